/**
 * torch.nn.functional.interpolate for NCHW float32 tensors, as A1111's latent upscaler calls it
 * (`interpolate(samples, size=(H//8, W//8), mode=…, antialias=…)`, align_corners=False).
 *
 * The reference is PyTorch's CPU kernels (aten/src/ATen/native/cpu/UpSampleKernel.cpp, UpSample.h):
 * every intermediate is rounded to float32 exactly where the C++ stores or computes in float, and the
 * C++ double promotions (`i + 0.5`, `… + 0.5` literals) are kept, because one rounding step decides
 * source indices and antialias window bounds at odd ratios. Two things we cannot know from here are
 * documented rather than guessed: whether the compiler fused a multiply-add into an FMA (1 ulp), and
 * CUDA's kernels, which use the same formulas with a different summation order (1 ulp).
 */
import type { LatentUpscaler } from "@latentfarm/shared";

const f32 = Math.fround;

export type InterpolationMode = "bilinear" | "bicubic" | "nearest" | "nearest-exact";

export interface LatentUpscaleMode {
  readonly mode: InterpolationMode;
  readonly antialias: boolean;
}

/** A1111 `shared.latent_upscale_modes`, keyed by the names the UI and the API use for hr_upscaler. */
export const LATENT_UPSCALE_MODES: Readonly<Record<LatentUpscaler, LatentUpscaleMode>> = Object.freeze({
  Latent: { mode: "bilinear", antialias: false },
  "Latent (antialiased)": { mode: "bilinear", antialias: true },
  "Latent (bicubic)": { mode: "bicubic", antialias: false },
  "Latent (bicubic antialiased)": { mode: "bicubic", antialias: true },
  "Latent (nearest)": { mode: "nearest", antialias: false },
  "Latent (nearest-exact)": { mode: "nearest-exact", antialias: false },
});

/** A1111's `latent_upscale_default_mode`: what hr_upscaler None means. */
export const DEFAULT_LATENT_UPSCALER = "Latent";

/** The interpolate mode for an A1111 latent upscaler name, or undefined for pixel-space upscalers. */
export function latentUpscaleMode(name: string | null | undefined): LatentUpscaleMode | undefined {
  const key = name ?? DEFAULT_LATENT_UPSCALER;
  return Object.hasOwn(LATENT_UPSCALE_MODES, key) ? LATENT_UPSCALE_MODES[key as LatentUpscaler] : undefined;
}

export type Nchw = readonly [n: number, c: number, h: number, w: number];

export interface InterpolateOptions {
  mode: InterpolationMode;
  /** Output [height, width]. Either this or scaleFactor. */
  size?: readonly [number, number];
  /**
   * torch's scale_factor (recompute_scale_factor unset): output = floor(in·s) and the kernel uses 1/s
   * instead of in/out, which changes the source positions when in·s is not an integer.
   */
  scaleFactor?: readonly [number, number];
  /** Only for bilinear and bicubic, as in torch. */
  antialias?: boolean;
}

export interface InterpolateResult {
  data: Float32Array;
  shape: Nchw;
}

export function interpolate(input: Float32Array, shape: Nchw, options: InterpolateOptions): InterpolateResult {
  const [n, c, inH, inW] = shape;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 1) throw new RangeError(`interpolate: bad input shape [${shape.join(", ")}]`);
  }
  if (input.length !== n * c * inH * inW) {
    throw new RangeError(`interpolate: ${input.length} values do not fill shape [${shape.join(", ")}]`);
  }
  const { mode } = options;
  const antialias = options.antialias ?? false;
  if (antialias && mode !== "bilinear" && mode !== "bicubic") {
    throw new RangeError(`interpolate: antialias needs bilinear or bicubic, not ${mode}`);
  }

  let outH: number;
  let outW: number;
  let scaleH: number | undefined;
  let scaleW: number | undefined;
  if (options.size !== undefined) {
    if (options.scaleFactor !== undefined) throw new RangeError("interpolate: give size or scaleFactor, not both");
    [outH, outW] = options.size;
  } else if (options.scaleFactor !== undefined) {
    [scaleH, scaleW] = options.scaleFactor;
    if (!(scaleH > 0) || !(scaleW > 0)) throw new RangeError("interpolate: scaleFactor must be positive");
    // torch computes the output size in Python doubles: floor(float(in) * s).
    outH = Math.floor(inH * scaleH);
    outW = Math.floor(inW * scaleW);
  } else {
    throw new RangeError("interpolate: size or scaleFactor is required");
  }
  if (!Number.isInteger(outH) || !Number.isInteger(outW) || outH < 1 || outW < 1) {
    throw new RangeError(`interpolate: bad output size ${outH}x${outW}`);
  }

  const outShape: Nchw = [n, c, outH, outW];
  const planes = n * c;
  if (antialias) {
    const interpSize = mode === "bilinear" ? 2 : 4;
    const filter = mode === "bilinear" ? triangleFilter : keysCubicFilter;
    return { data: separableAntialias(input, planes, inH, inW, outH, outW, scaleH, scaleW, interpSize, filter), shape: outShape };
  }
  switch (mode) {
    case "bilinear": {
      const hAxis = linearAxis(inH, outH, scaleH);
      const wAxis = linearAxis(inW, outW, scaleW);
      const channelsLastKernel = outH + outW <= 128 || (c > 3 && inH === 1 && inW === 1);
      const data = channelsLastKernel
        ? bilinearChannelsLastKernel(input, n, c, inH, inW, outH, outW, hAxis, wAxis)
        : bilinearGenericKernel(input, planes, inH, inW, outH, outW, hAxis, wAxis);
      return { data, shape: outShape };
    }
    case "bicubic":
      return { data: bicubicGeneric(input, planes, inH, inW, outH, outW, scaleH, scaleW), shape: outShape };
    case "nearest":
    case "nearest-exact": {
      const exactUsesDouble = outH + outW <= 128 || (c > 3 && inH === 1 && inW === 1);
      const hIdx = nearestAxis(mode, inH, outH, scaleH, exactUsesDouble);
      const wIdx = nearestAxis(mode, inW, outW, scaleW, exactUsesDouble);
      return { data: gather(input, planes, inH, inW, outH, outW, hIdx, wIdx), shape: outShape };
    }
  }
}

/** `area_pixel_compute_scale<float>` with align_corners=False. */
export function torchAreaPixelScale(inSize: number, outSize: number, scaleFactor?: number): number {
  if (scaleFactor !== undefined && scaleFactor > 0) return f32(1 / scaleFactor);
  return f32(inSize / outSize);
}

/** `area_pixel_compute_source_index<float>` with align_corners=False. */
function sourceIndex(scale: number, dst: number, cubic: boolean): number {
  const src = f32(f32(scale * f32(dst + 0.5)) - 0.5);
  return !cubic && src < 0 ? 0 : src;
}

interface LinearAxis {
  i0: Int32Array;
  i1: Int32Array;
  l0: Float32Array;
  l1: Float32Array;
}

function linearAxis(inSize: number, outSize: number, scaleFactor: number | undefined): LinearAxis {
  const axis: LinearAxis = {
    i0: new Int32Array(outSize),
    i1: new Int32Array(outSize),
    l0: new Float32Array(outSize),
    l1: new Float32Array(outSize),
  };
  const scale = torchAreaPixelScale(inSize, outSize, scaleFactor);
  for (let i = 0; i < outSize; i++) {
    if (outSize === inSize) {
      axis.i0[i] = i;
      axis.i1[i] = i;
      axis.l0[i] = 1;
      axis.l1[i] = 0;
      continue;
    }
    const real = sourceIndex(scale, i, false);
    const index = Math.min(Math.floor(real), inSize - 1);
    const lambda = Math.min(Math.max(f32(real - index), 0), 1);
    axis.i0[i] = index;
    axis.i1[i] = index + (index < inSize - 1 ? 1 : 0);
    axis.l1[i] = lambda;
    axis.l0[i] = f32(1 - lambda);
  }
  return axis;
}

/** `cpu_upsample_generic<float, 2, 2>`: ((x00·w0 + x01·w1)·h0 + (x10·w0 + x11·w1)·h1). */
function bilinearGenericKernel(
  input: Float32Array,
  planes: number,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  h: LinearAxis,
  w: LinearAxis,
): Float32Array {
  const out = new Float32Array(planes * outH * outW);
  for (let p = 0; p < planes; p++) {
    const src = p * inH * inW;
    const dst = p * outH * outW;
    for (let oy = 0; oy < outH; oy++) {
      const r0 = src + h.i0[oy]! * inW;
      const r1 = src + h.i1[oy]! * inW;
      const hl0 = h.l0[oy]!;
      const hl1 = h.l1[oy]!;
      for (let ox = 0; ox < outW; ox++) {
        const x0 = w.i0[ox]!;
        const x1 = w.i1[ox]!;
        const wl0 = w.l0[ox]!;
        const wl1 = w.l1[ox]!;
        const t0 = f32(f32(input[r0 + x0]! * wl0) + f32(input[r0 + x1]! * wl1));
        const t1 = f32(f32(input[r1 + x0]! * wl0) + f32(input[r1 + x1]! * wl1));
        out[dst + oy * outW + ox] = f32(t0 * hl0) + f32(t1 * hl1);
      }
    }
  }
  return out;
}

// Vectorized<float> lane count of the AVX2 build; channels in whole vectors take the vector expression.
const VEC_FLOATS = 8;

/**
 * `cpu_upsample_linear_channels_last`, which torch picks for small outputs (out_h + out_w ≤ 128):
 * weights are pre-multiplied (w00 = h0·w0 …); the scalar tail sums left to right, the vector body
 * right to left.
 */
function bilinearChannelsLastKernel(
  input: Float32Array,
  n: number,
  c: number,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  h: LinearAxis,
  w: LinearAxis,
): Float32Array {
  const out = new Float32Array(n * c * outH * outW);
  const vectorChannels = c - (c % VEC_FLOATS);
  const inPlane = inH * inW;
  const outPlane = outH * outW;
  for (let b = 0; b < n; b++) {
    for (let oy = 0; oy < outH; oy++) {
      const y0 = h.i0[oy]!;
      const y1 = h.i1[oy]!;
      const hl0 = h.l0[oy]!;
      const hl1 = h.l1[oy]!;
      for (let ox = 0; ox < outW; ox++) {
        const x0 = w.i0[ox]!;
        const x1 = w.i1[ox]!;
        const w00 = f32(hl0 * w.l0[ox]!);
        const w01 = f32(hl0 * w.l1[ox]!);
        const w10 = f32(hl1 * w.l0[ox]!);
        const w11 = f32(hl1 * w.l1[ox]!);
        for (let ch = 0; ch < c; ch++) {
          const base = (b * c + ch) * inPlane;
          const p00 = f32(input[base + y0 * inW + x0]! * w00);
          const p01 = f32(input[base + y0 * inW + x1]! * w01);
          const p10 = f32(input[base + y1 * inW + x0]! * w10);
          const p11 = f32(input[base + y1 * inW + x1]! * w11);
          out[(b * c + ch) * outPlane + oy * outW + ox] =
            ch < vectorChannels ? f32(p00 + f32(p01 + f32(p10 + p11))) : f32(f32(f32(p00 + p01) + p10) + p11);
        }
      }
    }
  }
  return out;
}

const CUBIC_A = -0.75;

function cubicConvolution1(x: number, a: number): number {
  return f32(f32(f32(f32(f32(f32(a + 2) * x) - f32(a + 3)) * x) * x) + 1);
}

function cubicConvolution2(x: number, a: number): number {
  return f32(f32(f32(f32(f32(f32(a * x) - f32(5 * a)) * x) + f32(8 * a)) * x) - f32(4 * a));
}

interface CubicAxis {
  index: Int32Array; // [out, 4]
  weight: Float32Array; // [out, 4]
}

/** `HelperInterpCubic::compute_indices_weights`: taps idx−1…idx+2 clamped to the edge. */
function cubicAxis(inSize: number, outSize: number, scaleFactor: number | undefined): CubicAxis {
  const axis: CubicAxis = { index: new Int32Array(outSize * 4), weight: new Float32Array(outSize * 4) };
  const scale = torchAreaPixelScale(inSize, outSize, scaleFactor);
  for (let i = 0; i < outSize; i++) {
    const real = sourceIndex(scale, i, true);
    const index = Math.min(Math.floor(real), inSize - 1);
    const t = Math.min(Math.max(f32(real - index), 0), 1);
    const x2 = f32(1 - t);
    const coeffs = [
      cubicConvolution2(f32(t + 1), CUBIC_A),
      cubicConvolution1(t, CUBIC_A),
      cubicConvolution1(x2, CUBIC_A),
      cubicConvolution2(f32(x2 + 1), CUBIC_A),
    ];
    for (let j = 0; j < 4; j++) {
      axis.index[i * 4 + j] = Math.max(Math.min(index - 1 + j, inSize - 1), 0);
      axis.weight[i * 4 + j] = coeffs[j]!;
    }
  }
  return axis;
}

/** `cpu_upsample_generic<float, 2, 4>`: Σ_j (Σ_k x[h_j, w_k]·ww_k)·wh_j, each sum left to right. */
function bicubicGeneric(
  input: Float32Array,
  planes: number,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  scaleH: number | undefined,
  scaleW: number | undefined,
): Float32Array {
  const h = cubicAxis(inH, outH, scaleH);
  const w = cubicAxis(inW, outW, scaleW);
  const out = new Float32Array(planes * outH * outW);
  for (let p = 0; p < planes; p++) {
    const src = p * inH * inW;
    const dst = p * outH * outW;
    for (let oy = 0; oy < outH; oy++) {
      for (let ox = 0; ox < outW; ox++) {
        let acc = 0;
        for (let j = 0; j < 4; j++) {
          const row = src + h.index[oy * 4 + j]! * inW;
          let t = f32(input[row + w.index[ox * 4]!]! * w.weight[ox * 4]!);
          for (let k = 1; k < 4; k++) t = f32(t + f32(input[row + w.index[ox * 4 + k]!]! * w.weight[ox * 4 + k]!));
          const term = f32(t * h.weight[oy * 4 + j]!);
          acc = j === 0 ? term : f32(acc + term);
        }
        out[dst + oy * outW + ox] = acc;
      }
    }
  }
  return out;
}

function nearestAxis(
  mode: "nearest" | "nearest-exact",
  inSize: number,
  outSize: number,
  scaleFactor: number | undefined,
  exactUsesDouble: boolean,
): Int32Array {
  const idx = new Int32Array(outSize);
  const scale = torchAreaPixelScale(inSize, outSize, scaleFactor);
  for (let i = 0; i < outSize; i++) {
    let src: number;
    if (mode === "nearest") {
      // Legacy (OpenCV INTER_NEAREST) rule: floor(dst·scale), in float.
      src = Math.floor(f32(scale * i));
    } else if (exactUsesDouble) {
      // nearest_exact_idx (channels-last kernel): floorf((dst + 0.5)·scale) with a double product.
      src = Math.floor(f32((i + 0.5) * scale));
    } else {
      // HelperInterpNearestExact (generic kernel): floorf(source_index + 0.5).
      src = Math.floor(f32(sourceIndex(scale, i, false) + 0.5));
    }
    idx[i] = Math.min(src, inSize - 1);
  }
  return idx;
}

function gather(
  input: Float32Array,
  planes: number,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  hIdx: Int32Array,
  wIdx: Int32Array,
): Float32Array {
  const out = new Float32Array(planes * outH * outW);
  for (let p = 0; p < planes; p++) {
    const src = p * inH * inW;
    const dst = p * outH * outW;
    for (let oy = 0; oy < outH; oy++) {
      const row = src + hIdx[oy]! * inW;
      for (let ox = 0; ox < outW; ox++) out[dst + oy * outW + ox] = input[row + wIdx[ox]!]!;
    }
  }
  return out;
}

type AaFilter = (x: number) => number;

function triangleFilter(x: number): number {
  const a = Math.abs(x);
  return a < 1 ? f32(1 - a) : 0;
}

// The antialiased bicubic kernel is Keys' a = −0.5 (PIL's), not the −0.75 of plain bicubic.
const AA_CUBIC_A = -0.5;

function keysCubicFilter(x: number): number {
  const a = Math.abs(x);
  if (a < 1) return cubicConvolution1(a, AA_CUBIC_A);
  if (a < 2) return cubicConvolution2(a, AA_CUBIC_A);
  return 0;
}

interface AaAxis {
  xmin: Int32Array;
  xsize: Int32Array;
  weights: Float32Array; // [out, maxInterp]
  maxInterp: number;
}

/**
 * `_compute_index_ranges_weights` + `_compute_indices_min_size_weights_aa`: a PIL-style window whose
 * support grows with the downscale factor, weights normalised to sum 1 (so borders renormalise
 * instead of clamping).
 */
export function antialiasAxisWeights(
  inSize: number,
  outSize: number,
  interpSize: 2 | 4,
  scaleFactor?: number,
): { xmin: Int32Array; xsize: Int32Array; weights: Float32Array; maxInterp: number } {
  return aaAxis(inSize, outSize, scaleFactor, interpSize, interpSize === 2 ? triangleFilter : keysCubicFilter);
}

function aaAxis(inSize: number, outSize: number, scaleFactor: number | undefined, interpSize: number, filter: AaFilter): AaAxis {
  const scale = torchAreaPixelScale(inSize, outSize, scaleFactor);
  const support = scale >= 1 ? f32(interpSize * 0.5 * scale) : interpSize * 0.5;
  const maxInterp = Math.ceil(support) * 2 + 1;
  const invscale = scale >= 1 ? f32(1 / scale) : 1;
  const axis: AaAxis = {
    xmin: new Int32Array(outSize),
    xsize: new Int32Array(outSize),
    weights: new Float32Array(outSize * maxInterp),
    maxInterp,
  };
  for (let i = 0; i < outSize; i++) {
    const center = f32(scale * (i + 0.5));
    const xmin = Math.max(Math.trunc(f32(center - support) + 0.5), 0);
    let xsize = Math.min(Math.trunc(f32(center + support) + 0.5), inSize) - xmin;
    xsize = Math.min(Math.max(xsize, 0), maxInterp);
    let total = 0;
    const base = i * maxInterp;
    for (let j = 0; j < xsize; j++) {
      const w = filter(f32((f32(j + xmin - center) + 0.5) * invscale));
      axis.weights[base + j] = w;
      total = f32(total + w);
    }
    if (total !== 0) {
      for (let j = 0; j < xsize; j++) axis.weights[base + j] = f32(axis.weights[base + j]! / total);
    }
    axis.xmin[i] = xmin;
    axis.xsize[i] = xsize;
  }
  return axis;
}

/** `separable_upsample_generic_Nd_kernel_impl`: the width pass first, then the height pass. */
function separableAntialias(
  input: Float32Array,
  planes: number,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  scaleH: number | undefined,
  scaleW: number | undefined,
  interpSize: number,
  filter: AaFilter,
): Float32Array {
  if (inH === outH && inW === outW) return input.slice();
  let cur = input;
  if (outW !== inW) {
    const axis = aaAxis(inW, outW, scaleW, interpSize, filter);
    const next = new Float32Array(planes * inH * outW);
    for (let row = 0; row < planes * inH; row++) {
      const src = row * inW;
      const dst = row * outW;
      for (let ox = 0; ox < outW; ox++) {
        const xmin = axis.xmin[ox]!;
        const size = axis.xsize[ox]!;
        const wBase = ox * axis.maxInterp;
        let acc = f32(cur[src + xmin]! * axis.weights[wBase]!);
        for (let j = 1; j < size; j++) acc = f32(acc + f32(cur[src + xmin + j]! * axis.weights[wBase + j]!));
        next[dst + ox] = acc;
      }
    }
    cur = next;
  }
  if (outH !== inH) {
    const axis = aaAxis(inH, outH, scaleH, interpSize, filter);
    const next = new Float32Array(planes * outH * outW);
    for (let p = 0; p < planes; p++) {
      const src = p * inH * outW;
      const dst = p * outH * outW;
      for (let oy = 0; oy < outH; oy++) {
        const ymin = axis.xmin[oy]!;
        const size = axis.xsize[oy]!;
        const wBase = oy * axis.maxInterp;
        for (let ox = 0; ox < outW; ox++) {
          let acc = f32(cur[src + ymin * outW + ox]! * axis.weights[wBase]!);
          for (let j = 1; j < size; j++) acc = f32(acc + f32(cur[src + (ymin + j) * outW + ox]! * axis.weights[wBase + j]!));
          next[dst + oy * outW + ox] = acc;
        }
      }
    }
    cur = next;
  }
  return cur;
}
