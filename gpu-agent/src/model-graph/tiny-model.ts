// Deterministic tiny Stable Diffusion models with random weights, in both forms the farm consumes: an
// LDM-layout .safetensors checkpoint and the diffusers ONNX folder built from it, plus a small tokenizer.
// The project's tests use these instead of the team kit's fixtures.

import { createHash } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { invalidArgument } from "./errors.js";
import { buildPipeline } from "./pipeline.js";
import type { BuiltPipeline } from "./pipeline.js";
import { SeededRandom } from "./random.js";
import { writeSafetensors } from "./safetensors.js";
import type { TensorToWrite } from "./safetensors.js";
import { makeTinyVocab, tinyTokenizerFiles } from "./tiny-tokenizer.js";
import { REFINER_TIME_IDS, TIME_IDS, TIME_ID_EMBED_DIM } from "./unet.js";
import { MemoryWeights } from "./weights.js";
import type { MemoryTensor } from "./weights.js";

/** The architecture of a generated model, in LDM terms. */
export interface TinySpec {
  /** An "sdxl-refiner" has only the OpenCLIP text encoder (the text2* fields); its text* fields are unused. */
  readonly family: "sd1" | "sd2" | "sdxl" | "sdxl-refiner";
  readonly unetChannels: readonly number[];
  readonly unetLayers: number;
  readonly unetAttention: readonly boolean[];
  readonly unetHeads: number;
  readonly inChannels: number;
  readonly transformerDepth: number;
  /** Transformer blocks per level, where they differ (SDXL); default transformerDepth everywhere. */
  readonly transformerDepths?: readonly number[];
  /** Transformer blocks of the middle block; default transformerDepth. */
  readonly middleDepth?: number;
  readonly textHidden: number;
  readonly textLayers: number;
  readonly textHeads: number;
  readonly textIntermediate: number;
  readonly maxPositions: number;
  /** SDXL's second (OpenCLIP) text encoder: width, layers, heads, MLP width and text_projection width. */
  readonly text2Hidden?: number;
  readonly text2Layers?: number;
  readonly text2Heads?: number;
  readonly text2Intermediate?: number;
  readonly projectionDim?: number;
  readonly vaeChannels: readonly number[];
  readonly vaeLayers: number;
  readonly latentChannels: number;
}

export type TinyConfigName = "small" | "sd15-topology" | "sdxl-small" | "sdxl-refiner-small";

export const TINY_SPECS: Readonly<Record<TinyConfigName, TinySpec>> = {
  // The team kit's tiny-sd15 topology (see the kit's fixtures README) with a small vocabulary.
  "sd15-topology": {
    family: "sd1",
    unetChannels: [32, 32, 64, 64],
    unetLayers: 2,
    unetAttention: [true, true, true, false],
    unetHeads: 8,
    inChannels: 4,
    transformerDepth: 1,
    textHidden: 32,
    textLayers: 3,
    textHeads: 4,
    textIntermediate: 64,
    maxPositions: 77,
    vaeChannels: [32, 32, 64, 64],
    vaeLayers: 2,
    latentChannels: 4,
  },
  // Fewer layers and levels for fast tests; the VAE keeps 4 levels so images stay 8x the latent size.
  small: {
    family: "sd1",
    unetChannels: [32, 64],
    unetLayers: 1,
    unetAttention: [true, false],
    unetHeads: 4,
    inChannels: 4,
    transformerDepth: 1,
    textHidden: 32,
    textLayers: 2,
    textHeads: 4,
    textIntermediate: 64,
    maxPositions: 77,
    vaeChannels: [32, 32, 32, 32],
    vaeLayers: 1,
    latentChannels: 4,
  },
  // SDXL base's layout (no attention at the first level, deeper transformers below it, two text encoders,
  // label_emb) at `small`'s sizes.
  "sdxl-small": {
    family: "sdxl",
    unetChannels: [32, 64],
    unetLayers: 2,
    unetAttention: [false, true],
    unetHeads: 4,
    inChannels: 4,
    transformerDepth: 2,
    transformerDepths: [0, 2],
    middleDepth: 2,
    textHidden: 32,
    textLayers: 2,
    textHeads: 4,
    textIntermediate: 64,
    maxPositions: 77,
    text2Hidden: 48,
    text2Layers: 3,
    text2Heads: 4,
    text2Intermediate: 96,
    projectionDim: 48,
    vaeChannels: [32, 32, 32, 32],
    vaeLayers: 1,
    latentChannels: 4,
  },
  // The SDXL refiner's layout: OpenCLIP-G alone under embedder 0 (sdxl-small's), label_emb over 5 time ids, and
  // attention at the inner levels only (none at the first or the deepest), at sdxl-small's sizes.
  "sdxl-refiner-small": {
    family: "sdxl-refiner",
    unetChannels: [32, 64, 64],
    unetLayers: 2,
    unetAttention: [false, true, false],
    unetHeads: 4,
    inChannels: 4,
    transformerDepth: 2,
    transformerDepths: [0, 2, 0],
    middleDepth: 2,
    textHidden: 0,
    textLayers: 0,
    textHeads: 0,
    textIntermediate: 0,
    maxPositions: 77,
    text2Hidden: 48,
    text2Layers: 3,
    text2Heads: 4,
    text2Intermediate: 96,
    projectionDim: 48,
    vaeChannels: [32, 32, 32, 32],
    vaeLayers: 1,
    latentChannels: 4,
  },
};

/** The second text encoder of an SDXL spec (the refiner's only one), checked. */
function text2Of(spec: TinySpec): { hidden: number; layers: number; heads: number; intermediate: number; projection: number } {
  const { text2Hidden: hidden, text2Layers: layers, text2Heads: heads, text2Intermediate: intermediate, projectionDim: projection } = spec;
  if (hidden === undefined || layers === undefined || heads === undefined || intermediate === undefined || projection === undefined) {
    throw invalidArgument("family", "an sdxl spec needs text2Hidden, text2Layers, text2Heads, text2Intermediate and projectionDim");
  }
  return { hidden, layers, heads, intermediate, projection };
}

/** The real models' shapes as TinySpecs, for benchmarks and shape tests (random weights of these are gigabytes). */
export const FULL_SIZE_SPECS: Readonly<Record<"sd15" | "sdxl" | "sdxlRefiner", TinySpec>> = {
  /** SD 1.5's shapes (v1-inference.yaml), expressed as a TinySpec. */
  sd15: {
    family: "sd1",
    unetChannels: [320, 640, 1280, 1280],
    unetLayers: 2,
    unetAttention: [true, true, true, false],
    unetHeads: 8,
    inChannels: 4,
    transformerDepth: 1,
    textHidden: 768,
    textLayers: 12,
    textHeads: 12,
    textIntermediate: 3072,
    maxPositions: 77,
    vaeChannels: [128, 256, 512, 512],
    vaeLayers: 2,
    latentChannels: 4,
  },

  /** SDXL 1.0 base's shapes (sd_xl_base.yaml), expressed as a TinySpec. */
  sdxl: {
    family: "sdxl",
    unetChannels: [320, 640, 1280],
    unetLayers: 2,
    unetAttention: [false, true, true],
    unetHeads: 8,
    inChannels: 4,
    transformerDepth: 10,
    transformerDepths: [0, 2, 10],
    middleDepth: 10,
    textHidden: 768,
    textLayers: 12,
    textHeads: 12,
    textIntermediate: 3072,
    maxPositions: 77,
    text2Hidden: 1280,
    text2Layers: 32,
    text2Heads: 20,
    text2Intermediate: 5120,
    projectionDim: 1280,
    vaeChannels: [128, 256, 512, 512],
    vaeLayers: 2,
    latentChannels: 4,
  },

  /** SDXL 1.0 refiner's shapes (sd_xl_refiner.yaml), expressed as a TinySpec. */
  sdxlRefiner: {
    family: "sdxl-refiner",
    unetChannels: [384, 768, 1536, 1536],
    unetLayers: 2,
    unetAttention: [false, true, true, false],
    unetHeads: 8,
    inChannels: 4,
    transformerDepth: 4,
    transformerDepths: [0, 4, 4, 0],
    middleDepth: 4,
    textHidden: 0,
    textLayers: 0,
    textHeads: 0,
    textIntermediate: 0,
    maxPositions: 77,
    text2Hidden: 1280,
    text2Layers: 32,
    text2Heads: 20,
    text2Intermediate: 5120,
    projectionDim: 1280,
    vaeChannels: [128, 256, 512, 512],
    vaeLayers: 2,
    latentChannels: 4,
  },
};

/** Every LDM checkpoint key of `spec` with its shape, for a text vocabulary of `vocabSize` tokens. */
export function ldmTensorShapes(spec: TinySpec, vocabSize: number): Map<string, number[]> {
  const out = new Map<string, number[]>();
  const put = (k: string, s: number[]): void => void out.set(k, s);
  const linear = (k: string, o: number, i: number, bias = true): void => {
    put(`${k}.weight`, [o, i]);
    if (bias) put(`${k}.bias`, [o]);
  };
  const conv = (k: string, o: number, i: number, ks: number): void => {
    put(`${k}.weight`, [o, i, ks, ks]);
    put(`${k}.bias`, [o]);
  };
  const norm = (k: string, c: number): void => {
    put(`${k}.weight`, [c]);
    put(`${k}.bias`, [c]);
  };

  // UNet
  const u = "model.diffusion_model.";
  const mc = spec.unetChannels[0]!;
  const temb = 4 * mc;
  const refiner = spec.family === "sdxl-refiner";
  const sdxl = spec.family === "sdxl";
  const ctx = refiner ? text2Of(spec).hidden : sdxl ? spec.textHidden + text2Of(spec).hidden : spec.textHidden;
  const sd2 = spec.family === "sd2";
  const linearProj = sd2 || sdxl || refiner;
  linear(`${u}time_embed.0`, temb, mc);
  linear(`${u}time_embed.2`, temb, temb);
  if (sdxl || refiner) {
    linear(`${u}label_emb.0.0`, temb, text2Of(spec).projection + (refiner ? REFINER_TIME_IDS : TIME_IDS) * TIME_ID_EMBED_DIM);
    linear(`${u}label_emb.0.2`, temb, temb);
  }
  conv(`${u}input_blocks.0.0`, mc, spec.inChannels, 3);
  const res = (k: string, cin: number, c: number): void => {
    norm(`${k}.in_layers.0`, cin);
    conv(`${k}.in_layers.2`, c, cin, 3);
    linear(`${k}.emb_layers.1`, c, temb);
    norm(`${k}.out_layers.0`, c);
    conv(`${k}.out_layers.3`, c, c, 3);
    if (cin !== c) conv(`${k}.skip_connection`, c, cin, 1);
  };
  const attn = (k: string, c: number, depth: number): void => {
    norm(`${k}.norm`, c);
    if (linearProj) linear(`${k}.proj_in`, c, c);
    else conv(`${k}.proj_in`, c, c, 1);
    for (let d = 0; d < depth; d++) {
      const b = `${k}.transformer_blocks.${d}`;
      for (const a of ["attn1", "attn2"]) {
        const kv = a === "attn1" ? c : ctx;
        linear(`${b}.${a}.to_q`, c, c, false);
        linear(`${b}.${a}.to_k`, c, kv, false);
        linear(`${b}.${a}.to_v`, c, kv, false);
        linear(`${b}.${a}.to_out.0`, c, c);
      }
      linear(`${b}.ff.net.0.proj`, 8 * c, c);
      linear(`${b}.ff.net.2`, c, 4 * c);
      for (const n of ["norm1", "norm2", "norm3"]) norm(`${b}.${n}`, c);
    }
    if (linearProj) linear(`${k}.proj_out`, c, c);
    else conv(`${k}.proj_out`, c, c, 1);
  };
  const depthAt = (level: number): number => spec.transformerDepths?.[level] ?? spec.transformerDepth;
  let ch = mc;
  const skips = [mc];
  let idx = 1;
  const levels = spec.unetChannels.length;
  spec.unetChannels.forEach((c, level) => {
    for (let j = 0; j < spec.unetLayers; j++, idx++) {
      res(`${u}input_blocks.${idx}.0`, ch, c);
      ch = c;
      if (spec.unetAttention[level]) attn(`${u}input_blocks.${idx}.1`, c, depthAt(level));
      skips.push(ch);
    }
    if (level < levels - 1) {
      conv(`${u}input_blocks.${idx}.0.op`, ch, ch, 3);
      skips.push(ch);
      idx++;
    }
  });
  res(`${u}middle_block.0`, ch, ch);
  attn(`${u}middle_block.1`, ch, spec.middleDepth ?? spec.transformerDepth);
  res(`${u}middle_block.2`, ch, ch);
  idx = 0;
  for (let level = levels - 1; level >= 0; level--) {
    const c = spec.unetChannels[level]!;
    for (let j = 0; j <= spec.unetLayers; j++, idx++) {
      res(`${u}output_blocks.${idx}.0`, ch + skips.pop()!, c);
      ch = c;
      let sub = 1;
      if (spec.unetAttention[level]) attn(`${u}output_blocks.${idx}.${sub++}`, c, depthAt(level));
      if (level > 0 && j === spec.unetLayers) conv(`${u}output_blocks.${idx}.${sub}.conv`, ch, ch, 3);
    }
  }
  norm(`${u}out.0`, ch);
  conv(`${u}out.2`, spec.latentChannels, ch, 3);

  // VAE
  const v = "first_stage_model.";
  const z = spec.latentChannels;
  const vres = (k: string, cin: number, c: number): void => {
    norm(`${k}.norm1`, cin);
    conv(`${k}.conv1`, c, cin, 3);
    norm(`${k}.norm2`, c);
    conv(`${k}.conv2`, c, c, 3);
    if (cin !== c) conv(`${k}.nin_shortcut`, c, cin, 1);
  };
  const vmid = (k: string, c: number): void => {
    vres(`${k}.mid.block_1`, c, c);
    norm(`${k}.mid.attn_1.norm`, c);
    for (const p of ["q", "k", "v", "proj_out"]) conv(`${k}.mid.attn_1.${p}`, c, c, 1);
    vres(`${k}.mid.block_2`, c, c);
  };
  const vc = spec.vaeChannels;
  const top = vc[vc.length - 1]!;
  conv(`${v}encoder.conv_in`, vc[0]!, 3, 3);
  ch = vc[0]!;
  vc.forEach((c, i) => {
    for (let j = 0; j < spec.vaeLayers; j++) {
      vres(`${v}encoder.down.${i}.block.${j}`, ch, c);
      ch = c;
    }
    if (i < vc.length - 1) conv(`${v}encoder.down.${i}.downsample.conv`, ch, ch, 3);
  });
  vmid(`${v}encoder`, ch);
  norm(`${v}encoder.norm_out`, ch);
  conv(`${v}encoder.conv_out`, 2 * z, ch, 3);
  conv(`${v}quant_conv`, 2 * z, 2 * z, 1);
  conv(`${v}post_quant_conv`, z, z, 1);
  conv(`${v}decoder.conv_in`, top, z, 3);
  ch = top;
  vmid(`${v}decoder`, ch);
  for (let i = vc.length - 1; i >= 0; i--) {
    for (let j = 0; j <= spec.vaeLayers; j++) {
      vres(`${v}decoder.up.${i}.block.${j}`, ch, vc[i]!);
      ch = vc[i]!;
    }
    if (i > 0) conv(`${v}decoder.up.${i}.upsample.conv`, ch, ch, 3);
  }
  norm(`${v}decoder.norm_out`, ch);
  conv(`${v}decoder.conv_out`, 3, ch, 3);

  // Text encoders
  const hfClip = (t: string, d: number, layers: number, inter: number): void => {
    put(`${t}embeddings.token_embedding.weight`, [vocabSize, d]);
    put(`${t}embeddings.position_embedding.weight`, [spec.maxPositions, d]);
    for (let i = 0; i < layers; i++) {
      const l = `${t}encoder.layers.${i}`;
      for (const p of ["q_proj", "k_proj", "v_proj", "out_proj"]) linear(`${l}.self_attn.${p}`, d, d);
      norm(`${l}.layer_norm1`, d);
      norm(`${l}.layer_norm2`, d);
      linear(`${l}.mlp.fc1`, inter, d);
      linear(`${l}.mlp.fc2`, d, inter);
    }
    norm(`${t}final_layer_norm`, d);
  };
  const openClip = (t: string, d: number, layers: number, inter: number, projection: number): void => {
    put(`${t}token_embedding.weight`, [vocabSize, d]);
    put(`${t}positional_embedding`, [spec.maxPositions, d]);
    for (let i = 0; i < layers; i++) {
      const l = `${t}transformer.resblocks.${i}`;
      put(`${l}.attn.in_proj_weight`, [3 * d, d]);
      put(`${l}.attn.in_proj_bias`, [3 * d]);
      linear(`${l}.attn.out_proj`, d, d);
      norm(`${l}.ln_1`, d);
      norm(`${l}.ln_2`, d);
      linear(`${l}.mlp.c_fc`, inter, d);
      linear(`${l}.mlp.c_proj`, d, inter);
    }
    norm(`${t}ln_final`, d);
    put(`${t}text_projection`, [d, projection]);
    put(`${t}logit_scale`, []);
  };
  if (refiner) {
    const t2 = text2Of(spec);
    openClip("conditioner.embedders.0.model.", t2.hidden, t2.layers, t2.intermediate, t2.projection);
  } else if (sdxl) {
    const t2 = text2Of(spec);
    hfClip("conditioner.embedders.0.transformer.text_model.", spec.textHidden, spec.textLayers, spec.textIntermediate);
    // SDXL runs every block of OpenCLIP-G: its pooled output is taken after the last one.
    openClip("conditioner.embedders.1.model.", t2.hidden, t2.layers, t2.intermediate, t2.projection);
  } else if (!sd2) {
    hfClip("cond_stage_model.transformer.text_model.", spec.textHidden, spec.textLayers, spec.textIntermediate);
  } else {
    // One more block than used: SD2 reads the penultimate layer.
    openClip("cond_stage_model.model.", spec.textHidden, spec.textLayers + 1, spec.textIntermediate, spec.textHidden);
  }
  return out;
}

/** Random values scaled so that activations stay O(1) through the network. */
export function randomTensor(rng: SeededRandom, key: string, shape: readonly number[]): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const isNorm = /(norm|ln_|layer_norm|in_layers\.0|out_layers\.0|out\.0)[^.]*\.(weight|bias)$/.test(key) && shape.length === 1;
  if (isNorm) return key.endsWith(".weight") ? rng.normalArray(n, 0.1, 1) : rng.normalArray(n, 0.1);
  if (key.endsWith("bias") || shape.length <= 1) return rng.normalArray(n, 0.02);
  if (/embedding/.test(key)) return rng.normalArray(n, 0.5);
  const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
  return rng.normalArray(n, 1 / Math.sqrt(fanIn));
}

export interface MakeTinyModelOptions {
  readonly outDir: string;
  readonly seed?: number;
  readonly config?: TinyConfigName;
  /** Overrides of the named config (e.g. `{ inChannels: 9 }` for an inpainting model, `{ family: "sd2" }`). */
  readonly overrides?: Partial<TinySpec>;
  /** Skip the ONNX build (only the checkpoint and tokenizer). */
  readonly checkpointOnly?: boolean;
}

export interface TinyModel {
  /** LDM-layout single-file checkpoint. */
  readonly checkpointPath: string;
  /** diffusers ONNX folder (absent with checkpointOnly). */
  readonly onnxDir: string | undefined;
  readonly tokenizerDir: string;
  readonly spec: TinySpec;
  readonly vocabSize: number;
  readonly bosId: number;
  readonly eosId: number;
  /** Hints that the importer needs for this model (tiny head counts cannot be inferred); text2Heads for SDXL and its refiner. */
  readonly hints: { readonly unetHeads: number; readonly textHeads?: number; readonly text2Heads?: number };
  readonly pipeline: BuiltPipeline | undefined;
}

/**
 * Writes `<outDir>/tiny-<config>.safetensors`, `<outDir>/tokenizer/` and `<outDir>/onnx/` (built from the
 * checkpoint by the same importer that real checkpoints go through). Same seed, same bytes.
 */
export async function makeTinyModel(opts: MakeTinyModelOptions): Promise<TinyModel> {
  const configName = opts.config ?? "small";
  const base = TINY_SPECS[configName];
  if (!base) throw invalidArgument("config", `unknown tiny config ${String(configName)}; use ${Object.keys(TINY_SPECS).join(", ")}`);
  const spec: TinySpec = { ...base, ...opts.overrides };
  const seed = opts.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw invalidArgument("seed", "must be an integer");
  const vocab = makeTinyVocab();
  const shapes = ldmTensorShapes(spec, vocab.size);
  const tensors = new Map<string, MemoryTensor>();
  const toWrite = new Map<string, TensorToWrite>();
  // Each tensor draws from its own stream (seed + key), so adding a tensor does not change the others.
  for (const [key, shape] of shapes) {
    const keySeed = createHash("sha256").update(`${seed}:${key}`).digest().readUInt32LE(0);
    const data = key.endsWith("logit_scale") ? new Float32Array([Math.log(100)]) : randomTensor(new SeededRandom(keySeed), key, shape);
    tensors.set(key, { shape, data });
    toWrite.set(key, { dtype: "F32", shape, data });
  }
  await mkdir(opts.outDir, { recursive: true });
  const checkpointPath = join(opts.outDir, `tiny-${configName}.safetensors`);
  await writeSafetensors(checkpointPath, toWrite, { format: "pt", "latentfarm.tiny": JSON.stringify({ config: configName, seed }) });
  const tokenizerDir = join(opts.outDir, "tokenizer");
  await mkdir(tokenizerDir, { recursive: true });
  for (const [name, content] of Object.entries(tinyTokenizerFiles(vocab))) await writeFile(join(tokenizerDir, name), content);
  const refiner = spec.family === "sdxl-refiner";
  const hints = {
    unetHeads: spec.unetHeads,
    // The refiner has no first text encoder for textHeads to describe.
    ...(refiner ? {} : { textHeads: spec.textHeads }),
    ...(spec.family === "sdxl" || refiner ? { text2Heads: text2Of(spec).heads } : {}),
  };
  let pipeline: BuiltPipeline | undefined;
  let onnxDir: string | undefined;
  if (!opts.checkpointOnly) {
    onnxDir = join(opts.outDir, "onnx");
    // Copies, not links: the folder must stay valid whatever a test does to the checkpoint file.
    pipeline = await buildPipeline(new MemoryWeights(tensors, checkpointPath), onnxDir, { ...hints, tokenizerDir, linkCheckpoint: false });
    await writeFile(
      join(onnxDir, "tiny_config.json"),
      `${JSON.stringify({ config: configName, seed, spec, vocab_size: vocab.size, bos_id: vocab.bosId, eos_id: vocab.eosId, ...hints }, null, 1)}\n`,
    );
  }
  return { checkpointPath, onnxDir, tokenizerDir, spec, vocabSize: vocab.size, bosId: vocab.bosId, eosId: vocab.eosId, hints, pipeline };
}

/** `make-tiny-model --out DIR [--seed N] [--config small|sd15-topology|sdxl-small|sdxl-refiner-small]` for the agent's CLI. */
export async function makeTinyModelCli(argv: readonly string[]): Promise<TinyModel> {
  let outDir: string | undefined;
  let seed = 0;
  let config: TinyConfigName = "small";
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const val = (): string => {
      const v = argv[++i];
      if (v === undefined) throw invalidArgument(a, "needs a value");
      return v;
    };
    if (a === "--out") outDir = val();
    else if (a === "--seed") seed = Number(val());
    else if (a === "--config") config = val() as TinyConfigName;
    else
      throw invalidArgument(
        a,
        `unknown option; usage: make-tiny-model --out DIR [--seed N] [--config ${Object.keys(TINY_SPECS).join("|")}]`,
      );
  }
  if (!outDir) throw invalidArgument("--out", "is required");
  return makeTinyModel({ outDir, seed, config });
}

/** Reads back the tiny_config.json of a generated ONNX folder. */
export async function readTinyConfig(onnxDir: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(join(onnxDir, "tiny_config.json"), "utf8")) as Record<string, unknown>;
}
