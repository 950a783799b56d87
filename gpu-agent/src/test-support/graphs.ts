// What the model-graph tests that run built graphs in ONNX Runtime share.
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { buildComponent } from "../model-graph/pipeline.js";
import { detectUNetConfig, timestepFrequencies } from "../model-graph/unet.js";
import { MemoryWeights, type MemoryTensor } from "../model-graph/weights.js";

/** The largest absolute difference between two arrays of the same length. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new RangeError(`lengths differ: ${a.length} and ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** One run of a graph (a file or its bytes) in a session of its own, released after. */
export async function runGraph(model: string | Uint8Array, feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
  const s = typeof model === "string" ? await ort.InferenceSession.create(model) : await ort.InferenceSession.create(model);
  try {
    return await s.run(feeds);
  } finally {
    await s.release();
  }
}

/** Token rows as a CLIP tokenizer gives them: BOS, the tokens, EOS, then `pad` to `seq`. */
export function tokenRows(rows: number[][], pad: number, ids: { bosId: number; eosId: number }, seq = 77): Int32Array {
  const out = new Int32Array(rows.length * seq).fill(pad);
  rows.forEach((tokens, r) => {
    out[r * seq] = ids.bosId;
    out.set(tokens, r * seq + 1);
    out[r * seq + 1 + tokens.length] = ids.eosId;
  });
  return out;
}

/** sgm's float32 argument x·freq (torch computes both in float32), then [cos, sin] in float64: a size id's embedding. */
export function fourierReference(x: number, dim: number): Float64Array {
  const freqs = timestepFrequencies(dim);
  const half = dim / 2;
  const out = new Float64Array(dim);
  for (let i = 0; i < half; i++) {
    const arg = Math.fround(Math.fround(x) * freqs[i]!);
    out[i] = Math.cos(arg);
    out[half + i] = Math.sin(arg);
  }
  return out;
}

/**
 * A UNet graph built alone from `t` (4 heads, as the tiny SDXL configs have) into `<dir>/<name>/unet/`;
 * `timeIds` sets its time-id count (the refiner's 5). Returns the graph's path.
 */
export async function buildTestUnet(dir: string, name: string, t: ReadonlyMap<string, MemoryTensor>, timeIds?: number): Promise<string> {
  const w = new MemoryWeights(t, name);
  const unet = { ...detectUNetConfig(w, { heads: 4 }), ...(timeIds === undefined ? {} : { timeIds }) };
  await buildComponent("unet", w, { unet }, {}, join(dir, name), { linkCheckpoint: false }, {});
  return join(dir, name, "unet", "model.onnx");
}
