// CLIP text encoder: SD1's HF CLIPTextModel layout (`cond_stage_model.transformer.text_model.*`) and SD2's
// OpenCLIP layout (`cond_stage_model.model.*`), and SDXL's two encoders under `conditioner.embedders.N.*`.
// Outputs last_hidden_state, pooler_output (or, for a projected encoder, text_embeds) and hidden_states.0..N
// (0 = embeddings) so that the caller can apply CLIP skip.

import { ModelFileError } from "./errors.js";
import type { Net } from "./nn.js";
import type { WeightSource } from "./weights.js";

export const HF_CLIP_PREFIX = "cond_stage_model.transformer.text_model.";
export const OPEN_CLIP_PREFIX = "cond_stage_model.model.";
/** Where SD1/SD2 checkpoints keep their text encoder; checkpoints from old transformers versions lack `text_model.`. */
export const SD_TEXT_PREFIXES: readonly string[] = [HF_CLIP_PREFIX, "cond_stage_model.transformer.", OPEN_CLIP_PREFIX];

export interface TextEncoderConfig {
  readonly layout: "hf-clip" | "open-clip";
  readonly prefix: string;
  readonly vocabSize: number;
  readonly hidden: number;
  readonly maxPositions: number;
  /** Transformer layers in the graph. */
  readonly layers: number;
  readonly heads: number;
  readonly activation: "quick_gelu" | "gelu";
  /**
   * Width of OpenCLIP's text_projection. Set only when the graph runs every stored layer, since the pooled
   * embedding it projects is taken after the whole stack (SDXL's second encoder); the graph then outputs
   * text_embeds instead of pooler_output.
   */
  readonly projectionDim?: number;
}

export interface TextEncoderHint {
  readonly heads?: number;
  readonly layers?: number;
  /** Prefixes to look for the encoder under, in order; each may hold either layout. Default SD_TEXT_PREFIXES. */
  readonly prefixes?: readonly string[];
  /** Run every stored layer (SDXL's OpenCLIP-G) instead of dropping OpenCLIP's last one (SD2). */
  readonly fullStack?: boolean;
}

/** Layer count, widths and layout from the checkpoint; heads from `heads` or hidden/64. */
export function detectTextEncoderConfig(w: WeightSource, hint: TextEncoderHint = {}): TextEncoderConfig {
  const prefixes = hint.prefixes ?? SD_TEXT_PREFIXES;
  const prefix = prefixes.find((p) => w.has(`${p}embeddings.token_embedding.weight`) || w.has(`${p}token_embedding.weight`));
  if (prefix === undefined)
    throw ModelFileError.invalidFile(
      w.label,
      `no CLIP text encoder found (nothing under ${prefixes.map((p) => p.slice(0, -1)).join(", ")})`,
    );
  const hf = w.has(`${prefix}embeddings.token_embedding.weight`);
  const tok = w.shape(hf ? `${prefix}embeddings.token_embedding.weight` : `${prefix}token_embedding.weight`)!;
  const pos = w.shape(hf ? `${prefix}embeddings.position_embedding.weight` : `${prefix}positional_embedding`);
  if (!pos) throw ModelFileError.invalidFile(w.label, "CLIP text encoder has no position embedding");
  let stored = 0;
  while (w.has(hf ? `${prefix}encoder.layers.${stored}.layer_norm1.weight` : `${prefix}transformer.resblocks.${stored}.ln_1.weight`))
    stored++;
  if (stored === 0) throw ModelFileError.invalidFile(w.label, "CLIP text encoder has no layers");
  const hidden = tok[1]!;
  const heads = hint.heads ?? hidden / 64;
  if (!Number.isInteger(heads) || heads < 1 || hidden % heads !== 0) {
    throw ModelFileError.invalidFile(w.label, `cannot infer attention heads for width ${hidden}; pass them in the config`);
  }
  // SD2 conditions on OpenCLIP's penultimate layer, so the last resblock is never run (as in diffusers' conversion).
  const layers = hint.layers ?? (hf || hint.fullStack === true ? stored : stored - 1);
  if (layers > stored || layers < 1) throw ModelFileError.invalidFile(w.label, `text encoder has ${stored} layers; ${layers} requested`);
  const projection = hf || layers !== stored ? undefined : w.shape(`${prefix}text_projection`);
  if (projection && (projection.length !== 2 || projection[0] !== hidden)) {
    throw ModelFileError.invalidFile(w.label, `${prefix}text_projection is ${JSON.stringify(projection)}, not [${hidden}, n]`);
  }
  return {
    layout: hf ? "hf-clip" : "open-clip",
    prefix,
    vocabSize: tok[0]!,
    hidden,
    maxPositions: pos[0]!,
    layers,
    heads,
    activation: hf ? "quick_gelu" : "gelu",
    ...(projection ? { projectionDim: projection[1]! } : {}),
  };
}

interface LayerKeys {
  ln1: string;
  ln2: string;
  out: string;
  fc1: string;
  fc2: string;
}

function layerKeys(cfg: TextEncoderConfig, i: number): LayerKeys {
  if (cfg.layout === "hf-clip") {
    const l = `${cfg.prefix}encoder.layers.${i}`;
    return { ln1: `${l}.layer_norm1`, ln2: `${l}.layer_norm2`, out: `${l}.self_attn.out_proj`, fc1: `${l}.mlp.fc1`, fc2: `${l}.mlp.fc2` };
  }
  const l = `${cfg.prefix}transformer.resblocks.${i}`;
  return { ln1: `${l}.ln_1`, ln2: `${l}.ln_2`, out: `${l}.attn.out_proj`, fc1: `${l}.mlp.c_fc`, fc2: `${l}.mlp.c_proj` };
}

export function buildTextEncoder(net: Net, cfg: TextEncoderConfig): void {
  const g = net.g;
  const ft = net.elem;
  const p = cfg.prefix;
  const hf = cfg.layout === "hf-clip";
  const ids = g.input("input_ids", "int32", ["batch", "sequence"]);
  const batch = g.op1("Shape", [ids], { start: 0, end: 1 });
  const seq = g.op1("Shape", [ids], { start: 1, end: 2 });
  const d = cfg.hidden;

  const tokens = g.op1("Gather", [net.param(hf ? `${p}embeddings.token_embedding.weight` : `${p}token_embedding.weight`), ids], {
    axis: 0,
  });
  const posTable = net.param(hf ? `${p}embeddings.position_embedding.weight` : `${p}positional_embedding`);
  const positions = g.op1("Slice", [posTable, g.ints([0]), seq, g.ints([0])]);
  const embeddings = net.add(tokens, positions);
  const toBSD = (x2d: string): string => g.op1("Reshape", [x2d, g.op1("Concat", [batch, g.ints([-1, d])], { axis: 0 })]);

  // Causal mask: -inf above the diagonal.
  const minusInf = {
    t: {
      name: "",
      elemType: ft,
      dims: [1],
      data: ft === "float32" ? new Uint8Array(new Float32Array([-Infinity]).buffer) : new Uint8Array(new Uint16Array([0xfc00]).buffer),
    },
  };
  const square = g.op1("ConstantOfShape", [g.op1("Concat", [seq, seq], { axis: 0 })], { value: minusInf });
  const mask = g.op1("Trilu", [square, g.constant("int64", [], [1])], { upper: 1 });

  const hiddenStates = [embeddings];
  let h = g.op1("Reshape", [embeddings, g.ints([-1, d])]);
  const headDim = d / cfg.heads;
  for (let i = 0; i < cfg.layers; i++) {
    const k = layerKeys(cfg, i);
    h = g.withScope(`layers.${i}`, () => {
      const n = net.layerNorm(h, k.ln1, 1e-5);
      let q: string, kk: string, v: string;
      if (hf) {
        const a = `${p}encoder.layers.${i}.self_attn`;
        [q, kk, v] = [net.gemm(n, `${a}.q_proj`), net.gemm(n, `${a}.k_proj`), net.gemm(n, `${a}.v_proj`)];
      } else {
        const a = `${p}transformer.resblocks.${i}.attn`;
        const qkv = net.gemmKeys(n, `${a}.in_proj_weight`, `${a}.in_proj_bias`);
        [q, kk, v] = g.op("Split", [qkv, g.ints([d, d, d])], { axis: 1 }, { outputs: 3 }) as [string, string, string];
      }
      let x = net.add(h, net.gemm(net.attention(q, kk, v, batch, cfg.heads, headDim, mask), k.out));
      const m = net.gemm(net.layerNorm(x, k.ln2, 1e-5), k.fc1);
      x = net.add(x, net.gemm(cfg.activation === "quick_gelu" ? net.quickGelu(m) : net.gelu(m), k.fc2));
      return x;
    });
    hiddenStates.push(toBSD(h));
  }
  const last2d = net.layerNorm(h, hf ? `${p}final_layer_norm` : `${p}ln_final`, 1e-5);
  const lastHidden = toBSD(last2d);
  if (cfg.projectionDim === undefined) net.output(lastHidden, "last_hidden_state", ["batch", "sequence", d]);

  // Pooled: the final state at the highest token id (EOS), as CLIPTextModel's legacy argmax rule.
  const eos = g.op1("ArgMax", [ids], { axis: -1, keepdims: 0 });
  const b = g.op1("Squeeze", [batch, g.ints([0])]);
  const rows = g.op1("Range", [g.constant("int64", [], [0]), b, g.constant("int64", [], [1])]);
  const seqScalar = g.op1("Squeeze", [seq, g.ints([0])]);
  const flat = net.add(g.op1("Mul", [rows, seqScalar]), eos);
  const pooled = g.op1("Gather", [last2d, flat], { axis: 0 });
  if (cfg.projectionDim === undefined) {
    net.output(pooled, "pooler_output", ["batch", d]);
  } else {
    // OpenCLIP applies the projection as `x @ text_projection`: the matrix is [hidden, projection], not a Linear.
    const embeds = g.op1("MatMul", [pooled, net.param(`${p}text_projection`)]);
    // In the order of optimum's CLIPTextModelWithProjection export.
    net.output(embeds, "text_embeds", ["batch", cfg.projectionDim]);
    net.output(lastHidden, "last_hidden_state", ["batch", "sequence", d]);
  }
  // Outputs in the order of the diffusers export: callers that take output 0 of an unprojected encoder get last_hidden_state.
  hiddenStates.forEach((v, i) => net.output(v, `hidden_states.${i}`, ["batch", "sequence", d]));
}
