import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { SDXL_SCALING_FACTOR, detectArchitecture } from "./architecture.js";
import { ModelFileError } from "./errors.js";
import { importCheckpointWithLoras, loadLora } from "./lora.js";
import { initializerFloat32, readModel } from "./onnx-read.js";
import { detectTextEncoderConfig } from "./clip.js";
import { MANIFEST_FILE, buildComponent, buildPipeline, buildPipelineFromCheckpoint } from "./pipeline.js";
import type { PipelineManifest } from "./pipeline.js";
import { SeededRandom } from "./random.js";
import { readSafetensors, writeSafetensors } from "./safetensors.js";
import { FULL_SIZE_SPECS, TINY_SPECS, ldmTensorShapes, makeTinyModel, makeTinyModelCli, readTinyConfig } from "./tiny-model.js";
import type { TinyModel } from "./tiny-model.js";
import { REFINER_TIME_IDS, TIME_IDS, TIME_ID_EMBED_DIM, textEmbedsDim } from "./unet.js";
import { MemoryWeights } from "./weights.js";
import { buildTestUnet, fourierReference, maxAbsDiff, runGraph as run, tokenRows as rowsOf } from "../test-support/graphs.js";
import type { MemoryTensor } from "./weights.js";

const dir = mkdtempSync(join(tmpdir(), "sdxl-refiner-test-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const U = "model.diffusion_model.";
const TE = "conditioner.embedders.0.model.";
const SEQ = 77;
/** The tiny refiner's OpenCLIP width, which is also its UNet's context width and its text_embeds width. */
const D = 48;
const ADM = D + REFINER_TIME_IDS * TIME_ID_EMBED_DIM;

let tiny: TinyModel;
let base: TinyModel;
let tensors: Map<string, MemoryTensor>;
before(async () => {
  tiny = await makeTinyModel({ outDir: join(dir, "tiny"), seed: 7, config: "sdxl-refiner-small" });
  base = await makeTinyModel({ outDir: join(dir, "base"), seed: 7, config: "sdxl-small" });
  const f = await readSafetensors(tiny.checkpointPath);
  tensors = new Map();
  for (const k of f.keys()) tensors.set(k, { shape: f.info(k).shape, data: await f.float32(k) });
  await f.close();
});

/** Token rows as the tiny tokenizer gives them: BOS, tokens, EOS, then `pad`. */
const tokenRows = (rows: number[][], pad: number): Int32Array => rowsOf(rows, pad, tiny, SEQ);

const conditioning = (textEmbeds: Float32Array, timeIds: Float32Array): Record<string, ort.Tensor> => ({
  text_embeds: new ort.Tensor("float32", textEmbeds, [timeIds.length / REFINER_TIME_IDS, D]),
  time_ids: new ort.Tensor("float32", timeIds, [timeIds.length / REFINER_TIME_IDS, REFINER_TIME_IDS]),
});

const unetFeeds = (rng: SeededRandom, batch: number): Record<string, ort.Tensor> => ({
  sample: new ort.Tensor("float32", rng.normalArray(batch * 4 * 7 * 5), [batch, 4, 7, 5]),
  timestep: new ort.Tensor("float32", new Float32Array(batch).fill(291.25), [batch]),
  encoder_hidden_states: new ort.Tensor("float32", rng.normalArray(batch * SEQ * D), [batch, SEQ, D]),
});

/** The UNet alone, from the given tensors (a UNet without label_emb is no refiner, so detection is bypassed). */
const shapeOnly = (shapes: ReadonlyMap<string, readonly number[]>, label: string): MemoryWeights =>
  new MemoryWeights(new Map([...shapes].map(([k, shape]) => [k, { shape, data: new Float32Array(0) }])), label);

// ---- detection -------------------------------------------------------------------------------------

test("detectArchitecture: a refiner is family sdxl-refiner with OpenCLIP-G as textEncoder2 and 5 time ids", () => {
  const a = detectArchitecture(new MemoryWeights(tensors, "tiny-refiner"), tiny.hints);
  assert.equal(a.family, "sdxl-refiner");
  assert.equal(a.textEncoder, undefined);
  assert.ok(!("textEncoder" in a), "no CLIP-L, not even as an undefined field in the manifest");
  assert.deepEqual(a.textEncoder2, {
    layout: "open-clip",
    prefix: TE,
    vocabSize: tiny.vocabSize,
    hidden: D,
    maxPositions: 77,
    layers: 3,
    heads: 4,
    activation: "gelu",
    projectionDim: D,
  });
  assert.equal(a.prediction, "epsilon");
  assert.equal(a.inpainting, false);
  assert.deepEqual(a.unet.levelChannels, [32, 64, 64]);
  assert.deepEqual(a.unet.attentionLevels, [false, true, false]);
  assert.deepEqual(a.unet.transformerDepths, [0, 2, 0]);
  assert.equal(a.unet.middleTransformerDepth, 2);
  assert.equal(a.unet.layersPerBlock, 2);
  assert.equal(a.unet.linearProjection, true);
  assert.equal(a.unet.contextDim, D);
  assert.equal(a.unet.admInChannels, ADM);
  assert.equal(a.unet.timeIds, 5);
  assert.equal(textEmbedsDim(a.unet), D);
  assert.deepEqual(a.unet.heads, [4, 4, 4]);
  assert.equal(a.vae.latentChannels, 4);
  // The base keeps its config as it was (no timeIds field: 6 is the default).
  const b = base.pipeline!.architecture;
  assert.equal(b.family, "sdxl");
  assert.ok(!("timeIds" in b.unet));
  assert.equal(textEmbedsDim(b.unet), D);
});

test("detectArchitecture on the SDXL refiner's real shapes: 384 channels, depth 4 at levels 1-2, 1280 context, 2560 adm", () => {
  const shapes = ldmTensorShapes(FULL_SIZE_SPECS.sdxlRefiner, 49408);
  assert.deepEqual(shapes.get(`${U}label_emb.0.0.weight`), [1536, 2560]);
  assert.deepEqual(shapes.get(`${U}input_blocks.0.0.weight`), [384, 4, 3, 3]);
  assert.deepEqual(shapes.get(`${TE}text_projection`), [1280, 1280]);
  assert.ok(!shapes.has("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"));
  const a = detectArchitecture(shapeOnly(shapes, "sd_xl_refiner_1.0"));
  assert.equal(a.family, "sdxl-refiner");
  assert.equal(a.unet.modelChannels, 384);
  assert.deepEqual(a.unet.levelChannels, [384, 768, 1536, 1536]);
  assert.deepEqual(a.unet.attentionLevels, [false, true, true, false]);
  assert.deepEqual(a.unet.transformerDepths, [0, 4, 4, 0]);
  assert.equal(a.unet.middleTransformerDepth, 4);
  // num_head_channels 64.
  assert.deepEqual(a.unet.heads, [6, 12, 24, 24]);
  assert.equal(a.unet.contextDim, 1280);
  assert.equal(a.unet.admInChannels, 2560);
  assert.equal(a.unet.timeIds, 5);
  assert.equal(a.unet.timeEmbedDim, 1536);
  assert.deepEqual(
    [a.textEncoder2.heads, a.textEncoder2.layers, a.textEncoder2.projectionDim, a.textEncoder2.hidden],
    [20, 32, 1280, 1280],
  );
});

test("refiner-shaped checkpoints that do not fit together are refused with the file named", () => {
  const refuse = (t: ReadonlyMap<string, MemoryTensor>, pattern: RegExp): void =>
    assert.throws(
      () => detectArchitecture(new MemoryWeights(t, "bad.safetensors"), tiny.hints),
      (e: unknown) => e instanceof ModelFileError && pattern.test(e.message) && e.message.startsWith("bad.safetensors: "),
    );
  // label_emb sized for the base's 6 time ids.
  const six = new Map(tensors);
  six.set(`${U}label_emb.0.0.weight`, { shape: [128, D + TIME_IDS * 256], data: new Float32Array(128 * (D + TIME_IDS * 256)) });
  refuse(six, /refiner UNet label_emb takes 1584 features, but .* make 1328/);
  // OpenCLIP without its text_projection: no text_embeds for label_emb.
  refuse(new Map([...tensors].filter(([k]) => k !== `${TE}text_projection`)), /refiner text encoder not found/);
  // A base whose CLIP-L was dropped: its UNet attends over 80 features, the lone encoder gives 48.
  const f = new Map<string, MemoryTensor>();
  for (const [k, s] of ldmTensorShapes(TINY_SPECS["sdxl-small"], tiny.vocabSize)) {
    if (k.startsWith("conditioner.embedders.0.")) continue;
    const key = k.replace("conditioner.embedders.1.", "conditioner.embedders.0.");
    f.set(key, { shape: s, data: new Float32Array(0) });
  }
  refuse(f, /cross-attention expects width 80 but the refiner's text encoder produces 48/);
});

// ---- the built folder --------------------------------------------------------------------------------

test("the built folder: the Optimum refiner layout, model_index, manifest, VAE scale, scheduler, tokenizer_2", async () => {
  const out = tiny.onnxDir!;
  assert.deepEqual(readdirSync(out).sort(), [
    MANIFEST_FILE,
    "model_index.json",
    "scheduler",
    "text_encoder_2",
    "tiny_config.json",
    "tokenizer_2",
    "unet",
    "vae_decoder",
    "vae_encoder",
  ]);
  for (const c of ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]) assert.ok(existsSync(join(out, c, "model.onnx")), c);
  assert.deepEqual(JSON.parse(readFileSync(join(out, "model_index.json"), "utf8")), {
    _class_name: "ORTStableDiffusionXLImg2ImgPipeline",
    force_zeros_for_empty_prompt: false,
    requires_aesthetics_score: true,
    scheduler: ["diffusers", "EulerDiscreteScheduler"],
    tokenizer: [null, null],
    tokenizer_2: ["transformers", "CLIPTokenizer"],
    text_encoder: [null, null],
    text_encoder_2: ["diffusers", "OnnxRuntimeModel"],
    unet: ["diffusers", "OnnxRuntimeModel"],
    vae_decoder: ["diffusers", "OnnxRuntimeModel"],
    vae_encoder: ["diffusers", "OnnxRuntimeModel"],
  });
  const manifest = JSON.parse(readFileSync(join(out, MANIFEST_FILE), "utf8")) as PipelineManifest;
  assert.equal(manifest.family, "sdxl-refiner");
  assert.equal(manifest.architecture.family, "sdxl-refiner");
  assert.equal(manifest.architecture.unet.timeIds, 5);
  assert.deepEqual(Object.keys(manifest.components).sort(), ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]);
  for (const c of ["text_encoder_2", "unet"]) {
    const m = await readModel(join(out, c, "model.onnx"));
    assert.equal(m.metadata["latentfarm.family"], "sdxl-refiner", c);
  }
  assert.deepEqual(JSON.parse(readFileSync(join(out, "vae_decoder", "config.json"), "utf8")), {
    scaling_factor: SDXL_SCALING_FACTOR,
    latent_channels: 4,
  });
  // The same scheduler as the base.
  const sched = (d: string): unknown => JSON.parse(readFileSync(join(d, "scheduler", "scheduler_config.json"), "utf8"));
  assert.deepEqual(sched(out), sched(base.onnxDir!));
  assert.equal((sched(out) as { _class_name: string })._class_name, "EulerDiscreteScheduler");
  assert.deepEqual(readFileSync(join(out, "tokenizer_2", "vocab.json")), readFileSync(join(tiny.tokenizerDir, "vocab.json")));
  assert.equal(
    (JSON.parse(readFileSync(join(out, "tokenizer_2", "special_tokens_map.json"), "utf8")) as { pad_token: string }).pad_token,
    "!",
  );
  assert.deepEqual(tiny.pipeline!.unusedKeys, [`${TE}logit_scale`]);
  assert.deepEqual(tiny.hints, { unetHeads: 4, text2Heads: 4 });
  const config = await readTinyConfig(out);
  assert.equal(config.config, "sdxl-refiner-small");
  assert.equal(config.text2Heads, 4);
  assert.equal(config.textHeads, undefined);
});

test("ONNX inputs and outputs: text_encoder_2 as the base's, UNet with 48-wide context and text_embeds, time_ids of 5", async () => {
  const io = async (c: string): Promise<{ inputs: unknown[]; outputs: unknown[] }> => {
    const m = await readModel(join(tiny.onnxDir!, c, "model.onnx"));
    const f = (v: { name: string; elemType: unknown; dims: unknown }): unknown => [v.name, v.elemType, v.dims];
    return { inputs: m.graph.inputs.map(f), outputs: m.graph.outputs.map(f) };
  };
  assert.deepEqual(await io("text_encoder_2"), {
    inputs: [["input_ids", "int32", ["batch", "sequence"]]],
    outputs: [
      ["text_embeds", "float32", ["batch", D]],
      ["last_hidden_state", "float32", ["batch", "sequence", D]],
      ...[0, 1, 2, 3].map((i) => [`hidden_states.${i}`, "float32", ["batch", "sequence", D]]),
    ],
  });
  assert.deepEqual(await io("unet"), {
    inputs: [
      ["sample", "float32", ["batch", 4, "height", "width"]],
      ["timestep", "float32", ["batch"]],
      ["encoder_hidden_states", "float32", ["batch", "sequence", D]],
      ["text_embeds", "float32", ["batch", D]],
      ["time_ids", "float32", ["batch", 5]],
    ],
    outputs: [["out_sample", "float32", ["batch", 4, "height", "width"]]],
  });
  // The base's io for comparison: the same names, 6 time ids and an 80-wide context.
  const baseUnet = await readModel(join(base.onnxDir!, "unet", "model.onnx"));
  assert.deepEqual(
    baseUnet.graph.inputs.map((i) => [i.name, i.dims?.at(-1)]),
    [
      ["sample", "width"],
      ["timestep", "batch"],
      ["encoder_hidden_states", 80],
      ["text_embeds", D],
      ["time_ids", 6],
    ],
  );
  assert.deepEqual((await io("vae_decoder")).inputs, [["latent_sample", "float32", ["batch", 4, "height", "width"]]]);
});

test("text_encoder_2 is the base's graph: same outputs as a base-layout build of the same weights; text_embeds checked by hand", async () => {
  const asBase = new Map<string, MemoryTensor>();
  for (const [k, v] of tensors) if (k.startsWith(TE)) asBase.set(`conditioner.embedders.1.model.${k.slice(TE.length)}`, v);
  const w = new MemoryWeights(asBase, "as-base");
  const cfg = detectTextEncoderConfig(w, { prefixes: ["conditioner.embedders.1.model."], fullStack: true, heads: 4 });
  await buildComponent("text_encoder_2", w, { textEncoder2: cfg }, {}, join(dir, "as-base"), { linkCheckpoint: false }, {});

  const ids = new Int32Array([...tokenRows([[5, 9]], 0), ...tokenRows([[7, 300, 11, 12]], tiny.eosId)]);
  const feeds = { input_ids: new ort.Tensor("int32", ids, [2, SEQ]) };
  const got = await run(join(tiny.onnxDir!, "text_encoder_2", "model.onnx"), feeds);
  const want = await run(join(dir, "as-base", "text_encoder_2", "model.onnx"), feeds);
  assert.deepEqual(Object.keys(got), Object.keys(want));
  for (const name of Object.keys(want)) assert.deepEqual(got[name]!.data, want[name]!.data, name);

  // text_embeds = last_hidden_state at the first EOS (the highest id) @ text_projection.
  const last = got.last_hidden_state!.data as Float32Array;
  const proj = tensors.get(`${TE}text_projection`)!.data;
  const embeds = got.text_embeds!.data as Float32Array;
  for (const [row, eos] of [
    [0, 3],
    [1, 5],
  ] as const) {
    const x = last.subarray((row * SEQ + eos) * D, (row * SEQ + eos + 1) * D);
    const ref = new Float64Array(D);
    for (let j = 0; j < D; j++) for (let i = 0; i < D; i++) ref[j]! += x[i]! * proj[i * D + j]!;
    const d = maxAbsDiff(embeds.subarray(row * D, (row + 1) * D), ref);
    assert.ok(d <= 1e-5, `row ${row}: ${d}`);
  }
});

// ---- the UNet ------------------------------------------------------------------------------------------

test("UNet label_emb over text_embeds and 5 time ids (aesthetic score last), checked against a UNet without label_emb", async () => {
  const rng = new SeededRandom(21);
  const temb = tensors.get(`${U}time_embed.2.bias`)!;
  const ted = temb.shape[0]!;
  const withoutLabel = (extraBias: ArrayLike<number>): Map<string, MemoryTensor> => {
    const t = new Map([...tensors].filter(([k]) => !k.startsWith(`${U}label_emb.`)));
    t.set(`${U}time_embed.2.bias`, { shape: temb.shape, data: temb.data.map((v, i) => v + extraBias[i]!) });
    return t;
  };
  const single = unetFeeds(rng, 1);

  // 1. The built refiner UNet itself with a zero last layer: label_emb(y) is its bias whatever y is.
  const b = rng.normalArray(ted, 0.3);
  const zeroed = new Map(tensors);
  zeroed.set(`${U}label_emb.0.2.weight`, { shape: [ted, ted], data: new Float32Array(ted * ted) });
  zeroed.set(`${U}label_emb.0.2.bias`, { shape: [ted], data: b });
  const zeroPath = await buildTestUnet(dir, "label-zero", zeroed, REFINER_TIME_IDS);
  const plain = await buildTestUnet(dir, "label-none", withoutLabel(b));
  const ids = new Float32Array([1024, 1024, 0, 0, 6]);
  let d = maxAbsDiff(
    (await run(zeroPath, { ...single, ...conditioning(rng.normalArray(D), ids) })).out_sample!.data as Float32Array,
    (await run(plain, single)).out_sample!.data as Float32Array,
  );
  assert.ok(d <= 1e-5, `zeroed label_emb: ${d}`);

  // 2. Selected features of y = [text_embeds, emb(orig h), emb(orig w), emb(crop top), emb(crop left), emb(aesthetic)]:
  //    hidden unit r = silu(y[k_r]), label = Σ c_r·silu(y[k_r]) + b2.
  const block = (id: number, i: number): number => D + id * TIME_ID_EMBED_DIM + i;
  const picks = [3, block(0, 11), block(2, 128 + 40), block(3, 5), block(4, 2), block(4, 128 + 1), block(4, 128 + 60)];
  const w0 = new Float32Array(ted * ADM);
  picks.forEach((k, r) => (w0[r * ADM + k] = 1));
  const c = picks.map(() => rng.normalArray(ted, 0.5));
  const w2 = new Float32Array(ted * ted);
  c.forEach((col, r) => col.forEach((v, i) => (w2[i * ted + r] = v)));
  const b2 = rng.normalArray(ted, 0.1);
  const select = new Map(tensors);
  select.set(`${U}label_emb.0.0.weight`, { shape: [ted, ADM], data: w0 });
  select.set(`${U}label_emb.0.0.bias`, { shape: [ted], data: new Float32Array(ted) });
  select.set(`${U}label_emb.0.2.weight`, { shape: [ted, ted], data: w2 });
  select.set(`${U}label_emb.0.2.bias`, { shape: [ted], data: b2 });
  // Detected like any refiner (the UNet config, and its 5 time ids, come from detection here).
  const sel = join(dir, "label-select");
  const built = await buildPipeline(new MemoryWeights(select, sel), sel, { ...tiny.hints, linkCheckpoint: false, components: ["unet"] });
  assert.equal(built.architecture.family, "sdxl-refiner");
  const embeds = rng.normalArray(D);
  const one = new Float32Array([832, 1216, 48, 24, 2.5]);
  const y = new Float64Array(ADM);
  y.set(embeds);
  one.forEach((v, j) => y.set(fourierReference(v, TIME_ID_EMBED_DIM), D + j * TIME_ID_EMBED_DIM));
  const label = Float64Array.from(b2);
  const silu = (v: number): number => v / (1 + Math.exp(-v));
  picks.forEach((k, r) => c[r]!.forEach((v, i) => (label[i]! += v * silu(y[k]!))));
  const shifted = await buildTestUnet(dir, "label-shifted", withoutLabel(label));
  const want = (await run(shifted, single)).out_sample!.data as Float32Array;
  const got = (await run(join(sel, "unet", "model.onnx"), { ...single, ...conditioning(embeds, one) })).out_sample!.data as Float32Array;
  d = maxAbsDiff(got, want);
  assert.ok(d <= 1e-5, `selected features: ${d}`);
  // The check has teeth: the aesthetic score (time id 4) moves the output, and so does text_embeds[3].
  const moved = await run(join(sel, "unet", "model.onnx"), {
    ...single,
    ...conditioning(
      embeds,
      one.map((v, i) => (i === 4 ? 6 : v)),
    ),
  });
  assert.ok(maxAbsDiff(moved.out_sample!.data as Float32Array, want) > 1e-3, "aesthetic score");
  const nudged = Float32Array.from(embeds, (v, i) => (i === 3 ? v + 1 : v));
  const moved2 = await run(join(sel, "unet", "model.onnx"), { ...single, ...conditioning(nudged, one) });
  assert.ok(maxAbsDiff(moved2.out_sample!.data as Float32Array, want) > 1e-3, "text_embeds");
});

test("UNet: rows are conditioned independently; batch 2 equals two batch-1 runs", async () => {
  const rng = new SeededRandom(5);
  const path = join(tiny.onnxDir!, "unet", "model.onnx");
  const feeds = unetFeeds(rng, 2);
  const embeds = rng.normalArray(2 * D);
  const ids = new Float32Array([1024, 1024, 0, 0, 6, 768, 1344, 16, 8, 2.5]);
  const both = (await run(path, { ...feeds, ...conditioning(embeds, ids) })).out_sample!;
  assert.deepEqual(both.dims, [2, 4, 7, 5]);
  const n = 4 * 7 * 5;
  for (const r of [0, 1]) {
    const row = (t: ort.Tensor, width: number): Float32Array => (t.data as Float32Array).slice(r * width, (r + 1) * width);
    const one = await run(path, {
      sample: new ort.Tensor("float32", row(feeds.sample!, n), [1, 4, 7, 5]),
      timestep: new ort.Tensor("float32", new Float32Array([291.25]), [1]),
      encoder_hidden_states: new ort.Tensor("float32", row(feeds.encoder_hidden_states!, SEQ * D), [1, SEQ, D]),
      ...conditioning(embeds.slice(r * D, (r + 1) * D), ids.slice(r * 5, (r + 1) * 5)),
    });
    const d = maxAbsDiff((both.data as Float32Array).subarray(r * n, (r + 1) * n), one.out_sample!.data as Float32Array);
    assert.ok(d <= 1e-5, `row ${r}: ${d}`);
  }
});

test("end to end: penultimate OpenCLIP-G states and text_embeds → UNet → VAE decoder; VAE encoder round trip shapes", async () => {
  const ids = tokenRows([[5, 9, 14]], 0);
  const te = await run(join(tiny.onnxDir!, "text_encoder_2", "model.onnx"), { input_ids: new ort.Tensor("int32", ids, [1, SEQ]) });
  const eps = (
    await run(join(tiny.onnxDir!, "unet", "model.onnx"), {
      sample: new ort.Tensor("float32", new Float32Array(4 * 5 * 3).fill(0.5), [1, 4, 5, 3]),
      timestep: new ort.Tensor("float32", new Float32Array([199]), [1]),
      encoder_hidden_states: te["hidden_states.2"]!,
      text_embeds: te.text_embeds!,
      time_ids: new ort.Tensor("float32", new Float32Array([1024, 1024, 0, 0, 6]), [1, 5]),
    })
  ).out_sample!;
  assert.deepEqual(eps.dims, [1, 4, 5, 3]);
  assert.ok((eps.data as Float32Array).every(Number.isFinite));
  const img = (await run(join(tiny.onnxDir!, "vae_decoder", "model.onnx"), { latent_sample: eps })).sample!;
  assert.deepEqual(img.dims, [1, 3, 40, 24]);
  const enc = await run(join(tiny.onnxDir!, "vae_encoder", "model.onnx"), { sample: img });
  assert.deepEqual(Object.values(enc)[0]!.dims.slice(2), [5, 3]);
});

test("linked and fp16 builds from the checkpoint file; the CLI makes the same bytes for the same seed", async () => {
  const out = join(dir, "linked");
  const built = await buildPipelineFromCheckpoint(tiny.checkpointPath, out, { ...tiny.hints, tokenizerDir: tiny.tokenizerDir });
  assert.equal(built.manifest.family, "sdxl-refiner");
  assert.ok(built.manifest.components.text_encoder_2!.linkedBytes > 0);
  assert.ok(!existsSync(join(out, "text_encoder")) && !existsSync(join(out, "tokenizer")));
  const half = join(dir, "half");
  await buildPipelineFromCheckpoint(tiny.checkpointPath, half, {
    ...tiny.hints,
    weightType: "float16",
    components: ["text_encoder", "unet"],
  });
  assert.deepEqual(
    readdirSync(half).sort(),
    [MANIFEST_FILE, "model_index.json", "scheduler", "unet"],
    "text_encoder is skipped, not an error",
  );

  const a = await makeTinyModelCli(["--out", join(dir, "cli-a"), "--seed", "5", "--config", "sdxl-refiner-small"]);
  await makeTinyModelCli(["--out", join(dir, "cli-b"), "--seed", "5", "--config", "sdxl-refiner-small"]);
  for (const f of ["tiny-sdxl-refiner-small.safetensors", "onnx/text_encoder_2/model.onnx", "onnx/unet/model.onnx", "onnx/unet/weights.pb"])
    assert.deepEqual(readFileSync(join(dir, "cli-a", f)), readFileSync(join(dir, "cli-b", f)), f);
  assert.equal(a.spec.family, "sdxl-refiner");
});

// ---- LoRAs ---------------------------------------------------------------------------------------------

/** Reference up·down product, written independently of lora.ts. */
function product(up: Float32Array, down: Float32Array, out: number, rank: number): Float64Array {
  const cols = down.length / rank;
  const res = new Float64Array(out * cols);
  for (let i = 0; i < out; i++)
    for (let j = 0; j < cols; j++) for (let r = 0; r < rank; r++) res[i * cols + j]! += up[i * rank + r]! * down[r * cols + j]!;
  return res;
}

/** [layer, target key, out, in (columns of the flattened weight)]. */
const REFINER_LORA: [string, string, number, number][] = [
  // sgm names.
  ["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", `${U}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight`, 64, D],
  ["lora_unet_label_emb_0_0", `${U}label_emb.0.0.weight`, 128, ADM],
  // diffusers names: 3 resnets per output level; the deepest level has no attention, so its upsampler is sub-block 1.
  ["lora_unet_up_blocks_1_attentions_2_proj_out", `${U}output_blocks.5.1.proj_out.weight`, 64, 64],
  ["lora_unet_up_blocks_0_upsamplers_0_conv", `${U}output_blocks.2.1.conv.weight`, 64, 64 * 9],
  ["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", `${U}middle_block.1.transformer_blocks.0.ff.net.2.weight`, 64, 256],
  ["lora_unet_add_embedding_linear_2", `${U}label_emb.0.2.weight`, 128, 128],
];

test("UNet LoRAs (sgm and diffusers names) merge into a refiner; text-encoder LoRA layers match nothing, as in A1111", async () => {
  const rng = new SeededRandom(41);
  const rank = 4;
  const file: Record<string, { dtype: "F32"; shape: number[]; data: Float32Array }> = {};
  const add = (layer: string, out: number, inp: number, alpha: number, conv = false): void => {
    file[`${layer}.lora_up.weight`] = {
      dtype: "F32",
      shape: conv ? [out, rank, 1, 1] : [out, rank],
      data: rng.normalArray(out * rank, 0.3),
    };
    file[`${layer}.lora_down.weight`] = {
      dtype: "F32",
      shape: conv ? [rank, inp / 9, 3, 3] : [rank, inp],
      data: rng.normalArray(rank * inp, 0.3),
    };
    file[`${layer}.alpha`] = { dtype: "F32", shape: [], data: new Float32Array([alpha]) };
  };
  REFINER_LORA.forEach(([layer, , out, inp], i) => add(layer, out, inp, 1 + i, layer.endsWith("_conv")));
  add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", D, D, 1);
  add("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", D, D, 1);
  const loraPath = join(dir, "refiner-lora.safetensors");
  await writeSafetensors(loraPath, file);

  const arch = detectArchitecture(new MemoryWeights(tensors, "tiny"), tiny.hints);
  const lora = await loadLora(loraPath, arch, new Map([...tensors].map(([k, v]) => [k, v.shape] as const)));
  assert.deepEqual(new Map(lora.modules.map((m) => [m.layer, m.target])), new Map(REFINER_LORA.map(([layer, key]) => [layer, key])));
  assert.deepEqual([...lora.warnings].sort(), [
    "layer lora_te1_text_model_encoder_layers_0_self_attn_q_proj matches no layer of the model",
    "layer lora_te2_text_model_encoder_layers_0_self_attn_q_proj matches no layer of the model",
  ]);

  const res = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: loraPath, unetWeight: 0.6 }], {
    cacheDir: join(dir, "lora-cache"),
    ...tiny.hints,
  });
  assert.equal(res.manifest.family, "sdxl-refiner");
  const path = join(res.dir, "unet", "model.onnx");
  const merged = new Map<string, Float32Array>();
  for (const init of (await readModel(path)).graph.initializers)
    if (init.elemType === "float32" && init.name.startsWith(U)) merged.set(init.name, await initializerFloat32(init, path));
  REFINER_LORA.forEach(([layer, key, out], i) => {
    const delta = product(file[`${layer}.lora_up.weight`]!.data, file[`${layer}.lora_down.weight`]!.data, out, rank);
    const k = ((1 + i) / rank) * 0.6;
    const got = merged.get(key)!;
    const baseValues = tensors.get(key)!.data;
    assert.equal(got.length, delta.length, key);
    let worst = 0;
    for (let j = 0; j < got.length; j++)
      worst = Math.max(worst, Math.abs(got[j]! - baseValues[j]! - delta[j]! * k) / (1 + Math.abs(delta[j]! * k)));
    assert.ok(worst <= 1e-5, `${key}: ${worst}`);
  });
  let untouched = 0;
  for (const [key, values] of merged) {
    if (REFINER_LORA.some(([, k]) => k === key)) continue;
    assert.deepEqual(values, tensors.get(key)!.data, `${key} must equal the base`);
    untouched++;
  }
  assert.ok(untouched > 100);
});
