import { test } from "node:test";
import assert from "node:assert/strict";
import sharp from "sharp";
import { encodePng, readTextChunks, toRgb8 } from "./png.js";

test("PNG carries the infotext in a chunk sharp can still decode", async () => {
  const rgb = new Uint8Array(8 * 4 * 3).map((_, i) => i % 256);
  const png = await encodePng(rgb, 8, 4, "a cat\nSteps: 20, Sampler: Euler a");
  const meta = await sharp(png).metadata();
  assert.equal(meta.width, 8);
  assert.equal(meta.height, 4);
  const raw = await sharp(png).raw().toBuffer();
  assert.deepEqual(new Uint8Array(raw), rgb);
  assert.equal(readTextChunks(png)["parameters"], "a cat\nSteps: 20, Sampler: Euler a");
});

test("non-Latin-1 infotext goes into iTXt and round-trips", async () => {
  const png = await encodePng(new Uint8Array(3), 1, 1, "猫 🐱, Steps: 1");
  assert.equal(readTextChunks(png)["parameters"], "猫 🐱, Steps: 1");
  assert.ok(png.includes(Buffer.from("iTXt")));
});

test("decode truncates toward zero after clamping, like astype(uint8)", () => {
  // One pixel per channel value: -1 → 0, 1 → 255, 0 → 127 (127.5 truncated), above range → 255.
  const img = new Float32Array([-1, 1, 0, 2, -3, 0.5, 0.999, -0.999, 0.1]);
  const out = toRgb8(img, 3, 1);
  // channel-major input, pixel-major output
  assert.deepEqual([...out], [0, 255, 254, 255, 0, 0, 127, 191, 140]);
});
