import { test } from "node:test";
import assert from "node:assert/strict";
import { fromHalf, toHalf } from "./float16.js";

test("half conversion matches IEEE 754 binary16 on known values", () => {
  const cases: Array<[number, number]> = [
    [0, 0x0000],
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [6.103515625e-5, 0x0400], // smallest normal
    [5.960464477539063e-8, 0x0001], // smallest subnormal
    [0.333251953125, 0x3555],
    [Infinity, 0x7c00],
    [1e6, 0x7c00], // overflow saturates to inf
  ];
  for (const [x, h] of cases) {
    assert.equal(toHalf(x), h, `toHalf(${x})`);
    if (Number.isFinite(x) && x < 65520) assert.equal(fromHalf(h), x, `fromHalf(${h})`);
  }
  assert.ok(Number.isNaN(fromHalf(toHalf(NaN))));
});

test("half rounding is to nearest even", () => {
  // 1 + 2^-11 is exactly between 1 and 1+2^-10: ties to even (1).
  assert.equal(toHalf(1 + 2 ** -11), 0x3c00);
  // 1 + 3*2^-11 is between 1+2^-10 and 1+2^-9: ties to even (1+2^-9).
  assert.equal(toHalf(1 + 3 * 2 ** -11), 0x3c02);
});
