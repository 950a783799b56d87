import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { silentLogger } from "@latentfarm/shared";
import { CheckpointHashes } from "./checkpoint-hashes.js";
import type { ModelEntry } from "./catalog.js";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "lf-hashes-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const autoV2 = (bytes: Buffer): string => createHash("sha256").update(bytes).digest("hex").slice(0, 10);

async function until<T>(f: () => Promise<T | undefined>): Promise<T> {
  for (const deadline = Date.now() + 10_000; ;) {
    const v = await f();
    if (v !== undefined) return v;
    assert.ok(Date.now() < deadline, "timed out");
    await new Promise((r) => setTimeout(r, 10));
  }
}

test("checkpoints are hashed in the background once; a changed file is hashed again; ONNX folders have no hash", async () => {
  const models = join(dir, "models");
  mkdirSync(models);
  const a = Buffer.alloc(3 << 20, 7);
  writeFileSync(join(models, "a.safetensors"), a);
  const entries: ModelEntry[] = [
    { name: "a", format: "safetensors", path: join(models, "a.safetensors") },
    { name: "onnx", format: "diffusers-onnx", path: join(models, "onnx") },
  ];
  const hashes = new CheckpointHashes(join(dir, "cache"), silentLogger, 0);
  try {
    // Nothing is known before the background hash has run: a heartbeat never waits for one.
    assert.deepEqual(await hashes.of(entries), new Map());
    assert.equal(await until(async () => (await hashes.of(entries)).get("a")), autoV2(a));
    assert.equal((await hashes.of(entries)).has("onnx"), false);
    // Another agent (or a restart) with the same cache knows it without reading the file.
    const again = new CheckpointHashes(join(dir, "cache"), silentLogger);
    assert.equal((await again.of(entries)).get("a"), autoV2(a));
    await again.close();
    const b = Buffer.alloc(1 << 20, 9);
    writeFileSync(join(models, "a.safetensors"), b);
    utimesSync(join(models, "a.safetensors"), new Date(), new Date(Date.now() + 10_000));
    assert.equal(await until(async () => (await hashes.of(entries)).get("a") === autoV2(b) || undefined), true);
  } finally {
    await hashes.close();
  }
});

test("close() stops a hash being read", async () => {
  const big = join(dir, "big.safetensors");
  writeFileSync(big, Buffer.alloc(64 << 20, 1));
  const hashes = new CheckpointHashes(join(dir, "cache-big"), silentLogger);
  await hashes.of([{ name: "big", format: "safetensors", path: big }]);
  await hashes.close();
  assert.deepEqual(await hashes.of([{ name: "big", format: "safetensors", path: big }]), new Map());
});
