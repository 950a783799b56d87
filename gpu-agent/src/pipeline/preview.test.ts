import { test } from "node:test";
import assert from "node:assert/strict";
import sharp from "sharp";
import { MAX_PREVIEW_SIDE, cheapApproximation, previewPng, rgbPngSync } from "./preview.js";

test("cheapApproximation: A1111's SD1 channel mix, then x·0.5 + 0.5 clamped and truncated to 8 bits", () => {
  const h = 1;
  const w = 3;
  const latent = new Float32Array(4 * h * w);
  latent[0] = 1; // pixel 0: channel 0 alone
  latent[3 * w + 1] = 1; // pixel 1: channel 3 alone
  latent[2] = 10; // pixel 2: far past the clamp
  assert.deepEqual(
    [...cheapApproximation(latent, h, w)],
    // 255·(0.5 + 0.298/2) = 165.5 → 165, …; 255·(0.5 − 0.184/2) = 104.04 → 104, …
    [165, 153, 154, 104, 92, 67, 255, 255, 255],
  );
  assert.throws(() => cheapApproximation(new Float32Array(9), 1, 3), /4×1×3 latent/);
});

test("cheapApproximation: SDXL latents get A1111's SDXL channel mix", () => {
  const latent = new Float32Array(4 * 2);
  latent[0] = 1; // pixel 0: channel 0 alone
  latent[3 * 2 + 1] = 1; // pixel 1: channel 3 alone
  // 255·(0.5 + 0.3448/2) = 171.46 → 171, …; 255·(0.5 − 0.373/2) = 79.94 → 79, …
  assert.deepEqual([...cheapApproximation(latent, 1, 2, "sdxl")], [171, 180, 183, 79, 95, 100]);
  assert.notDeepEqual([...cheapApproximation(latent, 1, 2)], [...cheapApproximation(latent, 1, 2, "sdxl")]);
});

test("rgbPngSync writes a PNG that decodes to its pixels", async () => {
  const rgb = Uint8Array.from({ length: 5 * 3 * 3 }, (_, i) => (i * 37) % 256);
  const png = rgbPngSync(rgb, 5, 3);
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  assert.deepEqual([info.width, info.height, info.channels], [5, 3, 3]);
  assert.deepEqual([...data], [...rgb]);
});

test("previewPng: latent size up to 256 a side; a larger latent is box-averaged down by a whole factor", async () => {
  const size = async (h: number, w: number) => {
    const meta = await sharp(previewPng(new Float32Array(4 * h * w).fill(0.3), h, w)).metadata();
    return [meta.width, meta.height];
  };
  assert.deepEqual(await size(64, 96), [96, 64]);
  assert.deepEqual(await size(MAX_PREVIEW_SIDE, 8), [8, MAX_PREVIEW_SIDE]);
  // A 4096×4096 image's latent (factor 2), and an odd one (factor 3): ceil(side / k) a side.
  assert.deepEqual(await size(512, 512), [256, 256]);
  assert.deepEqual(await size(520, 10), [4, 174]);
  // Averaging keeps a flat picture flat: every pixel is the one pixel of the same latent value.
  const pixel = [...cheapApproximation(new Float32Array(4).fill(0.3), 1, 1)];
  const { data } = await sharp(previewPng(new Float32Array(4 * 512 * 512).fill(0.3), 512, 512))
    .raw()
    .toBuffer({ resolveWithObject: true });
  for (let i = 0; i < data.length; i += 3) assert.deepEqual([data[i], data[i + 1], data[i + 2]], pixel, `pixel ${i / 3}`);
});
