/** Drives sampler generators in tests with closed-form models of Gaussian data. */
import type { ModelRequest, ModelResponse, SamplerRun } from "./types.js";
import { sd1Schedule } from "../sigmas.js";
import { setLatentResidency } from "./latent-pool.js";

export interface DriveResult {
  x: Float32Array;
  requests: ModelRequest[];
}

/** Runs a sampler to completion, answering each request with `answer`. */
export function drive(run: SamplerRun, answer: (request: ModelRequest) => ModelResponse): DriveResult {
  const requests: ModelRequest[] = [];
  let r = run.next();
  while (!r.done) {
    requests.push(r.value);
    r = run.next(answer(r.value));
  }
  return { x: r.value, requests };
}

/**
 * The ideal model for data x0 ~ N(0, s²) elementwise:
 * - VE: D(x, σ) = x·s²/(s² + σ²);
 * - VP (timestep samplers): eps(x_t) = sqrt(1 − ᾱ)·x_t/(ᾱ·s² + 1 − ᾱ), with ᾱ at the (fractional) timestep.
 */
export function gaussianModel(s: number): (request: ModelRequest) => Float32Array {
  const schedule = sd1Schedule();
  const s2 = s * s;
  return (request) => {
    const out = new Float32Array(request.x.length);
    if (request.kind === "denoise") {
      const factor = s2 / (s2 + request.sigma * request.sigma);
      for (let k = 0; k < out.length; k++) out[k] = request.x[k]! * factor;
      return out;
    }
    const abar = alphaBarAt(schedule.alphasCumprod, request.timestep);
    const factor = (Math.sqrt(1 - abar) / (abar * s2 + 1 - abar)) * request.inputScale;
    for (let k = 0; k < out.length; k++) out[k] = request.x[k]! * factor;
    return out;
  };
}

/** ᾱ at a fractional timestep, log-linear between table entries (UniPC's continuous-time view). */
export function alphaBarAt(alphasCumprod: Float32Array, t: number): number {
  const clamped = Math.min(Math.max(t, 0), alphasCumprod.length - 1);
  const lo = Math.floor(clamped);
  const hi = Math.ceil(clamped);
  const w = clamped - lo;
  return Math.exp((1 - w) * Math.log(alphasCumprod[lo]!) + w * Math.log(alphasCumprod[hi]!));
}

/** Exact probability-flow ODE solution for that data: x(σ) = x(σ₀)·sqrt((s² + σ²)/(s² + σ₀²)). */
export function exactFlow(x0: number, sigma0: number, sigma: number, s: number): number {
  return x0 * Math.sqrt((s * s + sigma * sigma) / (s * s + sigma0 * sigma0));
}

/**
 * `fn()` with residency on and every fresh or given-back slot filled with NaN, so that a read before a
 * write or after a release shows; residency is back to plain on afterwards, however fn ends.
 */
export function withPoisonedResidency<T>(fn: () => T): T {
  setLatentResidency(true, { poison: true });
  try {
    return fn();
  } finally {
    setLatentResidency(true);
  }
}
