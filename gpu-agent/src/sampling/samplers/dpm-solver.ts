/**
 * k-diffusion's DPMSolver: "DPM fast" (fixed orders 3…3,2,1) and "DPM adaptive" (embedded 2/3 pair with
 * PID step-size control), in t = −ln σ. They take σmin/σmax and a step budget instead of a σ list.
 */
import { linspaceF32 } from "../float32.js";
import { ModelCaller, ONE_DRAW, ancestralStep, checkedNoise, expF, expm1F, logF } from "./common.js";
import type { ModelRequest, ModelResponse, UpcomingNoise } from "./types.js";
import type { DiscreteSchedule } from "../sigmas.js";
import {
  dpmAdaptive2Last,
  dpmAdaptive3Last,
  dpmAdaptive3Stage2,
  dpmEpsCombines,
  dpmEpsStages,
  type DpmAdaptiveCoefficients,
  type DpmStart,
  type ScaledNoise,
} from "./updates.js";
import { freshLatent, releaseLatent, resultInPlaceOf, supersede } from "./latent-pool.js";

const f32 = Math.fround;

export interface DpmSolverOptions {
  sigmaMin: number;
  sigmaMax: number;
  noise: () => Float32Array;
  schedule?: DiscreteSchedule;
  /** A1111 passes eta_ancestral (1.0) here, so both samplers are ancestral by default. */
  eta?: number;
  sNoise?: number;
}

type EvalGenerator = Generator<ModelRequest, Float32Array, ModelResponse>;

/**
 * DPM fast's ancestral noise for the step's result, drawn once the step's last model answer is in (where
 * the separate pass after the step drew it: no draw comes between) and added in the step's last kernel.
 */
type FinalNoise = () => ScaledNoise;

const sigmaOf = (t: number): number => expF(-t);
const tOf = (sigma: number): number => -logF(sigma);

/**
 * k-diffusion's DPMSolver steps, as DPM fast takes them, and their coefficients, which DPM adaptive's
 * attempts share. Its eps_cache (eps at t and at the r1 stage) is kept implicit: every eps is computed
 * again in each kernel that needs it, from the model's answers, which the step keeps instead (./updates.ts).
 */
class Solver {
  readonly model: ModelCaller;
  step = 0;
  /** Noise announced with every model call of the current step. */
  upcoming: UpcomingNoise | undefined;
  /** A multi-stage step's start (x, its answer, σ), from which each later stage computes eps; until finish(). */
  private begun: DpmStart | undefined;

  constructor(
    private readonly length: number,
    schedule: DiscreteSchedule | undefined,
  ) {
    this.model = new ModelCaller(length, schedule);
  }

  private denoised(x: Float32Array, t: number): EvalGenerator {
    return this.model.denoise(x, sigmaOf(t), this.step, this.upcoming);
  }

  /**
   * D at (x, t), then the points x − c_j·eps (fresh arrays). A multi-stage step keeps its start for the
   * later stages until finish(); with `noise` (a one-stage step) the noise is added to the last point and
   * nothing is kept.
   */
  private *start(
    x: Float32Array,
    t: number,
    cs: readonly number[],
    noise?: FinalNoise,
  ): Generator<ModelRequest, Float32Array[], ModelResponse> {
    const den = yield* this.denoised(x, t);
    const start: DpmStart = { x, den, sigma: sigmaOf(t) };
    const outs = cs.map(() => freshLatent(this.length));
    dpmEpsStages(outs, start, cs, noise?.());
    if (noise === undefined) this.begun = start;
    else releaseLatent(den);
    return outs;
  }

  /** The end of a multi-stage step: its start's answer is read no more. */
  private finish(): void {
    releaseLatent(this.begun?.den);
    this.begun = undefined;
  }

  /** D at (u, s), then (x − a_j·eps) − b_j·(eps_u − eps) per pair (fresh arrays), x and eps from the step's start. */
  private *combine(
    u: Float32Array,
    s: number,
    pairs: ReadonlyArray<readonly [number, number]>,
    noise?: FinalNoise,
  ): Generator<ModelRequest, Float32Array[], ModelResponse> {
    const den = yield* this.denoised(u, s);
    const outs = pairs.map(() => freshLatent(this.length));
    dpmEpsCombines(outs, u, den, this.begun!, sigmaOf(s), pairs, noise?.());
    releaseLatent(den);
    return outs;
  }

  /** Coefficients of DPM-Solver-1: x − a·eps. */
  static first(tNext: number, h: number): number {
    return f32(sigmaOf(tNext) * expm1F(h));
  }

  /** Stage r1 of DPM-Solver-2: (s1, c1) with u1 = x − c1·eps, and the final (a, b). */
  static second(t: number, tNext: number, h: number, r1: number): { s1: number; c1: number; final: [number, number] } {
    const s1 = f32(t + f32(f32(r1) * h));
    const c1 = f32(sigmaOf(s1) * expm1F(f32(f32(r1) * h)));
    const sigmaNext = sigmaOf(tNext);
    const a = f32(sigmaNext * expm1F(h));
    const b = f32(f32(sigmaNext / f32(2 * r1)) * expm1F(h));
    return { s1, c1, final: [a, b] };
  }

  /** DPM-Solver-3 with r1 = 1/3, r2 = 2/3: stages (s1, c1), (s2, c2, c3) and the final (a, b). */
  static third(t: number, tNext: number, h: number, r1 = 1 / 3, r2 = 2 / 3) {
    const r1h = f32(f32(r1) * h);
    const r2h = f32(f32(r2) * h);
    const s1 = f32(t + r1h);
    const s2 = f32(t + r2h);
    const c1 = f32(sigmaOf(s1) * expm1F(r1h));
    const sigmaS2 = sigmaOf(s2);
    const c2 = f32(sigmaS2 * expm1F(r2h));
    const c3 = f32(f32(sigmaS2 * f32(r2 / r1)) * f32(f32(expm1F(r2h) / r2h) - 1));
    const sigmaNext = sigmaOf(tNext);
    const a = f32(sigmaNext * expm1F(h));
    const b = f32(f32(sigmaNext / f32(r2)) * f32(f32(expm1F(h) / h) - 1));
    return { s1, c1, s2, stage2: [c2, c3] as [number, number], final: [a, b] as [number, number] };
  }

  *step1(x: Float32Array, t: number, tNext: number, noise: FinalNoise): EvalGenerator {
    const [out] = yield* this.start(x, t, [Solver.first(tNext, f32(tNext - t))], noise);
    return out!;
  }

  *step2(x: Float32Array, t: number, tNext: number, noise: FinalNoise): EvalGenerator {
    const { s1, c1, final } = Solver.second(t, tNext, f32(tNext - t), 1 / 2);
    const [u1] = yield* this.start(x, t, [c1]);
    const [out] = yield* this.combine(u1!, s1, [final], noise);
    releaseLatent(u1);
    this.finish();
    return out!;
  }

  *step3(x: Float32Array, t: number, tNext: number, noise: FinalNoise): EvalGenerator {
    const { s1, c1, s2, stage2, final } = Solver.third(t, tNext, f32(tNext - t));
    const [u1] = yield* this.start(x, t, [c1]);
    const [u2] = yield* this.combine(u1!, s1, [stage2]);
    releaseLatent(u1);
    const [out] = yield* this.combine(u2!, s2, [final], noise);
    releaseLatent(u2);
    this.finish();
    return out!;
  }
}

function checkRange(o: DpmSolverOptions): void {
  if (!(o.sigmaMin > 0) || !(o.sigmaMax > 0)) throw new RangeError("sigma_min and sigma_max must not be 0");
}

/** Ancestral split in t: the deterministic target t_next′ and the noise scale su. */
function ancestralT(t: number, tNext: number, tEnd: number, eta: number): { tTarget: number; su: number } {
  if (!eta) return { tTarget: tNext, su: 0 };
  const { sigmaDown } = ancestralStep(sigmaOf(t), sigmaOf(tNext), eta);
  const tTarget = Math.min(tEnd, tOf(sigmaDown));
  const sn = sigmaOf(tNext);
  const st = sigmaOf(tTarget);
  return { tTarget, su: f32(Math.sqrt(f32(f32(sn * sn) - f32(st * st)))) };
}

export function* sampleDpmFast(x: Float32Array, n: number, o: DpmSolverOptions): EvalGenerator {
  checkRange(o);
  if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`DPM fast needs a positive step count, got ${n}`);
  const solver = new Solver(x.length, o.schedule);
  const eta = o.eta ?? 0;
  const sNoise = f32(o.sNoise ?? 1);
  const tStart = tOf(f32(o.sigmaMax));
  const tEnd = tOf(f32(o.sigmaMin));
  const m = Math.floor(n / 3) + 1;
  const ts = linspaceF32(tStart, tEnd, m + 1);
  const orders = n % 3 === 0 ? [...Array<number>(m - 2).fill(3), 2, 1] : [...Array<number>(m - 1).fill(3), n % 3];
  // Every step ends with a noise draw.
  solver.upcoming = ONE_DRAW;
  for (let i = 0; i < orders.length; i++) {
    solver.step = i;
    const t = ts[i]!;
    const tNext = ts[i + 1]!;
    const { tTarget, su } = ancestralT(t, tNext, tEnd, eta);
    const order = orders[i]!;
    // k-diffusion adds su·s_noise·noise even when su is 0, so the draw is consumed every step.
    const noise = (): ScaledNoise => ({ noise: checkedNoise(o.noise, x.length), scale: f32(su * sNoise) });
    if (order === 1) x = supersede(x, yield* solver.step1(x, t, tTarget, noise));
    else if (order === 2) x = supersede(x, yield* solver.step2(x, t, tTarget, noise));
    else x = supersede(x, yield* solver.step3(x, t, tTarget, noise));
  }
  return x;
}

export interface DpmAdaptiveOptions extends DpmSolverOptions {
  order?: 2 | 3;
  rtol?: number;
  atol?: number;
  hInit?: number;
  pcoeff?: number;
  icoeff?: number;
  dcoeff?: number;
  acceptSafety?: number;
  /** Safety net against a pathological model: stop after this many attempted steps. */
  maxSteps?: number;
}

class PidStepSizeController {
  private readonly b1: number;
  private readonly b2: number;
  private readonly b3: number;
  private errs: number[] = [];

  constructor(
    public h: number,
    pcoeff: number,
    icoeff: number,
    dcoeff: number,
    order: number,
    private readonly acceptSafety: number,
    private readonly eps = 1e-8,
  ) {
    this.b1 = (pcoeff + icoeff + dcoeff) / order;
    this.b2 = -(pcoeff + 2 * dcoeff) / order;
    this.b3 = dcoeff / order;
  }

  proposeStep(error: number): boolean {
    const invError = 1 / (error + this.eps);
    if (this.errs.length === 0) this.errs = [invError, invError, invError];
    this.errs[0] = invError;
    let factor = this.errs[0] ** this.b1 * this.errs[1]! ** this.b2 * this.errs[2]! ** this.b3;
    factor = 1 + Math.atan(factor - 1);
    const accept = factor >= this.acceptSafety;
    if (accept) {
      this.errs[2] = this.errs[1]!;
      this.errs[1] = this.errs[0];
    }
    this.h *= factor;
    return accept;
  }
}

/** One attempt's coefficients (updates.ts DpmAdaptiveCoefficients) and the σ of its model calls. */
function attemptCoefficients(order: 2 | 3, t: number, tNext: number): DpmAdaptiveCoefficients {
  const h = f32(tNext - t);
  const sigma = sigmaOf(t);
  if (order === 2) {
    const { s1, c1, final } = Solver.second(t, tNext, h, 1 / 2);
    return { sigma, sigma1: sigmaOf(s1), sigma2: 0, c1, stage2: [0, 0], low: [Solver.first(tNext, h), 0], high: final };
  }
  const second = Solver.second(t, tNext, h, 1 / 3);
  const third = Solver.third(t, tNext, h);
  return {
    sigma,
    sigma1: sigmaOf(second.s1),
    sigma2: sigmaOf(third.s2),
    c1: second.c1,
    stage2: third.stage2,
    low: second.final,
    high: third.final,
  };
}

/**
 * k-diffusion's dpm_solver_adaptive: embedded pairs (DPM-Solver-1/2 for order 2, 2/3 for order 3) sharing
 * their model calls, and the PID controller on the pair's error. Written as one generator, its requests
 * yielded here: it makes more model calls than any other sampler, and every generator level between the
 * driver and the yield is resumed on each of them (ModelCaller.denoiseRequest).
 */
export function* sampleDpmAdaptive(x: Float32Array, o: DpmAdaptiveOptions): EvalGenerator {
  checkRange(o);
  const order = o.order ?? 3;
  const eta = o.eta ?? 0;
  const sNoise = f32(o.sNoise ?? 1);
  const n = x.length;
  const model = new ModelCaller(n, o.schedule);
  const tStart = tOf(f32(o.sigmaMax));
  const tEnd = tOf(f32(o.sigmaMin));
  const forward = tEnd > tStart;
  if (!forward && eta) throw new RangeError("eta must be 0 for reverse sampling");
  const atol = f32(o.atol ?? 0.0078);
  const rtol = f32(o.rtol ?? 0.05);
  // The error kernel's maxima take NaN from the latents only (updates.ts adaptiveErrorExpr).
  if (Number.isNaN(atol) || Number.isNaN(rtol))
    throw new RangeError(`DPM adaptive's atol and rtol must be numbers, got ${atol} and ${rtol}`);
  const pid = new PidStepSizeController(
    Math.abs(o.hInit ?? 0.05) * (forward ? 1 : -1),
    o.pcoeff ?? 0,
    o.icoeff ?? 1,
    o.dcoeff ?? 0,
    eta ? 1.5 : order,
    o.acceptSafety ?? 0.81,
  );
  const maxSteps = o.maxSteps ?? 10000;
  let s = tStart;
  let xPrev = x;
  const limit = forward ? f32(tEnd - 1e-5) : f32(tEnd + 1e-5);
  // An accepted attempt adds su·s_noise·noise to its result (k-diffusion adds it even when su is 0), in the
  // pass that makes the result. That pass takes the draw; a rejected attempt keeps it for the next one,
  // so draws are consumed once per accepted step, in order, as k-diffusion consumes them.
  let drawn: Float32Array | undefined;
  for (let attempt = 0; forward ? s < limit : s > limit; attempt++) {
    if (attempt >= maxSteps) throw new RangeError(`DPM adaptive did not finish within ${maxSteps} steps`);
    const t = forward ? Math.min(tEnd, f32(s + pid.h)) : Math.max(tEnd, f32(s + pid.h));
    const { tTarget, su } = ancestralT(s, t, tEnd, eta);
    const k = attemptCoefficients(order, s, tTarget);
    // Every model call announces the one draw its attempt may take.
    let request = model.denoiseRequest(x, k.sigma, attempt, ONE_DRAW);
    const start: DpmStart = { x, den: model.denoised(request, yield request), sigma: k.sigma };
    const u1 = freshLatent(n);
    dpmEpsStages([u1], start, [k.c1]);
    request = model.denoiseRequest(u1, k.sigma1, attempt, ONE_DRAW);
    const den1 = model.denoised(request, yield request);
    releaseLatent(u1);
    const scale = f32(su * sNoise);
    // Results go over the answers just read, where the run holds them (updates.ts).
    let low: Float32Array;
    let next: Float32Array;
    let sumSquares: number;
    if (order === 3) {
      low = resultInPlaceOf(den1);
      const u2 = freshLatent(n);
      dpmAdaptive3Stage2(low, u2, start, den1, k);
      if (low !== den1) releaseLatent(den1);
      request = model.denoiseRequest(u2, k.sigma2, attempt, ONE_DRAW);
      const den2 = model.denoised(request, yield request);
      next = resultInPlaceOf(den2);
      sumSquares = dpmAdaptive3Last(next, u2, den2, start, low, k, xPrev, atol, rtol, {
        noise: (drawn ??= checkedNoise(o.noise, n)),
        scale,
      });
      if (next !== den2) releaseLatent(den2);
      releaseLatent(u2, start.den);
    } else {
      next = resultInPlaceOf(den1);
      low = resultInPlaceOf(start.den);
      sumSquares = dpmAdaptive2Last(next, low, start, den1, k, xPrev, atol, rtol, { noise: (drawn ??= checkedNoise(o.noise, n)), scale });
      if (next !== den1) releaseLatent(den1);
      if (low !== start.den) releaseLatent(start.den);
    }
    const error = f32(f32(Math.sqrt(sumSquares)) / f32(Math.sqrt(n)));
    if (pid.proposeStep(error)) {
      // The previous step's low result and its x (the start latent is the caller's: no-op).
      releaseLatent(xPrev, x);
      xPrev = low;
      x = next;
      drawn = undefined;
      s = t;
    } else {
      releaseLatent(low, next);
    }
  }
  return x;
}
