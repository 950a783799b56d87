import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import * as ort from "onnxruntime-node";
import { ModelFileError } from "./errors.js";
import { readModel } from "./onnx-read.js";
import {
  LINK_NAME,
  MANIFEST_FILE,
  a1111LegacyModelHash,
  a1111ModelHash,
  buildPipelineFromCheckpoint,
  importCheckpoint,
  loraAddnetHash,
} from "./pipeline.js";
import { SeededRandom } from "./random.js";
import { writeSafetensors } from "./safetensors.js";
import { makeTinyModel } from "./tiny-model.js";
import { timestepFrequencies } from "./unet.js";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";

const FIXTURES = KIT_FIXTURES;
const CKPT = join(FIXTURES, "tiny-sd15.safetensors");
const REF = join(FIXTURES, "tiny-sd15");
const noFixtures = kitSkip("tiny-sd15.safetensors");

const dir = mkdtempSync(join(tmpdir(), "pipeline-test-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

async function compare(component: string, built: string, ...feedSets: Record<string, ort.Tensor>[]): Promise<void> {
  const mine = await ort.InferenceSession.create(join(built, component, "model.onnx"));
  const ref = await ort.InferenceSession.create(join(REF, component, "model.onnx"));
  try {
    assert.deepEqual([...mine.inputNames].sort(), [...ref.inputNames].sort(), `${component} inputs`);
    assert.deepEqual(mine.outputNames, ref.outputNames, `${component} outputs (names and order)`);
    for (const feeds of feedSets) {
      const a = await mine.run(feeds);
      const b = await ref.run(feeds);
      for (const name of ref.outputNames) {
        assert.deepEqual(a[name]!.dims, b[name]!.dims, `${component}.${name} dims`);
        const d = maxAbsDiff(a[name]!.data as Float32Array, b[name]!.data as Float32Array);
        assert.ok(d <= 1e-4, `${component}.${name}: max abs diff ${d}`);
      }
    }
  } finally {
    await mine.release();
    await ref.release();
  }
}

test("fixture checkpoint → built graphs equal the exported ONNX files (9×7 latent, batch 2)", { skip: noFixtures }, async () => {
  const out = join(dir, "fixture-build");
  const config = JSON.parse(readFileSync(join(REF, "tiny_config.json"), "utf8")) as { config: { heads: number; te: { heads: number } } };
  const built = await buildPipelineFromCheckpoint(CKPT, out, {
    unetHeads: config.config.heads,
    textHeads: config.config.te.heads,
    tokenizerDir: join(REF, "tokenizer"),
  });
  assert.equal(built.architecture.family, "sd1");
  assert.equal(built.architecture.inpainting, false);
  assert.deepEqual(built.unusedKeys, []);
  const rng = new SeededRandom(11);
  const [B, h, w] = [2, 9, 7];

  const ids = new Int32Array(B * 77).fill(49407);
  ids[0] = 49406;
  ids[77] = 49406;
  for (let i = 1; i < 12; i++) ids[i] = rng.int(49400);
  for (let i = 78; i < 78 + 30; i++) ids[i] = rng.int(49400);
  await compare("text_encoder", out, { input_ids: new ort.Tensor("int32", ids, [B, 77]) });

  const sample = new ort.Tensor("float32", rng.normalArray(B * 4 * h * w), [B, 4, h, w]);
  // 154 tokens (two chunks, as A1111 sends for long prompts).
  const context = new ort.Tensor("float32", rng.normalArray(B * 154 * 32), [B, 154, 32]);
  await compare(
    "unet",
    out,
    { sample, timestep: new ort.Tensor("float32", new Float32Array([999, 0.37]), [B]), encoder_hidden_states: context },
    // One timestep for the whole batch, as the diffusers pipeline passes it.
    { sample, timestep: new ort.Tensor("float32", new Float32Array([457.25]), [1]), encoder_hidden_states: context },
  );

  await compare("vae_decoder", out, { latent_sample: new ort.Tensor("float32", rng.normalArray(B * 4 * h * w), [B, 4, h, w]) });
  await compare("vae_encoder", out, {
    sample: new ort.Tensor("float32", rng.uniformArray(B * 3 * 8 * h * 8 * w, -1, 1), [B, 3, 8 * h, 8 * w]),
  });

  // Initializers carry the checkpoint's own key names.
  const unet = await readModel(join(out, "unet", "model.onnx"));
  assert.ok(
    unet.graph.initializers.some((t) => t.name === "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
  );
  // Weights are not copied: the UNet's external data points into a hard link of the checkpoint.
  assert.ok(existsSync(join(out, "unet", LINK_NAME)));
  assert.ok(!existsSync(join(out, "unet", "weights.pb")));
  assert.equal(built.manifest.components.unet?.externalBytes, 0);
  assert.ok(existsSync(join(out, "tokenizer", "vocab.json")));
  const index = JSON.parse(readFileSync(join(out, "model_index.json"), "utf8")) as Record<string, unknown>;
  assert.deepEqual(index.unet, ["diffusers", "OnnxRuntimeModel"]);
  const sched = JSON.parse(readFileSync(join(out, "scheduler", "scheduler_config.json"), "utf8")) as Record<string, unknown>;
  assert.equal(sched.prediction_type, "epsilon");
});

test("timestep frequencies equal the constant torch folded into the fixture UNet", { skip: noFixtures }, async () => {
  const m = await readModel(join(REF, "unet", "model.onnx"));
  const node = m.graph.nodes.find((n) => n.opType === "Constant" && n.outputs[0] === "/u/time_proj/Constant_1_output_0");
  const t = node?.attrs.value as { raw: Uint8Array } | undefined;
  assert.ok(t, "fixture constant present");
  const torch = new Float32Array(Uint8Array.from(t.raw).buffer);
  const mine = timestepFrequencies(32);
  // torch's float32 exp differs from the correctly rounded value by at most one ulp.
  for (let i = 0; i < 16; i++) assert.ok(Math.abs(mine[i]! - torch[i]!) <= Math.abs(torch[i]!) * 2 ** -22, `freq ${i}`);
});

test("importCheckpoint caches by sha256 and returns A1111 hashes", async () => {
  const tiny = await makeTinyModel({ outDir: join(dir, "tiny"), seed: 5, checkpointOnly: true });
  const cacheDir = join(dir, "cache");
  const opts = { cacheDir, ...tiny.hints, tokenizerDir: tiny.tokenizerDir };
  const first = await importCheckpoint(tiny.checkpointPath, opts);
  const sha = createHash("sha256").update(readFileSync(tiny.checkpointPath)).digest("hex");
  assert.equal(first.sha256, sha);
  assert.equal(first.modelHash, sha.slice(0, 10));
  assert.equal(first.cached, false);
  assert.ok(first.dir.startsWith(join(cacheDir, sha)));
  assert.ok(existsSync(join(first.dir, MANIFEST_FILE)));
  const second = await importCheckpoint(tiny.checkpointPath, opts);
  assert.equal(second.cached, true);
  assert.equal(second.dir, first.dir);
  assert.deepEqual(second.architecture, first.architecture);
  // Different build options are a different cache entry.
  const fp = await importCheckpoint(tiny.checkpointPath, { ...opts, prediction: "v_prediction" });
  assert.notEqual(fp.dir, first.dir);
  assert.equal(fp.manifest.prediction, "v_prediction");
  const s = await ort.InferenceSession.create(join(second.dir, "unet", "model.onnx"));
  assert.deepEqual([...s.inputNames].sort(), ["encoder_hidden_states", "sample", "timestep"]);
  await s.release();
  // The checkpoint rewritten in place with the same bytes (same hash, new mtime): the linked entry is rebuilt.
  writeFileSync(tiny.checkpointPath, readFileSync(tiny.checkpointPath));
  const rewritten = await importCheckpoint(tiny.checkpointPath, opts);
  assert.equal(rewritten.sha256, sha);
  assert.equal(rewritten.cached, false);
  assert.equal((await importCheckpoint(tiny.checkpointPath, opts)).cached, true);
});

test("an fp16 checkpoint: the linked build (fp16 initializers + Cast) computes exactly what the converted copy does", async () => {
  const tiny = await makeTinyModel({ outDir: join(dir, "half-ckpt"), seed: 6, checkpointOnly: true });
  const { readSafetensors } = await import("./safetensors.js");
  const { f32ToF16 } = await import("./half.js");
  const f = await readSafetensors(tiny.checkpointPath);
  const halves = new Map<string, { dtype: "F16"; shape: readonly number[]; data: Uint16Array }>();
  for (const k of f.keys()) halves.set(k, { dtype: "F16", shape: f.info(k).shape, data: f32ToF16(await f.float32(k)) });
  await f.close();
  const ckpt = join(dir, "half.safetensors");
  await writeSafetensors(ckpt, halves);
  const linked = await buildPipelineFromCheckpoint(ckpt, join(dir, "half-linked"), { ...tiny.hints, components: ["unet"] });
  const copied = await buildPipelineFromCheckpoint(ckpt, join(dir, "half-copied"), {
    ...tiny.hints,
    components: ["unet"],
    linkCheckpoint: false,
  });
  assert.ok(linked.manifest.components.unet!.linkedBytes > 0);
  assert.equal(copied.manifest.components.unet!.linkedBytes, 0);
  const lm = await readModel(join(dir, "half-linked", "unet", "model.onnx"));
  assert.equal(lm.graph.initializers.find((t) => t.name.endsWith("input_blocks.0.0.weight"))?.elemType, "float16");
  const cm = await readModel(join(dir, "half-copied", "unet", "model.onnx"));
  assert.equal(cm.graph.initializers.find((t) => t.name.endsWith("input_blocks.0.0.weight"))?.elemType, "float32");
  const rng = new SeededRandom(8);
  const feeds = {
    sample: new ort.Tensor("float32", rng.normalArray(4 * 5 * 7), [1, 4, 5, 7]),
    timestep: new ort.Tensor("float32", new Float32Array([500.5]), [1]),
    encoder_hidden_states: new ort.Tensor("float32", rng.normalArray(77 * 32), [1, 77, 32]),
  };
  const outs: Float32Array[] = [];
  for (const d of ["half-linked", "half-copied"]) {
    const s = await ort.InferenceSession.create(join(dir, d, "unet", "model.onnx"));
    outs.push((await s.run(feeds)).out_sample!.data as Float32Array);
    await s.release();
  }
  assert.ok(maxAbsDiff(outs[0]!, outs[1]!) <= 1e-6, `linked vs copied: ${maxAbsDiff(outs[0]!, outs[1]!)}`);
});

test("hash helpers", async () => {
  assert.equal(a1111ModelHash("6CE0161689B3853ACAA03779EC93EAFE75A02F4CED659BEE03F50797806FA2FA"), "6ce0161689");
  assert.throws(() => a1111ModelHash("abc"), RangeError);
  const p = join(dir, "hash.bin");
  const data = new Uint8Array(0x100000 + 0x10000 + 10).map((_, i) => i * 7);
  await writeSafetensors(join(dir, "lora.safetensors"), { a: { dtype: "U8", shape: [data.length], data } }, { x: "y" });
  const file = readFileSync(join(dir, "lora.safetensors"));
  const n = Number(file.readBigUInt64LE(0));
  assert.equal(
    await loraAddnetHash(join(dir, "lora.safetensors")),
    createHash("sha256")
      .update(file.subarray(8 + n))
      .digest("hex")
      .slice(0, 12),
  );
  writeFileSync(p, data);
  assert.equal(await a1111LegacyModelHash(p), createHash("sha256").update(data.subarray(0x100000, 0x110000)).digest("hex").slice(0, 8));
});

test("architecture detection: SD2 (OpenCLIP, linear proj), inpainting, v-prediction flag", async () => {
  const sd2 = await makeTinyModel({ outDir: join(dir, "sd2"), seed: 1, overrides: { family: "sd2" } });
  const a = sd2.pipeline!.architecture;
  assert.equal(a.family, "sd2");
  assert.equal(a.textEncoder.layout, "open-clip");
  assert.equal(a.textEncoder.layers, sd2.spec.textLayers, "the last OpenCLIP block is not used");
  assert.equal(a.textEncoder.activation, "gelu");
  assert.equal(a.unet.linearProjection, true);
  const te = await ort.InferenceSession.create(join(sd2.onnxDir!, "text_encoder", "model.onnx"));
  assert.ok(te.outputNames.includes(`hidden_states.${sd2.spec.textLayers}`));
  await te.release();

  const inpaint = await makeTinyModel({ outDir: join(dir, "inpaint"), seed: 1, checkpointOnly: true, overrides: { inChannels: 9 } });
  const built = await buildPipelineFromCheckpoint(inpaint.checkpointPath, join(dir, "inpaint-onnx"), {
    ...inpaint.hints,
    prediction: "v_prediction",
    components: ["unet"],
  });
  assert.equal(built.architecture.inpainting, true);
  assert.equal(built.architecture.prediction, "v_prediction");
  const u = await ort.InferenceSession.create(join(dir, "inpaint-onnx", "unet", "model.onnx"));
  const out = await u.run({
    sample: new ort.Tensor("float32", new Float32Array(9 * 5 * 6), [1, 9, 5, 6]),
    timestep: new ort.Tensor("float32", new Float32Array([10]), [1]),
    encoder_hidden_states: new ort.Tensor("float32", new Float32Array(77 * 32), [1, 77, 32]),
  });
  assert.deepEqual(out.out_sample!.dims, [1, 4, 5, 6]);
  await u.release();
});

test("non-checkpoints and incomplete checkpoints are rejected with the file named", async () => {
  const lora = join(dir, "a-lora.safetensors");
  await writeSafetensors(lora, { "lora_unet_x.lora_down.weight": { dtype: "F32", shape: [1, 1], data: new Float32Array(1) } });
  await assert.rejects(
    buildPipelineFromCheckpoint(lora, join(dir, "x")),
    (e: unknown) =>
      e instanceof ModelFileError && e.code === status.INVALID_ARGUMENT && /looks like a LoRA/.test(e.message) && e.message.includes(lora),
  );
  // A checkpoint missing one UNet tensor.
  const tiny = await makeTinyModel({ outDir: join(dir, "cut"), seed: 2, checkpointOnly: true });
  const { readSafetensors } = await import("./safetensors.js");
  const f = await readSafetensors(tiny.checkpointPath);
  const tensors = new Map<string, { dtype: "F32"; shape: readonly number[]; data: Float32Array }>();
  for (const k of f.keys())
    if (!k.endsWith("middle_block.1.proj_out.weight")) tensors.set(k, { dtype: "F32", shape: f.info(k).shape, data: await f.float32(k) });
  await f.close();
  const cut = join(dir, "cut.safetensors");
  await writeSafetensors(cut, tensors);
  await assert.rejects(
    buildPipelineFromCheckpoint(cut, join(dir, "z"), tiny.hints),
    (e: unknown) => e instanceof ModelFileError && /middle_block\.1\.proj_out\.weight/.test(e.message) && e.message.includes(cut),
  );
});

test("variants: fused MultiHeadAttention and fp16 builds match the plain float32 graph; external data on demand", async () => {
  const tiny = await makeTinyModel({ outDir: join(dir, "variants"), seed: 4, checkpointOnly: true });
  const build = (name: string, extra: object): Promise<unknown> =>
    buildPipelineFromCheckpoint(tiny.checkpointPath, join(dir, name), { ...tiny.hints, components: ["text_encoder", "unet"], ...extra });
  await build("plain", {});
  await build("fused", { fusedAttention: true });
  await build("half", { weightType: "float16", embedLimitBytes: 1000 });
  const rng = new SeededRandom(3);
  const feeds = {
    sample: new ort.Tensor("float32", rng.normalArray(2 * 4 * 7 * 5), [2, 4, 7, 5]),
    timestep: new ort.Tensor("float32", new Float32Array([981.7, 20.5]), [2]),
    encoder_hidden_states: new ort.Tensor("float32", rng.normalArray(2 * 77 * 32), [2, 77, 32]),
  };
  const run = async (name: string): Promise<Float32Array> => {
    const s = await ort.InferenceSession.create(join(dir, name, "unet", "model.onnx"));
    const out = (await s.run(feeds)).out_sample!;
    await s.release();
    assert.equal(out.type, "float32", "graph I/O stays float32");
    return out.data as Float32Array;
  };
  const plain = await run("plain");
  const fused = await run("fused");
  const half = await run("half");
  assert.ok(maxAbsDiff(plain, fused) <= 1e-4, `fused: ${maxAbsDiff(plain, fused)}`);
  const scale = plain.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const dHalf = maxAbsDiff(plain, half);
  assert.ok(dHalf > 0 && dHalf <= 2e-2 * scale, `fp16: ${dHalf} (scale ${scale})`);
  const fusedModel = await readModel(join(dir, "fused", "unet", "model.onnx"));
  assert.ok(fusedModel.graph.nodes.some((n) => n.opType === "MultiHeadAttention" && n.domain === "com.microsoft"));
  assert.equal(fusedModel.opsets["com.microsoft"], 1);
  const halfModel = await readModel(join(dir, "half", "unet", "model.onnx"));
  assert.equal(halfModel.graph.initializers.find((t) => t.name.endsWith("input_blocks.0.0.weight"))?.elemType, "float16");
  // With a tiny embed limit the text encoder's weights move to an external file, and still load.
  assert.ok(existsSync(join(dir, "half", "text_encoder", "weights.pb")));
  const te = await ort.InferenceSession.create(join(dir, "half", "text_encoder", "model.onnx"));
  const ids = new Int32Array(77).fill(tiny.eosId);
  ids[0] = tiny.bosId;
  const o = await te.run({ input_ids: new ort.Tensor("int32", ids, [1, 77]) });
  assert.equal(o.last_hidden_state!.type, "float32");
  await te.release();
});
