import { test } from "node:test";
import assert from "node:assert/strict";
import { philoxNormalsSimd } from "./philox-simd.js";
import { philox4x32, philoxNormalsJs } from "./philox.js";

const A = Math.fround(2.3283064e-10);
const B = Math.fround(2.3283064e-10 * 6.2831855);

/** The scalar path's element i (what philox.ts passes as `exact`). */
const exactFor =
  (k0: number, k1: number, offset: number) =>
  (i: number): number => {
    const [c0, c1] = philox4x32([offset >>> 0, 0, i, 0], [k0, k1]);
    return Math.sqrt(-2 * Math.log(c0 * A + A / 2)) * Math.sin(c1 * B + B / 2);
  };

function assertSameBits(actual: Float32Array, expected: Float32Array, what: string): void {
  assert.equal(actual.length, expected.length);
  const a = new Uint32Array(actual.buffer, actual.byteOffset, actual.length);
  const e = new Uint32Array(expected.buffer, expected.byteOffset, expected.length);
  for (let i = 0; i < a.length; i++)
    if (a[i] !== e[i]) assert.fail(`${what}: element ${i} is ${actual[i]}, the scalar path gives ${expected[i]}`);
}

test("the SIMD NV loop gives the scalar path's bits: odd lengths, high key and counter bits, many keys", () => {
  const cases: Array<[number, number, number, number]> = [
    [1, 0, 0, 0],
    [2, 0, 1, 0],
    [3, 1, 2, 3],
    [5, 7, 42, 0],
    [9, 0xfffffff0, 0x80000001, 0xdeadbeef],
    [4097, 3, 99, 1],
  ];
  for (let k = 0; k < 24; k++) cases.push([16384, k * 3, (k * 2654435761) >>> 0, k]);
  for (const [n, offset, k0, k1] of cases) {
    const simd = new Float32Array(n);
    assert.ok(philoxNormalsSimd(simd, k0, k1, offset, exactFor(k0, k1, offset)), "WebAssembly SIMD is available in Node");
    const scalar = new Float32Array(n);
    philoxNormalsJs(scalar, k0, k1, offset);
    assertSameBits(simd, scalar, `n=${n} offset=${offset} key=${k0},${k1}`);
  }
});

test("elements whose float32 rounding the error bound cannot settle are recomputed exactly", () => {
  // Seed 1, offset 0: the pair (18514, 18515) lies within 2^-44 of a float32 rounding boundary.
  const calls: number[] = [];
  const exact = exactFor(1, 0, 0);
  const simd = new Float32Array(65536);
  philoxNormalsSimd(simd, 1, 0, 0, (i) => (calls.push(i), exact(i)));
  assert.deepEqual(calls, [18514, 18515]);
  const scalar = new Float32Array(65536);
  philoxNormalsJs(scalar, 1, 0, 0);
  assertSameBits(simd, scalar, "seed 1");
  // Only the flagged pair takes the slow path: with an `exact` that answers NaN nothing else changes.
  const unfixed = new Float32Array(65536);
  philoxNormalsSimd(unfixed, 1, 0, 0, () => Number.NaN);
  assert.ok(Number.isNaN(unfixed[18514]!) && Number.isNaN(unfixed[18515]!), "the flagged pair is the only one left to `exact`");
  assert.ok(unfixed.every((v, i) => i === 18514 || i === 18515 || !Number.isNaN(v)));
});
