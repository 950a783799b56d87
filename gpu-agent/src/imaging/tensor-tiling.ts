/**
 * A1111's other tiled model upscale (upscaler_utils.upscale_2 / tiled_upscale_2), which SwinIR and
 * ScuNET use: square tiles of min(tile, h, w) px at a stride of tile − overlap, the last flush with the
 * far edge, run on the image's BGR tensor; each output tile is added into a sum and a count of the
 * model's precision, and the sum divided by the count, so overlaps are plain averages. The tensor goes
 * back to 8-bit RGB once, at the end (bgrTensorToTile).
 */
import { bgrTensorToTile, tileToBgrTensor } from "./esrgan-tiling.js";
import type { Image8 } from "./resize-modes.js";

/** The model on one BGR CHW tensor in [0, 1]: its output tensor and size. */
export type UpscaleTensor = (
  bgr: Float32Array,
  width: number,
  height: number,
) => Promise<{ data: Float32Array; width: number; height: number }>;

export interface TensorTilesOptions {
  /** SWIN_tile (192) or SCUNET_tile (256); 0 runs the whole image in one call. */
  tileSize: number;
  /** SWIN_tile_overlap / SCUNET_tile_overlap (8). */
  tileOverlap: number;
  /**
   * The accumulation tensors' precision: rounds each sum and the quotient (Math.fround for a float32
   * model, float16 rounding for a float16 one, as torch adds in the input's dtype).
   */
  round?: (v: number) => number;
}

/** Tile starts along a side of n px: Python's range(0, n − tile, stride) + [n − tile] (no middle tiles for a stride ≤ 0). */
export function tensorTileStarts(n: number, tile: number, stride: number): number[] {
  const starts: number[] = [];
  if (stride > 0) for (let i = 0; i < n - tile; i += stride) starts.push(i);
  starts.push(n - tile);
  return starts;
}

function cropPlanes(x: Float32Array, width: number, height: number, left: number, top: number, size: number): Float32Array {
  const out = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    for (let row = 0; row < size; row++) {
      const from = c * width * height + (top + row) * width + left;
      out.set(x.subarray(from, from + size), c * size * size + row * size);
    }
  }
  return out;
}

export async function upscaleWithTensorTiles(img: Image8, run: UpscaleTensor, options: TensorTilesOptions): Promise<Image8> {
  if (img.channels !== 3) throw new RangeError(`expected RGB, got ${img.channels} channels`);
  const round = options.round ?? Math.fround;
  const { width: w, height: h } = img;
  const x = tileToBgrTensor(img);
  const tile = Math.min(options.tileSize, h, w);
  if (tile <= 0) {
    const out = await run(x, w, h);
    return bgrTensorToTile(out.data, out.width, out.height);
  }
  const stride = tile - options.tileOverlap;
  const tops = tensorTileStarts(h, tile, stride);
  const lefts = tensorTileStarts(w, tile, stride);
  let scale = 0;
  let sum: Float32Array | undefined;
  for (const top of tops) {
    for (const left of lefts) {
      const out = await run(cropPlanes(x, w, h, left, top, tile), tile, tile);
      if (sum === undefined) {
        scale = out.width / tile;
        if (!Number.isInteger(scale) || scale < 1)
          throw new RangeError(`the model maps a ${tile}px tile to ${out.width}px, not an integer scale`);
        sum = new Float32Array(3 * h * scale * w * scale);
      }
      const size = tile * scale;
      if (out.width !== size || out.height !== size || out.data.length !== 3 * size * size) {
        throw new RangeError(`expected a ${size}x${size} tile from the model, got ${out.width}x${out.height}`);
      }
      const W = w * scale;
      const plane = W * h * scale;
      for (let c = 0; c < 3; c++) {
        for (let row = 0; row < size; row++) {
          const base = c * plane + (top * scale + row) * W + left * scale;
          const from = c * size * size + row * size;
          for (let k = 0; k < size; k++) sum[base + k] = round(sum[base + k]! + out.data[from + k]!);
        }
      }
    }
  }
  // The tiles form a grid, so a pixel's count (torch's weights tensor) is the tiles covering its row times
  // those covering its column.
  const covering = (starts: number[], n: number): Uint16Array => {
    const counts = new Uint16Array(n * scale);
    for (const s of starts) for (let i = s * scale; i < (s + tile) * scale; i++) counts[i]!++;
    return counts;
  };
  const rows = covering(tops, h);
  const cols = covering(lefts, w);
  const result = sum!;
  const W = w * scale;
  const plane = W * h * scale;
  for (let i = 0; i < result.length; i++) {
    const at = i % plane;
    result[i] = round(result[i]! / (rows[Math.floor(at / W)]! * cols[at % W]!));
  }
  return bgrTensorToTile(result, w * scale, h * scale);
}
