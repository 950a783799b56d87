// What the model-graph tests that run built graphs in ONNX Runtime share.
import * as ort from "onnxruntime-node";

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
