/**
 * A1111 1.10 schedule types (modules/sd_schedulers.py, k-diffusion get_sigmas_*), and the sigma list
 * a k-diffusion sampler runs (KDiffusionSampler.get_sigmas): Automatic resolution, option overrides,
 * discard-penultimate. float32 where A1111 builds the list with torch float32 tensors.
 */
import { betaQuantile as defaultBetaQuantile, type BetaQuantile } from "./beta-quantile.js";
import { InvalidSamplingParameter } from "./errors.js";
import { f32, interp, linspaceF32, linspaceF64 } from "./float32.js";
import { sd1Schedule } from "./sigmas.js";
import { SCHEDULERS, type SchedulerId } from "@latentfarm/shared";

/** What a scheduler needs from the model's noise schedule (k-diffusion's "inner model"). */
export interface SigmaModel {
  /** Ascending σ table. */
  readonly sigmas: Float32Array;
  readonly sigmaMin: number;
  readonly sigmaMax: number;
  sigmaToT(sigma: number): number;
  tToSigma(t: number): number;
  /** The model's own discrete schedule of n steps (n + 1 values ending in 0). */
  getSigmas(n: number): Float32Array;
}

/** A concrete schedule type: the shared catalog's ids without "Automatic" (resolved before this). */
export type ScheduleType = Exclude<SchedulerId, "automatic">;

export interface ScheduleParameters {
  sigmaMin: number;
  sigmaMax: number;
  /** Karras / Polyexponential ρ (defaults 7 and 1). */
  rho?: number;
  model: SigmaModel;
  /** Align Your Steps table; SD 1.x unless "sdxl". */
  modelFamily?: "sd1" | "sdxl";
  betaAlpha?: number;
  betaBeta?: number;
  betaQuantile?: BetaQuantile;
}

function appendZero(values: ArrayLike<number>): Float32Array {
  const out = new Float32Array(values.length + 1);
  out.set(Array.from(values, f32));
  return out;
}

export function karrasSigmas(n: number, sigmaMin: number, sigmaMax: number, rho = 7): Float32Array {
  const ramp = linspaceF32(0, 1, n);
  const minInvRho = sigmaMin ** (1 / rho);
  const maxInvRho = sigmaMax ** (1 / rho);
  const span = f32(minInvRho - maxInvRho);
  const start = f32(maxInvRho);
  return appendZero(ramp.map((r) => f32(f32(f32(r * span) + start) ** rho)));
}

export function exponentialSigmas(n: number, sigmaMin: number, sigmaMax: number): Float32Array {
  return appendZero(linspaceF32(Math.log(sigmaMax), Math.log(sigmaMin), n).map((v) => Math.exp(v)));
}

export function polyexponentialSigmas(n: number, sigmaMin: number, sigmaMax: number, rho = 1): Float32Array {
  const ramp = linspaceF32(1, 0, n).map((r) => (rho === 1 ? r : r ** rho));
  const span = f32(Math.log(sigmaMax) - Math.log(sigmaMin));
  const offset = f32(Math.log(sigmaMin));
  return appendZero(ramp.map((r) => Math.exp(f32(f32(r * span) + offset))));
}

/** Uniform in t between t(σmax) and t(σmin); SGM Uniform takes n of n+1 points (drops the last). */
export function normalSigmas(n: number, sigmaMin: number, sigmaMax: number, model: SigmaModel, sgm = false): Float32Array {
  const start = model.sigmaToT(sigmaMax);
  const end = model.sigmaToT(sigmaMin);
  const ts = sgm ? linspaceF32(start, end, n + 1).subarray(0, n) : linspaceF32(start, end, n);
  return appendZero(Array.from(ts, (t) => model.tToSigma(t)));
}

/** KL Optimal ends at σmin: it has no appended 0, so sampling stops at σmin. */
export function klOptimalSigmas(n: number, sigmaMin: number, sigmaMax: number): Float32Array {
  const alphaMin = f32(Math.atan(f32(sigmaMin)));
  const alphaMax = f32(Math.atan(f32(sigmaMax)));
  const out = new Float32Array(n + 1);
  for (let i = 0; i <= n; i++) {
    const frac = f32(i / n);
    out[i] = Math.tan(f32(f32(frac * alphaMin) + f32(f32(1 - frac) * alphaMax)));
  }
  return out;
}

const AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029];
const AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.38, 0.234, 0.113, 0.029];

export function alignYourStepsSigmas(n: number, modelFamily: "sd1" | "sdxl" = "sd1"): Float32Array {
  const table = modelFamily === "sdxl" ? AYS_SDXL : AYS_SD1;
  if (n === table.length) return appendZero(table);
  // Log-linear resampling (numpy interp over linspace(0, 1) on ln σ, ascending order).
  const xs = linspaceF64(0, 1, table.length);
  const ys = table.map((s) => Math.log(s)).reverse();
  const newXs = linspaceF64(0, 1, n);
  const resampled = Array.from(newXs, (x) => Math.exp(interp(x, xs, ys))).reverse();
  return appendZero(resampled);
}

export function simpleSigmas(n: number, model: SigmaModel): Float32Array {
  const sigmas = model.sigmas;
  const stride = sigmas.length / n;
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(sigmas[sigmas.length - 1 - Math.trunc(i * stride)]!);
  return appendZero(out);
}

/** Every (1000 // n)-th table σ from index 1, reversed; may give more than n steps (e.g. n = 30 → 31). */
export function ddimSigmas(n: number, model: SigmaModel): Float32Array {
  const sigmas = model.sigmas;
  const stride = Math.max(Math.floor(sigmas.length / n), 1);
  const out: number[] = [];
  for (let i = 1; i < sigmas.length; i += stride) out.push(sigmas[i]!);
  return appendZero(out.reverse());
}

/** Beta schedule: linear in σ between σmin and σmax at Beta(α, β) quantiles of 1 − linspace(0, 1). */
export function betaSigmas(
  n: number,
  sigmaMin: number,
  sigmaMax: number,
  alpha = 0.6,
  beta = 0.6,
  quantile: BetaQuantile = defaultBetaQuantile,
): Float32Array {
  const ts = linspaceF64(0, 1, n).map((v) => 1 - v);
  return appendZero(Array.from(ts, (t) => sigmaMin + quantile(t, alpha, beta) * (sigmaMax - sigmaMin)));
}

/** One schedule type's sigma list for n steps (before A1111's discard-penultimate handling). */
export function scheduleSigmas(type: ScheduleType, n: number, p: ScheduleParameters): Float32Array {
  if (!Number.isSafeInteger(n) || n < 1) throw new InvalidSamplingParameter("steps", `steps must be a positive integer, got ${n}`);
  switch (type) {
    case "uniform":
      return p.model.getSigmas(n);
    case "karras":
      return karrasSigmas(n, p.sigmaMin, p.sigmaMax, p.rho ?? 7);
    case "exponential":
      return exponentialSigmas(n, p.sigmaMin, p.sigmaMax);
    case "polyexponential":
      return polyexponentialSigmas(n, p.sigmaMin, p.sigmaMax, p.rho ?? 1);
    case "sgm_uniform":
      return normalSigmas(n, p.sigmaMin, p.sigmaMax, p.model, true);
    case "kl_optimal":
      return klOptimalSigmas(n, p.sigmaMin, p.sigmaMax);
    case "align_your_steps":
      return alignYourStepsSigmas(n, p.modelFamily);
    case "simple":
      return simpleSigmas(n, p.model);
    case "normal":
      return normalSigmas(n, p.sigmaMin, p.sigmaMax, p.model, false);
    case "ddim":
      return ddimSigmas(n, p.model);
    case "beta":
      return betaSigmas(n, p.sigmaMin, p.sigmaMax, p.betaAlpha ?? 0.6, p.betaBeta ?? 0.6, p.betaQuantile);
  }
}

/** Default ρ of the schedules that take one (A1111 Scheduler.default_rho). */
export const DEFAULT_RHO: Partial<Record<ScheduleType, number>> = { karras: 7, polyexponential: 1 };

/** A1111's labels ("Karras"), from the shared catalog both services resolve names with. */
export const SCHEDULE_LABELS: Record<ScheduleType, string> = Object.fromEntries(
  SCHEDULERS.filter((e) => e.id !== "automatic").map((e) => [e.id, e.label]),
) as Record<ScheduleType, string>;

export interface SamplerSigmasInput {
  steps: number;
  /** The schedule to use after "Automatic" was resolved; undefined = the model's discrete schedule. */
  scheduleType: ScheduleType | undefined;
  /** The sampler's own discard_next_to_last_sigma option (DPM2, DPM2 a, DPM++ 3M SDE). */
  discardNextToLastSigma?: boolean;
  /** Option `always_discard_next_to_last_sigma`. */
  alwaysDiscardNextToLastSigma?: boolean;
  model?: SigmaModel;
  modelFamily?: "sd1" | "sdxl";
  /** Options `sigma_min`, `sigma_max`, `rho`: 0 (or absent) keeps the default. */
  sigmaMinOverride?: number;
  sigmaMaxOverride?: number;
  rhoOverride?: number;
  /** Option `use_old_karras_scheduler_sigmas`: σ range (0.1, 10). */
  useOldKarrasSchedulerSigmas?: boolean;
  betaAlpha?: number;
  betaBeta?: number;
  betaQuantile?: BetaQuantile;
}

export interface SamplerSigmas {
  sigmas: Float32Array;
  /** Infotext additions A1111 makes while building the list ("Schedule type", "Schedule rho", …). */
  infotext: Record<string, string | number | boolean>;
}

/** KDiffusionSampler.get_sigmas: the σ list a k-diffusion sampler runs for `steps` steps. */
export function samplerSigmas(input: SamplerSigmasInput): SamplerSigmas {
  const model = input.model ?? sd1Schedule();
  const infotext: Record<string, string | number | boolean> = {};
  let discard = input.discardNextToLastSigma ?? false;
  if (input.alwaysDiscardNextToLastSigma && !discard) {
    discard = true;
    infotext["Discard penultimate sigma"] = true;
  }
  const steps = input.steps + (discard ? 1 : 0);
  let sigmas: Float32Array;
  const type = input.scheduleType;
  if (type === undefined) {
    if (!Number.isSafeInteger(input.steps) || input.steps < 1) {
      throw new InvalidSamplingParameter("steps", `steps must be a positive integer, got ${input.steps}`);
    }
    sigmas = model.getSigmas(steps);
  } else {
    infotext["Schedule type"] = SCHEDULE_LABELS[type];
    const modelMin = model.sigmaMin;
    const modelMax = model.sigmaMax;
    let sigmaMin = input.useOldKarrasSchedulerSigmas ? 0.1 : modelMin;
    let sigmaMax = input.useOldKarrasSchedulerSigmas ? 10 : modelMax;
    const minOverride = input.sigmaMinOverride ?? 0;
    const maxOverride = input.sigmaMaxOverride ?? 0;
    if (minOverride !== 0 && minOverride !== modelMin) {
      sigmaMin = minOverride;
      infotext["Schedule min sigma"] = minOverride;
    }
    if (maxOverride !== 0 && maxOverride !== modelMax) {
      sigmaMax = maxOverride;
      infotext["Schedule max sigma"] = maxOverride;
    }
    const defaultRho = DEFAULT_RHO[type];
    let rho = defaultRho;
    const rhoOverride = input.rhoOverride ?? 0;
    if (defaultRho !== undefined && rhoOverride !== 0 && rhoOverride !== defaultRho) {
      rho = rhoOverride;
      infotext["Schedule rho"] = rhoOverride;
    }
    if (type === "beta") {
      infotext["Beta schedule alpha"] = input.betaAlpha ?? 0.6;
      infotext["Beta schedule beta"] = input.betaBeta ?? 0.6;
    }
    const parameters: ScheduleParameters = { sigmaMin, sigmaMax, model };
    if (rho !== undefined) parameters.rho = rho;
    if (input.modelFamily !== undefined) parameters.modelFamily = input.modelFamily;
    if (input.betaAlpha !== undefined) parameters.betaAlpha = input.betaAlpha;
    if (input.betaBeta !== undefined) parameters.betaBeta = input.betaBeta;
    if (input.betaQuantile !== undefined) parameters.betaQuantile = input.betaQuantile;
    sigmas = scheduleSigmas(type, steps, parameters);
  }
  if (discard && sigmas.length >= 2) {
    const out = new Float32Array(sigmas.length - 1);
    out.set(sigmas.subarray(0, sigmas.length - 2));
    out[out.length - 1] = sigmas[sigmas.length - 1]!;
    sigmas = out;
  }
  return { sigmas, infotext };
}
