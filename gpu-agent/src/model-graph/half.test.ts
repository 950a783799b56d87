import { test } from "node:test";
import assert from "node:assert/strict";
import { f16ToF32, f32ToF16, f32ToF16Bits } from "./half.js";
import { halfSimd } from "./half-simd.js";

const fromBits = (bits: Uint32Array): Float32Array => new Float32Array(bits.buffer, bits.byteOffset, bits.length);

test("half conversion matches IEEE 754 binary16 on known values", () => {
  const cases: Array<[number, number]> = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [65519, 0x7bff], // just under the rounding boundary to infinity
    [65520, 0x7c00], // rounds up past the largest half
    [6.103515625e-5, 0x0400], // smallest normal
    [5.960464477539063e-8, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // half of it: ties to even (zero)
    [0.333251953125, 0x3555],
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [1e6, 0x7c00], // overflow saturates to inf
  ];
  const values = Float32Array.from(cases, ([x]) => x);
  const halves = f32ToF16(values);
  cases.forEach(([x, h], i) => {
    assert.equal(halves[i], h, `f32ToF16(${x})`);
    assert.equal(f32ToF16Bits(x), h, `f32ToF16Bits(${x})`);
    if (Number.isFinite(x) && Math.abs(x) <= 65504 && x !== 2 ** -25) assert.equal(f16ToF32(Uint16Array.of(h))[0], x, `f16ToF32(${h})`);
  });
  assert.equal(f32ToF16(Float32Array.of(NaN))[0], 0x7e00);
  assert.ok(Number.isNaN(f16ToF32(Uint16Array.of(0x7e00))[0]));
});

test("half rounding is to nearest even", () => {
  // 1 + 2^-11 is exactly between 1 and 1+2^-10: ties to even (1).
  assert.equal(f32ToF16(Float32Array.of(1 + 2 ** -11))[0], 0x3c00);
  // 1 + 3*2^-11 is between 1+2^-10 and 1+2^-9: ties to even (1+2^-9).
  assert.equal(f32ToF16(Float32Array.of(1 + 3 * 2 ** -11))[0], 0x3c02);
});

test("the array conversion gives f32ToF16Bits's bits for every kind of float32", () => {
  const bits: number[] = [];
  // Every half, and the float32 values just around each rounding boundary between two halves (ties
  // included), with both signs: the cases where a rounding rule shows.
  const halves = f16ToF32(Uint16Array.from({ length: 65536 }, (_, h) => h));
  const asBits = new Uint32Array(halves.buffer);
  for (let h = 0; h < 65536; h++) {
    const b = asBits[h]!;
    if ((b & 0x7f800000) === 0x7f800000) continue;
    for (const d of [-2, -1, 0, 1, 2]) bits.push((b + d) >>> 0);
    // The midpoint to the next half up, in float32.
    const next = asBits[h + 1];
    if (next !== undefined && (h & 0x7fff) !== 0x7fff) {
      const mid = new Float32Array([(halves[h]! + halves[h + 1]!) / 2]);
      const m = new Uint32Array(mid.buffer)[0]!;
      for (const d of [-1, 0, 1]) bits.push((m + d) >>> 0);
    }
  }
  // Random bit patterns: NaNs, infinities, subnormal float32s and everything else.
  let state = 0x9e3779b9;
  for (let i = 0; i < 1 << 18; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    bits.push(state);
  }
  const input = fromBits(Uint32Array.from(bits));
  // Whole, the array goes through the SIMD loop; in pieces of 63, value by value (and across every piece edge).
  assert.ok(halfSimd() !== null, "WebAssembly SIMD is available on Node 20");
  const simd = f32ToF16(input);
  const js = new Uint16Array(input.length);
  for (let i = 0; i < input.length; i += 63) f32ToF16(input.subarray(i, i + 63), js.subarray(i, i + 63));
  for (let i = 0; i < input.length; i++) {
    const expected = f32ToF16Bits(input[i]!);
    for (const [path, got] of [
      ["SIMD", simd[i]!],
      ["JavaScript", js[i]!],
    ] as const) {
      if (got !== expected) assert.fail(`${path}: bits 0x${bits[i]!.toString(16)}: 0x${got.toString(16)} ≠ 0x${expected.toString(16)}`);
    }
  }
});

test("decoding gives the table's value for every half, in the SIMD loop and in JavaScript", () => {
  const all = Uint16Array.from({ length: 65536 }, (_, h) => h);
  const simd = f16ToF32(all);
  const js = new Float32Array(all.length);
  for (let i = 0; i < all.length; i += 63) f16ToF32(all.subarray(i, i + 63), js.subarray(i, i + 63));
  for (let h = 0; h < 65536; h++) {
    const [a, b] = [simd[h]!, js[h]!];
    // NaNs: the SIMD loop keeps the payload, the table has one NaN.
    if (!(Object.is(a, b) || (Number.isNaN(a) && Number.isNaN(b)))) assert.fail(`half 0x${h.toString(16)}: ${a} ≠ ${b}`);
  }
});

test("every half survives the round trip", () => {
  const all = Uint16Array.from({ length: 65536 }, (_, h) => h);
  const back = f32ToF16(f16ToF32(all));
  for (let h = 0; h < 65536; h++) {
    const isNaN = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
    // NaNs come back as a NaN (the decoding table holds one canonical NaN; the SIMD loop keeps payloads).
    if (isNaN) assert.equal(back[h]! & 0x7fff, 0x7e00, `half 0x${h.toString(16)}`);
    else assert.equal(back[h], h, `half 0x${h.toString(16)}`);
  }
});

test("views convert only their own values, on both paths and across the SIMD loop's chunks", () => {
  for (const length of [2, 70, 32768 + 21, 3 * 32768]) {
    const floats = Float32Array.from({ length: length + 2 }, (_, i) => (i === 0 || i === length + 1 ? 9 : (i % 7) - 3));
    const halves = new Uint16Array(length + 2);
    f32ToF16(floats.subarray(1, length + 1), halves.subarray(1, length + 1));
    assert.equal(halves[0], 0);
    assert.equal(halves[length + 1], 0);
    const back = new Float32Array(length + 2).fill(7);
    f16ToF32(halves.subarray(1, length + 1), back.subarray(1, length + 1));
    assert.deepEqual([back[0], back[length + 1]], [7, 7], `length ${length}`);
    assert.deepEqual(back.subarray(1, length + 1), floats.subarray(1, length + 1), `length ${length}`);
  }
});
