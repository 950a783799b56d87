#!/usr/bin/env node
// Collects *.test.ts files explicitly: Node 20 treats --test arguments as paths, Node 22 as globs,
// so passing a file list works on both.
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { spawnSync } from "node:child_process";

const root = new URL("..", import.meta.url).pathname;
const which = process.argv[2] ?? "all"; // all | unit | e2e
const roots = {
  unit: ["shared/src", "gpu-agent/src", "coordinator/src"],
  e2e: ["tests"],
};
const dirs = which === "all" ? [...roots.unit, ...roots.e2e] : roots[which];
if (!dirs) {
  console.error(`unknown test set ${which}: use all, unit or e2e`);
  process.exit(2);
}
const files = [];
function walk(dir) {
  for (const name of readdirSync(dir)) {
    if (name === "node_modules" || name === "dist" || name === "dist-test" || name === "bench") continue;
    const p = join(dir, name);
    if (statSync(p).isDirectory()) walk(p);
    else if (name.endsWith(".test.ts")) files.push(relative(root, p));
  }
}
for (const d of dirs) walk(join(root, d));
files.sort();
// Unit tests find the team kit only through LATENTFARM_KIT_FIXTURES (packages know no path outside
// the repository); the kit's usual place is beside the repository, as CI has it.
const env = { ...process.env };
const besideRepo = join(root, "..", "shared", "fixtures");
if (!env.LATENTFARM_KIT_FIXTURES && existsSync(besideRepo)) env.LATENTFARM_KIT_FIXTURES = besideRepo;
const r = spawnSync(process.execPath, ["--import", "tsx", "--test", "--test-reporter=spec", "--test-concurrency=1", ...files], {
  cwd: root,
  env,
  stdio: "inherit",
});
process.exit(r.status ?? 1);
