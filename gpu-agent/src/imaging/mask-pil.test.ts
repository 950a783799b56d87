// Expected bytes come from Pillow 9.4.0 (Debian bookworm's python3-pil; A1111 v1.10 pins 9.5.0, whose
// Resample.c, BoxBlur.c, Paste.c and AlphaComposite.c are the same) run on the same inputs.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  alphaComposite,
  luma601,
  pasteWithMask,
  pilBoxRadius,
  pilCrop,
  pilGaussianBlur,
  pilResize,
  premultiply,
  rgbToL,
  unpremultiply,
} from "./mask-pil.js";
import type { Image8 } from "./resize-modes.js";

const img = (width: number, height: number, channels: number, data: number[]): Image8 => ({
  width,
  height,
  channels,
  data: Uint8Array.from(data),
});

/** 9×7 L picture: (i·37) mod 256 in row-major order. */
const RS_IN = img(
  9,
  7,
  1,
  Array.from({ length: 63 }, (_, i) => (i * 37) % 256),
);

test("resize: PIL BICUBIC 9×7 → 3×2 and LANCZOS 9×7 → 5×11 (two-pass, 22-bit fixed point)", () => {
  assert.deepEqual([...pilResize(RS_IN, 3, 2, "bicubic").data], [110, 124, 109, 137, 122, 136]);
  assert.deepEqual(
    [...pilResize(RS_IN, 5, 11, "lanczos").data],
    [
      11, 69, 151, 198, 16, 34, 115, 177, 111, 47, 101, 177, 159, 18, 117, 175, 178, 52, 71, 173, 182, 102, 31, 174, 172, 127, 38, 123, 208,
      119, 74, 72, 215, 144, 64, 73, 175, 194, 68, 71, 129, 228, 87, 69, 145, 199, 135, 69, 131, 212, 230, 48, 95, 177, 235,
    ],
  );
  // Same size is a copy, not a filter pass.
  const same = pilResize(RS_IN, 9, 7, "lanczos");
  assert.deepEqual(same.data, RS_IN.data);
  assert.notEqual(same.data, RS_IN.data);
  // Channels are independent: an RGB picture of three copies resizes to three copies.
  const rgb = img(
    9,
    7,
    3,
    [...RS_IN.data].flatMap((v) => [v, v, v]),
  );
  const out = pilResize(rgb, 3, 2, "bicubic");
  assert.deepEqual(
    [...out.data].filter((_, i) => i % 3 === 1),
    [110, 124, 109, 137, 122, 136],
  );
});

/** 6×5 RGBa picture: (i·53) mod 256 in row-major band order. */
const GB_IN = img(
  6,
  5,
  4,
  Array.from({ length: 120 }, (_, i) => (i * 53) % 256),
);

test("GaussianBlur: extended-box radius in float32, three passes per axis", () => {
  assert.equal(pilBoxRadius(0), 0);
  // σ² = 4/3 → L = √17, l = 1, a = 3·(2 − 4)/(6·(4/3 − 4)) = 0.375.
  assert.equal(pilBoxRadius(2), Math.fround(1.375));
  assert.deepEqual(pilGaussianBlur(GB_IN, 0).data, GB_IN.data);
  assert.deepEqual(
    [...pilGaussianBlur(GB_IN, 2).data],
    [
      152, 97, 90, 117, 144, 109, 99, 115, 129, 119, 114, 118, 110, 125, 129, 129, 88, 123, 142, 143, 73, 118, 150, 156, 160, 102, 92, 115,
      150, 113, 102, 114, 132, 122, 116, 118, 109, 126, 131, 129, 86, 122, 143, 143, 70, 116, 150, 156, 170, 109, 95, 113, 156, 118, 105,
      113, 134, 125, 120, 118, 108, 127, 133, 130, 83, 121, 144, 144, 66, 114, 148, 156, 177, 115, 98, 111, 162, 123, 109, 113, 136, 128,
      124, 119, 107, 128, 136, 131, 79, 119, 145, 146, 62, 111, 148, 157, 181, 119, 101, 110, 164, 126, 113, 113, 136, 130, 127, 121, 105,
      128, 138, 133, 77, 118, 145, 148, 59, 109, 147, 159,
    ],
  );
  // A radius far past the picture: the edge-extended window covers everything, nearly flat.
  const wide = pilGaussianBlur(GB_IN, 256).data;
  assert.deepEqual([...wide.subarray(0, 16)], [67, 56, 108, 161, 67, 56, 108, 161, 67, 56, 108, 161, 67, 56, 109, 161]);
  assert.deepEqual([...wide.subarray(104)], [67, 55, 108, 160, 67, 56, 108, 161, 67, 56, 108, 161, 67, 56, 108, 161]);
});

test("alpha_composite: transparent source keeps the destination; opaque source replaces it; partial blends", () => {
  const dst = img(4, 1, 4, [10, 20, 30, 0, 200, 100, 50, 255, 0, 0, 0, 0, 90, 90, 90, 128]);
  const src = img(4, 1, 4, [250, 0, 0, 128, 0, 255, 0, 64, 40, 50, 60, 255, 1, 2, 3, 0]);
  assert.deepEqual([...alphaComposite(dst, src).data], [250, 0, 0, 128, 150, 139, 37, 255, 40, 50, 60, 255, 90, 90, 90, 128]);
  // Every colour survives an opaque composite onto anything.
  const all = img(
    256,
    1,
    4,
    Array.from({ length: 1024 }, (_, i) => (i % 4 === 3 ? 255 : i >> 2)),
  );
  const under = img(
    256,
    1,
    4,
    Array.from({ length: 1024 }, (_, i) => (i * 7) % 256),
  );
  assert.deepEqual(alphaComposite(under, all).data, all.data);
});

test("premultiply / paste with an L matte / un-premultiply round-trip opaque pixels exactly", () => {
  const rgba = img(3, 1, 4, [200, 100, 50, 255, 200, 100, 50, 128, 255, 255, 255, 1]);
  assert.deepEqual([...premultiply(rgba).data], [200, 100, 50, 255, 100, 50, 25, 128, 1, 1, 1, 1]);
  assert.deepEqual([...unpremultiply(img(2, 1, 4, [100, 50, 25, 128, 9, 9, 9, 0])).data], [199, 99, 49, 128, 9, 9, 9, 0]);
  const zero = img(3, 1, 4, new Array<number>(12).fill(0));
  const matte = img(3, 1, 1, [255, 0, 128]);
  const pasted = pasteWithMask(zero, premultiply(rgba), matte);
  assert.deepEqual([...pasted.data], [200, 100, 50, 255, 0, 0, 0, 0, 1, 1, 1, 1]);
  assert.throws(() => pasteWithMask(zero, rgba, img(2, 1, 1, [0, 0])), /do not match/);
});

test("convert('L') uses the 16-bit ITU-R 601-2 weights and keeps grays", () => {
  for (const v of [0, 1, 127, 128, 254, 255]) assert.equal(luma601(v, v, v), v);
  assert.equal(luma601(255, 0, 0), 76);
  assert.equal(luma601(0, 255, 0), 150);
  assert.equal(luma601(0, 0, 255), 29);
  assert.deepEqual([...rgbToL(img(2, 1, 3, [10, 200, 30, 255, 255, 0])).data], [124, 226]);
});

test("crop pads outside the picture with zeros", () => {
  const src = img(2, 2, 1, [1, 2, 3, 4]);
  assert.deepEqual([...pilCrop(src, [-1, 0, 2, 3]).data], [0, 1, 2, 0, 3, 4, 0, 0, 0]);
  assert.deepEqual([...pilCrop(src, [1, 1, 2, 2]).data], [4]);
});
