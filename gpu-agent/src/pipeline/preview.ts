/**
 * Live previews: a sampler's denoised latent as A1111's "Approx cheap" shows it (sd_vae_approx's
 * cheap_approximation), a fixed linear mix of the four latent channels into RGB at latent size. No
 * VAE runs, so a preview costs about one pass over the latent.
 */
import { deflateSync } from "node:zlib";
import { pngChunk } from "./png.js";

const f32 = Math.fround;

/** cheap_approximation's SD1 coefficients: row l is latent channel l's weight in R, G and B. */
const SD1_CHEAP_COEFFICIENTS: ReadonlyArray<readonly [number, number, number]> = [
  [0.298, 0.207, 0.208],
  [0.187, 0.286, 0.173],
  [-0.158, 0.189, 0.264],
  [-0.184, -0.271, -0.473],
].map((row) => row.map(f32) as [number, number, number]);

/** cheap_approximation's coefficients for SDXL's latent space (A1111 picks them when is_sdxl). */
const SDXL_CHEAP_COEFFICIENTS: ReadonlyArray<readonly [number, number, number]> = [
  [0.3448, 0.4168, 0.4395],
  [-0.1953, -0.029, 0.025],
  [0.1074, 0.0886, -0.0163],
  [-0.373, -0.2499, -0.2088],
].map((row) => row.map(f32) as [number, number, number]);

/** Whose latent space a preview mixes: SD1/SD2 share one, SDXL has its own. */
export type LatentSpace = "sd" | "sdxl";

/**
 * RGB8 (HWC) of a 4-channel latent [4,h,w]: the coefficients' mix, then A1111's single_sample_to_image
 * (x·0.5 + 0.5, clamped to [0, 1], times 255, truncated). Sums are float32, as torch's einsum makes them
 * up to the last bit (a preview is a picture to watch, not a result to match).
 */
export function cheapApproximation(latent: Float32Array, h: number, w: number, space: LatentSpace = "sd"): Uint8Array {
  const coefficients = space === "sdxl" ? SDXL_CHEAP_COEFFICIENTS : SD1_CHEAP_COEFFICIENTS;
  const plane = h * w;
  if (latent.length !== 4 * plane) throw new RangeError(`a cheap preview needs a 4×${h}×${w} latent, got ${latent.length} values`);
  // Channel planes one after another: each pass reads one plane in order.
  const red = new Float32Array(plane);
  const green = new Float32Array(plane);
  const blue = new Float32Array(plane);
  for (let l = 0; l < 4; l++) {
    const channel = latent.subarray(l * plane, (l + 1) * plane);
    const [cr, cg, cb] = coefficients[l]!;
    for (let i = 0; i < plane; i++) {
      const v = channel[i]!;
      red[i] = red[i]! + v * cr;
      green[i] = green[i]! + v * cg;
      blue[i] = blue[i]! + v * cb;
    }
  }
  const out = new Uint8Array(plane * 3);
  for (const [c, values] of [red, green, blue].entries()) {
    for (let i = 0; i < plane; i++) {
      const unit = Math.min(Math.max(f32(f32(values[i]! * 0.5) + 0.5), 0), 1);
      out[i * 3 + c] = Math.trunc(f32(unit * 255));
    }
  }
  return out;
}

/** A preview's largest side: 256 pixels of RGB stay well inside one NATS message (1 MiB) as a PNG. */
export const MAX_PREVIEW_SIDE = 256;

/**
 * The live preview of a 4-channel latent [4,h,w] as a PNG: cheapApproximation at latent size, box-averaged
 * down by a whole factor when a side exceeds MAX_PREVIEW_SIDE (a 4096-pixel image's latent is 512).
 */
export function previewPng(latent: Float32Array, h: number, w: number, space: LatentSpace = "sd"): Buffer {
  const rgb = cheapApproximation(latent, h, w, space);
  const k = Math.ceil(Math.max(h, w) / MAX_PREVIEW_SIDE);
  if (k <= 1) return rgbPngSync(rgb, w, h);
  const ow = Math.ceil(w / k);
  const oh = Math.ceil(h / k);
  const out = new Uint8Array(ow * oh * 3);
  for (let oy = 0; oy < oh; oy++) {
    for (let ox = 0; ox < ow; ox++) {
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        let n = 0;
        for (let y = oy * k; y < Math.min(h, (oy + 1) * k); y++) {
          for (let x = ox * k; x < Math.min(w, (ox + 1) * k); x++, n++) sum += rgb[(y * w + x) * 3 + c]!;
        }
        out[(oy * ow + ox) * 3 + c] = Math.round(sum / n);
      }
    }
  }
  return rgbPngSync(out, ow, oh);
}

/**
 * An RGB8 image as a PNG, synchronously: previews are made between model calls on the render's thread,
 * in step order, and sharp only encodes asynchronously (a later step's event could overtake them).
 */
export function rgbPngSync(rgb: Uint8Array, width: number, height: number): Buffer {
  const stride = width * 3;
  const rows = Buffer.alloc((stride + 1) * height);
  for (let y = 0; y < height; y++) rows.set(rgb.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB, deflate, no filter method variants, no interlace
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk("IHDR", header),
    pngChunk("IDAT", deflateSync(rows)),
    pngChunk("IEND", Buffer.alloc(0)),
  ]);
}
