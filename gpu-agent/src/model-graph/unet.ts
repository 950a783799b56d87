// UNet2DCondition of SD 1.x/2.x and SDXL (LDM/sgm `openaimodel.UNetModel` layout), built from a config that
// is read off the checkpoint's tensor shapes. Initializers are named `model.diffusion_model.*` as in the file.

import { ModelFileError } from "./errors.js";
import type { Net } from "./nn.js";
import type { GraphBuilder } from "./onnx.js";
import type { WeightSource } from "./weights.js";

export const UNET_PREFIX = "model.diffusion_model.";

/** SDXL's size and crop conditioning: original h, w, crop top, left, target h, w (diffusers' `time_ids`). */
export const TIME_IDS = 6;
/** The SDXL refiner's: original h, w, crop top, left, aesthetic score (the target size is not an input). */
export const REFINER_TIME_IDS = 5;
/** Width of each time id's sinusoidal embedding (sgm's ConcatTimestepEmbedderND outdim, diffusers' addition_time_embed_dim). */
export const TIME_ID_EMBED_DIM = 256;

export interface UNetConfig {
  readonly prefix: string;
  readonly inChannels: number;
  readonly outChannels: number;
  readonly modelChannels: number;
  /** Output channels of each resolution level. */
  readonly levelChannels: readonly number[];
  readonly layersPerBlock: number;
  /** Whether each level has a spatial transformer after its resnets. */
  readonly attentionLevels: readonly boolean[];
  /** Attention heads per level (SD1: 8 everywhere; SD2: channels / 64). */
  readonly heads: readonly number[];
  readonly contextDim: number;
  /** The deepest spatial transformer's block count (SD1/SD2: 1 everywhere). */
  readonly transformerDepth: number;
  /** Transformer blocks after each input-level resnet (0 at levels without attention); SDXL: [0, 2, 10]. */
  readonly transformerDepths: readonly number[];
  /** Transformer blocks of the middle block (0 when it has no attention). */
  readonly middleTransformerDepth: number;
  /**
   * Input width of `label_emb` (SDXL's "vector" conditioning: pooled text embeds + sinusoidal size and crop
   * embeddings); 0 when the UNet has none. With it the graph takes text_embeds and time_ids.
   */
  readonly admInChannels: number;
  /**
   * Width of the time_ids input where it is not SDXL base's TIME_IDS (the refiner's 5). Absent otherwise,
   * so that the configs recorded in existing build manifests stay as they were.
   */
  readonly timeIds?: number;
  /** SD2 projects in/out of the transformer with Linear, SD1 with a 1x1 conv. */
  readonly linearProjection: boolean;
  readonly normGroups: number;
  readonly timeEmbedDim: number;
}

export interface HeadsHint {
  /** A fixed head count for every level (SD1's `num_heads`). */
  readonly heads?: number;
  /** A fixed head width (SD2's `num_head_channels` = 64). */
  readonly headDim?: number;
}

/** Reads the UNet config off tensor shapes. Heads cannot be seen in weights; they come from `hint`. */
export function detectUNetConfig(w: WeightSource, hint: HeadsHint = {}, prefix = UNET_PREFIX): UNetConfig {
  const shape = (k: string): readonly number[] => {
    const s = w.shape(prefix + k);
    if (!s) throw ModelFileError.invalidFile(w.label, `not a UNet checkpoint: missing ${prefix + k}`);
    return s;
  };
  const convIn = shape("input_blocks.0.0.weight");
  const modelChannels = convIn[0]!;
  const inChannels = convIn[1]!;
  const outChannels = shape("out.2.weight")[0]!;
  const timeEmbedDim = shape("time_embed.0.weight")[0]!;

  const levelChannels: number[] = [];
  const attentionLevels: boolean[] = [];
  let layersPerBlock = 0;
  let countInLevel = 0;
  const transformerDepths: number[] = [];
  let contextDim = 0;
  let linearProjection = false;
  const depthOf = (block: string): number => {
    let d = 0;
    while (w.has(`${prefix}${block}.transformer_blocks.${d}.norm1.weight`)) d++;
    return d;
  };
  for (let i = 1; w.has(`${prefix}input_blocks.${i}.0.op.weight`) || w.has(`${prefix}input_blocks.${i}.0.in_layers.2.weight`); i++) {
    if (w.has(`${prefix}input_blocks.${i}.0.op.weight`)) {
      layersPerBlock ||= countInLevel;
      if (countInLevel !== layersPerBlock) throw ModelFileError.invalidFile(w.label, "UNet levels have different numbers of resnets");
      countInLevel = 0;
      continue;
    }
    const ch = shape(`input_blocks.${i}.0.in_layers.2.weight`)[0]!;
    const attn = w.has(`${prefix}input_blocks.${i}.1.proj_in.weight`);
    if (countInLevel === 0) {
      levelChannels.push(ch);
      attentionLevels.push(attn);
      transformerDepths.push(attn ? depthOf(`input_blocks.${i}.1`) : 0);
    }
    countInLevel++;
    if (attn && contextDim === 0) {
      contextDim = shape(`input_blocks.${i}.1.transformer_blocks.0.attn2.to_k.weight`)[1]!;
      linearProjection = shape(`input_blocks.${i}.1.proj_in.weight`).length === 2;
    }
  }
  layersPerBlock ||= countInLevel;
  if (levelChannels.length === 0) throw ModelFileError.invalidFile(w.label, "not a UNet checkpoint: no input blocks");
  const middleAttention = w.has(`${prefix}middle_block.1.proj_in.weight`);
  if (contextDim === 0 && middleAttention) {
    contextDim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]!;
    linearProjection = shape("middle_block.1.proj_in.weight").length === 2;
  }
  const middleTransformerDepth = middleAttention ? depthOf("middle_block.1") : 0;
  const admInChannels = w.has(`${prefix}label_emb.0.0.weight`) ? shape("label_emb.0.0.weight")[1]! : 0;
  const headDim = hint.headDim ?? (hint.heads === undefined ? (contextDim === 1024 ? 64 : undefined) : undefined);
  const heads = levelChannels.map((ch) => {
    if (headDim !== undefined) {
      if (ch % headDim !== 0) throw ModelFileError.invalidFile(w.label, `${ch} channels do not split into heads of ${headDim}`);
      return ch / headDim;
    }
    const h = hint.heads ?? 8;
    if (ch % h !== 0) throw ModelFileError.invalidFile(w.label, `${ch} channels do not split into ${h} heads`);
    return h;
  });
  return {
    prefix,
    inChannels,
    outChannels,
    modelChannels,
    levelChannels,
    layersPerBlock,
    attentionLevels,
    heads,
    contextDim,
    transformerDepth: Math.max(middleTransformerDepth, ...transformerDepths),
    transformerDepths,
    middleTransformerDepth,
    admInChannels,
    linearProjection,
    normGroups: 32,
    timeEmbedDim,
  };
}

/** Frequencies of the sinusoidal timestep embedding, computed in float32 the way torch does. */
export function timestepFrequencies(dim: number, freqShift = 0, maxPeriod = 10000): Float32Array {
  const half = Math.floor(dim / 2);
  const fr = Math.fround;
  const logMax = fr(-Math.log(maxPeriod));
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) out[i] = fr(Math.exp(fr(fr(logMax * i) / fr(half - freqShift))));
  return out;
}

/** How many time ids an SDXL UNet takes: 6 for the base, 5 for the refiner. */
export function timeIdsOf(cfg: Pick<UNetConfig, "timeIds">): number {
  return cfg.timeIds ?? TIME_IDS;
}

/** Width of the pooled text embedding an SDXL UNet with `admInChannels` label_emb inputs takes. */
export function textEmbedsDim(cfg: Pick<UNetConfig, "admInChannels" | "timeIds">): number {
  return cfg.admInChannels - timeIdsOf(cfg) * TIME_ID_EMBED_DIM;
}

/**
 * sgm's `timestep_embedding(x, dim)` of every element of a float32 [B, n] tensor, concatenated per row:
 * [B, n·dim], each dim-wide block [cos, sin]. Stays float32: sizes of 1024 and more fall where fp16
 * steps by whole units, too coarse for the arguments.
 */
export function sinusoidalEmbedding(g: GraphBuilder, x: string, dim: number): string {
  const freqs = g.constant("float32", [1, 1, dim / 2], timestepFrequencies(dim));
  const args = g.op1("Mul", [g.op1("Unsqueeze", [x, g.ints([2])]), freqs]);
  const emb = g.op1("Concat", [g.op1("Cos", [args]), g.op1("Sin", [args])], { axis: 2 });
  return g.op1("Reshape", [emb, g.ints([0, -1])]);
}

interface Ctx {
  net: Net;
  cfg: UNetConfig;
  batch: string;
  temb: string;
  context2d: string;
}

function resBlock(c: Ctx, x: string, key: string): string {
  const { net, cfg } = c;
  const p = cfg.prefix + key;
  return net.g.withScope(key, () => {
    let h = net.silu(net.groupNorm(x, `${p}.in_layers.0`, cfg.normGroups, 1e-5));
    h = net.conv(h, `${p}.in_layers.2`);
    const t = net.gemm(net.silu(c.temb), `${p}.emb_layers.1`);
    h = net.add(h, net.op1("Unsqueeze", [t, net.g.ints([2, 3])]));
    h = net.silu(net.groupNorm(h, `${p}.out_layers.0`, cfg.normGroups, 1e-5));
    h = net.conv(h, `${p}.out_layers.3`);
    const skip = net.has(`${p}.skip_connection.weight`) ? net.conv(x, `${p}.skip_connection`) : x;
    return net.add(skip, h);
  });
}

/** A spatial transformer with as many blocks as the checkpoint has under `key` (SDXL varies them per block). */
function transformer(c: Ctx, x: string, key: string, heads: number): string {
  const { net, cfg } = c;
  const p = cfg.prefix + key;
  return net.g.withScope(key, () => {
    const channels = net.shapeOf(`${p}.norm.weight`)[0]!;
    const inner = net.shapeOf(`${p}.proj_in.weight`)[0]!;
    const headDim = inner / heads;
    let h = net.groupNorm(x, `${p}.norm`, cfg.normGroups, 1e-6);
    const toTokens = (v: string, ch: number): string =>
      net.op1("Reshape", [
        net.op1("Transpose", [net.op1("Reshape", [v, net.g.ints([0, 0, -1])])], { perm: [0, 2, 1] }),
        net.g.ints([-1, ch]),
      ]);
    if (cfg.linearProjection) h = net.gemm(toTokens(h, channels), `${p}.proj_in`);
    else h = toTokens(net.conv(h, `${p}.proj_in`), inner);
    for (let d = 0; net.has(`${p}.transformer_blocks.${d}.norm1.weight`); d++) {
      const b = `${p}.transformer_blocks.${d}`;
      net.g.withScope(`transformer_blocks.${d}`, () => {
        let n = net.layerNorm(h, `${b}.norm1`, 1e-5);
        let a = net.attention(
          net.gemm(n, `${b}.attn1.to_q`),
          net.gemm(n, `${b}.attn1.to_k`),
          net.gemm(n, `${b}.attn1.to_v`),
          c.batch,
          heads,
          headDim,
        );
        h = net.add(net.gemm(a, `${b}.attn1.to_out.0`), h);
        n = net.layerNorm(h, `${b}.norm2`, 1e-5);
        a = net.attention(
          net.gemm(n, `${b}.attn2.to_q`),
          net.gemm(c.context2d, `${b}.attn2.to_k`),
          net.gemm(c.context2d, `${b}.attn2.to_v`),
          c.batch,
          heads,
          headDim,
        );
        h = net.add(net.gemm(a, `${b}.attn2.to_out.0`), h);
        n = net.layerNorm(h, `${b}.norm3`, 1e-5);
        const proj = net.gemm(n, `${b}.ff.net.0.proj`);
        const [value, gate] = net.g.op(
          "Split",
          [proj, net.g.ints([net.outFeatures(`${b}.ff.net.0.proj`) / 2, net.outFeatures(`${b}.ff.net.0.proj`) / 2])],
          { axis: 1 },
          { outputs: 2 },
        ) as [string, string];
        h = net.add(net.gemm(net.mul(value, net.gelu(gate)), `${b}.ff.net.2`), h);
      });
    }
    // Back to NCHW: [B·HW, C] → [B, HW, C] → [B, C, HW] → [B, C, H, W].
    const fromTokens = (v: string, ch: number): string => {
      const bnc = net.op1("Reshape", [v, net.op1("Concat", [c.batch, net.g.ints([-1, ch])], { axis: 0 })]);
      const bcn = net.op1("Transpose", [bnc], { perm: [0, 2, 1] });
      return net.op1("Reshape", [bcn, net.op1("Shape", [x])]);
    };
    if (cfg.linearProjection) h = fromTokens(net.gemm(h, `${p}.proj_out`), channels);
    else h = net.conv(fromTokens(h, inner), `${p}.proj_out`);
    return net.add(h, x);
  });
}

/**
 * Adds the UNet to `net.g`: inputs sample/timestep/encoder_hidden_states (and, with a label_emb, SDXL's
 * text_embeds [batch, textEmbedsDim] and time_ids float32 [batch, 6], or [batch, 5] for the refiner),
 * output out_sample.
 */
export function buildUNet(net: Net, cfg: UNetConfig): void {
  const g = net.g;
  const sample = net.input("sample", ["batch", cfg.inChannels, "height", "width"]);
  // Fractional timesteps near 1000 need float32 (fp16 has a step of 0.5 there), as in diffusers.
  const timestep = g.input("timestep", "float32", ["batch"]);
  const context = net.input("encoder_hidden_states", ["batch", "sequence", cfg.contextDim]);
  const batch = g.op1("Shape", [sample], { start: 0, end: 1 });
  const p = cfg.prefix;

  let temb = g.withScope("time_embedding", () => {
    const dim = net.shapeOf(`${p}time_embed.0.weight`)[1]!;
    const freqs = g.constant("float32", [1, dim / 2], timestepFrequencies(dim));
    const args = net.mul(g.op1("Unsqueeze", [timestep, g.ints([1])]), freqs);
    // flip_sin_to_cos: [cos, sin].
    let emb = g.op1("Concat", [g.op1("Cos", [args]), g.op1("Sin", [args])], { axis: 1 });
    // One timestep for the whole batch is allowed (the diffusers pipeline passes shape [1]).
    emb = g.op1("Expand", [emb, g.op1("Concat", [batch, g.ints([1])], { axis: 0 })]);
    return net.gemm(net.silu(net.gemm(net.fromFloat32(emb), `${p}time_embed.0`)), `${p}time_embed.2`);
  });
  if (cfg.admInChannels > 0) {
    if (textEmbedsDim(cfg) <= 0) {
      throw ModelFileError.invalidFile(
        net.weights.label,
        `label_emb takes ${cfg.admInChannels} features; SDXL's take text embeds plus ${timeIdsOf(cfg)}×${TIME_ID_EMBED_DIM} size and crop features`,
      );
    }
    const textEmbeds = net.input("text_embeds", ["batch", textEmbedsDim(cfg)]);
    const timeIds = g.input("time_ids", "float32", ["batch", timeIdsOf(cfg)]);
    const label = g.withScope("add_embedding", () => {
      const sizes = net.fromFloat32(sinusoidalEmbedding(g, timeIds, TIME_ID_EMBED_DIM));
      const y = g.op1("Concat", [textEmbeds, sizes], { axis: 1 });
      return net.gemm(net.silu(net.gemm(y, `${p}label_emb.0.0`)), `${p}label_emb.0.2`);
    });
    temb = net.add(temb, label);
  }
  const ctx: Ctx = { net, cfg, batch, temb, context2d: g.op1("Reshape", [context, g.ints([-1, cfg.contextDim])]) };

  let h = g.withScope("conv_in", () => net.conv(sample, `${p}input_blocks.0.0`));
  const skips: string[] = [h];
  let idx = 1;
  const levels = cfg.levelChannels.length;
  for (let level = 0; level < levels; level++) {
    for (let j = 0; j < cfg.layersPerBlock; j++, idx++) {
      h = resBlock(ctx, h, `input_blocks.${idx}.0`);
      if (cfg.attentionLevels[level]) h = transformer(ctx, h, `input_blocks.${idx}.1`, cfg.heads[level]!);
      skips.push(h);
    }
    if (level < levels - 1) {
      const key = `input_blocks.${idx}.0.op`;
      h = g.withScope(key, () => net.conv(h, p + key, { stride: 2 }));
      skips.push(h);
      idx++;
    }
  }

  h = resBlock(ctx, h, "middle_block.0");
  if (net.has(`${p}middle_block.1.proj_in.weight`)) {
    h = transformer(ctx, h, "middle_block.1", cfg.heads[levels - 1]!);
    h = resBlock(ctx, h, "middle_block.2");
  } else {
    h = resBlock(ctx, h, "middle_block.1");
  }

  idx = 0;
  for (let level = levels - 1; level >= 0; level--) {
    for (let j = 0; j <= cfg.layersPerBlock; j++, idx++) {
      const skip = skips.pop();
      if (!skip) throw ModelFileError.invalidFile(net.weights.label, "UNet output blocks outnumber input blocks");
      h = resBlock(ctx, g.op1("Concat", [h, skip], { axis: 1 }), `output_blocks.${idx}.0`);
      let sub = 1;
      if (cfg.attentionLevels[level]) h = transformer(ctx, h, `output_blocks.${idx}.${sub++}`, cfg.heads[level]!);
      if (level > 0 && j === cfg.layersPerBlock) {
        const key = `output_blocks.${idx}.${sub}.conv`;
        // Upsample to the size of the skip tensor that comes next, so odd latent sizes round-trip.
        const target = skips[skips.length - 1]!;
        h = g.withScope(key, () => {
          const size = g.op1("Shape", [target], { start: 2, end: 4 });
          const sizes = g.op1("Concat", [g.op1("Shape", [h], { start: 0, end: 2 }), size], { axis: 0 });
          const up = g.op1("Resize", [h, "", "", sizes], {
            mode: "nearest",
            coordinate_transformation_mode: "asymmetric",
            nearest_mode: "floor",
          });
          return net.conv(up, p + key);
        });
      }
    }
  }

  const out = g.withScope("out", () => net.conv(net.silu(net.groupNorm(h, `${p}out.0`, cfg.normGroups, 1e-5)), `${p}out.2`));
  net.output(out, "out_sample", ["batch", cfg.outChannels, "height", "width"]);
}
