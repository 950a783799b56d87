/**
 * A1111's tiled model upscale (upscaler_utils.upscale_with_model with images.split_grid /
 * images.combine_grid): tiles of ESRGAN_tile (192) px overlapping by ESRGAN_tile_overlap (8) px, each
 * run through the model, pasted back left to right and top to bottom with an 8-bit linear alpha over
 * the overlap. PIL's crop (zero padding outside the image), paste clipping and mask blending
 * (`(a·(255−m) + b·m)/255` rounded) are reproduced exactly on packed RGB bytes.
 */
import type { Image8 } from "./resize-modes.js";

export const ESRGAN_TILE = 192;
export const ESRGAN_TILE_OVERLAP = 8;

export interface GridRow {
  y: number;
  height: number;
  xs: number[];
}

export interface TileGrid {
  tileWidth: number;
  tileHeight: number;
  imageWidth: number;
  imageHeight: number;
  overlap: number;
  rows: GridRow[];
}

/** `split_grid`: evenly spread tiles; the last one flush with the far edge (negative when the image is smaller). */
export function splitGrid(imageWidth: number, imageHeight: number, tileWidth: number, tileHeight: number, overlap: number): TileGrid {
  if (tileWidth <= overlap || tileHeight <= overlap)
    throw new RangeError(`tile ${tileWidth}x${tileHeight} must exceed the overlap ${overlap}`);
  const cols = Math.ceil((imageWidth - overlap) / (tileWidth - overlap));
  const rowsCount = Math.ceil((imageHeight - overlap) / (tileHeight - overlap));
  const dx = cols > 1 ? (imageWidth - tileWidth) / (cols - 1) : 0;
  const dy = rowsCount > 1 ? (imageHeight - tileHeight) / (rowsCount - 1) : 0;
  const rows: GridRow[] = [];
  for (let r = 0; r < rowsCount; r++) {
    let y = Math.trunc(r * dy);
    if (y + tileHeight >= imageHeight) y = imageHeight - tileHeight;
    const xs: number[] = [];
    for (let c = 0; c < cols; c++) {
      let x = Math.trunc(c * dx);
      if (x + tileWidth >= imageWidth) x = imageWidth - tileWidth;
      xs.push(x);
    }
    rows.push({ y, height: tileHeight, xs });
  }
  return { tileWidth, tileHeight, imageWidth, imageHeight, overlap, rows };
}

/** PIL `Image.crop`: pixels outside the source are black. */
export function cropPadded(img: Image8, x: number, y: number, width: number, height: number): Image8 {
  const ch = img.channels;
  const out = new Uint8Array(width * height * ch);
  const x0 = Math.max(x, 0);
  const x1 = Math.min(x + width, img.width);
  for (let row = 0; row < height; row++) {
    const sy = y + row;
    if (sy < 0 || sy >= img.height || x1 <= x0) continue;
    out.set(img.data.subarray((sy * img.width + x0) * ch, (sy * img.width + x1) * ch), (row * width + (x0 - x)) * ch);
  }
  return { width, height, channels: ch, data: out };
}

export interface TileInfo {
  /** Row-major tile number. */
  index: number;
  row: number;
  col: number;
  /** Tile position in the source image (may be negative for images smaller than a tile). */
  x: number;
  y: number;
}

export type UpscaleTile = (tile: Image8, info: TileInfo) => Promise<Image8>;

export interface UpscaleWithModelOptions {
  /** ESRGAN_tile; 0 runs the whole image in one call. */
  tileSize?: number;
  tileOverlap?: number;
  /** Tiles in flight at once; the result does not depend on it. */
  concurrency?: number;
}

/** `upscale_with_model` over an injected per-tile model call. */
export async function upscaleWithModel(img: Image8, upscaleTile: UpscaleTile, options: UpscaleWithModelOptions = {}): Promise<Image8> {
  const tileSize = options.tileSize ?? ESRGAN_TILE;
  const overlap = options.tileOverlap ?? ESRGAN_TILE_OVERLAP;
  if (img.channels !== 3) throw new RangeError(`expected RGB, got ${img.channels} channels`);
  if (tileSize <= 0) return upscaleTile(img, { index: 0, row: 0, col: 0, x: 0, y: 0 });
  const grid = splitGrid(img.width, img.height, tileSize, tileSize, overlap);
  const jobs: Array<{ info: TileInfo; tile: Image8 }> = [];
  grid.rows.forEach((row, r) =>
    row.xs.forEach((x, c) => {
      jobs.push({ info: { index: jobs.length, row: r, col: c, x, y: row.y }, tile: cropPadded(img, x, row.y, tileSize, tileSize) });
    }),
  );
  const outputs = await mapLimited(jobs, options.concurrency ?? 1, ({ info, tile }) => upscaleTile(tile, info));
  // A1111 takes `output.width // tile.width` per tile; a model must scale every tile alike.
  const first = outputs[0]!;
  const scale = Math.floor(first.width / tileSize);
  if (scale < 1) throw new RangeError(`tile model shrank a ${tileSize}px tile to ${first.width}px`);
  for (const [i, o] of outputs.entries()) {
    if (o.width !== tileSize * scale || o.height !== tileSize * scale || o.channels !== 3) {
      throw new RangeError(`tile ${i}: expected ${tileSize * scale}x${tileSize * scale} RGB, got ${o.width}x${o.height}x${o.channels}`);
    }
  }
  const scaled: TileGrid = {
    tileWidth: tileSize * scale,
    tileHeight: tileSize * scale,
    imageWidth: img.width * scale,
    imageHeight: img.height * scale,
    overlap: overlap * scale,
    rows: grid.rows.map((row) => ({ y: row.y * scale, height: row.height * scale, xs: row.xs.map((x) => x * scale) })),
  };
  let k = 0;
  return combineGrid(
    scaled,
    grid.rows.map((row) => row.xs.map(() => outputs[k++]!)),
  );
}

/** numpy float32 `arange(ov) * 255 / ov` cast to uint8 (truncation). */
export function overlapAlpha(overlap: number): Uint8Array {
  const alpha = new Uint8Array(overlap);
  for (let r = 0; r < overlap; r++) alpha[r] = Math.trunc(Math.fround(Math.fround(r * 255) / overlap));
  return alpha;
}

/** `combine_grid`: rows assembled left to right, then stacked top to bottom, each seam alpha-blended. */
export function combineGrid(grid: TileGrid, tiles: Image8[][]): Image8 {
  const { imageWidth: W, imageHeight: H, overlap: ov } = grid;
  const alpha = overlapAlpha(ov);
  const combined: Image8 = { width: W, height: H, channels: 3, data: new Uint8Array(W * H * 3) };
  grid.rows.forEach((row, r) => {
    const h = row.height;
    const rowImg: Image8 = { width: W, height: h, channels: 3, data: new Uint8Array(W * h * 3) };
    row.xs.forEach((x, c) => {
      const tile = tiles[r]?.[c];
      if (tile === undefined) throw new RangeError(`missing tile ${r},${c}`);
      if (x === 0) {
        paste(rowImg, tile, 0, 0, 0, 0, tile.width, tile.height, undefined);
        return;
      }
      paste(rowImg, tile, 0, 0, x, 0, ov, h, (sx) => alpha[sx]!);
      paste(rowImg, tile, ov, 0, x + ov, 0, tile.width - ov, h, undefined);
    });
    if (row.y === 0) {
      paste(combined, rowImg, 0, 0, 0, 0, W, h, undefined);
      return;
    }
    paste(combined, rowImg, 0, 0, 0, row.y, W, ov, (_sx, sy) => alpha[sy]!);
    paste(combined, rowImg, 0, ov, 0, row.y + ov, W, h - ov, undefined);
  });
  return combined;
}

/**
 * PIL paste of the `w×h` block at (sx, sy) of `src` to (dx, dy) of `dst`, clipped to both images;
 * with a mask m (indexed in block coordinates): out = DIV255(dst·(255−m) + src·m).
 */
function paste(
  dst: Image8,
  src: Image8,
  sx: number,
  sy: number,
  dx: number,
  dy: number,
  w: number,
  h: number,
  mask: ((bx: number, by: number) => number) | undefined,
): void {
  const ch = 3;
  for (let by = 0; by < h; by++) {
    const ty = dy + by;
    const fy = sy + by;
    if (ty < 0 || ty >= dst.height || fy < 0 || fy >= src.height) continue;
    for (let bx = 0; bx < w; bx++) {
      const tx = dx + bx;
      const fx = sx + bx;
      if (tx < 0 || tx >= dst.width || fx < 0 || fx >= src.width) continue;
      const o = (ty * dst.width + tx) * ch;
      const i = (fy * src.width + fx) * ch;
      if (mask === undefined) {
        dst.data[o] = src.data[i]!;
        dst.data[o + 1] = src.data[i + 1]!;
        dst.data[o + 2] = src.data[i + 2]!;
      } else {
        const m = mask(bx, by);
        for (let c = 0; c < ch; c++) dst.data[o + c] = div255(dst.data[o + c]! * (255 - m) + src.data[i + c]! * m);
      }
    }
  }
}

/** PIL's DIV255: exact rounding of a/255 for 0 ≤ a ≤ 255². */
export function div255(a: number): number {
  const t = a + 128;
  return ((t >> 8) + t) >> 8;
}

/** Runs `fn` over items with at most `limit` promises pending; results keep the input order. */
export async function mapLimited<T, R>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  return results;
}

/**
 * A1111 `pil_image_to_torch_bgr` for one tile: NCHW float32 in BGR plane order, v/255 (computed in
 * double, stored as float32, as numpy → torch .float() does).
 */
export function tileToBgrTensor(tile: Image8): Float32Array {
  if (tile.channels !== 3) throw new RangeError(`expected RGB, got ${tile.channels} channels`);
  const plane = tile.width * tile.height;
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) out[(2 - c) * plane + i] = tile.data[i * 3 + c]! / 255;
  }
  return out;
}

/**
 * A1111 `torch_bgr_to_pil_image` (1.10): clamp to [0, 1], ×255 in float32, numpy round (half to even),
 * uint8, BGR planes back to packed RGB. (Forge truncates instead; A1111 rounds.)
 */
export function bgrTensorToTile(tensor: Float32Array, width: number, height: number): Image8 {
  const plane = width * height;
  if (tensor.length !== 3 * plane) throw new RangeError(`expected ${3 * plane} values, got ${tensor.length}`);
  const data = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = Math.fround(Math.min(Math.max(tensor[(2 - c) * plane + i]!, 0), 1) * 255);
      data[i * 3 + c] = roundHalfEven(v);
    }
  }
  return { width, height, channels: 3, data };
}

function roundHalfEven(v: number): number {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}
