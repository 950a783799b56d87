/**
 * The discrete noise schedule of a CompVis/LDM model as k-diffusion's CompVisDenoiser sees it, and the
 * eps/v denoiser conversions. All values follow torch's float32 arithmetic (ᾱ is a float32 buffer).
 */
import { f32, linspaceF32 } from "./float32.js";
import { e, Kernel } from "./kernels.js";
import { roundToF16 } from "../model-graph/half.js";

export const NUM_TRAIN_TIMESTEPS = 1000;

/** ldm "linear" schedule (diffusers "scaled_linear"): β = linspace(√0.00085, √0.012)², ᾱ = Πᵢ(1 − βᵢ) in float64. */
export function sd1AlphasCumprod(linearStart = 0.00085, linearEnd = 0.012, timesteps = NUM_TRAIN_TIMESTEPS): Float32Array {
  const start = Math.sqrt(linearStart);
  const end = Math.sqrt(linearEnd);
  const step = (end - start) / (timesteps - 1);
  const halfway = Math.floor(timesteps / 2);
  const out = new Float32Array(timesteps);
  let product = 1;
  for (let i = 0; i < timesteps; i++) {
    // torch.linspace in float64 (counts down from the end in the second half)
    const root = i < halfway ? start + step * i : end - step * (timesteps - 1 - i);
    product *= 1 - root * root;
    out[i] = product;
  }
  return out;
}

/** The precision of a schedule's ᾱ tensor, and so of the arithmetic torch does on it. */
export type TablePrecision = "float32" | "float16";

const ROUND: Record<TablePrecision, (v: number) => number> = { float32: f32, float16: roundToF16 };

/**
 * A1111's "Zero Terminal SNR" noise schedule option (rescale_zero_terminal_snr_abar), in the ᾱ
 * tensor's precision (float16 after "Downcast alphas_cumprod", which A1111 applies first).
 */
export function rescaleZeroTerminalSnr(alphasCumprod: Float32Array, precision: TablePrecision = "float32"): Float32Array {
  const round = ROUND[precision];
  const n = alphasCumprod.length;
  const roots = alphasCumprod.map((a) => round(Math.sqrt(a)));
  const first = roots[0]!;
  const last = roots[n - 1]!;
  const scale = round(first / round(first - last));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const shifted = round(round(roots[i]! - last) * scale);
    out[i] = round(shifted * shifted);
  }
  out[n - 1] = round(4.8973451890853435e-8);
  return out;
}

const MAX_REMEMBERED_TIMESTEPS = 4096;

export class DiscreteSchedule {
  readonly alphasCumprod: Float32Array;
  /** σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), ascending in t. */
  readonly sigmas: Float32Array;
  readonly logSigmas: Float32Array;
  /** The result of an elementwise torch op on this schedule's tensors, rounded to their precision. */
  readonly round: (v: number) => number;

  /**
   * `precision` float16: ᾱ was downcast (A1111's "Downcast alphas_cumprod", and every A1111 before
   * 1.7.0-225 running an fp16 model), so k-diffusion's σ and log σ tables are float16 tensors, made and
   * interpolated with float16 arithmetic where both operands are.
   */
  constructor(
    alphasCumprod: Float32Array,
    readonly precision: TablePrecision = "float32",
  ) {
    if (alphasCumprod.length < 2) throw new RangeError("a discrete schedule needs at least 2 timesteps");
    const round = ROUND[precision];
    this.round = round;
    this.alphasCumprod = alphasCumprod.map(round);
    const n = alphasCumprod.length;
    this.sigmas = new Float32Array(n);
    this.logSigmas = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const a = this.alphasCumprod[i]!;
      this.sigmas[i] = round(Math.sqrt(round(round(1 - a) / a)));
      this.logSigmas[i] = round(Math.log(this.sigmas[i]!));
    }
  }

  get sigmaMin(): number {
    return this.sigmas[0]!;
  }

  get sigmaMax(): number {
    return this.sigmas[this.sigmas.length - 1]!;
  }

  /**
   * Timesteps of the σ's already asked for: the search below scans up to 1000 log σ's, and the same σ's
   * come back within a run (Heun's second call is the next step's first) and in every run on this
   * schedule, which never changes. Bounded for a long-lived schedule (many step counts over an agent's life).
   */
  private readonly timesteps = new Map<number, number>();

  /** Fractional model timestep for σ (k-diffusion DiscreteSchedule.sigma_to_t, quantize off). */
  sigmaToT(sigma: number): number {
    let t = this.timesteps.get(sigma);
    if (t === undefined) {
      t = this.searchT(sigma);
      if (this.timesteps.size >= MAX_REMEMBERED_TIMESTEPS) this.timesteps.clear();
      this.timesteps.set(sigma, t);
    }
    return t;
  }

  private searchT(sigma: number): number {
    const ls = this.logSigmas;
    const logSigma = f32(Math.log(f32(sigma)));
    let low = 0;
    for (let i = ls.length - 1; i >= 0; i--) {
      if (logSigma >= ls[i]!) {
        low = i;
        break;
      }
    }
    low = Math.min(low, ls.length - 2);
    const high = low + 1;
    // low − high is an op on two table values: float16 in a float16 table.
    let w = f32(f32(ls[low]! - logSigma) / this.round(ls[low]! - ls[high]!));
    w = Math.min(Math.max(w, 0), 1);
    return f32(f32(f32(1 - w) * low) + f32(w * high));
  }

  /** Nearest timestep for σ (the `enable_quantization` option). */
  sigmaToTQuantized(sigma: number): number {
    const logSigma = f32(Math.log(f32(sigma)));
    let best = 0;
    let bestDist = Infinity;
    this.logSigmas.forEach((ls, i) => {
      const dist = Math.abs(f32(logSigma - ls));
      if (dist < bestDist) {
        bestDist = dist;
        best = i;
      }
    });
    return best;
  }

  tToSigma(t: number): number {
    const tt = f32(t);
    const low = Math.floor(tt);
    const high = Math.ceil(tt);
    const w = f32(tt - Math.trunc(tt));
    const ls = this.logSigmas;
    return f32(Math.exp(f32(f32(f32(1 - w) * ls[low]!) + f32(w * ls[high]!))));
  }

  /** k-diffusion `get_sigmas(n)`: uniform in t from the last timestep to 0, then a final 0 (n+1 values). */
  getSigmas(n: number): Float32Array {
    const ts = linspaceF32(this.sigmas.length - 1, 0, n);
    const out = new Float32Array(n + 1);
    for (let i = 0; i < n; i++) out[i] = this.tToSigma(ts[i]!);
    return out;
  }
}

const sd1Variants = new Map<string, DiscreteSchedule>();

/** The SD 1.x / SD 2.x schedule (shared instance; treat its arrays as read-only). */
export function sd1Schedule(): DiscreteSchedule {
  return sd1ScheduleWith("Default");
}

/** A1111's "Noise schedule for sampling" option: "Default", or "Zero Terminal SNR" (ᾱ rescaled). */
export type NoiseScheduleOption = "Default" | "Zero Terminal SNR";

/**
 * The SD1/SDXL schedule under A1111's noise-schedule option, with ᾱ downcast to float16 or not; one
 * instance each, so their σ → t caches are shared.
 */
export function sd1ScheduleWith(option: NoiseScheduleOption, precision: TablePrecision = "float32"): DiscreteSchedule {
  const key = `${option}/${precision}`;
  let schedule = sd1Variants.get(key);
  if (schedule === undefined) {
    // The constructor rounds ᾱ to the table's precision; Zero Terminal SNR rescales the rounded ᾱ (A1111 downcasts first).
    const base = sd1AlphasCumprod();
    const alphas = option === "Default" ? base : rescaleZeroTerminalSnr(base.map(ROUND[precision]), precision);
    schedule = new DiscreteSchedule(alphas, precision);
    sd1Variants.set(key, schedule);
  }
  return schedule;
}

/** SD1 σ table, ascending (σ₀ = 0.0291675…, σ₉₉₉ = 14.614642…); a fresh copy. */
export function discreteSigmas(): Float32Array {
  return Float32Array.from(sd1Schedule().sigmas);
}

export function sigmaToT(sigma: number): number {
  return sd1Schedule().sigmaToT(sigma);
}

export function tToSigma(t: number): number {
  return sd1Schedule().tToSigma(t);
}

/* ---- Denoiser conversions (k-diffusion CompVisDenoiser / CompVisVDenoiser, σ_data = 1) ---- */

/** c_in = 1/sqrt(σ² + 1): the scale of the latent fed to the UNet. */
export function cIn(sigma: number): number {
  const s = f32(sigma);
  return f32(1 / f32(Math.sqrt(f32(f32(s * s) + 1))));
}

/** UNet input for a sigma-space request: x·c_in (written to `out` when given). */
export function scaleModelInput(x: Float32Array, sigma: number, out: Float32Array = new Float32Array(x.length)): Float32Array {
  return scaleLatent(x, cIn(sigma), out);
}

const scaleKernel = new Kernel({ inputs: 1, params: 1, outputs: [e.mul(e.in(0), e.param(0))] });

/**
 * x·scale into `out`, each product rounded to float32 as `out[i] = x[i] * scale` stores it: the UNet's
 * input (scale c_in(σ), or an eps request's inputScale). A kernel pass (kernels.ts) takes 0.02 ms at
 * 4×128×128 where that loop took 0.15, on the pipeline thread between two UNet calls.
 */
export function scaleLatent(x: Float32Array, scale: number, out: Float32Array = new Float32Array(x.length)): Float32Array {
  if (out.length !== x.length) throw new RangeError(`input has ${x.length} values, the output ${out.length}`);
  // A kernel's parameters are float32 values; a scale that is not one is multiplied in float64 first.
  if (f32(scale) === scale) scaleKernel.run([out], [x], [scale]);
  else for (let i = 0; i < x.length; i++) out[i] = x[i]! * scale;
  return out;
}

/** eps-prediction: denoised = x − σ·eps (torch: x + eps·(−σ)). */
export function epsToDenoised(x: Float32Array, eps: Float32Array, sigma: number, out = new Float32Array(x.length)): Float32Array {
  const cOut = -f32(sigma);
  for (let i = 0; i < x.length; i++) out[i] = x[i]! + f32(eps[i]! * cOut);
  return out;
}

/** v-prediction scalings: c_skip = 1/(σ²+1), c_out = −σ/sqrt(σ²+1), c_in = 1/sqrt(σ²+1). */
export function vScalings(sigma: number): { cSkip: number; cOut: number; cIn: number } {
  const s = f32(sigma);
  const s2p1 = f32(f32(s * s) + 1);
  const root = f32(Math.sqrt(s2p1));
  return { cSkip: f32(1 / s2p1), cOut: f32(-s / root), cIn: f32(1 / root) };
}

/** v-prediction: denoised = v·c_out + x·c_skip. */
export function vToDenoised(x: Float32Array, v: Float32Array, sigma: number, out = new Float32Array(x.length)): Float32Array {
  const { cSkip, cOut } = vScalings(sigma);
  for (let i = 0; i < x.length; i++) out[i] = f32(v[i]! * cOut) + f32(x[i]! * cSkip);
  return out;
}

/** For timestep samplers on v-models: eps = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x (x unscaled, VP). */
export function vToEps(x: Float32Array, v: Float32Array, alphaCumprod: number, out = new Float32Array(x.length)): Float32Array {
  const a = f32(Math.sqrt(alphaCumprod));
  const b = f32(Math.sqrt(f32(1 - alphaCumprod)));
  for (let i = 0; i < x.length; i++) out[i] = f32(a * v[i]!) + f32(b * x[i]!);
  return out;
}
