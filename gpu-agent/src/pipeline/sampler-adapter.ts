import * as grpc from "@grpc/grpc-js";
import { FarmError, type ResolvedSampler } from "@latentfarm/shared";
import { sd1Schedule } from "../sampling/sigmas.js";

export interface ModelRequest {
  x: Float32Array;
  sigma: number;
  /** The sampling step this model call belongs to (A1111's step counter). */
  step: number;
}

export interface PreparedSampler {
  readonly sigmas: Float32Array;
  readonly steps: number;
  run(x: Float32Array): Generator<ModelRequest, Float32Array, Float32Array>;
}

export interface SamplerOptions {
  noise: () => Float32Array;
  eta?: number | undefined;
  sChurn?: number | undefined;
  sTmin?: number | undefined;
  sTmax?: number | undefined;
  sNoise?: number | undefined;
  seed: number;
  source: "CPU" | "GPU" | "NV";
}

function* eulerAncestral(x: Float32Array, sigmas: Float32Array, o: SamplerOptions): Generator<ModelRequest, Float32Array, Float32Array> {
  const eta = o.eta ?? 1;
  const sNoise = o.sNoise ?? 1;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const s = sigmas[i]!;
    const sn = sigmas[i + 1]!;
    const denoised = yield { x, sigma: s, step: i };
    const up = Math.min(sn, eta * Math.sqrt((sn * sn * (s * s - sn * sn)) / (s * s)));
    const down = Math.sqrt(sn * sn - up * up);
    const next = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) next[k] = x[k]! + ((x[k]! - denoised[k]!) / s) * (down - s);
    if (sn > 0) {
      const n = o.noise();
      for (let k = 0; k < x.length; k++) next[k] = next[k]! + n[k]! * sNoise * up;
    }
    x = next;
  }
  return x;
}

function* euler(x: Float32Array, sigmas: Float32Array, o: SamplerOptions): Generator<ModelRequest, Float32Array, Float32Array> {
  const n = sigmas.length - 1;
  const churn = o.sChurn ?? 0;
  const tmin = o.sTmin ?? 0;
  const tmax = o.sTmax && o.sTmax > 0 ? o.sTmax : Infinity;
  const sNoise = o.sNoise ?? 1;
  for (let i = 0; i < n; i++) {
    const s = sigmas[i]!;
    const gamma = tmin <= s && s <= tmax ? Math.min(churn / n, Math.SQRT2 - 1) : 0;
    // A1111/k-diffusion draw this noise every step, even when it is not used.
    const eps = o.noise();
    const sHat = s * (gamma + 1);
    if (gamma > 0) {
      const add = Math.sqrt(sHat * sHat - s * s);
      const xh = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) xh[k] = x[k]! + eps[k]! * sNoise * add;
      x = xh;
    }
    const denoised = yield { x, sigma: sHat, step: i };
    const dt = sigmas[i + 1]! - sHat;
    const next = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) next[k] = x[k]! + ((x[k]! - denoised[k]!) / sHat) * dt;
    x = next;
  }
  return x;
}

export function prepareSampler(resolved: ResolvedSampler, steps: number, o: SamplerOptions): PreparedSampler {
  const name = resolved.sampler.name;
  if (resolved.effectiveScheduler !== undefined && resolved.effectiveScheduler !== "uniform") {
    throw new FarmError(grpc.status.UNIMPLEMENTED, `schedule type ${resolved.effectiveScheduler} is not implemented yet`, { field: "scheduler" });
  }
  const sigmas = sd1Schedule().getSigmas(steps);
  const fn = name === "Euler a" ? eulerAncestral : name === "Euler" ? euler : undefined;
  if (!fn) throw new FarmError(grpc.status.UNIMPLEMENTED, `sampler "${name}" is not implemented yet`, { field: "sampler_name" });
  return { sigmas, steps, run: (x) => fn(x, sigmas, o) };
}
