/**
 * A1111's timestep samplers (modules/sd_samplers_timesteps_impl.py): DDIM, DDIM CFG++, PLMS and UniPC.
 * They walk integer (UniPC: fractional) model timesteps on the VP latent and ask for CFG-combined eps.
 */
import { linspaceF32 } from "../float32.js";
import { InvalidSamplingParameter } from "../errors.js";
import { sd1Schedule, type DiscreteSchedule } from "../sigmas.js";
import { ModelCaller, ONE_DRAW, checkedNoise, expm1F } from "./common.js";
import type { ModelRequest, ModelResponse } from "./types.js";
import {
  ddimStep,
  plmsStep,
  prepareUniPcFusedStep,
  uniPcCorrectThenPredict,
  uniPcDataPrediction,
  uniPcPredict,
  type UniPcFusedStep,
  type UniPcTerms,
} from "./updates.js";
import { freshLatent, releaseLatent, resultInPlaceOf, supersede } from "./latent-pool.js";

const f32 = Math.fround;

type Run = Generator<ModelRequest, Float32Array, ModelResponse>;

/** `get_timesteps(steps)`: clip(range(0, 1000, 1000 // steps) + 1, 0, 999), ascending. */
export function ddimTimesteps(steps: number, numTrainTimesteps = 1000): Int32Array {
  if (!Number.isSafeInteger(steps) || steps < 1)
    throw new InvalidSamplingParameter("steps", `steps must be a positive integer, got ${steps}`);
  const stride = Math.floor(numTrainTimesteps / steps);
  if (stride < 1) throw new InvalidSamplingParameter("steps", `at most ${numTrainTimesteps} steps are possible with timestep samplers`);
  const out: number[] = [];
  for (let t = 0; t < numTrainTimesteps; t += stride) out.push(Math.min(Math.max(t + 1, 0), numTrainTimesteps - 1));
  return Int32Array.from(out);
}

export interface TimestepSamplerOptions {
  /** Ascending model timesteps (`ddimTimesteps(steps)`, or its first t_enc entries for img2img). */
  timesteps: ArrayLike<number>;
  noise: () => Float32Array;
  schedule?: DiscreteSchedule;
  /** DDIM eta (A1111 option `eta_ddim`, default 0). */
  eta?: number;
}

/** σ equivalent of a timestep, reported with eps requests (previews, NGMS). */
function sigmaAt(schedule: DiscreteSchedule, t: number): number {
  return schedule.tToSigma(Math.min(Math.max(t, 0), schedule.sigmas.length - 1));
}

interface DdimCoefficients {
  alphas: Float32Array;
  alphasPrev: Float64Array;
  sqrtOneMinusAlphas: Float32Array;
  sigmas: Float64Array;
}

/**
 * A1111's per-timestep DDIM/PLMS tensors. sqrt(1 − ᾱ) is a tensor op in ᾱ's own dtype (float16 when ᾱ was
 * downcast: both the difference and the root rounded to float16); alphas_prev is float64, and the eta
 * sigmas come out float64 from torch's type promotion against it.
 */
export function ddimCoefficients(schedule: DiscreteSchedule, timesteps: ArrayLike<number>, eta: number): DdimCoefficients {
  const ac = schedule.alphasCumprod;
  const round = schedule.round;
  const n = timesteps.length;
  const alphas = new Float32Array(n);
  const alphasPrev = new Float64Array(n);
  const sqrtOneMinusAlphas = new Float32Array(n);
  const sigmas = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const a = ac[timesteps[i]!]!;
    const ap = ac[i === 0 ? 0 : timesteps[i - 1]!]!;
    alphas[i] = a;
    alphasPrev[i] = ap;
    sqrtOneMinusAlphas[i] = round(f32(Math.sqrt(round(1 - a))));
    sigmas[i] = eta * Math.sqrt(((1 - ap) / round(1 - a)) * (1 - a / ap));
  }
  return { alphas, alphasPrev, sqrtOneMinusAlphas, sigmas };
}

function* ddimLoop(x: Float32Array, o: TimestepSamplerOptions, cfgpp: boolean): Run {
  const schedule = o.schedule ?? sd1Schedule();
  const ts = o.timesteps;
  if (ts.length < 1) throw new InvalidSamplingParameter("steps", "DDIM needs at least one timestep");
  const model = new ModelCaller(x.length, schedule);
  const c = ddimCoefficients(schedule, ts, o.eta ?? 0);
  for (let i = 0; i < ts.length - 1; i++) {
    const index = ts.length - 1 - i;
    const t = ts[index]!;
    let eps: Float32Array;
    let direction: Float32Array;
    if (cfgpp) {
      // CFG++: scale 1/12.5 of the CFG scale, and the direction term uses the unconditional eps.
      const r = yield* model.epsWithUncond(x, t, sigmaAt(schedule, t), i, 1 / 12.5, ONE_DRAW);
      eps = r.output;
      direction = r.uncond;
    } else {
      eps = yield* model.eps(x, t, sigmaAt(schedule, t), i, 1, ONE_DRAW);
      direction = eps;
    }
    const aT = c.alphas[index]!;
    const aPrev = f32(c.alphasPrev[index]!);
    const sigmaT = f32(c.sigmas[index]!);
    const s1m = c.sqrtOneMinusAlphas[index]!;
    const sqrtAT = f32(Math.sqrt(aT));
    const sqrtAPrev = f32(Math.sqrt(aPrev));
    const dirScale = f32(Math.sqrt(f32(f32(1 - aPrev) - f32(sigmaT * sigmaT))));
    // A1111 draws this noise every step, also at eta 0.
    const n = checkedNoise(o.noise, x.length);
    x = supersede(x, ddimStep(resultInPlaceOf(x), x, eps, direction, n, s1m, sqrtAT, sqrtAPrev, dirScale, sigmaT), eps);
  }
  return x;
}

/** DDIM as A1111 runs it: len(timesteps) − 1 model calls, ending at the first timestep's noise level. */
export function sampleDdim(x: Float32Array, o: TimestepSamplerOptions): Run {
  return ddimLoop(x, o, false);
}

export function sampleDdimCfgpp(x: Float32Array, o: TimestepSamplerOptions): Run {
  return ddimLoop(x, o, true);
}

export function* samplePlms(x: Float32Array, o: TimestepSamplerOptions): Run {
  const schedule = o.schedule ?? sd1Schedule();
  const ts = o.timesteps;
  if (ts.length < 1) throw new InvalidSamplingParameter("steps", "PLMS needs at least one timestep");
  const model = new ModelCaller(x.length, schedule);
  const c = ddimCoefficients(schedule, ts, 0);
  const oldEps: Float32Array[] = [];
  for (let i = 0; i < ts.length - 1; i++) {
    const index = ts.length - 1 - i;
    const t = ts[index]!;
    const tNext = ts[Math.max(index - 1, 0)]!;
    const e = yield* model.eps(x, t, sigmaAt(schedule, t), i);
    const aPrev = f32(c.alphasPrev[index]!);
    const coefficients = {
      s1m: c.sqrtOneMinusAlphas[index]!,
      sqrtA: f32(Math.sqrt(c.alphas[index]!)),
      sqrtAPrev: f32(Math.sqrt(aPrev)),
      dirScale: f32(Math.sqrt(f32(1 - aPrev))),
    };
    if (oldEps.length === 0) {
      // Pseudo improved Euler: a second evaluation at the next timestep.
      const xPrev = plmsStep(freshLatent(x.length), x, e, "plain", undefined, coefficients);
      const eNext = yield* model.eps(xPrev, tNext, sigmaAt(schedule, tNext), i);
      x = supersede(x, plmsStep(resultInPlaceOf(x), x, e, [], eNext, coefficients), xPrev, eNext);
    } else {
      x = supersede(x, plmsStep(resultInPlaceOf(x), x, e, [...oldEps].reverse(), undefined, coefficients));
    }
    oldEps.push(e);
    if (oldEps.length >= 4) releaseLatent(oldEps.shift());
  }
  return x;
}

/* ---------------------------------------------------------------- UniPC ---- */

export type UniPcVariant = "bh1" | "bh2" | "vary_coeff";
export type UniPcSkipType = "time_uniform" | "time_quadratic" | "logSNR";

export interface UniPcOptions {
  timesteps: ArrayLike<number>;
  schedule?: DiscreteSchedule;
  /** img2img: start at timesteps[-1]/1000 + 1/1000 instead of T = 1. */
  isImg2img?: boolean;
  variant?: UniPcVariant;
  skipType?: UniPcSkipType;
  order?: number;
  lowerOrderFinal?: boolean;
}

/**
 * NoiseScheduleVP('discrete'): log α_t interpolated piecewise-linearly on t_n = (n+1)/N, in float32.
 * `round` is ᾱ's tensor precision: A1111 1.6+ hands UniPC the model's own ᾱ tensor, so with ᾱ downcast
 * the log is a float16 op (computed in float32, rounded to float16) before the table becomes float32.
 */
export class VpSchedule {
  readonly tArray: Float32Array;
  readonly logAlpha: Float32Array;
  readonly totalN: number;

  constructor(alphasCumprod: Float32Array, round: (v: number) => number = f32) {
    this.totalN = alphasCumprod.length;
    this.tArray = linspaceF32(0, 1, this.totalN + 1).slice(1);
    this.logAlpha = alphasCumprod.map((a) => f32(0.5 * round(f32(Math.log(a)))));
  }

  private interpolate(x: number, xp: Float32Array, yp: Float32Array): number {
    const k = xp.length;
    // Position of x among xp (an equal key sorts after x's twin, so it lands on the exact knot).
    let idx = 0;
    while (idx < k && xp[idx]! <= x) idx++;
    let x0: number, x1: number, y0: number, y1: number;
    if (idx === 0) {
      [x0, x1, y0, y1] = [xp[0]!, xp[1]!, yp[0]!, yp[1]!];
    } else if (idx === k) {
      [x0, x1, y0, y1] = [xp[k - 2]!, xp[k - 1]!, yp[k - 2]!, yp[k - 1]!];
    } else {
      [x0, x1, y0, y1] = [xp[idx - 1]!, xp[idx]!, yp[idx - 1]!, yp[idx]!];
    }
    return f32(y0 + f32(f32(f32(x - x0) * f32(y1 - y0)) / f32(x1 - x0)));
  }

  /**
   * Each update asks for the same few times again and again, and every plan on the schedule shares this
   * memo; the interpolation scans up to 1000 knots. Bounded, for an agent that sees many step counts.
   */
  private readonly logMeanCoeffs = new Map<number, number>();

  logMeanCoeff(t: number): number {
    let value = this.logMeanCoeffs.get(t);
    if (value === undefined) {
      value = this.interpolate(t, this.tArray, this.logAlpha);
      if (this.logMeanCoeffs.size >= 4096) this.logMeanCoeffs.clear();
      this.logMeanCoeffs.set(t, value);
    }
    return value;
  }

  alpha(t: number): number {
    return f32(Math.exp(this.logMeanCoeff(t)));
  }

  std(t: number): number {
    return f32(Math.sqrt(f32(1 - f32(Math.exp(f32(2 * this.logMeanCoeff(t)))))));
  }

  lambda(t: number): number {
    const lmc = this.logMeanCoeff(t);
    const logStd = f32(0.5 * f32(Math.log(f32(1 - f32(Math.exp(f32(2 * lmc)))))));
    return f32(lmc - logStd);
  }

  /** inverse_lambda for the logSNR skip type. */
  inverseLambda(lambda: number): number {
    const logAlpha = f32(-0.5 * f32(Math.log(1 + Math.exp(f32(-2 * lambda)))));
    const xp = this.logAlpha.slice().reverse();
    const yp = this.tArray.slice().reverse();
    return this.interpolate(logAlpha, xp, yp);
  }
}

/** Solves A·x = b (small dense system) by Gaussian elimination with partial pivoting, in float64. */
function solve(matrix: number[][], rhs: number[]): number[] {
  const n = rhs.length;
  const a = matrix.map((row, i) => [...row, rhs[i]!]);
  for (let col = 0; col < n; col++) {
    let pivot = col;
    for (let r = col + 1; r < n; r++) if (Math.abs(a[r]![col]!) > Math.abs(a[pivot]![col]!)) pivot = r;
    [a[col], a[pivot]] = [a[pivot]!, a[col]!];
    for (let r = col + 1; r < n; r++) {
      const factor = a[r]![col]! / a[col]![col]!;
      for (let c = col; c <= n; c++) a[r]![c] = a[r]![c]! - factor * a[col]![c]!;
    }
  }
  const x = new Array<number>(n).fill(0);
  for (let r = n - 1; r >= 0; r--) {
    let sum = a[r]![n]!;
    for (let c = r + 1; c < n; c++) sum -= a[r]![c]! * x[c]!;
    x[r] = sum / a[r]![r]!;
  }
  return x;
}

function invert(matrix: number[][]): number[][] {
  const n = matrix.length;
  const columns = Array.from({ length: n }, (_, j) =>
    solve(
      matrix,
      Array.from({ length: n }, (_, i) => (i === j ? 1 : 0)),
    ),
  );
  return Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => columns[j]![i]!));
}

/** The model's input time at a UniPC time t, its σ, and the VP schedule's std and α there. */
interface UniPcTime {
  inputTime: number;
  sigma: number;
  std: number;
  alpha: number;
}

function uniPcTime(schedule: DiscreteSchedule, ns: VpSchedule, t: number): UniPcTime {
  const inputTime = f32(f32(t - f32(1 / ns.totalN)) * 1000);
  return { inputTime, sigma: sigmaAt(schedule, inputTime), std: ns.std(t), alpha: ns.alpha(t) };
}

/**
 * What every UniPC update starts from, from the times alone: α_t, the step ratios r_k (last one 1), −h,
 * h·φ₁(−h) and the x and m₀ scales of the first-order part.
 */
function stepBasics(ns: VpSchedule, tPrev: readonly number[], t: number, stepOrder: number) {
  const tPrev0 = tPrev[tPrev.length - 1]!;
  const lambdaPrev0 = ns.lambda(tPrev0);
  const alphaT = f32(Math.exp(ns.logMeanCoeff(t)));
  const h = f32(ns.lambda(t) - lambdaPrev0);
  const rks: number[] = [];
  for (let i = 1; i < stepOrder; i++) {
    const lambdaPrevI = ns.lambda(tPrev[tPrev.length - 1 - i]!);
    rks.push(f32(f32(lambdaPrevI - lambdaPrev0) / h));
  }
  rks.push(1);
  const hh = -h;
  const hPhi1 = expm1F(hh);
  return { alphaT, rks, hh, hPhi1, ratio: f32(ns.std(t) / ns.std(tPrev0)), baseScale: f32(alphaT * hPhi1) };
}

/** The B(h) coefficients of one update: they depend on the times only. */
function bhTerms(
  ns: VpSchedule,
  variant: "bh1" | "bh2",
  tPrev: readonly number[],
  t: number,
  stepOrder: number,
  useCorrector: boolean,
): UniPcTerms {
  const { alphaT, rks, hh, hPhi1, ratio, baseScale } = stepBasics(ns, tPrev, t, stepOrder);
  const bH = variant === "bh1" ? hh : expm1F(hh);
  let hPhiK = f32(f32(hPhi1 / hh) - 1);
  let factorial = 1;
  const rMatrix: number[][] = [];
  const b: number[] = [];
  for (let i = 1; i <= stepOrder; i++) {
    rMatrix.push(rks.map((r) => f32(r ** (i - 1))));
    b.push(f32(f32(f32(hPhiK * factorial)) / bH));
    factorial *= i + 1;
    hPhiK = f32(f32(hPhiK / hh) - f32(1 / factorial));
  }
  let rhosP: number[] = [];
  if (stepOrder > 1) {
    rhosP =
      stepOrder === 2
        ? [0.5]
        : solve(
            rMatrix.slice(0, -1).map((row) => row.slice(0, -1)),
            b.slice(0, -1),
          ).map(f32);
  }
  const rhosC = useCorrector ? (stepOrder === 1 ? [0.5] : solve(rMatrix, b).map(f32)) : [];
  return { ratio, baseScale, scale: f32(alphaT * bH), rks: rks.slice(0, -1), rhosP, rhosC };
}

/** Where an update goes: its time, its order, and whether it has a corrector (all but the last). */
interface UniPcLayout {
  t: number;
  stepOrder: number;
  useCorrector: boolean;
}

/** One B(h) update of a plan. */
interface UniPcUpdate {
  at: UniPcTime;
  stepOrder: number;
  terms: UniPcTerms;
  /** Its corrector fused with the next update's predictor; undefined for the last update, which has none. */
  fused: UniPcFusedStep | undefined;
}

/**
 * Everything in a UniPC run that depends on the times alone: made once per prepared sampling
 * (planUniPc) and read by each of its runs (runUniPc). For B(h) that is every update's coefficients (a
 * small linear solve each), its fused kernel's params and its model time. Worked out in the run, after
 * its first model call, they took about 1 ms of it on the test VM (0.05 ms a step at 20 steps).
 */
export interface UniPcPlan {
  readonly schedule: DiscreteSchedule;
  readonly ns: VpSchedule;
  /** How many model outputs the history keeps. */
  readonly order: number;
  /** The start time t₀, and the model time there (the first call). */
  readonly t0: number;
  readonly first: UniPcTime;
  /** The updates in order: warm-up with rising order, then the main steps. */
  readonly layout: readonly UniPcLayout[];
  /** The B(h) updates, warm-up with rising order first; undefined for vary_coeff, which works out its own. */
  readonly updates: readonly UniPcUpdate[] | undefined;
}

/** The VP schedule of each discrete schedule, shared by every plan on it with its memo of log α_t. */
const vpSchedules = new WeakMap<DiscreteSchedule, VpSchedule>();

export function vpScheduleOf(schedule: DiscreteSchedule): VpSchedule {
  let ns = vpSchedules.get(schedule);
  if (ns === undefined) vpSchedules.set(schedule, (ns = new VpSchedule(schedule.alphasCumprod, schedule.round)));
  return ns;
}

export function planUniPc(o: UniPcOptions): UniPcPlan {
  const schedule = o.schedule ?? sd1Schedule();
  const ns = vpScheduleOf(schedule);
  const steps = o.timesteps.length;
  const order = o.order ?? 3;
  const variant = o.variant ?? "bh1";
  const skipType = o.skipType ?? "time_uniform";
  const lowerOrderFinal = o.lowerOrderFinal ?? true;
  if (steps < order) throw new InvalidSamplingParameter("steps", `UniPC order ${order} needs at least ${order} steps`);
  const tEnd = f32(1 / ns.totalN);
  const tStart = o.isImg2img ? f32(f32(o.timesteps[steps - 1]! / 1000) + f32(1 / 1000)) : 1;
  let times: Float32Array;
  if (skipType === "time_uniform") {
    times = linspaceF32(tStart, tEnd, steps + 1);
  } else if (skipType === "time_quadratic") {
    times = linspaceF32(Math.sqrt(tStart), Math.sqrt(tEnd), steps + 1).map((v) => f32(v * v));
  } else {
    const lambdas = linspaceF32(ns.lambda(tStart), ns.lambda(tEnd), steps + 1);
    times = lambdas.map((l) => ns.inverseLambda(l));
  }
  const t0 = times[0]!;
  const first = uniPcTime(schedule, ns, t0);
  const layout: UniPcLayout[] = [];
  for (let initOrder = 1; initOrder < order; initOrder++) layout.push({ t: times[initOrder]!, stepOrder: initOrder, useCorrector: true });
  for (let step = order; step <= steps; step++) {
    const stepOrder = lowerOrderFinal ? Math.min(order, steps + 1 - step) : order;
    layout.push({ t: times[step]!, stepOrder, useCorrector: step !== steps });
  }
  if (variant === "vary_coeff") return { schedule, ns, order, t0, first, layout, updates: undefined };

  let tPrev: number[] = [t0];
  const terms = layout.map(({ t, stepOrder, useCorrector }) => {
    const update = bhTerms(ns, variant, tPrev, t, stepOrder, useCorrector);
    tPrev = [...tPrev, t].slice(-order);
    return update;
  });
  // Every update but the last has a corrector, fused with the next update's predictor.
  const updates = layout.map(({ t, stepOrder, useCorrector }, k): UniPcUpdate => {
    const at = uniPcTime(schedule, ns, t);
    const fused = useCorrector ? prepareUniPcFusedStep(terms[k]!, at.std, at.alpha, terms[k + 1]!) : undefined;
    return { at, stepOrder, terms: terms[k]!, fused };
  });
  return { schedule, ns, order, t0, first, layout, updates };
}

/** UniPC as A1111 runs it (its uni_pc module, data prediction, multistep). */
export function* sampleUniPc(x: Float32Array, o: UniPcOptions): Run {
  return yield* runUniPc(x, planUniPc(o));
}

/** One UniPC run on a plan (planUniPc); a plan serves any number of runs. */
export function* runUniPc(x: Float32Array, p: UniPcPlan): Run {
  const { schedule, ns, order } = p;
  const model = new ModelCaller(x.length, schedule, 3);

  let updateIndex = 0;
  /** CFG-combined eps of the model at x_t, at the model time `at`. */
  const modelEps = function* (xt: Float32Array, at: UniPcTime): Run {
    return yield* model.eps(xt, at.inputTime, at.sigma, updateIndex);
  };
  /** Data prediction x0 = (x − σ_t·eps)/α_t from the CFG-combined eps. */
  const dataPrediction = function* (xt: Float32Array, at: UniPcTime): Run {
    const eps = yield* modelEps(xt, at);
    const data = uniPcDataPrediction(freshLatent(xt.length), xt, eps, at.std, at.alpha);
    releaseLatent(eps);
    return data;
  };
  /** The older model outputs m₁…m_{order−1} of an update (newest first). */
  const olderOutputs = (modelPrev: readonly Float32Array[], stepOrder: number): Float32Array[] => {
    const older: Float32Array[] = [];
    for (let i = 1; i < stepOrder; i++) older.push(modelPrev[modelPrev.length - 1 - i]!);
    return older;
  };

  /**
   * The B(h) updates of the plan. Each corrector also computes the next update's predictor in the same
   * pass (uniPcCorrectThenPredict): its coefficients depend on the times only, and its operands are this
   * pass's results and operands.
   */
  const bhLoop = function* (xIn: Float32Array, modelPrev: Float32Array[], updates: readonly UniPcUpdate[]): Run {
    const n = xIn.length;
    // Each update's corrected x is read by the next update's predictor only, so the kernel that corrects
    // makes the next x_t from it in registers: after the first update, the sampler's x is never an array.
    let predicted: Float32Array | undefined;
    for (const { at, stepOrder, terms, fused } of updates) {
      const older = olderOutputs(modelPrev, stepOrder);
      const m0 = modelPrev[modelPrev.length - 1]!;
      const xt = predicted ?? uniPcPredict(freshLatent(n), xIn, m0, older, terms);
      // The last update, without a corrector: its predictor is the result.
      if (fused === undefined) return xt;
      const eps = yield* modelEps(xt, at);
      // Both outputs go over the inputs that die with this pass, where the run holds them: the model
      // output over the answer eps, the next x_t over this x_t.
      const modelT = resultInPlaceOf(eps);
      // The history after the update: its model output appended, the last `order` entries kept.
      const nextModelPrev = [...modelPrev, modelT].slice(-order);
      // The plan's orders rise by at most one per update, so the next update's older outputs are this
      // one's m₀, m₁… from the front, which the fused kernel reads anyway.
      predicted = resultInPlaceOf(xt);
      uniPcCorrectThenPredict(modelT, predicted, xt, m0, older, eps, fused);
      // Dead now: x_t and eps (where not written over), and the model output the history drops.
      supersede(xt, predicted);
      supersede(eps, modelT);
      releaseLatent(modelPrev.length >= order ? modelPrev[0] : undefined);
      updateIndex++;
      modelPrev = nextModelPrev;
    }
    throw new Error("a UniPC plan ends with an update without a corrector");
  };

  const update = function* (
    xIn: Float32Array,
    modelPrev: Float32Array[],
    tPrev: number[],
    t: number,
    stepOrder: number,
    useCorrector: boolean,
  ): Generator<ModelRequest, { x: Float32Array; modelT: Float32Array | undefined }, ModelResponse> {
    const n = xIn.length;
    const modelPrev0 = modelPrev[modelPrev.length - 1]!;
    const { alphaT, rks, hh, hPhi1, ratio, baseScale } = stepBasics(ns, tPrev, t, stepOrder);
    const older = olderOutputs(modelPrev, stepOrder);

    const d1s = older.map((modelPrevI, i) => {
      const d = new Float32Array(n);
      for (let k = 0; k < n; k++) d[k] = f32(modelPrevI[k]! - modelPrev0[k]!) / rks[i]!;
      return d;
    });
    const xBase = new Float32Array(n);
    for (let k = 0; k < n; k++) xBase[k] = f32(ratio * xIn[k]!) - f32(baseScale * modelPrev0[k]!);
    const kk = rks.length;
    const cMatrix: number[][] = Array.from({ length: kk }, () => new Array<number>(kk).fill(0));
    let col = rks.map(() => 1);
    for (let k = 1; k <= kk; k++) {
      for (let r = 0; r < kk; r++) cMatrix[r]![k - 1] = col[r]!;
      col = col.map((v, r) => f32(f32(v * rks[r]!) / (k + 1)));
    }
    const hPhiKs: number[] = [];
    let factorial = 1;
    let hPhiK = hPhi1;
    for (let k = 1; k <= kk + 1; k++) {
      hPhiKs.push(hPhiK);
      hPhiK = f32(f32(hPhiK / hh) - f32(1 / factorial));
      factorial *= k + 1;
    }
    const combine = (weights: number[]): Float32Array => {
      const out = new Float32Array(n);
      for (let j = 0; j < d1s.length; j++) {
        const w = f32(weights[j]!);
        const d = d1s[j]!;
        for (let k = 0; k < n; k++) out[k] = out[k]! + f32(d[k]! * w);
      }
      return out;
    };
    let xt = xBase;
    if (d1s.length > 0) {
      const ap = invert(cMatrix.slice(0, -1).map((row) => row.slice(0, -1)));
      for (let k = 0; k < kk - 1; k++) {
        const res = combine(ap[k]!);
        const scale = f32(alphaT * hPhiKs[k + 1]!);
        const next = new Float32Array(n);
        for (let e = 0; e < n; e++) next[e] = xt[e]! - f32(scale * res[e]!);
        xt = next;
      }
    }
    let modelT: Float32Array | undefined;
    if (useCorrector) {
      modelT = yield* dataPrediction(xt, uniPcTime(schedule, ns, t));
      const ac = invert(cMatrix);
      xt = xBase;
      let last = 0;
      for (let k = 0; k < kk - 1; k++) {
        last = k;
        const res = combine(ac[k]!.slice(0, -1));
        const scale = f32(alphaT * hPhiKs[k + 1]!);
        const next = new Float32Array(n);
        for (let e = 0; e < n; e++) next[e] = xt[e]! - f32(scale * res[e]!);
        xt = next;
      }
      const weight = f32(ac[last]![kk - 1]!);
      const scale = f32(alphaT * hPhiKs[kk]!);
      const next = new Float32Array(n);
      for (let e = 0; e < n; e++) next[e] = xt[e]! - f32(scale * f32(f32(modelT[e]! - modelPrev0[e]!) * weight));
      xt = next;
    }
    return { x: xt, modelT };
  };

  const modelPrev: Float32Array[] = [yield* dataPrediction(x, p.first)];
  if (p.updates !== undefined) return yield* bhLoop(x, modelPrev, p.updates);
  const tPrev: number[] = [p.t0];
  for (const { t, stepOrder, useCorrector } of p.layout) {
    const r = yield* update(x, modelPrev, tPrev, t, stepOrder, useCorrector);
    x = r.x;
    updateIndex++;
    // The last update has no corrector and no model output: its x is the result.
    if (r.modelT === undefined) break;
    modelPrev.push(r.modelT);
    tPrev.push(t);
    // Once the history is full, the oldest model output leaves it.
    if (modelPrev.length > order) {
      releaseLatent(modelPrev.shift());
      tPrev.shift();
    }
  }
  return x;
}
