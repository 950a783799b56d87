#!/usr/bin/env node
// npm links the bins of dependencies and workspaces into node_modules/.bin, but not the root
// package's own. Linking ours there makes `npx latentfarm …` work right after `npm ci`.
import { chmodSync, mkdirSync, rmSync, symlinkSync } from "node:fs";
import { join } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const dir = join(root, "node_modules", ".bin");
mkdirSync(dir, { recursive: true });
const link = join(dir, "latentfarm");
rmSync(link, { force: true });
symlinkSync(join("..", "..", "bin", "latentfarm.js"), link);
chmodSync(join(root, "bin", "latentfarm.js"), 0o755);
