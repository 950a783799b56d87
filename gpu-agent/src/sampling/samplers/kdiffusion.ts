/**
 * k-diffusion samplers (crowsonkb/k-diffusion 0.0.16, the version A1111 1.10 pins) as generators.
 * Arithmetic is float32 and in torch's operation order so that results track A1111 closely; the
 * array updates are fused single-pass kernels (./updates.ts).
 */
import {
  ModelCaller,
  ONE_DRAW,
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
  upcomingSde,
} from "./common.js";
import {
  addNoise,
  dpmSolverAncestralStep,
  dpmSolverStep,
  dpmpp2mSdeStep,
  dpmpp2mStep,
  dpmpp3mSdeStep,
  dpmppSdeFinalStep,
  eulerAncestralStep,
  eulerStep,
  heunStep,
  lcmStep,
  lmsStep,
  midpointAncestralStep,
  midpointStep,
} from "./updates.js";
import { freshLatent, releaseLatent, resultInPlaceOf, supersede } from "./latent-pool.js";
import type { SamplerOptions, SamplerRun } from "./types.js";

const f32 = Math.fround;

interface Churn {
  /** γ of each step: min(s_churn/N, √2 − 1) where s_tmin ≤ σᵢ ≤ s_tmax, else 0. */
  gammas: readonly number[];
  sNoise: number;
  /** The last step whose churn noise is read (γ > 0), or −1: no step draws after it. */
  lastDraw: number;
}

function churnOptions(options: SamplerOptions): Churn {
  const { sigmas } = options;
  const sChurn = options.sChurn ?? 0;
  const sTmin = options.sTmin ?? 0;
  // s_tmax 0 means no upper bound (A1111's option default).
  const sTmax = options.sTmax === undefined || options.sTmax === 0 ? Infinity : options.sTmax;
  const gammas = Array.from(sigmas.subarray(0, -1), (sigma) =>
    sTmin <= sigma && sigma <= sTmax ? Math.min(sChurn / (sigmas.length - 1), 2 ** 0.5 - 1) : 0,
  );
  return { gammas, sNoise: options.sNoise ?? 1, lastDraw: gammas.findLastIndex((gamma) => gamma > 0) };
}

/**
 * The churn prologue of Euler/Heun/DPM2. A1111 draws the noise every step, even when γ = 0. A draw at a
 * γ = 0 step still counts when a later step adds churn noise: it moves the per-image generator on, and
 * skipping it would shift that noise. So every step draws up to the last one with γ > 0. No draw after it
 * is ever read: these samplers draw nothing else, and a later pass (Hires.fix) starts a generator of its
 * own. Those draws are skipped. With s_churn = 0, A1111's default, that is all of them: the images are
 * the same, and a step no longer pays for a 4×128×128 draw (0.5–0.8 ms on the test VM before the first
 * model call, then one per step on the noise thread).
 */
function churn(x: Float32Array, sigmas: Float32Array, i: number, c: Churn, options: SamplerOptions): { x: Float32Array; sigmaHat: number } {
  const sigma = sigmas[i]!;
  const gamma = c.gammas[i]!;
  const raw = i <= c.lastDraw ? checkedNoise(options.noise, x.length) : undefined;
  const sigmaHat = f32(sigma * f32(gamma + 1));
  // γ > 0 only up to lastDraw, so a step with churn always has its draw.
  if (!(gamma > 0) || raw === undefined) return { x, sigmaHat };
  const scale = f32(Math.sqrt(f32(f32(sigmaHat * sigmaHat) - f32(sigma * sigma))));
  return { x: addNoise(resultInPlaceOf(x), x, raw, c.sNoise, scale), sigmaHat };
}

/** The churn draw of the next step, announced while this step's model call runs (none past the last read one). */
const nextChurn = (c: Churn, i: number) => (i + 1 <= c.lastDraw ? ONE_DRAW : undefined);

export function* sampleEuler(x: Float32Array, options: SamplerOptions): SamplerRun {
  const { sigmas } = options;
  checkSigmas(sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const c = churnOptions(options);
  for (let i = 0; i < sigmas.length - 1; i++) {
    const churned = churn(x, sigmas, i, c, options);
    x = supersede(x, churned.x);
    const denoised = yield* model.denoise(x, churned.sigmaHat, i, nextChurn(c, i));
    x = supersede(x, eulerStep(resultInPlaceOf(x), x, denoised, churned.sigmaHat, f32(sigmas[i + 1]! - churned.sigmaHat)), denoised);
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
    const denoised = yield* model.denoise(x, sigma, i, next > 0 ? ONE_DRAW : undefined);
    const { sigmaDown, sigmaUp } = ancestralStep(sigma, next, eta);
    const dt = f32(sigmaDown - sigma);
    const out = resultInPlaceOf(x);
    // Drawn whenever σnext > 0, also at eta 0 (then scaled by σ_up = 0).
    x = supersede(
      x,
      next > 0
        ? eulerAncestralStep(out, x, denoised, checkedNoise(options.noise, x.length), sigma, dt, sNoise, sigmaUp)
        : eulerStep(out, x, denoised, sigma, dt),
      denoised,
    );
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
    x = supersede(x, churned.x);
    const sigmaHat = churned.sigmaHat;
    const next = sigmas[i + 1]!;
    const upcoming = nextChurn(c, i);
    const denoised = yield* model.denoise(x, sigmaHat, i, upcoming);
    const dt = f32(next - sigmaHat);
    const x2 = eulerStep(freshLatent(x.length), x, denoised, sigmaHat, dt);
    if (next === 0) {
      x = supersede(x, x2, denoised);
    } else {
      const denoised2 = yield* model.denoise(x2, next, i, upcoming);
      x = supersede(x, heunStep(resultInPlaceOf(x), x, denoised, denoised2, sigmaHat, next, dt), x2, denoised, denoised2);
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
    x = supersede(x, churned.x);
    const sigmaHat = churned.sigmaHat;
    const next = sigmas[i + 1]!;
    const upcoming = nextChurn(c, i);
    const denoised = yield* model.denoise(x, sigmaHat, i, upcoming);
    if (next === 0) {
      x = supersede(x, eulerStep(resultInPlaceOf(x), x, denoised, sigmaHat, f32(next - sigmaHat)), denoised);
    } else {
      const sigmaMid = expF(lerpF(logF(sigmaHat), logF(next), 0.5));
      // The answer is read no more: the midpoint goes over it.
      const x2 = supersede(denoised, eulerStep(resultInPlaceOf(denoised), x, denoised, sigmaHat, f32(sigmaMid - sigmaHat)));
      const denoised2 = yield* model.denoise(x2, sigmaMid, i, upcoming);
      x = supersede(x, midpointStep(resultInPlaceOf(x), x, x2, denoised2, sigmaMid, f32(next - sigmaHat)), x2, denoised2);
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
    const { sigmaDown, sigmaUp } = ancestralStep(sigma, sigmas[i + 1]!, eta);
    const upcoming = sigmaDown === 0 ? undefined : ONE_DRAW;
    const denoised = yield* model.denoise(x, sigma, i, upcoming);
    if (sigmaDown === 0) {
      x = supersede(x, eulerStep(resultInPlaceOf(x), x, denoised, sigma, f32(sigmaDown - sigma)), denoised);
    } else {
      const sigmaMid = expF(lerpF(logF(sigma), logF(sigmaDown), 0.5));
      const x2 = supersede(denoised, eulerStep(resultInPlaceOf(denoised), x, denoised, sigma, f32(sigmaMid - sigma)));
      const denoised2 = yield* model.denoise(x2, sigmaMid, i, upcoming);
      const noise = checkedNoise(options.noise, x.length);
      x = supersede(
        x,
        midpointAncestralStep(resultInPlaceOf(x), x, x2, denoised2, noise, sigmaMid, f32(sigmaDown - sigma), sNoise, sigmaUp),
        x2,
        denoised2,
      );
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
  // The last `order` derivatives, newest first, in buffers reused round-robin.
  const ds: Float32Array[] = [];
  let spare: Float32Array | undefined;
  // They depend on the σ list only: worked out before the first model call, not in each step's
  // (cache-cold) time between two calls.
  const coefficientsAt = Array.from({ length: sigmas.length - 1 }, (_, i) => {
    const currentOrder = Math.min(i + 1, order);
    return Array.from({ length: currentOrder }, (_, j) => f32(linearMultistepCoefficient(currentOrder, sigmas, i, j)));
  });
  for (let i = 0; i < sigmas.length - 1; i++) {
    const sigma = sigmas[i]!;
    const denoised = yield* model.denoise(x, sigma, i);
    const d = spare ?? freshLatent(x.length);
    const out = resultInPlaceOf(x);
    lmsStep(out, d, x, denoised, ds, sigma, coefficientsAt[i]!);
    ds.unshift(d);
    spare = ds.length > order ? ds.pop() : undefined;
    x = supersede(x, out, denoised);
  }
  return x;
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
    const upcoming = next > 0 ? ONE_DRAW : undefined;
    const denoised = yield* model.denoise(x, sigma, i, upcoming);
    const { sigmaDown, sigmaUp } = ancestralStep(sigma, next, eta);
    // Written last, after every read of x.
    const out = resultInPlaceOf(x);
    if (sigmaDown === 0) {
      const dt = f32(sigmaDown - sigma);
      x = supersede(
        x,
        next > 0
          ? eulerAncestralStep(out, x, denoised, checkedNoise(options.noise, x.length), sigma, dt, sNoise, sigmaUp)
          : eulerStep(out, x, denoised, sigma, dt),
        denoised,
      );
    } else {
      const t = tOfSigma(sigma);
      const tNext = tOfSigma(sigmaDown);
      const h = f32(tNext - t);
      const s = f32(t + f32(0.5 * h));
      const sigmaT = sigmaOfT(t);
      const sigmaS = sigmaOfT(s);
      const x2 = supersede(denoised, dpmSolverStep(resultInPlaceOf(denoised), x, denoised, f32(sigmaS / sigmaT), expm1F(f32(-h * 0.5))));
      const denoised2 = yield* model.denoise(x2, sigmaS, i, upcoming);
      const ratio = f32(sigmaOfT(tNext) / sigmaT);
      x = supersede(
        x,
        next > 0
          ? dpmSolverAncestralStep(out, x, denoised2, checkedNoise(options.noise, x.length), ratio, expm1F(-h), sNoise, sigmaUp)
          : dpmSolverStep(out, x, denoised2, ratio, expm1F(-h)),
        x2,
        denoised2,
      );
    }
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
    if (next === 0) {
      const denoised = yield* model.denoise(x, sigma, i);
      x = supersede(x, eulerStep(resultInPlaceOf(x), x, denoised, sigma, f32(next - sigma)), denoised);
      continue;
    }
    const t = tOfSigma(sigma);
    const tNext = tOfSigma(next);
    const h = f32(tNext - t);
    const s = f32(t + f32(h * r));
    const fac = 1 / (2 * r);
    const sigmaT = sigmaOfT(t);
    const sigmaS = sigmaOfT(s);
    const sigmaNext = sigmaOfT(tNext);
    const denoised = yield* model.denoise(x, sigma, i, upcomingSde(options, sigmaT, sigmaS));

    const step1 = ancestralStep(sigmaT, sigmaS, eta);
    const s1 = tOfSigma(step1.sigmaDown);
    const x2 = dpmSolverAncestralStep(
      freshLatent(x.length),
      x,
      denoised,
      noise(sigmaT, sigmaS),
      f32(sigmaOfT(s1) / sigmaT),
      expm1F(f32(t - s1)),
      sNoise,
      step1.sigmaUp,
    );
    const denoised2 = yield* model.denoise(x2, sigmaS, i, upcomingSde(options, sigmaT, sigmaNext));

    const step2 = ancestralStep(sigmaT, sigmaNext, eta);
    const t2 = tOfSigma(step2.sigmaDown);
    x = supersede(
      x,
      dpmppSdeFinalStep(
        resultInPlaceOf(x),
        x,
        denoised,
        denoised2,
        noise(sigmaT, sigmaNext),
        f32(1 - fac),
        f32(fac),
        f32(sigmaOfT(t2) / sigmaT),
        expm1F(f32(t - t2)),
        sNoise,
        step2.sigmaUp,
      ),
      x2,
      denoised,
      denoised2,
    );
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
    const out = resultInPlaceOf(x);
    if (oldDenoised === undefined || next === 0) {
      x = supersede(x, dpmSolverStep(out, x, denoised, ratio, expm1NegH));
    } else {
      const hLast = f32(t - tOfSigma(sigmas[i - 1]!));
      const r = f32(hLast / h);
      const inv2r = f32(1 / f32(2 * r));
      x = supersede(x, dpmpp2mStep(out, x, denoised, oldDenoised, f32(1 + inv2r), inv2r, ratio, expm1NegH));
    }
    releaseLatent(oldDenoised);
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
    const noisy = next !== 0 && Boolean(eta);
    const denoised = yield* model.denoise(x, sigma, i, noisy ? upcomingSde(options, sigma, next) : undefined);
    if (next === 0) {
      x = supersede(x, denoised);
    } else {
      const t = -logF(sigma);
      const s = -logF(next);
      const h = f32(s - t);
      const etaH = f32(f32(eta) * h);
      const xScale = f32(f32(next / sigma) * expF(-etaH));
      const negHEtaH = f32(-h - etaH);
      const dScale = -expm1F(negHEtaH);
      let old: { den: Float32Array; c: number } | undefined;
      if (oldDenoised !== undefined) {
        const r = f32(hLast / h);
        const invR = f32(1 / r);
        const c = solver === "heun" ? f32(f32(f32(dScale / negHEtaH) + 1) * invR) : f32(f32(0.5 * dScale) * invR);
        old = { den: oldDenoised, c };
      }
      const noiseTerm = noisy
        ? { noise: noise(sigma, next), sigmaNext: next, root: f32(Math.sqrt(-expm1F(f32(-2 * etaH)))), sNoise }
        : undefined;
      x = supersede(x, dpmpp2mSdeStep(resultInPlaceOf(x), x, denoised, xScale, dScale, old, noiseTerm));
      hLast = h;
    }
    // At the last step x is this denoised; the run returns it.
    releaseLatent(oldDenoised);
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
    const noisy = next !== 0 && Boolean(eta);
    const denoised = yield* model.denoise(x, sigma, i, noisy ? upcomingSde(options, sigma, next) : undefined);
    let h = h1 ?? 0;
    if (next === 0) {
      x = supersede(x, denoised);
    } else {
      const t = -logF(sigma);
      const s = -logF(next);
      h = f32(s - t);
      const hEta = f32(h * f32(eta + 1));
      const xScale = expF(-hEta);
      const dScale = -expm1F(-hEta);
      const phi2 = f32(f32(expm1F(-hEta) / hEta) + 1);
      let history: Parameters<typeof dpmpp3mSdeStep>[5];
      if (h2 !== undefined && denoised1 !== undefined && denoised2 !== undefined) {
        const r0 = f32(h1! / h);
        const r1 = f32(h2 / h);
        history = { phi2, phi3: f32(f32(phi2 / hEta) - 0.5), d1: denoised1, d2: denoised2, r0, r1, rSum: f32(r0 + r1) };
      } else if (h1 !== undefined && denoised1 !== undefined) {
        history = { phi2, phi3: 0, d1: denoised1, r0: f32(h1 / h) };
      }
      const noiseTerm = noisy
        ? { noise: noise(sigma, next), sigmaNext: next, root: f32(Math.sqrt(-expm1F(f32(f32(-2 * h) * f32(eta))))), sNoise }
        : undefined;
      x = supersede(x, dpmpp3mSdeStep(resultInPlaceOf(x), x, denoised, xScale, dScale, history, noiseTerm));
    }
    releaseLatent(denoised2);
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
    const eps = yield* model.eps(x, timestep, sigma, i, cIn, next > 0 ? ONE_DRAW : undefined);
    const { cSkip, cOut } = lcm.boundaryScalings(sigma);
    const noise = next > 0 ? { noise: checkedNoise(options.noise, x.length), sigmaNext: next } : undefined;
    x = supersede(x, lcmStep(resultInPlaceOf(x), x, eps, -f32(sigma), cOut, cSkip, noise), eps);
  }
  return x;
}

/** The parts of A1111's LCMCompVisDenoiser the sampler needs (see `LcmSchedule`). */
export interface LcmDenoiser {
  sigmaToT(sigma: number): number;
  /** c_skip and c_out of LCM's boundary condition at σ: x₀ = c_out·(x − σ·eps) + c_skip·x. */
  boundaryScalings(sigma: number): { cSkip: number; cOut: number };
}
