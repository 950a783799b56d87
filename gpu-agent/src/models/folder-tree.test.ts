import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { filesUnder } from "./folder-tree.js";

test("filesUnder follows links, each real folder once (a link loop ends), and leaves hidden entries out when asked", async () => {
  const dir = mkdtempSync(join(tmpdir(), "lf-tree-"));
  try {
    mkdirSync(join(dir, "a", "b"), { recursive: true });
    writeFileSync(join(dir, "a", "b", "x.pt"), "12");
    writeFileSync(join(dir, "a", ".hidden.pt"), "1");
    writeFileSync(join(dir, "a", "notes.txt"), "1");
    symlinkSync(dir, join(dir, "a", "b", "loop"));
    const pt = (name: string) => name.endsWith(".pt");
    assert.deepEqual(
      (await filesUnder(dir, pt, { skipHidden: true })).map((f) => [f.path, f.size]),
      [[join(dir, "a", "b", "x.pt"), 2]],
    );
    assert.deepEqual((await filesUnder(dir, pt)).map((f) => f.path).sort(), [join(dir, "a", ".hidden.pt"), join(dir, "a", "b", "x.pt")]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
