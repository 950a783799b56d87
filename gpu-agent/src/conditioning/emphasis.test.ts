import assert from "node:assert/strict";
import { test } from "node:test";
import type { EmphasisMode } from "./chunking.js";
import { applyEmphasis, type EmphasisRow } from "./emphasis.js";
import { EmphasisKernel } from "./emphasis-kernel.js";

/**
 * The arithmetic applyEmphasis must reproduce bit for bit, written as plainly as possible:
 * per-position float64 sums of the hidden values in index order, mean(z) and mean(z·m) over the
 * batch (repeated rows weighted by their count) rounded to float32, and torch's float32 products.
 */
function reference(mode: EmphasisMode, z: Float32Array, positions: number, hidden: number, rows: readonly EmphasisRow[]): Float32Array[] {
  const rowSize = positions * hidden;
  const m = rows.map((r) => r.multipliers.map((x) => Math.fround(x)));
  let scale = 1;
  if (mode === "Original") {
    let total = 0;
    let weighted = 0;
    let count = 0;
    rows.forEach((row, i) => {
      let t = 0;
      let w = 0;
      for (let k = 0; k < positions; k++) {
        let s = 0;
        for (let h = 0; h < hidden; h++) s += z[row.encoderRow * rowSize + k * hidden + h]!;
        t += s;
        w += s * m[i]![k]!;
      }
      total += row.count * t;
      weighted += row.count * w;
      count += row.count;
    });
    const n = count * rowSize;
    scale = Math.fround(Math.fround(total / n) / Math.fround(weighted / n));
  }
  return rows.map((row, i) => {
    const out = new Float32Array(rowSize);
    for (let k = 0; k < positions; k++) {
      for (let h = 0; h < hidden; h++) {
        const v = z[row.encoderRow * rowSize + k * hidden + h]!;
        if (mode === "Original") out[k * hidden + h] = Math.fround(Math.fround(v * m[i]![k]!) * scale);
        else if (mode === "No norm") out[k * hidden + h] = v * m[i]![k]!;
        else out[k * hidden + h] = v;
      }
    }
    return out;
  });
}

/** xorshift32: reproducible values. */
function random(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

// Magnitudes from 2^-24 to 2^10 plus a large outlier channel, like CLIP's. Some positions start with
// 1, 2^60, -2^60: summed in index order that is 0 (the 1 is absorbed), in any other order it is
// not, so a changed summation order shows in the scale.
function hiddenStates(rnd: () => number, rows: number, positions: number, hidden: number): Float32Array {
  const z = new Float32Array(rows * positions * hidden);
  for (let i = 0; i < z.length; i++) {
    z[i] = (rnd() - 0.5) * 2 ** Math.floor(rnd() * 34 - 24) + (i % hidden === 3 ? -27.9 : 0);
  }
  for (let p = 0; p < rows * positions; p++) {
    if (p % 5 === 2) z.set([1, 2 ** 60, -(2 ** 60)], p * hidden);
  }
  return z;
}

function weights(rnd: () => number, positions: number): number[] {
  const pick = [1, 1, 1, 1, 1.1, 1.21, 1 / 1.1, 0.7, 1.3000000000000003, 1.4641000000000004, 0];
  return Array.from({ length: positions }, () => pick[Math.floor(rnd() * pick.length)]!);
}

function check(mode: EmphasisMode, positions: number, hidden: number, seed: number): void {
  const rnd = random(seed);
  const encoderRows = 3;
  const z = hiddenStates(rnd, encoderRows, positions, hidden);
  const shared = weights(rnd, positions);
  const rows: EmphasisRow[] = [
    { encoderRow: 0, multipliers: weights(rnd, positions), count: 2 },
    { encoderRow: 1, multipliers: shared, count: 1 },
    { encoderRow: 2, multipliers: new Array<number>(positions).fill(1), count: 3 },
    { encoderRow: 1, multipliers: [...shared], count: 1 }, // the same chunk as row 1: copied
    { encoderRow: 0, multipliers: weights(rnd, positions), count: 1 }, // same tokens, other weights
  ];
  const rowSize = positions * hidden;
  // All rows in one array at scattered offsets, the rest poisoned, to catch writes out of place.
  const out = new Float32Array(rows.length * 2 * rowSize).fill(NaN);
  const targets = rows.map((_, i) => ({ array: out, offset: (2 * i + 1) * rowSize }));
  applyEmphasis(mode, z, positions, hidden, rows, targets);
  const expected = reference(mode, z, positions, hidden, rows);
  rows.forEach((_, i) => {
    const got = out.subarray((2 * i + 1) * rowSize, (2 * i + 2) * rowSize);
    const want = expected[i]!;
    for (let j = 0; j < rowSize; j++) {
      if (!Object.is(got[j], want[j])) {
        assert.fail(`${mode} positions=${positions} hidden=${hidden} row ${i}[${j}]: ${got[j]} vs ${want[j]}`);
      }
    }
    assert.ok(out.subarray(2 * i * rowSize, (2 * i + 1) * rowSize).every(Number.isNaN), `row ${i}: gap written`);
  });
}

test("emphasis is bit-identical to the plain float64-sum / float32-product arithmetic", () => {
  // hidden % 4 === 0 runs the WebAssembly kernel (768: SD1; 12 and 8: its shorter unrolls); 6 and 10
  // run the scalar code. 77 positions leave one for the kernel's single-lane tail; 13 and 3 more.
  for (const mode of ["Original", "No norm", "Ignore", "None"] as EmphasisMode[]) {
    for (const [positions, hidden] of [
      [77, 768],
      [77, 12],
      [13, 8],
      [3, 16],
      [77, 6],
      [13, 10],
    ] as const) {
      for (const seed of [1, 2, 3]) check(mode, positions, hidden, seed * 7919 + positions + hidden);
    }
  }
});

test("the WebAssembly kernel is available on this runtime (so the fast path is what ran above)", () => {
  assert.ok(EmphasisKernel.create(768) !== undefined);
  assert.equal(EmphasisKernel.create(6), undefined);
});
