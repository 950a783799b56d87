import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import * as ort from "onnxruntime-node";
import { FarmError } from "@latentfarm/shared";
import { buildPipelineFromCheckpoint } from "./pipeline.js";
import { readSafetensors } from "./safetensors.js";
import { bytesToUnicode, makeTinyVocab } from "./tiny-tokenizer.js";
import { TINY_SPECS, ldmTensorShapes, makeTinyModel, makeTinyModelCli } from "./tiny-model.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const FIXTURE = kitFixture("tiny-sd15.safetensors");
const dir = mkdtempSync(join(tmpdir(), "tiny-test-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const sha = (p: string): string => createHash("sha256").update(readFileSync(p)).digest("hex");

test("same seed gives byte-identical files, another seed different weights", async () => {
  const a = await makeTinyModel({ outDir: join(dir, "a"), seed: 3 });
  const b = await makeTinyModel({ outDir: join(dir, "b"), seed: 3 });
  const c = await makeTinyModel({ outDir: join(dir, "c"), seed: 4, checkpointOnly: true });
  assert.equal(sha(a.checkpointPath), sha(b.checkpointPath));
  assert.notEqual(sha(a.checkpointPath), sha(c.checkpointPath));
  for (const f of [
    "unet/model.onnx",
    "unet/weights.pb",
    "text_encoder/model.onnx",
    "vae_decoder/model.onnx",
    "tokenizer/vocab.json",
    "model_index.json",
  ]) {
    assert.equal(sha(join(a.onnxDir!, f)), sha(join(b.onnxDir!, f)), f);
  }
});

test("the ONNX folder equals what the importer builds from the written checkpoint", async () => {
  const m = await makeTinyModel({ outDir: join(dir, "re"), seed: 8 });
  const out = join(dir, "re-import");
  await buildPipelineFromCheckpoint(m.checkpointPath, out, { ...m.hints, linkCheckpoint: false });
  for (const f of ["text_encoder/model.onnx", "unet/model.onnx", "unet/weights.pb", "vae_decoder/model.onnx", "vae_encoder/model.onnx"]) {
    assert.equal(sha(join(out, f)), sha(join(m.onnxDir!, f)), f);
  }
});

test("tokenizer: CLIP byte table, contiguous ids, BOS/EOS last, merges consistent, embedding rows match", async () => {
  const table = bytesToUnicode();
  assert.equal(new Set(table.values()).size, 256);
  assert.equal(table.get(0x21), "!");
  assert.equal(table.get(0), "\u0100");
  assert.equal(table.get(0x20), "\u0120");
  assert.equal([...table.values()][0], "!", "printable bytes come first");

  const m = await makeTinyModel({ outDir: join(dir, "tok"), seed: 1, checkpointOnly: true });
  const vocab = JSON.parse(readFileSync(join(m.tokenizerDir, "vocab.json"), "utf8")) as Record<string, number>;
  const ids = Object.values(vocab).sort((x, y) => x - y);
  assert.deepEqual(
    ids,
    ids.map((_, i) => i),
  );
  assert.equal(vocab["<|startoftext|>"], ids.length - 2);
  assert.equal(vocab["<|endoftext|>"], ids.length - 1);
  assert.equal(m.bosId, ids.length - 2);
  assert.equal(m.eosId, ids.length - 1);
  const merges = readFileSync(join(m.tokenizerDir, "merges.txt"), "utf8").trimEnd().split("\n");
  assert.equal(merges[0], "#version: 0.2");
  assert.ok(merges.length > 100);
  for (const line of merges.slice(1)) {
    const [l, r] = line.split(" ");
    assert.ok(l! in vocab && r! in vocab && l! + r! in vocab, line);
  }
  assert.ok("photo</w>" in vocab || "pho" in vocab, "merges learned words of the corpus");
  assert.equal(makeTinyVocab().size, ids.length);
  const f = await readSafetensors(m.checkpointPath);
  assert.deepEqual(f.info("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight").shape, [ids.length, 32]);
  await f.close();
});

test("sd15-topology has the fixture's keys and shapes (vocabulary size aside)", { skip: kitSkip("tiny-sd15.safetensors") }, async () => {
  const shapes = ldmTensorShapes(TINY_SPECS["sd15-topology"], 49408);
  const f = await readSafetensors(FIXTURE);
  try {
    assert.deepEqual([...shapes.keys()].sort(), f.keys().sort());
    for (const [k, s] of shapes) assert.deepEqual(s, [...f.info(k).shape], k);
  } finally {
    await f.close();
  }
});

test("the tiny model runs end to end: text encoder → UNet → VAE decoder at 8× the latent size", async () => {
  const m = await makeTinyModel({ outDir: join(dir, "run"), seed: 2, config: "small" });
  const te = await ort.InferenceSession.create(join(m.onnxDir!, "text_encoder", "model.onnx"));
  const ids = new Int32Array(77).fill(m.eosId);
  ids[0] = m.bosId;
  ids[1] = 5;
  const cond = (await te.run({ input_ids: new ort.Tensor("int32", ids, [1, 77]) })).last_hidden_state!;
  const unet = await ort.InferenceSession.create(join(m.onnxDir!, "unet", "model.onnx"));
  const eps = (
    await unet.run({
      sample: new ort.Tensor("float32", new Float32Array(4 * 5 * 3).fill(0.5), [1, 4, 5, 3]),
      timestep: new ort.Tensor("float32", new Float32Array([999]), [1]),
      encoder_hidden_states: cond,
    })
  ).out_sample!;
  assert.deepEqual(eps.dims, [1, 4, 5, 3]);
  assert.ok((eps.data as Float32Array).every(Number.isFinite));
  const dec = await ort.InferenceSession.create(join(m.onnxDir!, "vae_decoder", "model.onnx"));
  const img = (await dec.run({ latent_sample: eps })).sample!;
  assert.deepEqual(img.dims, [1, 3, 40, 24]);
  await Promise.all([te.release(), unet.release(), dec.release()]);
});

test("CLI arguments", async () => {
  const m = await makeTinyModelCli(["--out", join(dir, "cli"), "--seed", "9", "--config", "small"]);
  assert.ok(existsSync(join(m.onnxDir!, "tiny_config.json")));
  await assert.rejects(makeTinyModelCli(["--bogus"]), (e: unknown) => e instanceof FarmError && e.code === status.INVALID_ARGUMENT);
  await assert.rejects(makeTinyModelCli(["--seed", "1"]), /--out/);
  await assert.rejects(makeTinyModel({ outDir: join(dir, "x"), config: "huge" as "small" }), /unknown tiny config/);
});
