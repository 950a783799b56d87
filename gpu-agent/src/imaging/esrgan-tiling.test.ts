import { test } from "node:test";
import assert from "node:assert/strict";
import {
  bgrTensorToTile,
  combineGrid,
  cropPadded,
  div255,
  overlapAlpha,
  splitGrid,
  tileToBgrTensor,
  upscaleWithModel,
  type UpscaleTile,
} from "./esrgan-tiling.js";
import type { Image8 } from "./resize-modes.js";

function image(width: number, height: number, f: (x: number, y: number, c: number) => number): Image8 {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) for (let c = 0; c < 3; c++) data[(y * width + x) * 3 + c] = f(x, y, c);
  return { width, height, channels: 3, data };
}

/** A per-pixel "model": 4× nearest of 255 − v. */
const pointModel: UpscaleTile = async (t) => {
  const s = 4;
  return image(t.width * s, t.height * s, (x, y, c) => 255 - t.data[(Math.floor(y / s) * t.width + Math.floor(x / s)) * 3 + c]!);
};

/** A local "model": mean of a pixel and its right/bottom neighbours (clamped at the tile edge), then 4× nearest. */
const localModel: UpscaleTile = async (t) => {
  const s = 4;
  const at = (x: number, y: number, c: number) => t.data[(Math.min(y, t.height - 1) * t.width + Math.min(x, t.width - 1)) * 3 + c]!;
  return image(t.width * s, t.height * s, (x, y, c) => {
    const sx = Math.floor(x / s);
    const sy = Math.floor(y / s);
    return Math.round((at(sx, sy, c) + at(sx + 1, sy, c) + at(sx, sy + 1, c)) / 3);
  });
};

test("split_grid positions (tile 192, overlap 8)", () => {
  // 512: cols = ceil(504/184) = 3, dx = 160; 768: rows = ceil(760/184) = 5, dy = 144
  const g = splitGrid(512, 768, 192, 192, 8);
  assert.deepEqual(
    g.rows.map((r) => r.y),
    [0, 144, 288, 432, 576],
  );
  assert.deepEqual(g.rows[0]!.xs, [0, 160, 320]);
  // 1000: cols = ceil(992/184) = 6, dx = 808/5 = 161.6 → int(c·dx)
  assert.deepEqual(splitGrid(1000, 192, 192, 192, 8).rows[0]!.xs, [0, 161, 323, 484, 646, 808]);
  // smaller than a tile: one tile flush with the far edge, i.e. at a negative offset
  const small = splitGrid(190, 100, 192, 192, 8);
  assert.deepEqual(
    small.rows.map((r) => [r.y, r.xs]),
    [[-92, [-2]]],
  );
});

test("overlap alpha is numpy's float32 r·255/ov truncated", () => {
  assert.deepEqual(Array.from(overlapAlpha(8)), [0, 31, 63, 95, 127, 159, 191, 223]);
  assert.deepEqual(Array.from(overlapAlpha(32)).slice(0, 4), [0, 7, 15, 23]);
  assert.equal(div255(255 * 255), 255);
  for (let a = 0; a < 256; a++) assert.equal(div255(255 * a), a);
  assert.equal(div255(12600), 49); // 12600/255 = 49.41
});

test("cropPadded pads outside the image with black, like PIL crop", () => {
  const img = image(3, 2, (x, y) => 10 * y + x + 1);
  const c = cropPadded(img, -1, 1, 3, 2);
  assert.deepEqual(Array.from(c.data.filter((_, i) => i % 3 === 0)), [0, 11, 12, 0, 0, 0]);
});

test("tiled per-pixel model equals the whole-image run exactly (seams blend identical values)", async () => {
  const img = image(500, 420, (x, y, c) => (x * 7 + y * 3 + c * 50) % 256);
  const whole = await upscaleWithModel(img, pointModel, { tileSize: 0 });
  const tiled = await upscaleWithModel(img, pointModel, { concurrency: 3 });
  assert.equal(tiled.width, 2000);
  assert.equal(tiled.height, 1680);
  assert.deepEqual(tiled.data, whole.data);
});

test("tiled local model: exact away from seams, ≤ 1 level in the blend zones", async () => {
  // smooth content, as a real image is at the scale of 1 px
  const img = image(520, 400, (x, y, c) => Math.round(128 + 90 * Math.sin(x / 37 + c) * Math.cos(y / 53)));
  const whole = await upscaleWithModel(img, localModel, { tileSize: 0 });
  const tiled = await upscaleWithModel(img, localModel, { tileSize: 192, tileOverlap: 8 });
  const grid = splitGrid(520, 400, 192, 192, 8);
  const s = 4;
  const ov = 8 * s;
  const inBlend = (x: number, y: number) =>
    grid.rows[0]!.xs.some((tx) => tx > 0 && x >= tx * s && x < tx * s + ov) ||
    grid.rows.some((r) => r.y > 0 && y >= r.y * s && y < r.y * s + ov);
  let awayMax = 0;
  let blendMax = 0;
  let blendPixels = 0;
  for (let y = 0; y < tiled.height; y++) {
    for (let x = 0; x < tiled.width; x++) {
      for (let c = 0; c < 3; c++) {
        const d = Math.abs(tiled.data[(y * tiled.width + x) * 3 + c]! - whole.data[(y * whole.width + x) * 3 + c]!);
        if (inBlend(x, y)) {
          blendMax = Math.max(blendMax, d);
          blendPixels++;
        } else awayMax = Math.max(awayMax, d);
      }
    }
  }
  assert.ok(blendPixels > 0, "there are blend zones");
  assert.equal(awayMax, 0, "away from seams");
  assert.ok(blendMax <= 1, `blend zone diff ${blendMax}`);
});

test("image narrower than a tile: A1111 blends the first overlap columns with black", async () => {
  // 190 px wide: the only column is at x = −2 → −8 after 4×, so output columns 0..23 are the tile's
  // columns 8..31 pasted with alpha r·255/32 over the black row canvas.
  const img = image(190, 200, () => 55); // the point model writes 255 − 55 = 200
  const out = await upscaleWithModel(img, pointModel);
  const px = (x: number, y: number) => out.data[(y * out.width + x) * 3]!;
  assert.equal(px(0, 100), div255(200 * Math.trunc((8 * 255) / 32))); // alpha 63 → 49
  assert.equal(px(0, 100), 49);
  assert.equal(px(23, 100), div255(200 * Math.trunc((31 * 255) / 32)));
  assert.equal(px(24, 100), 200);
});

test("combineGrid rejects missing tiles; models that change the tile size are refused", async () => {
  const g = splitGrid(300, 192, 192, 192, 8);
  assert.throws(() => combineGrid(g, [[]]), RangeError);
  await assert.rejects(
    upscaleWithModel(
      image(300, 200, () => 0),
      async (t) => (t.width === 192 ? image(384, 380, () => 0) : t),
    ),
    RangeError,
  );
});

test("model tensors: BGR planes of v/255 in; clamp, ×255, round half to even out", () => {
  const tile = image(
    2,
    1,
    (x, _y, c) =>
      [
        [255, 0, 51],
        [1, 2, 3],
      ][x]![c]!,
  );
  const t = tileToBgrTensor(tile);
  // planes B, G, R
  assert.deepEqual(Array.from(t), [51 / 255, 3 / 255, 0, 2 / 255, 1, 1 / 255].map(Math.fround));
  // pixel 0: B = 0.5 → 127.5 → 128 (half to even; truncation would give 127), G = 0.25 → 63.75 → 64,
  // R = 1.2 → clamped → 255; pixel 1: B = −0.1 → 0, G = 0.75 → 191.25 → 191, R = 0 → 0
  const out = bgrTensorToTile(Float32Array.from([0.5, -0.1, 0.25, 0.75, 1.2, 0]), 2, 1);
  assert.deepEqual(Array.from(out.data), [255, 64, 128, 0, 191, 0]);
  assert.deepEqual(bgrTensorToTile(t, 2, 1).data, tile.data);
});
