import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { SDXL_SCALING_FACTOR, detectArchitecture } from "./architecture.js";
import { f16ToF32, f32ToF16 } from "./half.js";
import { GraphBuilder, encodeModel } from "./onnx.js";
import { decodeModel, initializerFloat32, readModel } from "./onnx-read.js";
import { importCheckpointWithLoras, loadLora } from "./lora.js";
import { MANIFEST_FILE, buildPipelineFromCheckpoint, importCheckpoint } from "./pipeline.js";
import type { PipelineManifest } from "./pipeline.js";
import { SeededRandom } from "./random.js";
import { readSafetensors, writeSafetensors } from "./safetensors.js";
import { FULL_SIZE_SPECS, ldmTensorShapes, makeTinyModel, makeTinyModelCli, readTinyConfig } from "./tiny-model.js";
import type { TinyModel } from "./tiny-model.js";
import { TOKEN_OVERRIDE_POSITIONS, TOKEN_OVERRIDE_VECTORS, withTokenOverrides } from "./token-override.js";
import { TIME_IDS, TIME_ID_EMBED_DIM, sinusoidalEmbedding } from "./unet.js";
import { MemoryWeights } from "./weights.js";
import { buildTestUnet, fourierReference, maxAbsDiff, runGraph as run, tokenRows as rowsOf } from "../test-support/graphs.js";
import type { MemoryTensor } from "./weights.js";

const dir = mkdtempSync(join(tmpdir(), "sdxl-test-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const U = "model.diffusion_model.";
const TE2 = "conditioner.embedders.1.model.";
const SEQ = 77;

let tiny: TinyModel;
let tensors: Map<string, MemoryTensor>;
before(async () => {
  tiny = await makeTinyModel({ outDir: join(dir, "tiny"), seed: 3, config: "sdxl-small" });
  const f = await readSafetensors(tiny.checkpointPath);
  tensors = new Map();
  for (const k of f.keys()) tensors.set(k, { shape: f.info(k).shape, data: await f.float32(k) });
  await f.close();
});

const maxAbs = (a: ArrayLike<number>): number => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);

/** Token rows as the tiny tokenizer gives them: BOS, tokens, EOS, then `pad`. */
const tokenRows = (rows: number[][], pad: number): Int32Array => rowsOf(rows, pad, tiny, SEQ);

/** SDXL's extra UNet inputs for a batch of `timeIds.length / 6` rows. */
const conditioning = (textEmbeds: Float32Array, timeIds: Float32Array): Record<string, ort.Tensor> => ({
  text_embeds: new ort.Tensor("float32", textEmbeds, [timeIds.length / TIME_IDS, 48]),
  time_ids: new ort.Tensor("float32", timeIds, [timeIds.length / TIME_IDS, TIME_IDS]),
});

const unetFeeds = (rng: SeededRandom, batch: number, textEmbeds?: Float32Array, timeIds?: Float32Array): Record<string, ort.Tensor> => ({
  sample: new ort.Tensor("float32", rng.normalArray(batch * 4 * 6 * 5), [batch, 4, 6, 5]),
  timestep: new ort.Tensor("float32", new Float32Array(batch).fill(417.5), [batch]),
  encoder_hidden_states: new ort.Tensor("float32", rng.normalArray(batch * SEQ * 80), [batch, SEQ, 80]),
  ...(textEmbeds && timeIds ? conditioning(textEmbeds, timeIds) : {}),
});

/** The UNet alone, from the given tensors (the architecture check would refuse a base model without label_emb). */
test("detectArchitecture: SDXL base layout, per-block transformer depths, label_emb, both text encoders", () => {
  const w = new MemoryWeights(tensors, "tiny-sdxl");
  const a = detectArchitecture(w, tiny.hints);
  assert.equal(a.family, "sdxl");
  assert.equal(a.prediction, "epsilon");
  assert.equal(a.inpainting, false);
  assert.deepEqual(a.unet.attentionLevels, [false, true]);
  assert.deepEqual(a.unet.transformerDepths, [0, 2]);
  assert.equal(a.unet.middleTransformerDepth, 2);
  assert.equal(a.unet.transformerDepth, 2);
  assert.equal(a.unet.layersPerBlock, 2);
  assert.equal(a.unet.linearProjection, true);
  assert.equal(a.unet.contextDim, 32 + 48);
  assert.equal(a.unet.admInChannels, 48 + TIME_IDS * TIME_ID_EMBED_DIM);
  assert.deepEqual(a.unet.heads, [4, 4]);
  assert.deepEqual(
    { layout: a.textEncoder.layout, prefix: a.textEncoder.prefix, hidden: a.textEncoder.hidden, layers: a.textEncoder.layers },
    { layout: "hf-clip", prefix: "conditioner.embedders.0.transformer.text_model.", hidden: 32, layers: 2 },
  );
  assert.equal(a.textEncoder.projectionDim, undefined);
  assert.deepEqual(a.textEncoder2, {
    layout: "open-clip",
    prefix: TE2,
    vocabSize: tiny.vocabSize,
    hidden: 48,
    maxPositions: 77,
    layers: 3,
    heads: 4,
    activation: "gelu",
    projectionDim: 48,
  });
  // Without a head count the UNet's heads are 64 wide, as in SDXL; a head-width hint overrides it.
  assert.throws(() => detectArchitecture(w, { textHeads: 4, text2Heads: 4 }), /32 channels do not split into heads of 64/);
  assert.deepEqual(detectArchitecture(w, { ...tiny.hints, unetHeadDim: 16 }).unet.heads, [2, 4]);

  // Refiners (OpenCLIP-G alone under embedder 0) are detected and built: see sdxl-refiner.test.ts.
  // A UNet whose label_emb does not fit the text embeds and size conditioning.
  const wrong = new Map(tensors);
  wrong.set(`${U}label_emb.0.0.weight`, { shape: [128, 1000], data: new Float32Array(128 * 1000) });
  assert.throws(() => detectArchitecture(new MemoryWeights(wrong, "x"), tiny.hints), /label_emb takes 1000 features/);
});

test("detectArchitecture on SDXL base's real shapes: 64-wide heads, depths [0, 2, 10], 2048 context, 2816 adm", () => {
  const spec = FULL_SIZE_SPECS.sdxl;
  const shapes = ldmTensorShapes(spec, 49408);
  assert.deepEqual(shapes.get(`${U}label_emb.0.0.weight`), [1280, 2816]);
  assert.deepEqual(shapes.get(`${U}output_blocks.2.2.conv.weight`), [1280, 1280, 3, 3]);
  // Detection reads shapes only.
  const w = new MemoryWeights(new Map([...shapes].map(([k, shape]) => [k, { shape, data: new Float32Array(0) }])), "sdxl-base");
  const a = detectArchitecture(w);
  assert.equal(a.family, "sdxl");
  assert.deepEqual(a.unet.heads, [5, 10, 20]);
  assert.deepEqual(a.unet.transformerDepths, [0, 2, 10]);
  assert.equal(a.unet.middleTransformerDepth, 10);
  assert.equal(a.unet.contextDim, 2048);
  assert.equal(a.unet.admInChannels, 2816);
  assert.equal(a.unet.timeEmbedDim, 1280);
  assert.deepEqual([a.textEncoder.heads, a.textEncoder.layers, a.textEncoder.activation], [12, 12, "quick_gelu"]);
  assert.deepEqual([a.textEncoder2?.heads, a.textEncoder2?.layers, a.textEncoder2?.projectionDim], [20, 32, 1280]);
});

test("SD1/SD2 keep their layout: one depth per level, no second text encoder, no label_emb", async () => {
  const sd1 = await makeTinyModel({ outDir: join(dir, "sd1"), seed: 3, config: "small" });
  const a = sd1.pipeline!.architecture;
  assert.equal(a.family, "sd1");
  assert.equal(a.textEncoder2, undefined);
  assert.deepEqual(a.unet.transformerDepths, [1, 0]);
  assert.equal(a.unet.middleTransformerDepth, 1);
  assert.equal(a.unet.admInChannels, 0);
  assert.ok(!existsSync(join(sd1.onnxDir!, "text_encoder_2")));
  assert.ok(!existsSync(join(sd1.onnxDir!, "tokenizer_2")));
  assert.ok(!existsSync(join(sd1.onnxDir!, "vae_decoder", "config.json")));
  const index = JSON.parse(readFileSync(join(sd1.onnxDir!, "model_index.json"), "utf8")) as Record<string, unknown>;
  assert.equal(index._class_name, "OnnxStableDiffusionPipeline");
  assert.ok(!("text_encoder_2" in index));
  assert.equal((await readTinyConfig(sd1.onnxDir!)).text2Heads, undefined);
  const unet = await ort.InferenceSession.create(join(sd1.onnxDir!, "unet", "model.onnx"));
  assert.deepEqual([...unet.inputNames], ["sample", "timestep", "encoder_hidden_states"]);
  await unet.release();
});

test("the built folder: model_index, manifest, VAE scale, scheduler, tokenizer_2, tiny_config", async () => {
  const out = tiny.onnxDir!;
  const index = JSON.parse(readFileSync(join(out, "model_index.json"), "utf8")) as Record<string, unknown>;
  assert.equal(index._class_name, "ORTStableDiffusionXLPipeline");
  for (const c of ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"])
    assert.deepEqual(index[c], ["diffusers", "OnnxRuntimeModel"], c);
  assert.deepEqual(index.tokenizer_2, ["transformers", "CLIPTokenizer"]);
  const manifest = JSON.parse(readFileSync(join(out, MANIFEST_FILE), "utf8")) as PipelineManifest;
  assert.equal(manifest.family, "sdxl");
  assert.equal(manifest.architecture.textEncoder2?.projectionDim, 48);
  assert.ok(manifest.components.text_encoder_2 && manifest.components.text_encoder_2.initializers > 0);
  assert.deepEqual(JSON.parse(readFileSync(join(out, "vae_decoder", "config.json"), "utf8")), {
    scaling_factor: SDXL_SCALING_FACTOR,
    latent_channels: 4,
  });
  assert.equal(SDXL_SCALING_FACTOR, 0.13025);
  const sched = JSON.parse(readFileSync(join(out, "scheduler", "scheduler_config.json"), "utf8")) as Record<string, unknown>;
  assert.equal(sched._class_name, "EulerDiscreteScheduler");
  assert.equal(sched.prediction_type, "epsilon");
  assert.deepEqual(readFileSync(join(out, "tokenizer_2", "vocab.json")), readFileSync(join(out, "tokenizer", "vocab.json")));
  assert.equal(
    (JSON.parse(readFileSync(join(out, "tokenizer_2", "special_tokens_map.json"), "utf8")) as { pad_token: string }).pad_token,
    "!",
  );
  // OpenCLIP's logit_scale is for contrastive training only.
  assert.deepEqual(tiny.pipeline!.unusedKeys, [`${TE2}logit_scale`]);
  assert.equal(tiny.hints.text2Heads, 4);
  const config = await readTinyConfig(out);
  assert.equal(config.text2Heads, 4);
  assert.equal(config.config, "sdxl-small");
});

test("the CLI makes the SDXL tiny model, the same bytes for the same seed", async () => {
  const a = await makeTinyModelCli(["--out", join(dir, "cli-a"), "--seed", "5", "--config", "sdxl-small"]);
  const b = await makeTinyModelCli(["--out", join(dir, "cli-b"), "--seed", "5", "--config", "sdxl-small"]);
  for (const f of ["tiny-sdxl-small.safetensors", "onnx/text_encoder_2/model.onnx", "onnx/unet/model.onnx", "onnx/unet/weights.pb"])
    assert.deepEqual(readFileSync(join(dir, "cli-a", f)), readFileSync(join(dir, "cli-b", f)), f);
  assert.equal(a.spec.family, "sdxl");
  assert.deepEqual(a.hints, b.hints);
});

test("text_encoder_2: text_embeds = ln_final(all layers)[first argmax of ids] @ text_projection; every hidden state", async () => {
  // Row 0 pads with EOS (several argmax hits: the first counts), row 1 with 0 as OpenCLIP does.
  const ids = new Int32Array([...tokenRows([[5, 9]], tiny.eosId), ...tokenRows([[7, 300, 11, 12, 40]], 0)]);
  const path = join(tiny.onnxDir!, "text_encoder_2", "model.onnx");
  const s = await ort.InferenceSession.create(path);
  assert.deepEqual([...s.inputNames], ["input_ids"]);
  assert.deepEqual(
    [...s.outputNames],
    ["text_embeds", "last_hidden_state", "hidden_states.0", "hidden_states.1", "hidden_states.2", "hidden_states.3"],
  );
  const o = await s.run({ input_ids: new ort.Tensor("int32", ids, [2, SEQ]) });
  await s.release();
  assert.deepEqual(o.text_embeds!.dims, [2, 48]);
  assert.deepEqual(o.last_hidden_state!.dims, [2, SEQ, 48]);
  const last = o.last_hidden_state!.data as Float32Array;
  const proj = tensors.get(`${TE2}text_projection`)!.data;
  const embeds = o.text_embeds!.data as Float32Array;
  for (const [row, eos] of [
    [0, 3],
    [1, 6],
  ] as const) {
    const x = last.subarray((row * SEQ + eos) * 48, (row * SEQ + eos + 1) * 48);
    const want = new Float64Array(48);
    for (let j = 0; j < 48; j++) for (let i = 0; i < 48; i++) want[j]! += x[i]! * proj[i * 48 + j]!;
    const d = maxAbsDiff(embeds.subarray(row * 48, (row + 1) * 48), want);
    assert.ok(d <= 1e-5, `row ${row}: ${d}`);
  }
  // last_hidden_state is ln_final of the last layer's output (no layer is dropped, unlike SD2).
  const top = o["hidden_states.3"]!.data as Float32Array;
  const [gamma, beta] = [tensors.get(`${TE2}ln_final.weight`)!.data, tensors.get(`${TE2}ln_final.bias`)!.data];
  for (let t = 0; t < 2 * SEQ; t++) {
    const v = top.subarray(t * 48, (t + 1) * 48);
    const mean = v.reduce((a, b) => a + b, 0) / 48;
    const variance = v.reduce((a, b) => a + (b - mean) ** 2, 0) / 48;
    const want = Array.from(v, (x, i) => ((x - mean) / Math.sqrt(variance + 1e-5)) * gamma[i]! + beta[i]!);
    const d = maxAbsDiff(last.subarray(t * 48, (t + 1) * 48), want);
    assert.ok(d <= 1e-4, `token ${t}: ${d}`);
  }
});

test("in-graph sinusoidal embedding of time_ids: [cos, sin] per id, as sgm computes it in float32", async () => {
  const g = new GraphBuilder("fourier");
  const x = g.input("x", "float32", ["batch", TIME_IDS]);
  g.output(sinusoidalEmbedding(g, x, TIME_ID_EMBED_DIM), "y", "float32", ["batch", TIME_IDS * TIME_ID_EMBED_DIM]);
  const values = new Float32Array([1024, 1024, 0, 0, 1024, 1024, 832, 1216, 37, 64, 896, 1152.5]);
  const y = (await run(encodeModel(g.toSpec()).toBytes(), { x: new ort.Tensor("float32", values, [2, TIME_IDS]) })).y!;
  assert.deepEqual(y.dims, [2, TIME_IDS * TIME_ID_EMBED_DIM]);
  const got = y.data as Float32Array;
  let worst = 0;
  let worstExact = 0;
  for (let k = 0; k < values.length; k++) {
    const ref = fourierReference(values[k]!, TIME_ID_EMBED_DIM);
    const block = got.subarray(k * TIME_ID_EMBED_DIM, (k + 1) * TIME_ID_EMBED_DIM);
    worst = Math.max(worst, maxAbsDiff(block, ref));
    // Against the exact (float64 throughout) embedding the float32 arguments cost up to |x·f|·2⁻²⁴.
    const exact = Array.from({ length: TIME_ID_EMBED_DIM }, (_, i) => {
      const arg = values[k]! * Math.exp((-Math.log(10000) * (i % 128)) / 128);
      return i < 128 ? Math.cos(arg) : Math.sin(arg);
    });
    worstExact = Math.max(worstExact, maxAbsDiff(block, exact));
  }
  assert.ok(worst <= 1e-5, `vs float32-argument reference: ${worst}`);
  assert.ok(worstExact <= 3e-4, `vs exact: ${worstExact}`);
});

test("UNet: text_embeds and time_ids condition the output", async () => {
  const path = join(tiny.onnxDir!, "unet", "model.onnx");
  const s = await ort.InferenceSession.create(path);
  assert.deepEqual([...s.inputNames], ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]);
  assert.deepEqual([...s.outputNames], ["out_sample"]);
  const rng = new SeededRandom(4);
  const embeds = rng.normalArray(2 * 48);
  const ids = new Float32Array([1024, 1024, 0, 0, 1024, 1024, 768, 1344, 0, 0, 768, 1344]);
  const feeds = unetFeeds(rng, 2, embeds, ids);
  const base = (await s.run(feeds)).out_sample!;
  assert.deepEqual(base.dims, [2, 4, 6, 5]);
  const other = await s.run({ ...feeds, text_embeds: new ort.Tensor("float32", rng.normalArray(2 * 48), [2, 48]) });
  const moved = await s.run({
    ...feeds,
    time_ids: new ort.Tensor(
      "float32",
      ids.map((v, i) => (i === 2 ? 64 : v)),
      [2, TIME_IDS],
    ),
  });
  await s.release();
  const b = base.data as Float32Array;
  assert.ok(maxAbsDiff(b, other.out_sample!.data as Float32Array) > 1e-3, "text_embeds change the output");
  // Only row 0's crop changed: row 1 keeps its output.
  const m = moved.out_sample!.data as Float32Array;
  const half = b.length / 2;
  assert.ok(maxAbsDiff(b.subarray(0, half), m.subarray(0, half)) > 1e-3, "time_ids change the output");
  assert.ok(maxAbsDiff(b.subarray(half), m.subarray(half)) <= 1e-6, "rows are conditioned independently");
});

test("UNet label_emb: emb = time_embed(t) + label_emb(y), checked against a UNet without label_emb", async () => {
  const rng = new SeededRandom(9);
  const temb = tensors.get(`${U}time_embed.2.bias`)!;
  const withoutLabel = (extraBias: ArrayLike<number>): Map<string, MemoryTensor> => {
    const t = new Map([...tensors].filter(([k]) => !k.startsWith(`${U}label_emb.`)));
    t.set(`${U}time_embed.2.bias`, { shape: temb.shape, data: temb.data.map((v, i) => v + extraBias[i]!) });
    return t;
  };
  const ted = temb.shape[0]!;
  const adm = 48 + TIME_IDS * TIME_ID_EMBED_DIM;

  // 1. A zero last layer: label_emb(y) is its bias b whatever y is.
  const b = rng.normalArray(ted, 0.3);
  const zeroed = new Map(tensors);
  zeroed.set(`${U}label_emb.0.2.weight`, { shape: [ted, ted], data: new Float32Array(ted * ted) });
  zeroed.set(`${U}label_emb.0.2.bias`, { shape: [ted], data: b });
  const a = await buildTestUnet(dir, "label-zero", zeroed);
  const plain = await buildTestUnet(dir, "label-none", withoutLabel(b));
  const plainModel = await ort.InferenceSession.create(plain);
  assert.deepEqual([...plainModel.inputNames], ["sample", "timestep", "encoder_hidden_states"], "no label_emb, no extra inputs");
  await plainModel.release();
  const feeds = unetFeeds(rng, 2);
  const ids = new Float32Array([1024, 1024, 0, 0, 1024, 1024, 832, 1216, 32, 16, 832, 1216]);
  const got = (await run(a, { ...feeds, ...conditioning(rng.normalArray(96), ids) })).out_sample!;
  const want = (await run(plain, feeds)).out_sample!;
  let d = maxAbsDiff(got.data as Float32Array, want.data as Float32Array);
  assert.ok(d <= 1e-5, `zeroed label_emb: ${d}`);

  // 2. Selected features of y pass through: hidden unit r = silu(y[k_r]), label = Σ c_r·silu(y[k_r]) + b2.
  const picks = [5, 48 + 3, 48 + 2 * 256 + 128 + 72, 48 + 5 * 256 + 128 + 7, 48 + 1 * 256 + 127];
  const w0 = new Float32Array(ted * adm);
  picks.forEach((k, r) => (w0[r * adm + k] = 1));
  const w2 = new Float32Array(ted * ted);
  const c = picks.map(() => rng.normalArray(ted, 0.5));
  c.forEach((col, r) => col.forEach((v, i) => (w2[i * ted + r] = v)));
  const b2 = rng.normalArray(ted, 0.1);
  const select = new Map(tensors);
  select.set(`${U}label_emb.0.0.weight`, { shape: [ted, adm], data: w0 });
  select.set(`${U}label_emb.0.0.bias`, { shape: [ted], data: new Float32Array(ted) });
  select.set(`${U}label_emb.0.2.weight`, { shape: [ted, ted], data: w2 });
  select.set(`${U}label_emb.0.2.bias`, { shape: [ted], data: b2 });
  const embeds = rng.normalArray(48);
  const one = new Float32Array([896, 1152, 48, 24, 1024, 1024]);
  const y = new Float64Array(adm);
  y.set(embeds);
  one.forEach((v, j) => y.set(fourierReference(v, TIME_ID_EMBED_DIM), 48 + j * TIME_ID_EMBED_DIM));
  const label = Float64Array.from(b2);
  const silu = (v: number): number => v / (1 + Math.exp(-v));
  picks.forEach((k, r) => c[r]!.forEach((v, i) => (label[i]! += v * silu(y[k]!))));
  const sel = await buildTestUnet(dir, "label-select", select);
  const shifted = await buildTestUnet(dir, "label-shifted", withoutLabel(label));
  const single = unetFeeds(rng, 1);
  const got2 = (await run(sel, { ...single, ...conditioning(embeds, one) })).out_sample!;
  const want2 = (await run(shifted, single)).out_sample!;
  d = maxAbsDiff(got2.data as Float32Array, want2.data as Float32Array);
  assert.ok(d <= 1e-5, `selected features: ${d}`);
  // The check has teeth: text_embeds[5] moves the output.
  const nudged = Float32Array.from(embeds, (v, i) => (i === 5 ? v + 1 : v));
  const got3 = (await run(sel, { ...single, ...conditioning(nudged, one) })).out_sample!;
  assert.ok(maxAbsDiff(got3.data as Float32Array, want2.data as Float32Array) > 1e-3);
});

test("end to end: both encoders' penultimate states → UNet → VAE decoder", async () => {
  const ids = tokenRows([[5, 9, 14]], tiny.eosId);
  const te1 = await run(join(tiny.onnxDir!, "text_encoder", "model.onnx"), { input_ids: new ort.Tensor("int32", ids, [1, SEQ]) });
  assert.ok("pooler_output" in te1 && "hidden_states.2" in te1, "CLIP-L keeps pooler_output and all its layers");
  const te2 = await run(join(tiny.onnxDir!, "text_encoder_2", "model.onnx"), { input_ids: new ort.Tensor("int32", ids, [1, SEQ]) });
  const a = te1["hidden_states.1"]!.data as Float32Array;
  const b = te2["hidden_states.2"]!.data as Float32Array;
  const context = new Float32Array(SEQ * 80);
  for (let t = 0; t < SEQ; t++) {
    context.set(a.subarray(t * 32, (t + 1) * 32), t * 80);
    context.set(b.subarray(t * 48, (t + 1) * 48), t * 80 + 32);
  }
  const eps = (
    await run(join(tiny.onnxDir!, "unet", "model.onnx"), {
      sample: new ort.Tensor("float32", new Float32Array(4 * 5 * 3).fill(0.5), [1, 4, 5, 3]),
      timestep: new ort.Tensor("float32", new Float32Array([999]), [1]),
      encoder_hidden_states: new ort.Tensor("float32", context, [1, SEQ, 80]),
      text_embeds: te2.text_embeds!,
      time_ids: new ort.Tensor("float32", new Float32Array([1024, 1024, 0, 0, 1024, 1024]), [1, 6]),
    })
  ).out_sample!;
  assert.ok((eps.data as Float32Array).every(Number.isFinite));
  const img = (await run(join(tiny.onnxDir!, "vae_decoder", "model.onnx"), { latent_sample: eps })).sample!;
  assert.deepEqual(img.dims, [1, 3, 40, 24]);
});

test("fp16 (weightType float16) and fused-attention builds of text_encoder_2 and UNet match the float32 graphs", async () => {
  const out = join(dir, "half");
  const built = await buildPipelineFromCheckpoint(tiny.checkpointPath, out, {
    ...tiny.hints,
    weightType: "float16",
    components: ["text_encoder_2", "unet"],
  });
  assert.equal(built.manifest.weightType, "float16");
  assert.ok(!existsSync(join(out, "text_encoder")) && !existsSync(join(out, "vae_decoder", "config.json")));
  const unetModel = await readModel(join(out, "unet", "model.onnx"));
  assert.equal(unetModel.graph.initializers.find((t) => t.name === `${U}label_emb.0.0.weight`)?.elemType, "float16");
  assert.ok(
    unetModel.graph.inputs.every((i) => i.elemType === "float32"),
    "graph inputs stay float32",
  );

  const ids = tokenRows([[5, 9, 14]], 0);
  const te = async (d: string): Promise<Record<string, ort.Tensor>> =>
    run(join(d, "text_encoder_2", "model.onnx"), { input_ids: new ort.Tensor("int32", ids, [1, SEQ]) });
  const [full, half] = [await te(tiny.onnxDir!), await te(out)];
  assert.equal(half.text_embeds!.type, "float32");
  for (const name of ["text_embeds", "last_hidden_state", "hidden_states.3"]) {
    const [x, y] = [full[name]!.data as Float32Array, half[name]!.data as Float32Array];
    assert.ok(maxAbsDiff(x, y) <= 2e-2 * maxAbs(x), `${name}: ${maxAbsDiff(x, y)}`);
  }
  const rng = new SeededRandom(12);
  const feeds = unetFeeds(rng, 2, rng.normalArray(96), new Float32Array([1024, 1024, 0, 0, 1024, 1024, 832, 1216, 32, 16, 832, 1216]));
  const [x, y] = [
    (await run(join(tiny.onnxDir!, "unet", "model.onnx"), feeds)).out_sample!.data as Float32Array,
    (await run(join(out, "unet", "model.onnx"), feeds)).out_sample!.data as Float32Array,
  ];
  const d = maxAbsDiff(x, y);
  assert.ok(d > 0 && d <= 2e-2 * maxAbs(x), `unet fp16: ${d} (scale ${maxAbs(x)})`);
  // And with com.microsoft MultiHeadAttention.
  const fused = join(dir, "fused");
  await buildPipelineFromCheckpoint(tiny.checkpointPath, fused, { ...tiny.hints, fusedAttention: true, components: ["unet"] });
  const z = (await run(join(fused, "unet", "model.onnx"), feeds)).out_sample!.data as Float32Array;
  assert.ok(maxAbsDiff(x, z) <= 1e-4, `unet fused: ${maxAbsDiff(x, z)}`);
});

/** Runs a token-override model with `vectors` at `at`, as the runtime feeds it. */
async function runOverrides(
  model: string | Uint8Array,
  ids: Int32Array,
  at: number[][],
  vectors: Float32Array,
  hidden: number,
): Promise<Record<string, ort.Tensor>> {
  return run(model, {
    input_ids: new ort.Tensor("int32", ids, [ids.length / SEQ, SEQ]),
    [TOKEN_OVERRIDE_POSITIONS]: new ort.Tensor("int64", BigInt64Array.from(at.flat(), BigInt), [at.length, 2]),
    [TOKEN_OVERRIDE_VECTORS]: new ort.Tensor("float32", vectors, [at.length, hidden]),
  });
}

async function checkOverrides(modelPath: string, tokenTable: Float32Array, hidden: number, outputs: readonly string[]): Promise<void> {
  const bytes = readFileSync(modelPath);
  const patched = withTokenOverrides(bytes, modelPath);
  let model: string | Uint8Array = patched.model;
  if (patched.externalData) {
    // External data is named relative to the model's folder.
    model = join(modelPath, "..", "model.token-overrides.onnx");
    writeFileSync(model, patched.model);
  }
  const vectorsInput = decodeModel(patched.model).graph.inputs.find((i) => i.name === TOKEN_OVERRIDE_VECTORS);
  assert.equal(vectorsInput?.elemType, "float32");
  // Token 300 at position 2 of row 1, written as the table's own row for token 300: the same encoding.
  const placeholder = new Int32Array([...tokenRows([[5, 9]], 0), ...tokenRows([[7, 1, 11]], 0)]);
  const direct = new Int32Array([...tokenRows([[5, 9]], 0), ...tokenRows([[7, 300, 11]], 0)]);
  const want = await run(modelPath, { input_ids: new ort.Tensor("int32", direct, [2, SEQ]) });
  const got = await runOverrides(model, placeholder, [[1, 2]], tokenTable.slice(300 * hidden, 301 * hidden), hidden);
  for (const name of outputs) assert.deepEqual(got[name]!.data, want[name]!.data, name);
  const none = await runOverrides(model, direct, [], new Float32Array(0), hidden);
  for (const name of outputs) assert.deepEqual(none[name]!.data, want[name]!.data, `${name} without overrides`);
}

test("token overrides patch text_encoder_2, also when an fp16 checkpoint's table is Cast in the graph", async () => {
  const table2 = tensors.get(`${TE2}token_embedding.weight`)!.data;
  const table1 = tensors.get("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight")!.data;
  const te2Outputs = ["text_embeds", "last_hidden_state", "hidden_states.0", "hidden_states.2"];
  await checkOverrides(join(tiny.onnxDir!, "text_encoder_2", "model.onnx"), table2, 48, te2Outputs);

  // A linked build of an fp16 checkpoint keeps the fp16 table and casts it to float32.
  const halves = new Map<string, { dtype: "F16"; shape: readonly number[]; data: Uint16Array }>();
  for (const [k, t] of tensors) halves.set(k, { dtype: "F16", shape: t.shape, data: f32ToF16(t.data) });
  const ckpt = join(dir, "half-ckpt.safetensors");
  await writeSafetensors(ckpt, halves);
  const out = join(dir, "half-linked");
  const built = await buildPipelineFromCheckpoint(ckpt, out, { ...tiny.hints, components: ["text_encoder", "text_encoder_2"] });
  assert.ok(built.manifest.components.text_encoder_2!.linkedBytes > 0);
  const m = await readModel(join(out, "text_encoder_2", "model.onnx"));
  assert.equal(m.graph.initializers.find((t) => t.name === `${TE2}token_embedding.weight`)?.elemType, "float16");
  const rounded = (t: Float32Array): Float32Array => f16ToF32(f32ToF16(t));
  await checkOverrides(join(out, "text_encoder_2", "model.onnx"), rounded(table2), 48, te2Outputs);
  await checkOverrides(join(out, "text_encoder", "model.onnx"), rounded(table1), 32, ["last_hidden_state", "pooler_output"]);
});

test("importCheckpoint: SDXL builds and caches every component, text2Heads in the cache key", async () => {
  const cacheDir = join(dir, "cache");
  const opts = { cacheDir, ...tiny.hints, tokenizerDir: tiny.tokenizerDir };
  const first = await importCheckpoint(tiny.checkpointPath, opts);
  assert.equal(first.cached, false);
  assert.equal(first.manifest.family, "sdxl");
  for (const c of ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"])
    assert.ok(existsSync(join(first.dir, c, "model.onnx")), c);
  assert.ok(first.manifest.components.text_encoder_2!.linkedBytes > 0);
  const second = await importCheckpoint(tiny.checkpointPath, opts);
  assert.equal(second.cached, true);
  assert.deepEqual(second.architecture, first.architecture);
  const other = await importCheckpoint(tiny.checkpointPath, { ...opts, text2Heads: 2 });
  assert.notEqual(other.dir, first.dir);
  assert.equal(other.architecture.textEncoder2?.heads, 2);
});

// ---- LoRAs ------------------------------------------------------------------------------------------

const T1 = "conditioner.embedders.0.transformer.text_model.";

/** Reference up·down product, written independently of lora.ts. */
function product(up: Float32Array, down: Float32Array, out: number, rank: number): Float64Array {
  const cols = down.length / rank;
  const res = new Float64Array(out * cols);
  for (let i = 0; i < out; i++)
    for (let j = 0; j < cols; j++) for (let r = 0; r < rank; r++) res[i * cols + j]! += up[i * rank + r]! * down[r * cols + j]!;
  return res;
}

/** [layer, target key, out, in, first row of the target it changes]. */
const SDXL_LORA: [string, string, number, number, number][] = [
  // sgm names, as kohya's SDXL trainer writes them.
  ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", `${U}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`, 64, 64, 0],
  ["lora_unet_output_blocks_2_1_proj_in", `${U}output_blocks.2.1.proj_in.weight`, 64, 64, 0],
  ["lora_unet_middle_block_1_transformer_blocks_1_ff_net_2", `${U}middle_block.1.transformer_blocks.1.ff.net.2.weight`, 64, 256, 0],
  // diffusers names (3 resnets per level in the output blocks, 2 in the input blocks).
  [
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_k",
    `${U}input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight`,
    64,
    80,
    0,
  ],
  ["lora_unet_add_embedding_linear_2", `${U}label_emb.0.2.weight`, 128, 128, 0],
  ["lora_te1_text_model_encoder_layers_1_self_attn_q_proj", `${T1}encoder.layers.1.self_attn.q_proj.weight`, 32, 32, 0],
  ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj", `${TE2}transformer.resblocks.0.attn.in_proj_weight`, 48, 48, 0],
  ["lora_te2_text_model_encoder_layers_2_self_attn_k_proj", `${TE2}transformer.resblocks.2.attn.in_proj_weight`, 48, 48, 48],
  ["lora_te2_text_model_encoder_layers_1_self_attn_v_proj", `${TE2}transformer.resblocks.1.attn.in_proj_weight`, 48, 48, 96],
  ["lora_te2_text_model_encoder_layers_1_self_attn_out_proj", `${TE2}transformer.resblocks.1.attn.out_proj.weight`, 48, 48, 0],
  ["lora_te2_text_model_encoder_layers_0_mlp_fc1", `${TE2}transformer.resblocks.0.mlp.c_fc.weight`, 96, 48, 0],
  ["lora_te2_text_model_encoder_layers_2_mlp_fc2", `${TE2}transformer.resblocks.2.mlp.c_proj.weight`, 48, 96, 0],
];

test("SDXL LoRAs (kohya te1/te2/unet names) merge into both text encoders and the UNet", async () => {
  const rng = new SeededRandom(31);
  const rank = 4;
  const file: Record<string, { dtype: "F32"; shape: number[]; data: Float32Array }> = {};
  const add = (layer: string, out: number, inp: number, alpha: number): void => {
    file[`${layer}.lora_up.weight`] = { dtype: "F32", shape: [out, rank], data: rng.normalArray(out * rank, 0.3) };
    file[`${layer}.lora_down.weight`] = { dtype: "F32", shape: [rank, inp], data: rng.normalArray(rank * inp, 0.3) };
    file[`${layer}.alpha`] = { dtype: "F32", shape: [], data: new Float32Array([alpha]) };
  };
  SDXL_LORA.forEach(([layer, , out, inp], i) => add(layer, out, inp, 1 + i));
  // A1111 matches SD1-style text-encoder names to nothing on SDXL.
  add("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, 1);
  const loraPath = join(dir, "xl-lora.safetensors");
  await writeSafetensors(loraPath, file);

  const arch = detectArchitecture(new MemoryWeights(tensors, "tiny"), tiny.hints);
  const shapes = new Map([...tensors].map(([k, v]) => [k, v.shape] as const));
  const lora = await loadLora(loraPath, arch, shapes);
  const byLayer = new Map(lora.modules.map((m) => [m.layer, m]));
  for (const [layer, key, , , row] of SDXL_LORA) {
    const mod = byLayer.get(layer);
    assert.equal(mod?.target, key, layer);
    assert.equal(mod.rowOffset, row, `${layer} rows`);
    assert.equal(mod.isText, !key.startsWith(U), `${layer} is text`);
  }
  assert.deepEqual(lora.warnings, ["layer lora_te_text_model_encoder_layers_0_self_attn_q_proj matches no layer of the model"]);

  const res = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: loraPath, unetWeight: 0.7, textWeight: 0.4 }], {
    cacheDir: join(dir, "lora-cache"),
    ...tiny.hints,
  });
  assert.equal(res.manifest.family, "sdxl");
  const merged = new Map<string, Float32Array>();
  for (const c of ["text_encoder", "text_encoder_2", "unet"]) {
    const path = join(res.dir, c, "model.onnx");
    for (const init of (await readModel(path)).graph.initializers)
      if (init.elemType === "float32" && !init.name.startsWith("/")) merged.set(init.name, await initializerFloat32(init, path));
  }
  const touched = new Set<string>();
  SDXL_LORA.forEach(([layer, key, out, inp, row], i) => {
    const scale = (1 + i) / rank;
    const w = key.startsWith(U) ? 0.7 : 0.4;
    const delta = product(file[`${layer}.lora_up.weight`]!.data, file[`${layer}.lora_down.weight`]!.data, out, rank);
    const got = merged.get(key)!;
    const baseValues = tensors.get(key)!.data;
    const from = row * inp;
    for (let j = 0; j < baseValues.length; j++) {
      const e = j >= from && j < from + delta.length ? delta[j - from]! * scale * w : 0;
      const d = got[j]! - baseValues[j]!;
      assert.ok(Math.abs(d - e) <= 1e-5 + 1e-5 * Math.abs(e), `${key}[${j}]: Δ ${d}, expected ${e}`);
    }
    touched.add(key);
  });
  let untouched = 0;
  for (const [key, values] of merged) {
    if (touched.has(key)) continue;
    assert.deepEqual(values, tensors.get(key)!.data, `${key} must equal the base`);
    untouched++;
  }
  assert.ok(untouched > 100);
});
