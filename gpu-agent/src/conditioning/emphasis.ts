import type { EmphasisMode } from "./chunking.js";
import { EmphasisKernel } from "./emphasis-kernel.js";

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
  // torch.asarray(batch_multipliers) is float32: every product below uses the rounded weights.
  const multipliers = rows.map((r) => Float32Array.from(r.multipliers));
  // Past KERNEL_MAX_BYTES of encoder output the scalar path runs instead, so the kernel's memory,
  // which never shrinks, stays bounded.
  const kernel = z.length * 4 <= KERNEL_MAX_BYTES ? emphasisKernel(hidden) : undefined;
  if (kernel !== undefined) {
    applyWithKernel(kernel, mode, z, positions, hidden, rows, multipliers, targets);
    return;
  }
  const scale =
    mode === "Original"
      ? restoringScale(positions, hidden, rows, multipliers, (row, sums) => sumPositions(z, row * rowSize, positions, hidden, sums))
      : 1;
  for (let i = 0; i < rows.length; i++) {
    const target = targets[i]!;
    if (copyEarlierEqualRow(rows, multipliers, targets, i, rowSize)) continue;
    if (mode === "Original") {
      writeScaled(z, rows[i]!.encoderRow * rowSize, multipliers[i]!, positions, hidden, target, scale);
    } else {
      writeWeighted(z, rows[i]!.encoderRow * rowSize, multipliers[i]!, positions, hidden, target);
    }
  }
}

const KERNEL_MAX_BYTES = 32 * 1024 * 1024;
const kernels = new Map<number, EmphasisKernel | undefined>();

// One per hidden size and thread: applyEmphasis runs to completion synchronously, so callers never
// share one at the same time.
function emphasisKernel(hidden: number): EmphasisKernel | undefined {
  if (!kernels.has(hidden)) kernels.set(hidden, EmphasisKernel.create(hidden));
  return kernels.get(hidden);
}

// Scratch layout in the kernel's memory (bytes): position sums (f64), multipliers (f32), the whole
// encoder output, one output row. `z` is copied in once; each computed row is copied out to its target.
function applyWithKernel(
  kernel: EmphasisKernel,
  mode: EmphasisMode,
  z: Float32Array,
  positions: number,
  hidden: number,
  rows: readonly EmphasisRow[],
  multipliers: readonly Float32Array[],
  targets: readonly EmphasisTarget[],
): void {
  const rowSize = positions * hidden;
  const sumsAt = 0;
  const multsAt = align16(sumsAt + positions * 8);
  const zAt = align16(multsAt + positions * 4);
  const outAt = zAt + z.length * 4;
  kernel.reserve(outAt + rowSize * 4);
  kernel.f32.set(z, zAt / 4);
  const rowAt = (encoderRow: number) => zAt + encoderRow * rowSize * 4;
  const scale =
    mode === "Original"
      ? restoringScale(positions, hidden, rows, multipliers, (row, sums) => {
          kernel.sums(rowAt(row), positions, sumsAt);
          sums.set(kernel.f64.subarray(sumsAt / 8, sumsAt / 8 + positions));
        })
      : 1;
  for (let i = 0; i < rows.length; i++) {
    if (copyEarlierEqualRow(rows, multipliers, targets, i, rowSize)) continue;
    kernel.f32.set(multipliers[i]!.subarray(0, positions), multsAt / 4);
    // "No norm" multiplies by 1 afterwards, which leaves every float32 as it is.
    kernel.scale(rowAt(rows[i]!.encoderRow), outAt, multsAt, positions, scale);
    targets[i]!.array.set(kernel.f32.subarray(outAt / 4, outAt / 4 + rowSize), targets[i]!.offset);
  }
}

const align16 = (n: number): number => Math.ceil(n / 16) * 16;

/** Texts that share a chunk (same tokens and weights) get the same result: copies an earlier one. */
function copyEarlierEqualRow(
  rows: readonly EmphasisRow[],
  multipliers: readonly Float32Array[],
  targets: readonly EmphasisTarget[],
  i: number,
  rowSize: number,
): boolean {
  const same = earlierEqualRow(rows, multipliers, i);
  if (same < 0) return false;
  const from = targets[same]!;
  targets[i]!.array.set(from.array.subarray(from.offset, from.offset + rowSize), targets[i]!.offset);
  return true;
}

function earlierEqualRow(rows: readonly EmphasisRow[], multipliers: readonly Float32Array[], i: number): number {
  const m = multipliers[i]!;
  search: for (let j = 0; j < i; j++) {
    if (rows[j]!.encoderRow !== rows[i]!.encoderRow) continue;
    const o = multipliers[j]!;
    for (let k = 0; k < m.length; k++) if (o[k] !== m[k]) continue search;
    return j;
  }
  return -1;
}

/**
 * mean(z) / mean(z·m) over the batch, rounded to float32. Both means are built from per-position
 * float64 sums of the hidden values, each summed in index order; the order is part of the result
 * (float64 addition does not associate), so it must not change.
 */
function restoringScale(
  positions: number,
  hidden: number,
  rows: readonly EmphasisRow[],
  multipliers: readonly Float32Array[],
  sumPositionsOf: (encoderRow: number, sums: Float64Array) => void,
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
      sumPositionsOf(row.encoderRow, sums);
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

// One dependent chain of additions per position would leave the CPU waiting on each add's latency;
// four positions at a time keep four independent chains in flight, each still in index order.
function sumPositions(z: Float32Array, base: number, positions: number, hidden: number, sums: Float64Array): void {
  let k = 0;
  for (; k + 4 <= positions; k += 4) {
    const o0 = base + k * hidden;
    const o1 = o0 + hidden;
    const o2 = o1 + hidden;
    const o3 = o2 + hidden;
    let s0 = 0;
    let s1 = 0;
    let s2 = 0;
    let s3 = 0;
    for (let h = 0; h < hidden; h++) {
      s0 += z[o0 + h]!;
      s1 += z[o1 + h]!;
      s2 += z[o2 + h]!;
      s3 += z[o3 + h]!;
    }
    sums[k] = s0;
    sums[k + 1] = s1;
    sums[k + 2] = s2;
    sums[k + 3] = s3;
  }
  for (; k < positions; k++) {
    const o = base + k * hidden;
    let s = 0;
    for (let h = 0; h < hidden; h++) s += z[o + h]!;
    sums[k] = s;
  }
}

/**
 * "Original": fp32(fp32(z·m)·scale). A float64 product of two float32 values is exact, so rounding
 * it once gives torch's float32 product; with m = 1 the first product is z itself.
 */
function writeScaled(
  z: Float32Array,
  base: number,
  m: Float32Array,
  positions: number,
  hidden: number,
  target: EmphasisTarget,
  scale: number,
): void {
  const out = target.array;
  for (let k = 0; k < positions; k++) {
    const mk = m[k]!;
    const src = base + k * hidden;
    const dst = target.offset + k * hidden;
    if (mk === 1) {
      for (let h = 0; h < hidden; h++) out[dst + h] = z[src + h]! * scale;
    } else {
      for (let h = 0; h < hidden; h++) out[dst + h] = Math.fround(z[src + h]! * mk) * scale;
    }
  }
}

/** "No norm": fp32(z·m); positions with weight 1 are plain copies. */
function writeWeighted(z: Float32Array, base: number, m: Float32Array, positions: number, hidden: number, target: EmphasisTarget): void {
  const out = target.array;
  for (let k = 0; k < positions; k++) {
    const mk = m[k]!;
    const src = base + k * hidden;
    const dst = target.offset + k * hidden;
    if (mk === 1) out.set(z.subarray(src, src + hidden), dst);
    else for (let h = 0; h < hidden; h++) out[dst + h] = z[src + h]! * mk;
  }
}
