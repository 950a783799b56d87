import { test } from "node:test";
import assert from "node:assert/strict";
import { bgrTensorToTile, tileToBgrTensor } from "./esrgan-tiling.js";
import { tensorTileStarts, upscaleWithTensorTiles, type UpscaleTensor } from "./tensor-tiling.js";
import type { Image8 } from "./resize-modes.js";

function picture(width: number, height: number): Image8 {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < data.length; i++) data[i] = (i * 37 + Math.floor(i / 7)) % 256;
  return { width, height, channels: 3, data };
}

/**
 * A ×2 "model" that is not translation invariant: nearest upscale, darkened toward the tile's right
 * edge, so what overlapping tiles give for a pixel depends on which tile it came from.
 */
const positional: UpscaleTensor = async (x, width, height) => {
  const W = width * 2;
  const H = height * 2;
  const out = new Float32Array(3 * W * H);
  for (let c = 0; c < 3; c++)
    for (let y = 0; y < H; y++)
      for (let u = 0; u < W; u++) out[c * W * H + y * W + u] = x[c * width * height + (y >> 1) * width + (u >> 1)]! * (1 - u / (4 * W));
  return { data: out, width: W, height: H };
};

test("tile starts: Python's range(0, n − tile, stride) + [n − tile]", () => {
  assert.deepEqual(tensorTileStarts(20, 8, 6), [0, 6, 12]);
  assert.deepEqual(tensorTileStarts(21, 8, 6), [0, 6, 12, 13]);
  assert.deepEqual(tensorTileStarts(8, 8, 6), [0]);
  // A stride of 0 or less (an image no wider than the overlap) leaves the last tile alone.
  assert.deepEqual(tensorTileStarts(10, 8, 0), [2]);
});

test("tensor tiles: each output pixel is the plain average of the tiles covering it, converted to 8 bits once", async () => {
  const img = picture(21, 13);
  const tile = 8;
  const overlap = 2;
  const got = await upscaleWithTensorTiles(img, positional, { tileSize: tile, tileOverlap: overlap });
  assert.deepEqual([got.width, got.height], [42, 26]);
  // Per output pixel: every tile whose output covers it, each run on its own crop, averaged in float32.
  const x = tileToBgrTensor(img);
  const outputs: Array<{ left: number; top: number; data: Float32Array }> = [];
  for (const top of tensorTileStarts(13, tile, tile - overlap)) {
    for (const left of tensorTileStarts(21, tile, tile - overlap)) {
      const crop = new Float32Array(3 * tile * tile);
      for (let c = 0; c < 3; c++)
        for (let r = 0; r < tile; r++)
          for (let k = 0; k < tile; k++) crop[c * tile * tile + r * tile + k] = x[c * 21 * 13 + (top + r) * 21 + left + k]!;
      outputs.push({ left, top, data: (await positional(crop, tile, tile)).data });
    }
  }
  const expected = new Float32Array(3 * 42 * 26);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < 26; y++) {
      for (let u = 0; u < 42; u++) {
        let sum = 0;
        let n = 0;
        for (const o of outputs) {
          const ty = y - o.top * 2;
          const tu = u - o.left * 2;
          if (ty < 0 || tu < 0 || ty >= tile * 2 || tu >= tile * 2) continue;
          sum = Math.fround(sum + o.data[c * 256 + ty * 16 + tu]!);
          n++;
        }
        expected[c * 42 * 26 + y * 42 + u] = Math.fround(sum / n);
      }
    }
  }
  assert.deepEqual(got, bgrTensorToTile(expected, 42, 26));
  // The overlaps matter: a whole-image run gives another image.
  const whole = await positional(x, 21, 13);
  assert.notDeepEqual(got, bgrTensorToTile(whole.data, 42, 26));
  // Tile size 0, or a tile as large as the image, runs it whole.
  assert.deepEqual(await upscaleWithTensorTiles(img, positional, { tileSize: 0, tileOverlap: 8 }), bgrTensorToTile(whole.data, 42, 26));
  assert.deepEqual(await upscaleWithTensorTiles(picture(8, 8), positional, { tileSize: 192, tileOverlap: 8 }).then((i) => i.width), 16);
});
