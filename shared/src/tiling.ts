/**
 * Ultimate-SD-Upscale-style tiled second pass, made for a farm: the image is cut into overlapping tiles
 * whose edges sit on the latent grid, each tile is processed on its own (any agent, any order, retried
 * at will), and the results are blended with feathered linear weights into one image.
 *
 * Determinism: every tile reads its input from the same source image (never from a neighbour's result),
 * its seed follows a fixed rule of the tile index (tileSeed), and the blender folds tiles into the sum
 * strictly in index order. So the output depends only on the tile results, not on which agent produced
 * them or when they arrived: a 1-agent run and a 3-agent run give identical bytes.
 */

export interface TileRect {
  /** Row-major index, the unit of determinism (seed rule, fold order). */
  index: number;
  row: number;
  col: number;
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface TileLayout {
  width: number;
  height: number;
  overlap: number;
  /** Column starts and row starts (tiles are the cross product). */
  xs: number[];
  ys: number[];
  tileWidth: number;
  tileHeight: number;
  tiles: TileRect[];
}

export interface TileLayoutOptions {
  /** Tile edge in px (a multiple of `align`); the tile shrinks to the image when the image is smaller. */
  tileSize: number;
  /** Minimum overlap between neighbours in px (a multiple of `align`). */
  overlap: number;
  /** Grid the tile positions snap to: 8 px = one latent cell. */
  align?: number;
}

export function planTiles(width: number, height: number, options: TileLayoutOptions): TileLayout {
  const align = options.align ?? 8;
  const { tileSize, overlap } = options;
  for (const [name, v] of [
    ["width", width],
    ["height", height],
    ["tileSize", tileSize],
    ["overlap", overlap],
  ] as const) {
    if (!Number.isInteger(v) || v < 0 || v % align !== 0)
      throw new RangeError(`${name} must be a non-negative multiple of ${align}, got ${v}`);
  }
  if (width === 0 || height === 0 || tileSize === 0) throw new RangeError("image and tile sizes must be positive");
  if (overlap * 2 > tileSize) throw new RangeError(`overlap ${overlap} must be at most half the tile ${tileSize}`);
  const xs = axisStarts(width, tileSize, overlap, align);
  const ys = axisStarts(height, tileSize, overlap, align);
  const tileWidth = Math.min(tileSize, width);
  const tileHeight = Math.min(tileSize, height);
  const tiles: TileRect[] = [];
  ys.forEach((y, row) => xs.forEach((x, col) => tiles.push({ index: tiles.length, row, col, x, y, width: tileWidth, height: tileHeight })));
  return { width, height, overlap, xs, ys, tileWidth, tileHeight, tiles };
}

function axisStarts(length: number, tile: number, overlap: number, align: number): number[] {
  if (length <= tile) return [0];
  const span = length - tile;
  // Fewest tiles whose even spacing keeps every neighbour overlap ≥ `overlap` after snapping to `align`.
  for (let n = Math.max(2, Math.ceil((length - overlap) / (tile - overlap))); ; n++) {
    const starts = Array.from({ length: n }, (_, i) => (i === n - 1 ? span : Math.round((i * span) / (n - 1) / align) * align));
    if (starts.every((s, i) => i === 0 || starts[i - 1]! + tile - s >= overlap)) return starts;
  }
}

/** Extra pixels processed because of the overlaps, in % of the image (0 = no overlap work). */
export function tileOverheadPercent(layout: TileLayout): number {
  const processed = layout.tiles.reduce((sum, t) => sum + t.width * t.height, 0);
  return (processed / (layout.width * layout.height) - 1) * 100;
}

/**
 * 1-D feather along one axis for the tile starting at `starts[i]`: a linear ramp (k + ½)/ov over each
 * overlap shared with a neighbour, 1 elsewhere and along the image border. Neighbouring ramps use the
 * same overlap width, so they sum to exactly 1 across it.
 */
export function featherRamp(starts: readonly number[], i: number, tile: number): Float64Array {
  const w = new Float64Array(tile).fill(1);
  const start = starts[i]!;
  const prev = starts[i - 1];
  const next = starts[i + 1];
  if (prev !== undefined) {
    const ov = prev + tile - start;
    for (let k = 0; k < ov; k++) w[k] = Math.min(w[k]!, (k + 0.5) / ov);
  }
  if (next !== undefined) {
    const ov = start + tile - next;
    for (let k = 0; k < ov; k++) w[tile - 1 - k] = Math.min(w[tile - 1 - k]!, (k + 0.5) / ov);
  }
  return w;
}

/** The blend weight of every pixel of a tile (product of the two 1-D feathers), row-major. */
export function tileWeights(layout: TileLayout, tile: TileRect): Float64Array {
  const wx = featherRamp(layout.xs, tile.col, layout.tileWidth);
  const wy = featherRamp(layout.ys, tile.row, layout.tileHeight);
  const out = new Float64Array(tile.width * tile.height);
  for (let y = 0; y < tile.height; y++) for (let x = 0; x < tile.width; x++) out[y * tile.width + x] = wy[y]! * wx[x]!;
  return out;
}

/**
 * Per-tile seed rule.
 * - "same": every tile uses the image's seed, as Ultimate SD Upscale does (one p.seed for all tiles);
 *   each tile's noise is then that seed's noise at the tile's latent size.
 * - "per-tile": seed + tile index (mod 2³²), which avoids a repeated noise pattern across tiles.
 * Both depend only on the tile index, so the result is the same whichever agent runs a tile.
 */
export type TileSeedRule = "same" | "per-tile";

export function tileSeed(seed: number, tileIndex: number, rule: TileSeedRule = "same"): number {
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new RangeError(`seed must be a uint32, got ${seed}`);
  return rule === "same" ? seed : (seed + tileIndex) >>> 0;
}

/** Copies a tile's pixels out of an interleaved image (channels per pixel). */
export function extractTile<T extends Float32Array | Uint8Array>(image: T, width: number, channels: number, tile: TileRect): T {
  const out = new (image.constructor as new (n: number) => T)(tile.width * tile.height * channels);
  for (let y = 0; y < tile.height; y++) {
    const start = ((tile.y + y) * width + tile.x) * channels;
    out.set(image.subarray(start, start + tile.width * channels), y * tile.width * channels);
  }
  return out;
}

/**
 * Folds tile results into Σ w·v and Σ w strictly in tile-index order, buffering early arrivals, so the
 * float sums — and therefore the output — do not depend on arrival order.
 */
export class TileBlender {
  private readonly sum: Float64Array;
  private readonly weight: Float64Array;
  private readonly pending = new Map<number, Float32Array | Uint8Array>();
  private nextIndex = 0;

  constructor(
    readonly layout: TileLayout,
    readonly channels: number,
  ) {
    this.sum = new Float64Array(layout.width * layout.height * channels);
    this.weight = new Float64Array(layout.width * layout.height);
  }

  get complete(): boolean {
    return this.nextIndex === this.layout.tiles.length;
  }

  /** Accepts a tile's result (tile-sized, interleaved). Repeats of an already folded tile are ignored. */
  add(index: number, pixels: Float32Array | Uint8Array): void {
    const tile = this.layout.tiles[index];
    if (tile === undefined) throw new RangeError(`no tile ${index}`);
    if (pixels.length !== tile.width * tile.height * this.channels) {
      throw new RangeError(`tile ${index}: expected ${tile.width * tile.height * this.channels} values, got ${pixels.length}`);
    }
    if (index < this.nextIndex || this.pending.has(index)) return;
    this.pending.set(index, pixels);
    for (let p = this.pending.get(this.nextIndex); p !== undefined; p = this.pending.get(this.nextIndex)) {
      this.pending.delete(this.nextIndex);
      this.fold(this.layout.tiles[this.nextIndex]!, p);
      this.nextIndex++;
    }
  }

  // Typed arrays are read into locals and the weight is formed per pixel from the two 1-D feathers
  // (the same product tileWeights gives): at 2048² this loop is most of an assembly's time.
  private fold(tile: TileRect, pixels: Float32Array | Uint8Array): void {
    const wx = featherRamp(this.layout.xs, tile.col, this.layout.tileWidth);
    const wy = featherRamp(this.layout.ys, tile.row, this.layout.tileHeight);
    const ch = this.channels;
    const W = this.layout.width;
    const sum = this.sum;
    const weight = this.weight;
    for (let y = 0; y < tile.height; y++) {
      const wyy = wy[y]!;
      let o = (tile.y + y) * W + tile.x;
      let i = y * tile.width * ch;
      if (ch === 3) {
        for (let x = 0; x < tile.width; x++, o++, i += 3) {
          const wt = wyy * wx[x]!;
          weight[o] = weight[o]! + wt;
          const so = o * 3;
          sum[so] = sum[so]! + wt * pixels[i]!;
          sum[so + 1] = sum[so + 1]! + wt * pixels[i + 1]!;
          sum[so + 2] = sum[so + 2]! + wt * pixels[i + 2]!;
        }
        continue;
      }
      for (let x = 0; x < tile.width; x++, o++) {
        const wt = wyy * wx[x]!;
        weight[o] = weight[o]! + wt;
        const so = o * ch;
        for (let c = 0; c < ch; c++, i++) sum[so + c] = sum[so + c]! + wt * pixels[i]!;
      }
    }
  }

  private assertComplete(): void {
    if (!this.complete) {
      throw new Error(`tiles missing: folded ${this.nextIndex} of ${this.layout.tiles.length} (waiting for tile ${this.nextIndex})`);
    }
  }

  /** Blended image as float32 (same value scale as the tiles). */
  resultFloat32(): Float32Array {
    this.assertComplete();
    const { sum, weight, channels: ch } = this;
    const out = new Float32Array(sum.length);
    for (let o = 0, i = 0; o < weight.length; o++) {
      const w = weight[o]!;
      for (let c = 0; c < ch; c++, i++) out[i] = sum[i]! / w;
    }
    return out;
  }

  /** Blended image rounded to bytes (round half up, clamped). */
  resultUint8(): Uint8Array {
    this.assertComplete();
    const { sum, weight, channels: ch } = this;
    const out = new Uint8Array(sum.length);
    for (let o = 0, i = 0; o < weight.length; o++) {
      const w = weight[o]!;
      // A Uint8Array store wraps out-of-range values instead of clamping them.
      for (let c = 0; c < ch; c++, i++) {
        const v = Math.floor(sum[i]! / w + 0.5);
        out[i] = v < 0 ? 0 : v > 255 ? 255 : v;
      }
    }
    return out;
  }
}

/**
 * Runs a tiled pass in-process: every tile is cut from `image`, handed to `processTile` (a stand-in for
 * "send to an agent"), and blended. `concurrency` only changes scheduling, never the result.
 */
export async function runTiledPass<T extends Float32Array | Uint8Array>(
  image: T,
  layout: TileLayout,
  channels: number,
  processTile: (pixels: T, tile: TileRect) => Promise<Float32Array | Uint8Array>,
  options: { concurrency?: number } = {},
): Promise<TileBlender> {
  const blender = new TileBlender(layout, channels);
  const queue = [...layout.tiles];
  const worker = async (): Promise<void> => {
    for (let tile = queue.shift(); tile !== undefined; tile = queue.shift()) {
      blender.add(tile.index, await processTile(extractTile(image, layout.width, channels, tile), tile));
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, options.concurrency ?? 1) }, worker));
  return blender;
}

/**
 * The layout a coordinator planned, rebuilt from its tile starts (what travels in a TilePlan), with
 * the checks an agent needs before blending: tiles inside the image, covering all of it, in order.
 * Its `overlap` is the smallest overlap the tiles actually have.
 */
export function layoutFromStarts(
  width: number,
  height: number,
  tileWidth: number,
  tileHeight: number,
  xs: readonly number[],
  ys: readonly number[],
): TileLayout {
  const axis = (name: string, starts: readonly number[], tile: number, length: number): void => {
    if (!Number.isInteger(length) || length < 1 || !Number.isInteger(tile) || tile < 1 || tile > length) {
      throw new RangeError(`${name}: tile ${tile} does not fit ${length}`);
    }
    if (starts.length === 0 || starts[0] !== 0 || starts.at(-1)! + tile !== length)
      throw new RangeError(`${name}: tiles do not span 0..${length}`);
    for (let i = 1; i < starts.length; i++) {
      if (!Number.isInteger(starts[i]) || starts[i]! <= starts[i - 1]! || starts[i]! > starts[i - 1]! + tile) {
        throw new RangeError(`${name}: tile starts ${starts.join(",")} leave a gap or are out of order`);
      }
    }
  };
  axis("x", xs, tileWidth, width);
  axis("y", ys, tileHeight, height);
  const tiles: TileRect[] = [];
  ys.forEach((y, row) => xs.forEach((x, col) => tiles.push({ index: tiles.length, row, col, x, y, width: tileWidth, height: tileHeight })));
  const overlap = Math.min(
    ...[xs, ys].flatMap((st, a) => st.slice(1).map((s, i) => st[i]! + (a === 0 ? tileWidth : tileHeight) - s)),
    Infinity,
  );
  return { width, height, overlap: overlap === Infinity ? 0 : overlap, xs: [...xs], ys: [...ys], tileWidth, tileHeight, tiles };
}

/** Crops an NCHW tensor to rows y..y+h and columns x..x+w of every plane. */
export function cropNchw(
  data: Float32Array,
  shape: readonly number[],
  rect: { x: number; y: number; width: number; height: number },
): Float32Array {
  if (shape.length !== 4) throw new RangeError(`expected an NCHW shape, got [${shape.join(",")}]`);
  const [n, c, h, w] = shape as [number, number, number, number];
  if (data.length !== n * c * h * w) throw new RangeError(`shape [${shape.join(",")}] needs ${n * c * h * w} values, got ${data.length}`);
  if (rect.x < 0 || rect.y < 0 || rect.width < 1 || rect.height < 1 || rect.x + rect.width > w || rect.y + rect.height > h) {
    throw new RangeError(`crop ${rect.width}x${rect.height}+${rect.x}+${rect.y} is outside ${w}x${h}`);
  }
  const out = new Float32Array(n * c * rect.width * rect.height);
  for (let p = 0; p < n * c; p++) {
    for (let y = 0; y < rect.height; y++) {
      const src = p * h * w + (rect.y + y) * w + rect.x;
      out.set(data.subarray(src, src + rect.width), (p * rect.height + y) * rect.width);
    }
  }
  return out;
}
