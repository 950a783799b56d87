import assert from "node:assert/strict";
import { test } from "node:test";
import { combineDenoised } from "./cfg.js";

test("one prompt, weight 1: uncond + cfg·(cond − uncond)", () => {
  const cond = Float32Array.from([1, 2, 3, -4]);
  const uncond = Float32Array.from([0.5, 2, 4, 0]);
  const out = combineDenoised([{ denoised: cond, weight: 1 }], uncond, 7);
  assert.deepEqual([...out], [0.5 + 7 * 0.5, 2, 4 - 7, -28]);
});

test("AND weights: uncond + Σ w_j·cfg·(cond_j − uncond)", () => {
  const uncond = Float32Array.from([1, 1]);
  const a = Float32Array.from([2, 0]);
  const b = Float32Array.from([1, 3]);
  const out = combineDenoised(
    [
      { denoised: a, weight: 1.2 },
      { denoised: b, weight: -0.5 },
    ],
    uncond,
    5,
  );
  const expected = [1 + 1.2 * 5 * 1 + -0.5 * 5 * 0, 1 + 1.2 * 5 * -1 + -0.5 * 5 * 2];
  assert.ok(Math.abs(out[0]! - expected[0]!) < 1e-6);
  assert.ok(Math.abs(out[1]! - expected[1]!) < 1e-6);
});

test("float32 arithmetic like torch, and in-place into the uncond buffer", () => {
  const uncond = Float32Array.from([0.1, 0.2]);
  const cond = Float32Array.from([0.3, 0.7]);
  const expected = Float32Array.from([0, 0]);
  for (let i = 0; i < 2; i++) {
    const d = Math.fround(cond[i]! - uncond[i]!);
    expected[i] = uncond[i]! + Math.fround(d * Math.fround(0.8 * 6.5));
  }
  const copy = uncond.slice();
  assert.deepEqual(combineDenoised([{ denoised: cond, weight: 0.8 }], copy, 6.5, copy), expected);
  assert.throws(() => combineDenoised([{ denoised: new Float32Array(3), weight: 1 }], uncond, 7), RangeError);
});
