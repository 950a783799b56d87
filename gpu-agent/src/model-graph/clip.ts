// CLIP text encoder: SD1's HF CLIPTextModel layout (`cond_stage_model.transformer.text_model.*`) and SD2's
// OpenCLIP layout (`cond_stage_model.model.*`). Outputs last_hidden_state, pooler_output and
// hidden_states.0..N (0 = embeddings) so that the caller can apply CLIP skip.

import { ModelFileError } from "./errors.js";
import type { Net } from "./nn.js";
import type { WeightSource } from "./weights.js";

export const HF_CLIP_PREFIX = "cond_stage_model.transformer.text_model.";
export const OPEN_CLIP_PREFIX = "cond_stage_model.model.";

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
}

/** Layer count, widths and layout from the checkpoint; heads from `heads` or hidden/64. */
export function detectTextEncoderConfig(w: WeightSource, hint: { heads?: number; layers?: number } = {}): TextEncoderConfig {
  // Checkpoints saved with old transformers versions lack the `text_model.` level.
  const hfPrefix = [HF_CLIP_PREFIX, "cond_stage_model.transformer."].find((p) => w.has(`${p}embeddings.token_embedding.weight`));
  const hf = hfPrefix !== undefined;
  const open = w.has(`${OPEN_CLIP_PREFIX}token_embedding.weight`);
  if (!hf && !open)
    throw ModelFileError.invalidFile(
      w.label,
      "no CLIP text encoder found (neither cond_stage_model.transformer nor cond_stage_model.model)",
    );
  const prefix = hfPrefix ?? OPEN_CLIP_PREFIX;
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
  const layers = hint.layers ?? (hf ? stored : stored - 1);
  if (layers > stored || layers < 1) throw ModelFileError.invalidFile(w.label, `text encoder has ${stored} layers; ${layers} requested`);
  return {
    layout: hf ? "hf-clip" : "open-clip",
    prefix,
    vocabSize: tok[0]!,
    hidden,
    maxPositions: pos[0]!,
    layers,
    heads,
    activation: hf ? "quick_gelu" : "gelu",
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
  net.output(toBSD(last2d), "last_hidden_state", ["batch", "sequence", d]);

  // Pooled: the final state at the highest token id (EOS), as CLIPTextModel's legacy argmax rule.
  const eos = g.op1("ArgMax", [ids], { axis: -1, keepdims: 0 });
  const b = g.op1("Squeeze", [batch, g.ints([0])]);
  const rows = g.op1("Range", [g.constant("int64", [], [0]), b, g.constant("int64", [], [1])]);
  const seqScalar = g.op1("Squeeze", [seq, g.ints([0])]);
  const flat = net.add(g.op1("Mul", [rows, seqScalar]), eos);
  net.output(g.op1("Gather", [last2d, flat], { axis: 0 }), "pooler_output", ["batch", d]);
  // Outputs in the order of the diffusers export: callers that take output 0 get last_hidden_state.
  hiddenStates.forEach((v, i) => net.output(v, `hidden_states.${i}`, ["batch", "sequence", d]));
}
