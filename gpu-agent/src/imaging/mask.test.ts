// Expected values come from running A1111 v1.10's own masking code (processing.py, masking.py,
// images.resize_image) on the same inputs with OpenCV 4.6 and Pillow 9.4 (Debian bookworm).
import { test } from "node:test";
import assert from "node:assert/strict";
import sharp from "sharp";
import {
  applyOverlay,
  binaryMask,
  blurMask,
  cropRegion,
  cvGaussianBlur1d,
  cvGaussianKernelQ8,
  decodeMask,
  doubledMask,
  expandCropRegion,
  fillMasked,
  invertMask,
  latentMask,
  maskBlurKernelSize,
  overlayImage,
  resizeImageA1111,
} from "./mask.js";
import { ImageInputError } from "./image-input.js";
import type { Image8 } from "./resize-modes.js";

const img = (width: number, height: number, channels: number, data: ArrayLike<number>): Image8 => ({
  width,
  height,
  channels,
  data: Uint8Array.from(data),
});

test("cv2 kernel: A1111's size 2·int(2.5σ + 0.5) + 1, Q8 taps summing to 256", () => {
  assert.deepEqual([1, 2, 4, 7].map(maskBlurKernelSize), [7, 11, 21, 37]);
  // Impulse responses of cv2.GaussianBlur (each tap < 128, so 255·q/256 rounds back to q).
  assert.deepEqual([...cvGaussianKernelQ8(7, 1)], [1, 14, 62, 102, 62, 14, 1]);
  assert.deepEqual([...cvGaussianKernelQ8(21, 4)], [1, 2, 4, 5, 9, 11, 16, 19, 23, 25, 26, 25, 23, 19, 16, 11, 9, 5, 4, 2, 1]);
  for (const s of [1, 2, 4, 7, 16, 64]) {
    const q = cvGaussianKernelQ8(maskBlurKernelSize(s), s);
    assert.equal(
      q.reduce((a, b) => a + b, 0),
      256,
      `σ=${s}`,
    );
  }
});

/** 12×8 mask: a 5×4 block and a corner pixel. */
const BLUR_IN = (() => {
  const m = new Uint8Array(96);
  for (let y = 2; y < 6; y++) for (let x = 3; x < 8; x++) m[y * 12 + x] = 255;
  m[95] = 255;
  return img(12, 8, 1, m);
})();

test("mask blur: cv2 along x, then along y, reflect-101 borders", () => {
  const x = cvGaussianBlur1d(BLUR_IN, 2, "x");
  assert.deepEqual(
    [...x.data.subarray(24, 36)],
    [52, 66, 104, 151, 189, 203, 189, 151, 102, 57, 28, 18],
    "the block's rows, reflected at the left edge",
  );
  assert.deepEqual([...x.data.subarray(84)], [0, 0, 0, 0, 0, 0, 2, 7, 17, 31, 45, 52]);
  assert.deepEqual(
    [...blurMask(BLUR_IN, 2, 2).data],
    [
      23, 29, 46, 67, 84, 90, 84, 67, 45, 25, 12, 8, 26, 32, 51, 74, 93, 100, 93, 74, 50, 28, 14, 9, 31, 40, 63, 91, 114, 122, 114, 91, 61,
      35, 17, 11, 36, 45, 71, 103, 129, 139, 129, 103, 70, 40, 20, 14, 36, 45, 71, 103, 129, 139, 129, 104, 71, 41, 22, 16, 31, 40, 63, 91,
      114, 122, 114, 92, 63, 38, 22, 17, 26, 32, 51, 74, 93, 100, 93, 76, 53, 34, 22, 18, 23, 29, 46, 67, 84, 90, 85, 69, 49, 32, 22, 19,
    ],
  );
  assert.deepEqual(blurMask(BLUR_IN, 0, 0).data, BLUR_IN.data);
  // A kernel wider than the picture keeps reflecting.
  const thin = img(3, 1, 1, [0, 255, 0]);
  assert.deepEqual([...cvGaussianBlur1d(thin, 4, "x").data], [124, 131, 124]);
});

test("binary mask: RGBA with transparency uses alpha (> 128 when rounding), else luma; invert", () => {
  const rgba = img(3, 1, 4, [255, 255, 255, 128, 0, 0, 0, 129, 10, 20, 30, 255]);
  assert.deepEqual([...binaryMask({ mode: "RGBA", image: rgba }, true).data], [0, 255, 255]);
  assert.deepEqual([...binaryMask({ mode: "RGBA", image: rgba }, false).data], [128, 129, 255]);
  const opaque = img(2, 1, 4, [255, 0, 0, 255, 0, 0, 255, 255]);
  assert.deepEqual([...binaryMask({ mode: "RGBA", image: opaque }, true).data], [76, 29], "opaque RGBA → convert('L')");
  assert.deepEqual([...binaryMask({ mode: "LA", image: img(2, 1, 2, [7, 0, 200, 255]) }, true).data], [7, 200]);
  assert.deepEqual(
    [...binaryMask({ mode: "P", image: img(1, 1, 4, [0, 255, 0, 0]) }, true).data],
    [150],
    "palette transparency is ignored",
  );
  assert.deepEqual([...invertMask(img(3, 1, 1, [0, 1, 255])).data], [255, 254, 0]);
});

test("crop region: bounding box ± padding, clamped; blank mask → none", () => {
  const m = new Uint8Array(768 * 512);
  for (let y = 100; y < 132; y++) m.fill(255, y * 768 + 600, y * 768 + 728);
  const wide = img(768, 512, 1, m);
  assert.deepEqual(cropRegion(wide, 0), [600, 100, 728, 132]);
  assert.deepEqual(cropRegion(wide, 32), [568, 68, 760, 164]);
  assert.equal(cropRegion(img(5, 5, 1, new Uint8Array(25)), 3), undefined);
});

test("expand crop region: grow the short side to the processing ratio, shift back inside", () => {
  assert.deepEqual(expandCropRegion([600, 100, 728, 132], 512, 512, 768, 512), [600, 52, 728, 180]);
  assert.deepEqual(expandCropRegion([568, 68, 760, 164], 512, 512, 768, 512), [568, 20, 760, 212]);
  // Grown past the bottom edge: shifted up.
  assert.deepEqual(expandCropRegion([1, 286, 19, 300], 512, 768, 200, 300), [1, 273, 19, 300]);
  // Grown past both sides: shifted right, then clamped to the picture.
  assert.deepEqual(expandCropRegion([1, 286, 19, 300], 1024, 256, 200, 300), [0, 286, 56, 300]);
  assert.deepEqual(expandCropRegion([45, 10, 55, 90], 512, 512, 100, 100), [10, 10, 90, 90]);
  assert.deepEqual(expandCropRegion([45, 10, 55, 90], 64, 48, 100, 100), [0, 10, 100, 90]);
});

test("latent mask: processed mask → PIL BICUBIC to latent size → /255 in float32 → rounded half to even", () => {
  const m = new Uint8Array(256);
  for (let y = 4; y < 16; y++) m.fill(255, y * 16 + 9, y * 16 + 16);
  const blurred = blurMask(img(16, 16, 1, m), 2, 2);
  const soft = latentMask(blurred, 2, 2, false);
  assert.deepEqual([...soft], [0.04313725605607033, 0.4313725531101227, 0.07450980693101883, 0.7843137383460999]);
  assert.deepEqual([...latentMask(blurred, 2, 2, true)], [0, 0, 0, 1]);
});

/** 8×6 RGB picture ((i·29) mod 256) and its mask: a 4×3 hole and a row at 90. */
const FILL_IMG = img(
  8,
  6,
  3,
  Array.from({ length: 144 }, (_, i) => (i * 29) % 256),
);
const FILL_MASK = (() => {
  const m = new Uint8Array(48);
  for (let y = 1; y < 4; y++) m.fill(255, y * 8 + 2, y * 8 + 6);
  m.fill(90, 34, 38);
  return img(8, 6, 1, m);
})();

test("masked content 'fill': holes painted from blurred surroundings, unmasked pixels untouched", async () => {
  assert.deepEqual(
    [...(await fillMasked(FILL_IMG, FILL_MASK)).data],
    [
      0, 29, 58, 87, 116, 145, 174, 203, 232, 5, 34, 63, 92, 121, 150, 179, 208, 237, 10, 39, 68, 97, 126, 155, 184, 213, 242, 15, 44, 73,
      103, 122, 131, 107, 122, 135, 110, 124, 137, 112, 125, 136, 194, 223, 252, 25, 54, 83, 112, 141, 170, 199, 228, 1, 115, 124, 128, 118,
      119, 130, 120, 119, 131, 122, 119, 131, 122, 151, 180, 209, 238, 11, 40, 69, 98, 127, 156, 185, 129, 123, 126, 131, 117, 127, 134,
      114, 127, 136, 114, 127, 50, 79, 108, 137, 166, 195, 224, 253, 26, 55, 84, 113, 141, 153, 173, 197, 41, 64, 89, 96, 120, 146, 152,
      176, 234, 7, 36, 65, 94, 123, 152, 181, 210, 239, 12, 41, 70, 99, 128, 157, 186, 215, 244, 17, 46, 75, 104, 133, 162, 191, 220, 249,
      22, 51,
    ],
  );
  await assert.rejects(fillMasked(FILL_IMG, img(4, 4, 1, new Uint8Array(16))), /do not match/);
  const aborted = new AbortController();
  aborted.abort();
  await assert.rejects(fillMasked(FILL_IMG, FILL_MASK, aborted.signal), { name: "AbortError" });
});

test("overlay and paste-back: unmasked pixels come back exactly, masked ones from the generated crop", () => {
  const overlay = overlayImage(FILL_IMG, FILL_MASK);
  // Opaque copy where the mask is 0, fully transparent under 255, alpha 165 under 90.
  assert.deepEqual([...overlay.data.subarray(0, 8)], [0, 29, 58, 255, 87, 116, 145, 255]);
  assert.deepEqual([...overlay.data.subarray(40, 44)], [0, 0, 0, 0]);
  assert.deepEqual([...overlay.data.subarray(136, 144)], [142, 171, 199, 165, 228, 1, 30, 165]);
  const gen = img(
    4,
    4,
    3,
    Array.from({ length: 48 }, (_, i) => (i * 11) % 256),
  );
  const out = applyOverlay(gen, [2, 1, 4, 4], overlay);
  assert.deepEqual(
    [...out.data],
    [
      0, 29, 58, 87, 116, 145, 174, 203, 232, 5, 34, 63, 92, 121, 150, 179, 208, 237, 10, 39, 68, 97, 126, 155, 184, 213, 242, 15, 44, 73,
      0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 121, 194, 223, 252, 25, 54, 83, 112, 141, 170, 199, 228, 1, 132, 143, 154, 165, 176, 187,
      198, 209, 220, 231, 242, 253, 122, 151, 180, 209, 238, 11, 40, 69, 98, 127, 156, 185, 8, 19, 30, 41, 52, 63, 74, 85, 96, 107, 118,
      129, 50, 79, 108, 137, 166, 195, 224, 253, 26, 55, 84, 113, 141, 164, 186, 209, 66, 88, 112, 134, 156, 179, 202, 134, 234, 7, 36, 65,
      94, 123, 152, 181, 210, 239, 12, 41, 70, 99, 128, 157, 186, 215, 244, 17, 46, 75, 104, 133, 162, 191, 220, 249, 22, 51,
    ],
  );
  // Whole-picture mode: no paste location, the overlay is composited straight onto the output.
  const same = applyOverlay(img(8, 6, 3, new Uint8Array(144).fill(7)), undefined, overlay);
  for (let i = 0; i < 48; i++) {
    const m = FILL_MASK.data[i]!;
    for (let c = 0; c < 3; c++) {
      if (m === 0) assert.equal(same.data[i * 3 + c], FILL_IMG.data[i * 3 + c]);
      if (m === 255) assert.equal(same.data[i * 3 + c], 7);
    }
  }
});

test("resize_image for masks: 0 Lanczos, 1 crop and resize, 2 (and 3) resize and fill", () => {
  const mask = FILL_MASK;
  const just = resizeImageA1111(0, mask, 16, 12);
  assert.equal(just.width, 16);
  assert.equal(just.channels, 1);
  const fill = resizeImageA1111(2, mask, 16, 16);
  assert.deepEqual(resizeImageA1111(3, mask, 16, 16), fill);
  // 8×6 → 16×16 "resize and fill": the picture is 16×12 in the middle, bands of 2 rows above and below.
  assert.deepEqual([...fill.data.subarray(0, 16)], [...fill.data.subarray(16, 32)]);
  const crop = resizeImageA1111(1, mask, 16, 16);
  assert.equal(crop.height, 16);
  assert.deepEqual(doubledMask(img(3, 1, 1, [0, 100, 200])).data, Uint8Array.from([0, 200, 255]));
});

test("decodeMask keeps the channels a mask's meaning depends on; bad bytes name the field", async () => {
  const gray = await sharp(Buffer.from([0, 128, 255, 7]), { raw: { width: 2, height: 2, channels: 1 } })
    .toColourspace("b-w")
    .png()
    .toBuffer();
  const g = await decodeMask(gray, { maxBytes: 1e6, maxPixels: 100 });
  assert.equal(g.mode, "L");
  assert.deepEqual([...g.image.data], [0, 128, 255, 7]);
  const la = await sharp(Buffer.from([9, 0, 200, 255]), { raw: { width: 2, height: 1, channels: 2 } })
    .toColourspace("b-w")
    .png()
    .toBuffer();
  const l = await decodeMask(la, { maxBytes: 1e6, maxPixels: 100 });
  assert.equal(l.mode, "LA");
  assert.deepEqual([...binaryMask(l, true).data], [9, 200], "PIL's convert('L') drops LA's alpha");
  const rgba = await sharp(Buffer.from([1, 2, 3, 0, 4, 5, 6, 200]), { raw: { width: 2, height: 1, channels: 4 } })
    .png()
    .toBuffer();
  const a = await decodeMask(rgba, { maxBytes: 1e6, maxPixels: 100 });
  assert.equal(a.mode, "RGBA");
  assert.deepEqual([...binaryMask(a, true).data], [0, 255]);
  await assert.rejects(
    decodeMask(Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), { maxBytes: 1e6, maxPixels: 100 }),
    (e: unknown) => {
      assert.ok(e instanceof ImageInputError);
      assert.equal(e.field, "mask");
      return true;
    },
  );
  await assert.rejects(decodeMask(gray.subarray(0, 40), { maxBytes: 1e6, maxPixels: 100 }), /mask: /);
  await assert.rejects(decodeMask(gray, { maxBytes: 1e6, maxPixels: 3 }), /mask: .*pixel/);
});
