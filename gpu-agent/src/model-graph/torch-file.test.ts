import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { status } from "@grpc/grpc-js";
import { unzipSync, zipSync } from "fflate";
import { readTorchFile, TorchTensor } from "./torch-file.js";

// Written by test-support/embeddings/make-torch-embeddings.py in torch.save's zip layout.
const DIR = join(import.meta.dirname, "..", "test-support", "embeddings");
const read = (name: string) => readTorchFile(readFileSync(join(DIR, name)), name);
/** make-torch-embeddings.py's value(k): exact in float16 and float32. */
const value = (k: number) => (((k * 37) % 101) - 50) / 64;

test("an A1111 embedding file: dicts as Maps, a float32 tensor with its shape and values", () => {
  const data = read("a1111-style.pt") as Map<string, unknown>;
  assert.equal(data.get("name"), "a1111-style");
  assert.equal(data.get("step"), 500);
  const t = (data.get("string_to_param") as Map<string, unknown>).get("*");
  assert.ok(t instanceof TorchTensor);
  assert.equal(t.dtype, "float32");
  assert.deepEqual(t.shape, [2, 32]);
  assert.deepEqual(
    [...t.data],
    Array.from({ length: 64 }, (_, k) => value(k)),
  );
});

test("a ParameterDict of a float16 parameter stored transposed, past an offset into its storage", () => {
  const data = read("ldm-style.pt") as Map<string, unknown>;
  const dict = data.get("string_to_param") as { _parameters: Map<string, TorchTensor> };
  const t = dict._parameters.get("*")!;
  assert.equal(t.dtype, "float16");
  assert.deepEqual(t.shape, [3, 32]);
  // Element (i, j) is value(1000 + 32 i + j) whatever the storage order.
  assert.deepEqual(
    [...t.data],
    Array.from({ length: 96 }, (_, k) => value(1000 + k)),
  );
});

test("a diffusers concept: one 1-D tensor under its token", () => {
  const data = read("concept.bin") as Map<string, TorchTensor>;
  const t = data.get("<concept>")!;
  assert.deepEqual(t.shape, [32]);
  assert.deepEqual(
    [...t.data],
    Array.from({ length: 32 }, (_, k) => value(2000 + k)),
  );
});

test("a pickle that calls os.system is read as inert data, and runs nothing", () => {
  const marker = "/tmp/latentfarm-pickle-ran";
  rmSync(marker, { force: true });
  const data = read("runs-a-command.pt") as Map<string, Map<string, unknown>>;
  const call = data.get("string_to_param")!.get("*") as { args?: unknown[] };
  assert.ok(!(call instanceof TorchTensor));
  assert.deepEqual(call.args, ["touch /tmp/latentfarm-pickle-ran"]);
  assert.equal(existsSync(marker), false);
});

test("files that are not torch zip archives are INVALID_ARGUMENT naming the file", () => {
  const legacy = new Uint8Array([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8]);
  assert.throws(
    () => readTorchFile(legacy, "old.pt"),
    (e: Error & { code?: number }) => e.code === status.INVALID_ARGUMENT && /old\.pt: .*before 1\.6/.test(e.message),
  );
  const noPickle = zipSync({ "archive/version": new TextEncoder().encode("3\n") });
  assert.throws(() => readTorchFile(noPickle, "x.pt"), /without data\.pkl/);
  // A storage the pickle names but the archive lacks.
  const bytes = readFileSync(join(DIR, "a1111-style.pt"));
  const entries: Record<string, Uint8Array> = {};
  for (const [name, data] of Object.entries(unzipSync(bytes))) if (!name.endsWith("/data/0")) entries[name] = data;
  assert.throws(() => readTorchFile(zipSync(entries, { level: 0 }), "y.pt"), /storage 0 is missing/);
  // A pickle cut short.
  const cut = unzipSync(bytes);
  const pkl = Object.keys(cut).find((n) => n.endsWith("data.pkl"))!;
  cut[pkl] = cut[pkl]!.subarray(0, 40);
  assert.throws(() => readTorchFile(zipSync(cut, { level: 0 }), "z.pt"), /z\.pt: unreadable pickle/);
});
