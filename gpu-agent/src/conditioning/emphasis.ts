import type { EmphasisMode } from "./chunking.js";

/** One row of a chunk batch as A1111 builds it: which encoder output it uses and its weights. */
export interface EmphasisRow {
  /** Row of the encoder output `z` holding this row's hidden states (rows with equal tokens share one). */
  encoderRow: number;
  /** Per-position weights, length `positions`. */
  multipliers: readonly number[];
  /** How many rows of A1111's batch are this row (schedule entries repeat texts). */
  count: number;
}

/** Where an emphasized row is written: `positions × hidden` values from `offset`. */
export interface EmphasisTarget {
  array: Float32Array;
  offset: number;
}

/**
 * sd_emphasis.py for one chunk index: `z` holds the encoder output of the distinct token rows
 * ([encoderRows, positions, hidden]); writes one emphasized [positions, hidden] block per row.
 * "Original" restores the mean over the whole batch, counting repeated rows, as A1111's batch has them.
 * Products are rounded to float32 as torch computes them (fp32 hidden states × fp32 multipliers).
 */
export function applyEmphasis(
  mode: EmphasisMode,
  z: Float32Array,
  positions: number,
  hidden: number,
  rows: readonly EmphasisRow[],
  targets: readonly EmphasisTarget[],
): void {
  const rowSize = positions * hidden;
  if (mode === "Ignore" || mode === "None") {
    for (let i = 0; i < rows.length; i++) {
      const start = rows[i]!.encoderRow * rowSize;
      targets[i]!.array.set(z.subarray(start, start + rowSize), targets[i]!.offset);
    }
    return;
  }
  const multipliers = rows.map((r) => Float32Array.from(r.multipliers));
  const scale = mode === "Original" ? restoringScale(z, positions, hidden, rows, multipliers) : 1;
  const round = mode === "Original";
  // Texts that share a chunk (same tokens and weights) get the same result: compute it once, copy.
  const done = new Map<string, EmphasisTarget>();
  for (let i = 0; i < rows.length; i++) {
    const target = targets[i]!;
    const key = `${rows[i]!.encoderRow}|${rows[i]!.multipliers.join(",")}`;
    const same = done.get(key);
    if (same !== undefined) {
      target.array.set(same.array.subarray(same.offset, same.offset + rowSize), target.offset);
      continue;
    }
    writeScaled(z, rows[i]!.encoderRow * rowSize, multipliers[i]!, positions, hidden, target, scale, round);
    done.set(key, target);
  }
}

// mean(z) / mean(z·m) over the batch; both are sums of per-position sums of hidden values.
function restoringScale(
  z: Float32Array,
  positions: number,
  hidden: number,
  rows: readonly EmphasisRow[],
  multipliers: readonly Float32Array[],
): number {
  const rowSize = positions * hidden;
  const positionSums = new Map<number, Float64Array>();
  let total = 0;
  let weighted = 0;
  let count = 0;
  for (let i = 0; i < rows.length; i++) {
    const row = rows[i]!;
    let sums = positionSums.get(row.encoderRow);
    if (sums === undefined) {
      sums = new Float64Array(positions);
      const base = row.encoderRow * rowSize;
      for (let k = 0; k < positions; k++) {
        let s = 0;
        const o = base + k * hidden;
        for (let h = 0; h < hidden; h++) s += z[o + h]!;
        sums[k] = s;
      }
      positionSums.set(row.encoderRow, sums);
    }
    const m = multipliers[i]!;
    let t = 0;
    let w = 0;
    for (let k = 0; k < positions; k++) {
      t += sums[k]!;
      w += sums[k]! * m[k]!;
    }
    total += row.count * t;
    weighted += row.count * w;
    count += row.count;
  }
  const n = count * rowSize;
  return Math.fround(Math.fround(total / n) / Math.fround(weighted / n));
}

function writeScaled(
  z: Float32Array,
  base: number,
  m: Float32Array,
  positions: number,
  hidden: number,
  target: EmphasisTarget,
  scale: number,
  round: boolean,
): void {
  const out = target.array;
  for (let k = 0; k < positions; k++) {
    const mk = m[k]!;
    const src = base + k * hidden;
    const dst = target.offset + k * hidden;
    if (round) {
      for (let h = 0; h < hidden; h++) out[dst + h] = Math.fround(z[src + h]! * mk) * scale;
    } else {
      for (let h = 0; h < hidden; h++) out[dst + h] = z[src + h]! * mk;
    }
  }
}
