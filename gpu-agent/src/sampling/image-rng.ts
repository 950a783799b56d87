/**
 * Per-image noise as A1111's ImageRNG produces it (modules/rng.py): variation seeds (slerp), seed
 * resize, the eta-noise-seed-delta swap, and sampler noise from the same per-image generators.
 */
import {
  createGenerator,
  restoreGenerator,
  type GeneratorOptions,
  type GeneratorSnapshot,
  type ImageGenerator,
  type RngSource,
} from "./generator.js";
import { InvalidSamplingParameter } from "./errors.js";
import { f32 } from "./float32.js";

export type LatentShape = readonly [channels: number, height: number, width: number];

export interface ImageRngOptions {
  /** Latent shape of one image, (C, H, W) = (4, height/8, width/8). */
  shape: LatentShape;
  /** One seed per image of this batch. */
  seeds: readonly number[];
  /** Variation seeds, one per image; a missing entry counts as 0. */
  subseeds?: readonly number[];
  subseedStrength?: number;
  /** "Resize seed from" size in pixels; used only when both are > 0. */
  seedResizeFromH?: number;
  seedResizeFromW?: number;
  source: RngSource;
  /** Option `eta_noise_seed_delta` (ENSD). */
  etaNoiseSeedDelta?: number;
  /** "GPU" source only: see GeneratorOptions.cudaResidentThreads. */
  cudaResidentThreads?: number;
}

export class ImageRng {
  readonly shape: LatentShape;
  private readonly seeds: readonly number[];
  private readonly options: ImageRngOptions;
  private generators: ImageGenerator[];
  private readonly generatorOptions: GeneratorOptions;
  private isFirst = true;

  constructor(options: ImageRngOptions) {
    const [c, h, w] = options.shape;
    for (const dim of [c, h, w]) {
      if (!Number.isSafeInteger(dim) || dim <= 0)
        throw new InvalidSamplingParameter("shape", `invalid latent shape ${options.shape.join("×")}`);
    }
    if (options.seeds.length === 0) throw new InvalidSamplingParameter("seed", "at least one seed is needed");
    this.options = options;
    this.shape = options.shape;
    this.seeds = [...options.seeds];
    this.generatorOptions = options.cudaResidentThreads === undefined ? {} : { cudaResidentThreads: options.cudaResidentThreads };
    this.generators = this.seeds.map((seed) => this.create(seed));
  }

  private create(seed: number): ImageGenerator {
    return createGenerator(this.options.source, seed, this.generatorOptions);
  }

  get imageCount(): number {
    return this.seeds.length;
  }

  /** Elements of one image's latent. */
  get imageSize(): number {
    return this.shape[0] * this.shape[1] * this.shape[2];
  }

  /** The initial latent noise of every image, concatenated image after image (torch.stack). */
  first(): Float32Array {
    this.isFirst = false;
    const { shape, options } = this;
    const resizeH = options.seedResizeFromH ?? 0;
    const resizeW = options.seedResizeFromW ?? 0;
    const noiseShape: LatentShape = resizeH <= 0 || resizeW <= 0 ? shape : [shape[0], Math.floor(resizeH / 8), Math.floor(resizeW / 8)];
    const resized = noiseShape[1] !== shape[1] || noiseShape[2] !== shape[2];
    const strength = options.subseedStrength ?? 0;
    const out = new Float32Array(this.imageCount * this.imageSize);

    this.seeds.forEach((seed, i) => {
      const generator = this.generators[i]!;
      let subnoise: Float32Array | undefined;
      if (options.subseeds !== undefined && strength !== 0) {
        subnoise = this.create(options.subseeds[i] ?? 0).next(noiseShape);
      }
      let noise = resized ? this.create(seed).next(noiseShape) : generator.next(shape);
      if (subnoise !== undefined) noise = slerp(strength, noise, subnoise, noiseShape);
      if (resized) noise = pasteResized(generator.next(shape), shape, noise, noiseShape);
      out.set(noise, i * this.imageSize);
    });

    const delta = options.etaNoiseSeedDelta ?? 0;
    if (delta !== 0) this.generators = this.seeds.map((seed) => this.create(seed + delta));
    return out;
  }

  /** Sampler noise (`randn_like`): the next draw of each image's generator; the first call is `first()`. */
  next(): Float32Array {
    if (this.isFirst) return this.first();
    return drawEach(this.generators, this.shape);
  }

  /**
   * The sampler noise still to come, as plain data: `NoiseContinuation.resume(c).next()` draws what this
   * object's next() would. Only after first() (the initial latent is where variations and resizing apply).
   */
  continuation(): NoiseContinuationState {
    if (this.isFirst) throw new Error("a noise continuation starts after the initial noise: call first() before");
    return { shape: this.shape, generators: this.generators.map((g) => g.snapshot()) };
  }
}

/** ImageRng's sampler noise after first(), as plain data (it crosses threads by structured clone). */
export interface NoiseContinuationState {
  shape: LatentShape;
  generators: GeneratorSnapshot[];
}

/** ImageRng.next() continued from a NoiseContinuationState, in this thread or another. */
export class NoiseContinuation {
  private constructor(
    private readonly shape: LatentShape,
    private readonly generators: ImageGenerator[],
  ) {}

  static resume(state: NoiseContinuationState): NoiseContinuation {
    return new NoiseContinuation(state.shape, state.generators.map(restoreGenerator));
  }

  next(): Float32Array {
    return drawEach(this.generators, this.shape);
  }
}

function drawEach(generators: readonly ImageGenerator[], shape: LatentShape): Float32Array {
  // One image: the generator's fresh array is the result, no copy.
  if (generators.length === 1) return generators[0]!.next(shape);
  const size = shape[0] * shape[1] * shape[2];
  const out = new Float32Array(generators.length * size);
  generators.forEach((generator, i) => out.set(generator.next(shape), i * size));
  return out;
}

/**
 * A1111's `slerp(val, low, high)` on (C, H, W) tensors: vectors run along H (torch dim 1), one
 * interpolation angle per (c, w) column; nearly parallel noise falls back to the linear blend with
 * A1111's (swapped-looking) weights low·val + high·(1 − val).
 */
export function slerp(val: number, low: Float32Array, high: Float32Array, shape: LatentShape): Float32Array {
  const [channels, height, width] = shape;
  const columns = channels * width;
  const lowNorm = new Float32Array(columns);
  const highNorm = new Float32Array(columns);
  for (let c = 0; c < channels; c++) {
    for (let x = 0; x < width; x++) {
      let sumLow = 0;
      let sumHigh = 0;
      for (let y = 0; y < height; y++) {
        const idx = (c * height + y) * width + x;
        sumLow += low[idx]! * low[idx]!;
        sumHigh += high[idx]! * high[idx]!;
      }
      lowNorm[c * width + x] = Math.sqrt(sumLow);
      highNorm[c * width + x] = Math.sqrt(sumHigh);
    }
  }
  const dot = new Float32Array(columns);
  let dotSum = 0;
  for (let c = 0; c < channels; c++) {
    for (let x = 0; x < width; x++) {
      const col = c * width + x;
      let sum = 0;
      for (let y = 0; y < height; y++) {
        const idx = (c * height + y) * width + x;
        sum += f32(low[idx]! / lowNorm[col]!) * f32(high[idx]! / highNorm[col]!);
      }
      dot[col] = sum;
      dotSum += dot[col]!;
    }
  }
  const out = new Float32Array(low.length);
  if (f32(dotSum / columns) > 0.9995) {
    const lowWeight = f32(val);
    const highWeight = f32(1 - val);
    for (let i = 0; i < out.length; i++) out[i] = f32(low[i]! * lowWeight) + f32(high[i]! * highWeight);
    return out;
  }
  for (let c = 0; c < channels; c++) {
    for (let x = 0; x < width; x++) {
      const col = c * width + x;
      const omega = f32(Math.acos(dot[col]!));
      const so = f32(Math.sin(omega));
      const lowScale = f32(f32(Math.sin(f32(f32(1 - val) * omega))) / so);
      const highScale = f32(f32(Math.sin(f32(f32(val) * omega))) / so);
      for (let y = 0; y < height; y++) {
        const idx = (c * height + y) * width + x;
        out[idx] = f32(lowScale * low[idx]!) + f32(highScale * high[idx]!);
      }
    }
  }
  return out;
}

/** Seed resize: centre `noise` (C, h0, w0) into `x` (C, H, W), cropping when it is larger. */
function pasteResized(x: Float32Array, shape: LatentShape, noise: Float32Array, noiseShape: LatentShape): Float32Array {
  const [channels, height, width] = shape;
  const [, h0, w0] = noiseShape;
  const dx = Math.floor((width - w0) / 2);
  const dy = Math.floor((height - h0) / 2);
  const w = dx >= 0 ? w0 : w0 + 2 * dx;
  const h = dy >= 0 ? h0 : h0 + 2 * dy;
  const tx = Math.max(dx, 0);
  const ty = Math.max(dy, 0);
  const sx = Math.max(-dx, 0);
  const sy = Math.max(-dy, 0);
  // Python slices clamp at the tensor edge, so an odd crop copies only what fits.
  const rows = Math.min(h, height - ty, h0 - sy);
  const cols = Math.min(w, width - tx, w0 - sx);
  for (let c = 0; c < channels; c++) {
    for (let y = 0; y < rows; y++) {
      for (let xx = 0; xx < cols; xx++) {
        x[(c * height + ty + y) * width + tx + xx] = noise[(c * h0 + sy + y) * w0 + sx + xx]!;
      }
    }
  }
  return x;
}
