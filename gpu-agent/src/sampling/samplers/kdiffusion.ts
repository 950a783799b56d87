/**
 * k-diffusion samplers (crowsonkb/k-diffusion 0.0.16, the version A1111 1.10 pins) as generators.
 * Arithmetic is float32 and in torch's operation order so that results track A1111 closely.
 */
import { f32 } from "../float32.js";
import {
  ModelCaller,
  addNoise,
  addScaled,
  ancestralStep,
  brownianOrPlain,
  checkSigmas,
  checkedNoise,
  expF,
  expm1F,
  lerpF,
  logF,
  sigmaOfT,
  tOfSigma,
  toD,
} from "./common.js";
import type { SamplerOptions, SamplerRun } from "./types.js";

interface Churn {
  sChurn: number;
  sTmin: number;
  sTmax: number;
  sNoise: number;
}

function churnOptions(options: SamplerOptions): Churn {
  const sTmax = options.sTmax ?? 0;
  return {
    sChurn: options.sChurn ?? 0,
    sTmin: options.sTmin ?? 0,
    sTmax: sTmax === 0 ? Infinity : sTmax,
    sNoise: options.sNoise ?? 1,
  };
}

/**
 * The churn prologue of Euler/Heun/DPM2. The noise is drawn every step, even when γ = 0: it consumes
 * a draw of the per-image generator, so skipping it would shift all later noise.
 */
function churn(x: Float32Array, sigmas: Float32Array, i: number, c: Churn, options: SamplerOptions): { x: Float32Array; sigmaHat: number } {
  const sigma = sigmas[i]!;
  const gamma = c.sTmin <= sigma && sigma <= c.sTmax ? Math.min(c.sChurn / (sigmas.length - 1), 2 ** 0.5 - 1) : 0;
  const raw = checkedNoise(options.noise, x.length);
  const sigmaHat = f32(sigma * f32(gamma + 1));
  if (!(gamma > 0)) return { x, sigmaHat };
  const scale = f32(Math.sqrt(f32(f32(sigmaHat * sigmaHat) - f32(sigma * sigma))));
  const s = f32(c.sNoise);
  const out = new Float32Array(x.length);
  for (let k = 0; k < x.length; k++) out[k] = x[k]! + f32(f32(raw[k]! * s) * scale);
  return { x: out, sigmaHat };
}

export function* sampleEuler(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const c = churnOptions(options);
  for (let i = 0; i < sigmas.length - 1; i++) {
    const churned = churn(x, sigmas, i, c, options);
    x = churned.x;
    const denoised = yield* model.denoise(x, churned.sigmaHat, i);
    const d = toD(x, denoised, churned.sigmaHat);
    x = addScaled(x, d, f32(sigmas[i + 1]! - churned.sigmaHat));
  }
  return x;
}

export function* sampleEulerAncestral(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const eta = options.eta ?? 1;
  const sNoise = options.sNoise ?? 1;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigma, i);
    const { sigmaDown, sigmaUp } = ancestralStep(sigma, next, eta);
    const d = toD(x, denoised, sigma);
    x = addScaled(x, d, f32(sigmaDown - sigma));
    // Drawn whenever σnext > 0, also at eta 0 (then scaled by σ_up = 0).
    if (next > 0) x = addNoise(x, checkedNoise(options.noise, x.length), sNoise, sigmaUp);
  }
  return x;
}

export function* sampleHeun(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const c = churnOptions(options);
  for (let i = 0; i < sigmas.length - 1; i++) {
    const churned = churn(x, sigmas, i, c, options);
    x = churned.x;
    const sigmaHat = churned.sigmaHat;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigmaHat, i);
    const d = toD(x, denoised, sigmaHat);
    const dt = f32(next - sigmaHat);
    if (next === 0) {
      x = addScaled(x, d, dt);
    } else {
      const x2 = addScaled(x, d, dt);
      const denoised2 = yield* model.denoise(x2, next, i);
      const d2 = toD(x2, denoised2, next);
      const out = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) out[k] = x[k]! + f32(f32(f32(d[k]! + d2[k]!) / 2) * dt);
      x = out;
    }
  }
  return x;
}

export function* sampleDpm2(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const c = churnOptions(options);
  for (let i = 0; i < sigmas.length - 1; i++) {
    const churned = churn(x, sigmas, i, c, options);
    x = churned.x;
    const sigmaHat = churned.sigmaHat;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigmaHat, i);
    const d = toD(x, denoised, sigmaHat);
    if (next === 0) {
      x = addScaled(x, d, f32(next - sigmaHat));
    } else {
      const sigmaMid = expF(lerpF(logF(sigmaHat), logF(next), 0.5));
      const x2 = addScaled(x, d, f32(sigmaMid - sigmaHat));
      const denoised2 = yield* model.denoise(x2, sigmaMid, i);
      const d2 = toD(x2, denoised2, sigmaMid);
      x = addScaled(x, d2, f32(next - sigmaHat));
    }
  }
  return x;
}

export function* sampleDpm2Ancestral(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const eta = options.eta ?? 1;
  const sNoise = options.sNoise ?? 1;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const denoised = yield* model.denoise(x, sigma, i);
    const { sigmaDown, sigmaUp } = ancestralStep(sigma, sigmas[i + 1]!, eta);
    const d = toD(x, denoised, sigma);
    if (sigmaDown === 0) {
      x = addScaled(x, d, f32(sigmaDown - sigma));
    } else {
      const sigmaMid = expF(lerpF(logF(sigma), logF(sigmaDown), 0.5));
      const x2 = addScaled(x, d, f32(sigmaMid - sigma));
      const denoised2 = yield* model.denoise(x2, sigmaMid, i);
      const d2 = toD(x2, denoised2, sigmaMid);
      x = addScaled(x, d2, f32(sigmaDown - sigma));
      x = addNoise(x, checkedNoise(options.noise, x.length), sNoise, sigmaUp);
    }
  }
  return x;
}

/**
 * ∫_{t[i]}^{t[i+1]} Π_{k≠j} (τ − t[i−k])/(t[i−j] − t[i−k]) dτ. k-diffusion integrates this
 * Lagrange basis polynomial (degree ≤ 3) with scipy quad; 3-point Gauss–Legendre is exact for it.
 */
export function linearMultistepCoefficient(order: number, t: ArrayLike<number>, i: number, j: number): number {
  if (order - 1 > i) throw new RangeError(`order ${order} too high for step ${i}`);
  const basis = (tau: number): number => {
    let product = 1;
    for (let k = 0; k < order; k++) {
      if (k === j) continue;
      product *= (tau - t[i - k]!) / (t[i - j]! - t[i - k]!);
    }
    return product;
  };
  const a = t[i]!;
  const b = t[i + 1]!;
  const half = (b - a) / 2;
  const mid = (a + b) / 2;
  const node = Math.sqrt(3 / 5);
  return half * ((5 / 9) * basis(mid - half * node) + (8 / 9) * basis(mid) + (5 / 9) * basis(mid + half * node));
}

export function* sampleLms(x: Float32Array, options: SamplerOptions, order = 4): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const ds: Float32Array[] = [];
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const denoised = yield* model.denoise(x, sigma, i);
    ds.push(toD(x, denoised, sigma));
    if (ds.length > order) ds.shift();
    const currentOrder = Math.min(i + 1, order);
    const coefficients: number[] = [];
    for (let j = 0; j < currentOrder; j++) coefficients.push(f32(linearMultistepCoefficient(currentOrder, sigmas, i, j)));
    // sum(coeff·d for newest-first d) starts from Python's 0, then x + sum
    const sum = new Float32Array(x.length);
    for (let j = 0; j < currentOrder; j++) {
      const d = ds[ds.length - 1 - j]!;
      const coeff = coefficients[j]!;
      for (let k = 0; k < x.length; k++) sum[k] = sum[k]! + f32(coeff * d[k]!);
    }
    const out = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) out[k] = x[k]! + sum[k]!;
    x = out;
  }
  return x;
}

/** (σ(t_next)/σ(t))·x − expm1(−h)·D, the first-order DPM-Solver++ update used by several samplers. */
function dpmSolverUpdate(x: Float32Array, ratio: number, expm1NegH: number, denoised: Float32Array): Float32Array {
  const out = new Float32Array(x.length);
  for (let k = 0; k < x.length; k++) out[k] = f32(ratio * x[k]!) - f32(expm1NegH * denoised[k]!);
  return out;
}

export function* sampleDpmppSecondOrderAncestral(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const eta = options.eta ?? 1;
  const sNoise = options.sNoise ?? 1;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigma, i);
    const { sigmaDown, sigmaUp } = ancestralStep(sigma, next, eta);
    if (sigmaDown === 0) {
      x = addScaled(x, toD(x, denoised, sigma), f32(sigmaDown - sigma));
    } else {
      const t = tOfSigma(sigma);
      const tNext = tOfSigma(sigmaDown);
      const h = f32(tNext - t);
      const s = f32(t + f32(0.5 * h));
      const sigmaT = sigmaOfT(t);
      const sigmaS = sigmaOfT(s);
      const x2 = dpmSolverUpdate(x, f32(sigmaS / sigmaT), expm1F(f32(-h * 0.5)), denoised);
      const denoised2 = yield* model.denoise(x2, sigmaS, i);
      x = dpmSolverUpdate(x, f32(sigmaOfT(tNext) / sigmaT), expm1F(-h), denoised2);
    }
    if (next > 0) x = addNoise(x, checkedNoise(options.noise, x.length), sNoise, sigmaUp);
  }
  return x;
}

export function* sampleDpmppSde(x: Float32Array, options: SamplerOptions, r = 0.5): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const eta = options.eta ?? 1;
  const sNoise = options.sNoise ?? 1;
  const noise = brownianOrPlain(options, x.length);
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigma, i);
    if (next === 0) {
      x = addScaled(x, toD(x, denoised, sigma), f32(next - sigma));
      continue;
    }
    const t = tOfSigma(sigma);
    const tNext = tOfSigma(next);
    const h = f32(tNext - t);
    const s = f32(t + f32(h * r));
    const fac = 1 / (2 * r);
    const sigmaT = sigmaOfT(t);
    const sigmaS = sigmaOfT(s);

    const step1 = ancestralStep(sigmaT, sigmaS, eta);
    const s1 = tOfSigma(step1.sigmaDown);
    let x2 = dpmSolverUpdate(x, f32(sigmaOfT(s1) / sigmaT), expm1F(f32(t - s1)), denoised);
    x2 = addNoise(x2, noise(sigmaT, sigmaS), sNoise, step1.sigmaUp);
    const denoised2 = yield* model.denoise(x2, sigmaS, i);

    const step2 = ancestralStep(sigmaT, sigmaOfT(tNext), eta);
    const t2 = tOfSigma(step2.sigmaDown);
    const mixed = new Float32Array(x.length);
    const w1 = f32(1 - fac);
    const w2 = f32(fac);
    for (let k = 0; k < x.length; k++) mixed[k] = f32(w1 * denoised[k]!) + f32(w2 * denoised2[k]!);
    x = dpmSolverUpdate(x, f32(sigmaOfT(t2) / sigmaT), expm1F(f32(t - t2)), mixed);
    x = addNoise(x, noise(sigmaT, sigmaOfT(tNext)), sNoise, step2.sigmaUp);
  }
  return x;
}

export function* sampleDpmpp2m(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  let oldDenoised: Float32Array | undefined;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigma, i);
    const t = tOfSigma(sigma);
    const tNext = tOfSigma(next);
    const h = f32(tNext - t);
    const ratio = f32(sigmaOfT(tNext) / sigmaOfT(t));
    const expm1NegH = expm1F(-h);
    if (oldDenoised === undefined || next === 0) {
      x = dpmSolverUpdate(x, ratio, expm1NegH, denoised);
    } else {
      const hLast = f32(t - tOfSigma(sigmas[i - 1]!));
      const r = f32(hLast / h);
      const inv2r = f32(1 / f32(2 * r));
      const wNew = f32(1 + inv2r);
      const mixed = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) mixed[k] = f32(wNew * denoised[k]!) - f32(inv2r * oldDenoised[k]!);
      x = dpmSolverUpdate(x, ratio, expm1NegH, mixed);
    }
    oldDenoised = denoised;
  }
  return x;
}

export type Dpmpp2mSdeSolver = "midpoint" | "heun";

export function* sampleDpmpp2mSde(x: Float32Array, options: SamplerOptions, solver: Dpmpp2mSdeSolver = "midpoint"): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const eta = options.eta ?? 1;
  const sNoise = options.sNoise ?? 1;
  const noise = brownianOrPlain(options, x.length);
  let oldDenoised: Float32Array | undefined;
  let hLast = 0;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigma, i);
    if (next === 0) {
      x = denoised;
    } else {
      const t = -logF(sigma);
      const s = -logF(next);
      const h = f32(s - t);
      const etaH = f32(f32(eta) * h);
      const xScale = f32(f32(next / sigma) * expF(-etaH));
      const negHEtaH = f32(-h - etaH);
      const dScale = -expm1F(negHEtaH);
      const out = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) out[k] = f32(xScale * x[k]!) + f32(dScale * denoised[k]!);
      x = out;
      if (oldDenoised !== undefined) {
        const r = f32(hLast / h);
        const invR = f32(1 / r);
        const correction =
          solver === "heun" ? f32(f32(f32(dScale / negHEtaH) + 1) * invR) : f32(f32(0.5 * dScale) * invR);
        for (let k = 0; k < x.length; k++) x[k] = x[k]! + f32(correction * f32(denoised[k]! - oldDenoised[k]!));
      }
      if (eta) {
        const root = f32(Math.sqrt(-expm1F(f32(-2 * etaH))));
        const n = noise(sigma, next);
        const s = f32(sNoise);
        for (let k = 0; k < x.length; k++) x[k] = x[k]! + f32(f32(f32(n[k]! * next) * root) * s);
      }
      hLast = h;
    }
    oldDenoised = denoised;
  }
  return x;
}

export function* sampleDpmpp3mSde(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const eta = options.eta ?? 1;
  const sNoise = options.sNoise ?? 1;
  const noise = brownianOrPlain(options, x.length);
  let denoised1: Float32Array | undefined;
  let denoised2: Float32Array | undefined;
  let h1: number | undefined;
  let h2: number | undefined;
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const denoised = yield* model.denoise(x, sigma, i);
    let h = h1 ?? 0;
    if (next === 0) {
      x = denoised;
    } else {
      const t = -logF(sigma);
      const s = -logF(next);
      h = f32(s - t);
      const hEta = f32(h * f32(eta + 1));
      const xScale = expF(-hEta);
      const dScale = -expm1F(-hEta);
      const out = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) out[k] = f32(xScale * x[k]!) + f32(dScale * denoised[k]!);
      x = out;
      const phi2 = f32(f32(expm1F(-hEta) / hEta) + 1);
      if (h2 !== undefined && denoised1 !== undefined && denoised2 !== undefined) {
        const r0 = f32(h1! / h);
        const r1 = f32(h2 / h);
        const rSum = f32(r0 + r1);
        const phi3 = f32(f32(phi2 / hEta) - 0.5);
        for (let k = 0; k < x.length; k++) {
          const d10 = f32(f32(denoised[k]! - denoised1[k]!) / r0);
          const d11 = f32(f32(denoised1[k]! - denoised2[k]!) / r1);
          const diff = f32(d10 - d11);
          const d1 = f32(d10 + f32(f32(diff * r0) / rSum));
          const d2 = f32(diff / rSum);
          x[k] = f32(x[k]! + f32(phi2 * d1)) - f32(phi3 * d2);
        }
      } else if (h1 !== undefined && denoised1 !== undefined) {
        const r = f32(h1 / h);
        for (let k = 0; k < x.length; k++) x[k] = x[k]! + f32(phi2 * f32(f32(denoised[k]! - denoised1[k]!) / r));
      }
      if (eta) {
        const root = f32(Math.sqrt(-expm1F(f32(f32(-2 * h) * f32(eta)))));
        const n = noise(sigma, next);
        const s = f32(sNoise);
        for (let k = 0; k < x.length; k++) x[k] = x[k]! + f32(f32(f32(n[k]! * next) * root) * s);
      }
    }
    denoised2 = denoised1;
    denoised1 = denoised;
    h2 = h1;
    h1 = h;
  }
  return x;
}

/**
 * LCM (A1111 sd_samplers_lcm): x = D; then fresh noise scaled by the next σ. The denoiser is LCM's
 * own wrapper, so this sampler asks for eps and applies LCM's boundary-condition scalings itself.
 */
export function* sampleLcm(x: Float32Array, options: SamplerOptions & { lcm: LcmDenoiser }): SamplerRun {
  const { sigmas, lcm } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const timestep = lcm.sigmaToT(sigma);
    const cIn = f32(1 / f32(Math.sqrt(f32(f32(sigma * sigma) + 1))));
    const eps = yield* model.eps(x, timestep, sigma, i, cIn);
    x = lcm.denoisedFromEps(x, eps, sigma);
    if (next > 0) {
      const n = checkedNoise(options.noise, x.length);
      const out = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) out[k] = x[k]! + f32(next * n[k]!);
      x = out;
    }
  }
  return x;
}

/** The parts of A1111's LCMCompVisDenoiser the sampler needs (see `createLcmDenoiser`). */
export interface LcmDenoiser {
  sigmaToT(sigma: number): number;
  denoisedFromEps(x: Float32Array, eps: Float32Array, sigma: number): Float32Array;
}
