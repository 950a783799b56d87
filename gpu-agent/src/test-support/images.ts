// Synthetic images for pipeline tests.
import sharp from "sharp";

/** RGB8 with red rising left to right and green top to bottom; blue from `blue(x, y)`. */
export function gradientRgb(width: number, height: number, blue: (x: number, y: number) => number = () => 128): Uint8Array {
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      out[i] = (x * 255) / (width - 1);
      out[i + 1] = (y * 255) / (height - 1);
      out[i + 2] = blue(x, y);
    }
  }
  return out;
}

/** A PNG of raw 8-bit pixels (1 channel: gray, 3: RGB). */
export async function rawPng(data: Uint8Array, width: number, height: number, channels: 1 | 3 = 3): Promise<Uint8Array> {
  return new Uint8Array(await sharp(data, { raw: { width, height, channels } }).png().toBuffer());
}

/** A PNG of one colour. */
export async function solidPng(width: number, height: number, rgb: { r: number; g: number; b: number }): Promise<Uint8Array> {
  return new Uint8Array(
    await sharp({ create: { width, height, channels: 3, background: rgb } })
      .png()
      .toBuffer(),
  );
}

/** An inpainting mask PNG (size × size) with its right half white (masked) and its left half black. */
export async function rightHalfMask(size = 64): Promise<Uint8Array> {
  const half = { create: { width: size / 2, height: size, channels: 3 as const, background: { r: 255, g: 255, b: 255 } } };
  return new Uint8Array(
    await sharp({ create: { width: size, height: size, channels: 3, background: { r: 0, g: 0, b: 0 } } })
      .composite([{ input: half, left: size / 2, top: 0 }])
      .png()
      .toBuffer(),
  );
}
