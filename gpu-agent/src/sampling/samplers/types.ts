import type { DiscreteSchedule } from "../sigmas.js";

/**
 * One model evaluation a sampler asks for. The runtime evaluates it (UNet for cond and uncond,
 * CFG) and resumes the generator with the result; samplers never run a model themselves.
 *
 * - kind "denoise" (k-diffusion samplers): return the CFG-combined denoised x0 for the latent `x` at
 *   noise level `sigma`, i.e. eps-model: UNet(x·c_in(σ), timestep) → x − σ·eps (v-models: see
 *   `vToDenoised`), then uncond + cfg·(cond − uncond).
 * - kind "eps" (timestep samplers DDIM/PLMS/UniPC, and LCM): return the CFG-combined eps of
 *   UNet(x·inputScale, timestep). With `needUncond`, return `{ output, uncond }` where `uncond` is the
 *   unconditional eps alone (DDIM CFG++); `cfgScaleMultiplier` scales the CFG scale for this call.
 */
export type ModelRequest = DenoiseRequest | EpsRequest;

interface RequestBase {
  /** The latent to evaluate; the sampler never mutates it after yielding. */
  readonly x: Float32Array;
  /** Noise level of `x` (for eps requests the σ equivalent of `timestep`); for previews and NGMS. */
  readonly sigma: number;
  /** Fractional timestep to feed the UNet. */
  readonly timestep: number;
  /**
   * 0-based sampler step this call belongs to: the `i` A1111 reports as `state.sampling_step`
   * (a second-order step makes two calls with the same `step`).
   */
  readonly step: number;
  /**
   * 0-based index of this model call in the run: A1111's CFGDenoiser `step` counter, which selects the
   * prompt-schedule entry (`a [b:3]` uses "a " while call ≤ 3). Heun-style samplers make ~2 calls per step.
   */
  readonly call: number;
  /**
   * Noise the sampler will draw soon after this request is answered: the driver may draw it while the
   * model runs (PreparedSampling.drawAhead). Draws keep their order, so this changes no value.
   */
  readonly upcoming?: UpcomingNoise;
  /**
   * Where the driver may write its answer: an array of the latent's length that belongs to the run (it
   * lives in the kernels' memory, see latent-pool.ts), handed back as the answer (as `output` for a
   * needUncond request). The sampler's kernels then read the answer where it is instead of copying it
   * in. Its values are undefined until written: the driver writes every one. Optional for the driver:
   * an answer in an array of its own is accepted too. Never answer with any other array of the
   * sampler's (such as `x`): the sampler gives its answers back when it is done with them.
   */
  readonly into?: Float32Array;
}

/** What a sampler announces it will draw next (before it yields again, or soon after). */
export interface UpcomingNoise {
  /** How many of the next `noise()` draws follow. */
  readonly draws?: number;
  /** Noise-sampler calls (σ, σ_next) that follow, with exactly these arguments. */
  readonly queries?: ReadonlyArray<readonly [sigma: number, sigmaNext: number]>;
}

export interface DenoiseRequest extends RequestBase {
  readonly kind: "denoise";
}

export interface EpsRequest extends RequestBase {
  readonly kind: "eps";
  /** Multiply `x` by this before the UNet (1 for VP timestep samplers, c_in(σ) for LCM). */
  readonly inputScale: number;
  readonly cfgScaleMultiplier?: number;
  readonly needUncond?: boolean;
}

export interface EpsWithUncond {
  readonly output: Float32Array;
  readonly uncond: Float32Array;
}

export type ModelResponse = Float32Array | EpsWithUncond;

/** A running sampler: yields requests, is resumed with their results, returns the final latent. */
export type SamplerRun = Generator<ModelRequest, Float32Array, ModelResponse>;

/** Noise for the Brownian-tree SDE samplers: a standard-normal increment between two noise levels. */
export type NoiseSampler = (sigma: number, sigmaNext: number) => Float32Array;

export interface SamplerOptions {
  /** Schedule: σ values from high to low, normally ending in 0 (k-diffusion samplers). */
  sigmas: Float32Array;
  /** `randn_like(x)`: the next draw of the per-image generators (ImageRng.next()). */
  noise: () => Float32Array;
  /** Brownian-tree noise for DPM++ SDE / 2M SDE / 3M SDE; falls back to `noise()` when absent. */
  noiseSampler?: NoiseSampler;
  /** Model schedule (σ↔t); SD1 when absent. */
  schedule?: DiscreteSchedule;
  /** Ancestral eta (A1111 `eta_ancestral`, default 1.0). */
  eta?: number;
  /** Churn parameters of Euler, Heun and DPM2 (A1111 defaults: 0, 0, ∞, 1). */
  sChurn?: number;
  sTmin?: number;
  /** 0 means ∞, as in A1111's option. */
  sTmax?: number;
  sNoise?: number;
}

/** The sampler function: `x` is the start latent (already scaled by σ₀ for txt2img). */
export type SamplerFunction = (x: Float32Array, options: SamplerOptions) => SamplerRun;
