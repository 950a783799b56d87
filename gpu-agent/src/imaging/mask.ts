/**
 * A1111 v1.10's inpainting mask handling (processing.py StableDiffusionProcessingImg2Img.init,
 * masking.py, images.resize_image, apply_overlay), on 8-bit images:
 *
 * - the mask as PIL opened it → `create_binary_mask` (RGBA with real transparency: the alpha band,
 *   thresholded at > 128 when mask_round; anything else: `convert("L")`), optionally inverted;
 * - `cv2.GaussianBlur` along x then y with kernel 2·⌊2.5σ + 0.5⌋ + 1 (OpenCV's bit-exact 8-bit path:
 *   Q8 kernel by error diffusion, reflect-101 border);
 * - "only masked": bounding box of the non-zero mask ± padding, grown to the processing aspect
 *   ratio, cropped and resized with "resize and fill";
 * - masked content "fill" (blur-filled holes), the RGBA overlay that restores unmasked pixels, and
 *   the paste-back of the generated crop;
 * - the latent mask: the processed mask resized to latent size (PIL BICUBIC) and rounded.
 *
 * PIL's arithmetic is in mask-pil.ts. Init-image placement for the whole-picture path stays with
 * img2img's sharp Lanczos; every other resize here is PIL-exact.
 */
import sharp, { type OutputInfo } from "sharp";
import { inspectImage, ImageInputError, type ImageLimits } from "./image-input.js";
import { composeOnCanvas, planImg2imgResize, type Image8 } from "./resize-modes.js";
import {
  alphaComposite,
  luma601,
  pasteWithMask,
  pilGaussianBlur,
  pilResize,
  premultiply,
  rgbaToRgb,
  rgbToRgba,
  unpremultiply,
} from "./mask-pil.js";

/** The PIL mode a decoded mask corresponds to (what create_binary_mask branches on). */
export type MaskMode = "L" | "LA" | "RGB" | "RGBA" | "P";

export interface DecodedMask {
  mode: MaskMode;
  /** 1 (L, LA: the grey band only), 3 (RGB, P without transparency) or 4 (RGBA, P with transparency) channels. */
  image: Image8;
}

/** (x1, y1, x2, y2), right and bottom exclusive, as PIL boxes are. */
export type CropBox = readonly [number, number, number, number];

/**
 * Decodes a mask within the byte/pixel limits, keeping its channels (a mask's alpha band can be the
 * mask). Failures are ImageInputError naming `field`.
 */
export async function decodeMask(buf: Uint8Array, limits: ImageLimits, field = "mask"): Promise<DecodedMask> {
  const info = await inspectImage(buf, limits, field);
  let raw: { data: Buffer; info: OutputInfo; gray: boolean };
  try {
    const pipeline = sharp(buf, { limitInputPixels: limits.maxPixels, failOn: "error", pages: 1, sequentialRead: true });
    const meta = await pipeline.metadata();
    const gray = meta.space === "b-w" || meta.space === "grey16";
    // sharp widens grey to RGB on raw output unless told to keep it ("b-w" also drops a grey alpha,
    // which PIL's convert("L") ignores anyway).
    const out = await pipeline
      .toColourspace(gray ? "b-w" : "srgb")
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
    raw = { ...out, gray };
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new ImageInputError(field, "undecodable", `cannot decode image: ${message}`, { cause: err });
  }
  const { width, height, channels } = raw.info;
  if (channels < 1 || channels > 4) throw new ImageInputError(field, "undecodable", `unexpected ${channels}-channel decode`);
  const data = new Uint8Array(raw.data.buffer, raw.data.byteOffset, width * height * channels).slice();
  const mode: MaskMode = info.isPalette ? "P" : raw.gray ? (info.hasAlpha ? "LA" : "L") : channels === 4 ? "RGBA" : "RGB";
  return { mode, image: { width, height, channels, data } };
}

/** A1111 `create_binary_mask(image, round)` → an "L" mask. */
export function binaryMask(mask: DecodedMask, round: boolean): Image8 {
  const { image, mode } = mask;
  const px = image.width * image.height;
  const ch = image.channels;
  const d = image.data;
  const out = new Uint8Array(px);
  let useAlpha = false;
  if (mode === "RGBA") {
    for (let i = 0; i < px && !useAlpha; i++) if (d[i * 4 + 3] !== 255) useAlpha = true;
  }
  for (let i = 0; i < px; i++) {
    if (useAlpha) {
      const a = d[i * 4 + 3]!;
      out[i] = round ? (a > 128 ? 255 : 0) : a;
    } else if (ch <= 2) {
      out[i] = d[i * ch]!;
    } else {
      out[i] = luma601(d[i * ch]!, d[i * ch + 1]!, d[i * ch + 2]!);
    }
  }
  return { width: image.width, height: image.height, channels: 1, data: out };
}

/** `ImageOps.invert` of an 8-bit image. */
export function invertMask(mask: Image8): Image8 {
  return { ...mask, data: mask.data.map((v) => 255 - v) };
}

// ---------------------------------------------------------------------------------------------
// cv2.GaussianBlur, 8-bit bit-exact path (smooth.dispatch.cpp / smooth.simd.hpp)
// ---------------------------------------------------------------------------------------------

/** numpy.around / torch.round: halves go to the even neighbour. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x - Math.trunc(x)) === 0.5 ? 2 * Math.round(x / 2) : r;
}

/**
 * OpenCV's Q8 Gaussian kernel for an odd size `n` and σ > 0: getGaussianKernelBitExact's doubles,
 * then getGaussianKernelFixedPoint_ED (round each outer tap with the running error, centre tap takes
 * what is left of 256).
 */
export function cvGaussianKernelQ8(n: number, sigma: number): Int32Array {
  if (!Number.isInteger(n) || n < 1 || n % 2 === 0) throw new RangeError(`kernel size must be odd and positive, got ${n}`);
  if (!(sigma > 0)) throw new RangeError(`sigma must be > 0, got ${sigma}`);
  const scale2X = -0.125 / (sigma * sigma);
  const half = (n - 1) / 2;
  const values: number[] = [];
  let sum = 0;
  for (let i = 0, x = 1 - n; i < half; i++, x += 2) {
    const t = Math.exp(x * x * scale2X);
    values.push(t);
    sum += t;
  }
  sum = sum * 2 + 1;
  const mul1 = 1 / sum;
  const q = new Int32Array(n);
  let err = 0;
  let outer = 0;
  for (let i = 0; i < half; i++) {
    const adj = values[i]! * mul1 * 256 + err;
    const v = roundHalfEven(adj);
    err = adj - v;
    q[i] = v;
    q[n - 1 - i] = v;
    outer += v;
  }
  q[half] = 256 - 2 * outer;
  return q;
}

/** OpenCV borderInterpolate for BORDER_REFLECT_101 (cv2's default border). */
function reflect101(p: number, len: number): number {
  if (len === 1) return 0;
  while (p < 0 || p >= len) p = p < 0 ? -p : 2 * (len - 1) - p;
  return p;
}

/** A1111's kernel size for a mask blur of σ: 2·int(2.5σ + 0.5) + 1. */
export function maskBlurKernelSize(sigma: number): number {
  return 2 * Math.trunc(2.5 * sigma + 0.5) + 1;
}

/**
 * `cv2.GaussianBlur(mask, (k, 1), σ)` (horizontal) or `(1, k)` (vertical) on a one-channel image:
 * the other axis's kernel is [1], so each output is (Σ q·src + 128) >> 8 along one axis. The sums
 * are exact integers, so pairing the symmetric taps changes nothing.
 */
export function cvGaussianBlur1d(mask: Image8, sigma: number, axis: "x" | "y"): Image8 {
  if (mask.channels !== 1) throw new RangeError("mask blur needs a one-channel image");
  const n = maskBlurKernelSize(sigma);
  const q = cvGaussianKernelQ8(n, sigma);
  const half = (n - 1) / 2;
  const qc = q[half]!;
  const { width, height, data } = mask;
  const out = new Uint8Array(width * height);
  if (axis === "x") {
    const pad = new Int32Array(width + 2 * half);
    for (let y = 0; y < height; y++) {
      const row = y * width;
      for (let i = 0; i < pad.length; i++) pad[i] = data[row + reflect101(i - half, width)]!;
      for (let x = 0; x < width; x++) {
        let s = qc * pad[x + half]!;
        for (let k = 0; k < half; k++) s += q[k]! * (pad[x + k]! + pad[x + n - 1 - k]!);
        out[row + x] = (s + 128) >> 8;
      }
    }
  } else {
    const acc = new Int32Array(width);
    for (let y = 0; y < height; y++) {
      const centre = y * width;
      for (let x = 0; x < width; x++) acc[x] = qc * data[centre + x]!;
      for (let k = 0; k < half; k++) {
        const a = reflect101(y + k - half, height) * width;
        const b = reflect101(y + half - k, height) * width;
        const w = q[k]!;
        for (let x = 0; x < width; x++) acc[x] = acc[x]! + w * (data[a + x]! + data[b + x]!);
      }
      for (let x = 0; x < width; x++) out[centre + x] = (acc[x]! + 128) >> 8;
    }
  }
  return { width, height, channels: 1, data: out };
}

/** A1111's mask blur: x first (if > 0), then y (if > 0). */
export function blurMask(mask: Image8, blurX: number, blurY: number): Image8 {
  let m = mask;
  if (blurX > 0) m = cvGaussianBlur1d(m, blurX, "x");
  if (blurY > 0) m = cvGaussianBlur1d(m, blurY, "y");
  return m;
}

// ---------------------------------------------------------------------------------------------
// Geometry (masking.py)
// ---------------------------------------------------------------------------------------------

/**
 * `masking.get_crop_region_v2(mask, pad)`: PIL getbbox of the non-zero pixels grown by `pad` and
 * clamped to the image; undefined for an all-zero mask.
 */
export function cropRegion(mask: Image8, pad: number): CropBox | undefined {
  if (mask.channels !== 1) throw new RangeError("crop region needs a one-channel mask");
  const { width, height, data } = mask;
  let x1 = width;
  let y1 = height;
  let x2 = -1;
  let y2 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[y * width + x] === 0) continue;
      if (x < x1) x1 = x;
      if (x > x2) x2 = x;
      if (y < y1) y1 = y;
      if (y > y2) y2 = y;
    }
  }
  if (x2 < 0) return undefined;
  const box: CropBox = [x1, y1, x2 + 1, y2 + 1];
  if (!pad) return box;
  return [Math.max(box[0] - pad, 0), Math.max(box[1] - pad, 0), Math.min(box[2] + pad, width), Math.min(box[3] + pad, height)];
}

/**
 * `masking.expand_crop_region`: grows the short side of the box (symmetrically, in integer steps)
 * to the processing aspect ratio, shifted back inside the image.
 */
export function expandCropRegion(
  box: CropBox,
  processingWidth: number,
  processingHeight: number,
  imageWidth: number,
  imageHeight: number,
): CropBox {
  let [x1, y1, x2, y2] = box;
  const ratioCrop = (x2 - x1) / (y2 - y1);
  const ratioProcessing = processingWidth / processingHeight;
  if (ratioCrop > ratioProcessing) {
    const desired = (x2 - x1) / ratioProcessing;
    const diff = Math.trunc(desired - (y2 - y1));
    y1 -= Math.floor(diff / 2);
    y2 += diff - Math.floor(diff / 2);
    if (y2 >= imageHeight) {
      const d = y2 - imageHeight;
      y2 -= d;
      y1 -= d;
    }
    if (y1 < 0) {
      y2 -= y1;
      y1 = 0;
    }
    if (y2 >= imageHeight) y2 = imageHeight;
  } else {
    const desired = (y2 - y1) * ratioProcessing;
    const diff = Math.trunc(desired - (x2 - x1));
    x1 -= Math.floor(diff / 2);
    x2 += diff - Math.floor(diff / 2);
    if (x2 >= imageWidth) {
      const d = x2 - imageWidth;
      x2 -= d;
      x1 -= d;
    }
    if (x1 < 0) {
      x2 -= x1;
      x1 = 0;
    }
    if (x2 >= imageWidth) x2 = imageWidth;
  }
  return [x1, y1, x2, y2];
}

// ---------------------------------------------------------------------------------------------
// images.resize_image with PIL LANCZOS, masked content, overlay
// ---------------------------------------------------------------------------------------------

/**
 * `images.resize_image(mode, im, width, height)` without an upscaler (masks always; RGB when
 * upscaler_for_img2img is None): 0 Lanczos to size, 1 crop and resize, anything else resize and fill
 * (mode 3 lands in that branch too).
 */
export function resizeImageA1111(mode: number, img: Image8, width: number, height: number): Image8 {
  if (mode === 0) return pilResize(img, width, height, "lanczos");
  const plan = planImg2imgResize(mode === 1 ? 1 : 2, { width: img.width, height: img.height }, { width, height });
  const resize = plan.resize!;
  return composeOnCanvas(pilResize(img, resize.width, resize.height, "lanczos"), plan);
}

/** The whole-picture overlay mask: clip(2·mask, 0, 255), so the blur's inner half is fully generated. */
export function doubledMask(mask: Image8): Image8 {
  return { ...mask, data: mask.data.map((v) => Math.min(v * 2, 255)) };
}

function zeros(width: number, height: number, channels: number): Image8 {
  return { width, height, channels, data: new Uint8Array(width * height * channels) };
}

/**
 * The RGBA overlay: the init picture premultiplied into transparency through the inverted overlay
 * mask, then un-premultiplied — opaque where the mask is 0, transparent where it is 255.
 */
export function overlayImage(image: Image8, maskForOverlay: Image8): Image8 {
  const masked = pasteWithMask(zeros(image.width, image.height, 4), premultiply(rgbToRgba(image)), invertMask(maskForOverlay));
  return unpremultiply(masked);
}

/**
 * `masking.fill`: masked pixels are painted from ever finer blurs of the unmasked ones. Six full-size
 * blurs take a while (about 0.6 s for 512² on a busy 2-core machine), so the event loop gets a
 * turn and `signal` is checked between them.
 */
export async function fillMasked(image: Image8, mask: Image8, signal?: AbortSignal): Promise<Image8> {
  if (image.width !== mask.width || image.height !== mask.height) throw new RangeError("images do not match");
  let mod = zeros(image.width, image.height, 4);
  const masked = pasteWithMask(zeros(image.width, image.height, 4), premultiply(rgbToRgba(image)), invertMask(mask));
  for (const [radius, repeats] of [
    [256, 1],
    [64, 1],
    [16, 2],
    [4, 4],
    [2, 2],
    [0, 1],
  ] as const) {
    await new Promise<void>((resolve) => setImmediate(resolve));
    signal?.throwIfAborted();
    const blurred = unpremultiply(pilGaussianBlur(masked, radius));
    for (let i = 0; i < repeats; i++) mod = alphaComposite(mod, blurred);
  }
  return rgbaToRgb(mod);
}

/**
 * The latent mask A1111 blends with (`nmask`, 1 = generate): the processed mask resized to the latent
 * size with PIL's default BICUBIC, /255 in float32, rounded half to even when mask_round.
 */
export function latentMask(mask: Image8, latentWidth: number, latentHeight: number, round: boolean): Float32Array {
  if (mask.channels !== 1) throw new RangeError("latent mask needs a one-channel mask");
  const small = pilResize(mask, latentWidth, latentHeight, "bicubic");
  const out = new Float32Array(latentWidth * latentHeight);
  for (let i = 0; i < out.length; i++) {
    const v = Math.fround(small.data[i]! / 255);
    out[i] = round ? roundHalfEven(v) : v;
  }
  return out;
}

/**
 * `apply_overlay`: with a paste location, the generated picture is crop-and-resized to the box and
 * pasted onto a transparent canvas of the overlay's size; then the overlay is alpha-composited on top.
 */
export function applyOverlay(generated: Image8, pasteTo: readonly [number, number, number, number] | undefined, overlay: Image8): Image8 {
  let base: Image8;
  if (pasteTo === undefined) {
    base = rgbToRgba(generated);
  } else {
    const [x, y, w, h] = pasteTo;
    const fitted = resizeImageA1111(1, generated, w, h);
    base = zeros(overlay.width, overlay.height, 4);
    for (let row = 0; row < h; row++) {
      const ty = y + row;
      if (ty < 0 || ty >= overlay.height) continue;
      for (let col = 0; col < w; col++) {
        const tx = x + col;
        if (tx < 0 || tx >= overlay.width) continue;
        const s = (row * w + col) * 3;
        const t = (ty * overlay.width + tx) * 4;
        base.data[t] = fitted.data[s]!;
        base.data[t + 1] = fitted.data[s + 1]!;
        base.data[t + 2] = fitted.data[s + 2]!;
        base.data[t + 3] = 255;
      }
    }
  }
  return rgbaToRgb(alphaComposite(base, overlay));
}
