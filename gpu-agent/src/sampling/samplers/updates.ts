/**
 * The per-step array updates of the samplers as float32 kernels (see ../kernels.ts). Each one is a
 * whole step fused into a single pass, spelled in exactly the operation order (and with exactly the
 * roundings) of the torch tensor code it reproduces; the comments give that order.
 *
 * Ownership: samplers yield fresh arrays (a request's `x` is never written after it is yielded) and
 * never write into model results; the other operands are read only.
 */
import { Kernel, e, type Expr } from "../kernels.js";

const fround = Math.fround;

const X = e.in(0);
const D = e.in(1);

/** d = (x − D)/σ, the k-diffusion `to_d`. */
const toD = (x: Expr, den: Expr, sigma: Expr): Expr => e.div(e.sub(x, den), sigma);

/** x + d·dt */
const euler = new Kernel({ inputs: 2, params: 2, outputs: [e.add(X, e.mul(toD(X, D, e.param(0)), e.param(1)))] });

export function eulerStep(out: Float32Array, x: Float32Array, den: Float32Array, sigma: number, dt: number): Float32Array {
  euler.run([out], [x, den], [sigma, dt]);
  return out;
}

/** (x + d·dt) + (n·s_noise)·σ_up */
const eulerNoise = new Kernel({
  inputs: 3,
  params: 4,
  outputs: [e.add(e.add(X, e.mul(toD(X, D, e.param(0)), e.param(1))), e.mul(e.mul(e.in(2), e.param(2)), e.param(3)))],
});

export function eulerAncestralStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  noise: Float32Array,
  sigma: number,
  dt: number,
  sNoise: number,
  sigmaUp: number,
): Float32Array {
  eulerNoise.run([out], [x, den, noise], [sigma, dt, fround(sNoise), sigmaUp]);
  return out;
}

/** x + (n·s)·scale: churn, restart jumps and ancestral noise. */
const addNoiseKernel = new Kernel({ inputs: 2, params: 2, outputs: [e.add(X, e.mul(e.mul(e.in(1), e.param(0)), e.param(1)))] });

export function addNoise(out: Float32Array, x: Float32Array, noise: Float32Array, s: number, scale: number): Float32Array {
  addNoiseKernel.run([out], [x, noise], [fround(s), scale]);
  return out;
}

/**
 * Heun's correction: x + ((d + d₂)/2)·dt with d = (x − D)/σ̂, d₂ = (x₂ − D₂)/σ_next, where x₂ is the Euler
 * step x + d·dt. x₂ is recomputed rather than read (the same operations on the same operands give the same
 * bits), which saves a pass over one latent. The halving is a multiplication by 0.5: both round the same
 * exact value a/2, so the bits are those of the division, which costs several times as much.
 */
const heunD = toD(X, D, e.param(0));
const heunX2 = e.add(X, e.mul(heunD, e.param(2)));
const heun = new Kernel({
  inputs: 3,
  params: 4,
  outputs: [e.add(X, e.mul(e.mul(e.add(heunD, toD(heunX2, e.in(2), e.param(1))), e.param(3)), e.param(2)))],
});

/** Heun's correction of the Euler step eulerStep(x, den, sigma, dt) (whose result D₂ was computed at). */
export function heunStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  den2: Float32Array,
  sigma: number,
  sigma2: number,
  dt: number,
): Float32Array {
  heun.run([out], [x, den, den2], [sigma, sigma2, dt, 0.5]);
  return out;
}

/** DPM2's second half: x + d₂·dt with d₂ = (x₂ − D₂)/σ_mid; optionally + (n·s)·σ_up (DPM2 a). */
const midpoint = new Kernel({ inputs: 3, params: 2, outputs: [e.add(X, e.mul(toD(e.in(1), e.in(2), e.param(0)), e.param(1)))] });
const midpointNoise = new Kernel({
  inputs: 4,
  params: 4,
  outputs: [e.add(e.add(X, e.mul(toD(e.in(1), e.in(2), e.param(0)), e.param(1))), e.mul(e.mul(e.in(3), e.param(2)), e.param(3)))],
});

export function midpointStep(
  out: Float32Array,
  x: Float32Array,
  x2: Float32Array,
  den2: Float32Array,
  sigmaMid: number,
  dt: number,
): Float32Array {
  midpoint.run([out], [x, x2, den2], [sigmaMid, dt]);
  return out;
}

export function midpointAncestralStep(
  out: Float32Array,
  x: Float32Array,
  x2: Float32Array,
  den2: Float32Array,
  noise: Float32Array,
  sigmaMid: number,
  dt: number,
  sNoise: number,
  sigmaUp: number,
): Float32Array {
  midpointNoise.run([out], [x, x2, den2, noise], [sigmaMid, dt, fround(sNoise), sigmaUp]);
  return out;
}

/** First-order DPM-Solver++: ratio·x − expm1(−h)·D; optionally + (n·s)·σ_up. */
const dpmSolverExpr = e.sub(e.mul(e.param(0), X), e.mul(e.param(1), D));
const dpmSolver = new Kernel({ inputs: 2, params: 2, outputs: [dpmSolverExpr] });
const dpmSolverNoise = new Kernel({ inputs: 3, params: 4, outputs: [e.add(dpmSolverExpr, e.mul(e.mul(e.in(2), e.param(2)), e.param(3)))] });

export function dpmSolverStep(out: Float32Array, x: Float32Array, den: Float32Array, ratio: number, expm1NegH: number): Float32Array {
  dpmSolver.run([out], [x, den], [ratio, expm1NegH]);
  return out;
}

export function dpmSolverAncestralStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  noise: Float32Array,
  ratio: number,
  expm1NegH: number,
  sNoise: number,
  sigmaUp: number,
): Float32Array {
  dpmSolverNoise.run([out], [x, den, noise], [ratio, expm1NegH, fround(sNoise), sigmaUp]);
  return out;
}

/** DPM++ SDE's second stage: D' = (1 − fac)·D + fac·D₂, then ratio·x − expm1·D' + (n·s)·σ_up. */
const dpmppSdeFinal = new Kernel({
  inputs: 4,
  params: 6,
  outputs: [
    e.add(
      e.sub(e.mul(e.param(2), X), e.mul(e.param(3), e.add(e.mul(e.param(0), D), e.mul(e.param(1), e.in(2))))),
      e.mul(e.mul(e.in(3), e.param(4)), e.param(5)),
    ),
  ],
});

export function dpmppSdeFinalStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  den2: Float32Array,
  noise: Float32Array,
  w1: number,
  w2: number,
  ratio: number,
  expm1: number,
  sNoise: number,
  sigmaUp: number,
): Float32Array {
  dpmppSdeFinal.run([out], [x, den, den2, noise], [w1, w2, ratio, expm1, fround(sNoise), sigmaUp]);
  return out;
}

/** DPM++ 2M: D' = (1 + 1/2r)·D − (1/2r)·D_old, then ratio·x − expm1(−h)·D'. */
const dpmpp2m = new Kernel({
  inputs: 3,
  params: 4,
  outputs: [e.sub(e.mul(e.param(2), X), e.mul(e.param(3), e.sub(e.mul(e.param(0), D), e.mul(e.param(1), e.in(2)))))],
});

export function dpmpp2mStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  old: Float32Array,
  wNew: number,
  inv2r: number,
  ratio: number,
  expm1NegH: number,
): Float32Array {
  dpmpp2m.run([out], [x, den, old], [wNew, inv2r, ratio, expm1NegH]);
  return out;
}

/**
 * DPM++ 2M SDE: xScale·x + dScale·D, then + c·(D − D_old) when there is an older D, then
 * + ((n·σ_next)·root)·s_noise when eta > 0. Operands: x, D, [D_old], [n].
 */
function sde2mExpr(correction: boolean, noise: boolean): { spec: { inputs: number; params: number }; out: Expr } {
  let out = e.add(e.mul(e.param(0), X), e.mul(e.param(1), D));
  let next = 2;
  if (correction) out = e.add(out, e.mul(e.param(2), e.sub(D, e.in(next++))));
  if (noise) out = e.add(out, e.mul(e.mul(e.mul(e.in(next++), e.param(3)), e.param(4)), e.param(5)));
  return { spec: { inputs: next, params: 6 }, out };
}

const sde2m = [false, true].map((c) =>
  [false, true].map((n) => {
    const { spec, out } = sde2mExpr(c, n);
    return new Kernel({ ...spec, outputs: [out] });
  }),
);

export interface SdeNoiseTerm {
  noise: Float32Array;
  sigmaNext: number;
  root: number;
  sNoise: number;
}

export function dpmpp2mSdeStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  xScale: number,
  dScale: number,
  old: { den: Float32Array; c: number } | undefined,
  noise: SdeNoiseTerm | undefined,
): Float32Array {
  const ins = [x, den];
  if (old !== undefined) ins.push(old.den);
  if (noise !== undefined) ins.push(noise.noise);
  sde2m[old === undefined ? 0 : 1]![noise === undefined ? 0 : 1]!.run([out], ins, [
    xScale,
    dScale,
    old?.c ?? 0,
    noise?.sigmaNext ?? 0,
    noise?.root ?? 0,
    fround(noise?.sNoise ?? 0),
  ]);
  return out;
}

/**
 * DPM++ 3M SDE: xScale·x + dScale·D, then the multistep correction (none, first order with D₁, or
 * second order with D₁ and D₂), then the noise term as in 2M SDE.
 * Params: xScale, dScale, phi2, phi3, r0 (or r), r1, rSum, σ_next, root, s_noise.
 */
function sde3mExpr(order: 0 | 1 | 2, noise: boolean): { inputs: number; out: Expr } {
  let out = e.add(e.mul(e.param(0), X), e.mul(e.param(1), D));
  let next = 2;
  if (order === 2) {
    const d1In = e.in(next++);
    const d2In = e.in(next++);
    const d10 = e.div(e.sub(D, d1In), e.param(4));
    const d11 = e.div(e.sub(d1In, d2In), e.param(5));
    const diff = e.sub(d10, d11);
    const d1 = e.add(d10, e.div(e.mul(diff, e.param(4)), e.param(6)));
    const d2 = e.div(diff, e.param(6));
    out = e.sub(e.add(out, e.mul(e.param(2), d1)), e.mul(e.param(3), d2));
  } else if (order === 1) {
    out = e.add(out, e.mul(e.param(2), e.div(e.sub(D, e.in(next++)), e.param(4))));
  }
  if (noise) out = e.add(out, e.mul(e.mul(e.mul(e.in(next++), e.param(7)), e.param(8)), e.param(9)));
  return { inputs: next, out };
}

const sde3m = ([0, 1, 2] as const).map((order) =>
  [false, true].map((n) => {
    const { inputs, out } = sde3mExpr(order, n);
    return new Kernel({ inputs, params: 10, outputs: [out] });
  }),
);

export function dpmpp3mSdeStep(
  out: Float32Array,
  x: Float32Array,
  den: Float32Array,
  xScale: number,
  dScale: number,
  history: { phi2: number; phi3: number; d1: Float32Array; r0: number; d2?: Float32Array; r1?: number; rSum?: number } | undefined,
  noise: SdeNoiseTerm | undefined,
): Float32Array {
  const ins = [x, den];
  const order = history === undefined ? 0 : history.d2 === undefined ? 1 : 2;
  if (history !== undefined) {
    ins.push(history.d1);
    if (history.d2 !== undefined) ins.push(history.d2);
  }
  if (noise !== undefined) ins.push(noise.noise);
  sde3m[order]![noise === undefined ? 0 : 1]!.run([out], ins, [
    xScale,
    dScale,
    history?.phi2 ?? 0,
    history?.phi3 ?? 0,
    history?.r0 ?? 1,
    history?.r1 ?? 1,
    history?.rSum ?? 1,
    noise?.sigmaNext ?? 0,
    noise?.root ?? 0,
    fround(noise?.sNoise ?? 0),
  ]);
  return out;
}

/**
 * LMS: d = (x − D)/σ is stored for later steps, and x + Σ c_j·d_j (newest first, the sum starting
 * from Python's 0). Operands: x, D, then the older d's newest first; outputs: new x, d.
 */
const lms = [1, 2, 3, 4].map((order) => {
  const d = toD(X, D, e.param(0));
  let sum = e.add(e.param(1), e.mul(e.param(2), d));
  for (let j = 1; j < order; j++) sum = e.add(sum, e.mul(e.param(2 + j), e.in(1 + j)));
  return new Kernel({ inputs: 1 + order, params: 6, outputs: [e.add(X, sum), d] });
});

export function lmsStep(
  out: Float32Array,
  dOut: Float32Array,
  x: Float32Array,
  den: Float32Array,
  older: readonly Float32Array[],
  sigma: number,
  coefficients: readonly number[],
): void {
  const order = coefficients.length;
  const params = [sigma, 0, 0, 0, 0, 0];
  for (let j = 0; j < order; j++) params[2 + j] = coefficients[j]!;
  lms[order - 1]!.run([out, dOut], [x, den, ...older.slice(0, order - 1)], params);
}

/*
 * DPM-Solver (DPM fast / adaptive). eps = (x − D)/σ at the step's start is not stored: each kernel that
 * reads it computes it again from x and the start's answer D, which takes as many operands as reading a
 * stored eps, spares the pass that made it one array written, and gives the same bits (the same float32
 * operations on the same values). Stage points are x − c·eps and the combined updates
 * (x − a·eps) − b·(eps₂ − eps); eps within one kernel is computed once per value and shared.
 */

/** An ancestral term n·c added to the last output of a DPM-Solver kernel. */
export interface ScaledNoise {
  noise: Float32Array;
  scale: number;
}

/** The step's start: x, the model's answer D there and σ, from which the kernels compute eps = (x − D)/σ. */
export interface DpmStart {
  x: Float32Array;
  den: Float32Array;
  sigma: number;
}

/** last + n·c, the rounding of DPM fast's separate x + su·s_noise·noise pass on the stored result. */
const plusNoise = (last: Expr, noise: Expr, scale: Expr): Expr => e.add(last, e.mul(noise, scale));

/** From (x, D[, n]): x − c_j·eps per coefficient [, the last + n·c]. Params: σ, c_0…[, c]. */
const dpmStagesKernels = new Map<string, Kernel>();

export function dpmEpsStages(outs: readonly Float32Array[], start: DpmStart, cs: readonly number[], noise?: ScaledNoise): void {
  const key = `${cs.length}/${noise !== undefined}`;
  let kernel = dpmStagesKernels.get(key);
  if (kernel === undefined) {
    const eps = toD(X, D, e.param(0));
    const outputs = cs.map((_, j) => e.sub(X, e.mul(e.param(1 + j), eps)));
    if (noise !== undefined) outputs.push(plusNoise(outputs.pop()!, e.in(2), e.param(1 + cs.length)));
    kernel = new Kernel({ inputs: noise === undefined ? 2 : 3, params: 1 + cs.length + (noise === undefined ? 0 : 1), outputs });
    dpmStagesKernels.set(key, kernel);
  }
  const { x, den, sigma } = start;
  if (noise === undefined) kernel.run(outs, [x, den], [sigma, ...cs]);
  else kernel.run(outs, [x, den, noise.noise], [sigma, ...cs, noise.scale]);
}

/** (x − a·eps) − b·(eps_u − eps): the DPM-Solver combination. */
const dpmCombine = (x: Expr, eps: Expr, a: Expr, b: Expr, epsU: Expr): Expr => e.sub(e.sub(x, e.mul(a, eps)), e.mul(b, e.sub(epsU, eps)));

/**
 * eps_u = (u − D_u)/σ_u, eps = (x − D_x)/σ_x and (x − a·eps) − b·(eps_u − eps), from operands u, D_u, x, D_x
 * and params σ_u, σ_x, a, b at `p`.
 */
function dpmCombineExprs(pairCount: number, p: (k: number) => Expr): Expr[] {
  const epsU = toD(X, D, p(0));
  const xIn = e.in(2);
  const eps = toD(xIn, e.in(3), p(1));
  return Array.from({ length: pairCount }, (_, j) => dpmCombine(xIn, eps, p(2 + 2 * j), p(3 + 2 * j), epsU));
}

/**
 * From (u, D_u, x, D_x[, n]): (x − a_j·eps) − b_j·(eps_u − eps) per pair [, the last + n·c]. Params: σ_u, σ_x,
 * a_0, b_0, a_1, b_1…[, c]
 */
const dpmCombinesKernels = new Map<string, Kernel>();

export function dpmEpsCombines(
  outs: readonly Float32Array[],
  u: Float32Array,
  denU: Float32Array,
  start: DpmStart,
  sigmaU: number,
  pairs: ReadonlyArray<readonly [a: number, b: number]>,
  noise?: ScaledNoise,
): void {
  const key = `${pairs.length}/${noise !== undefined}`;
  let kernel = dpmCombinesKernels.get(key);
  if (kernel === undefined) {
    const outputs = dpmCombineExprs(pairs.length, e.param);
    if (noise !== undefined) outputs.push(plusNoise(outputs.pop()!, e.in(4), e.param(2 + 2 * pairs.length)));
    kernel = new Kernel({ inputs: noise === undefined ? 4 : 5, params: 2 + 2 * pairs.length + (noise === undefined ? 0 : 1), outputs });
    dpmCombinesKernels.set(key, kernel);
  }
  const { x, den, sigma } = start;
  if (noise === undefined) kernel.run(outs, [u, denU, x, den], [sigmaU, sigma, ...pairs.flat()]);
  else kernel.run(outs, [u, denU, x, den, noise.noise], [sigmaU, sigma, ...pairs.flat(), noise.scale]);
}

/**
 * DDIM: pred_x0 = (x − sqrt(1 − ᾱ)·eps)/sqrt(ᾱ), then sqrt(ᾱ_prev)·pred_x0 + dirScale·dir + σ_t·n.
 * Operands: x, eps, dir (eps itself, or the unconditional eps for CFG++), n.
 */
const ddimExpr = (dir: Expr, noise: Expr): Expr =>
  e.add(
    e.add(e.mul(e.param(2), e.div(e.sub(X, e.mul(e.param(0), e.in(1))), e.param(1))), e.mul(e.param(3), dir)),
    e.mul(e.param(4), noise),
  );
const ddim = new Kernel({ inputs: 4, params: 5, outputs: [ddimExpr(e.in(2), e.in(3))] });
/** Plain DDIM's direction is eps itself: read once instead of twice. */
const ddimOwnDirection = new Kernel({ inputs: 3, params: 5, outputs: [ddimExpr(e.in(1), e.in(2))] });

export function ddimStep(
  out: Float32Array,
  x: Float32Array,
  eps: Float32Array,
  dir: Float32Array,
  noise: Float32Array,
  sqrtOneMinusA: number,
  sqrtA: number,
  sqrtAPrev: number,
  dirScale: number,
  sigma: number,
): Float32Array {
  const params = [sqrtOneMinusA, sqrtA, sqrtAPrev, dirScale, sigma];
  if (dir === eps) ddimOwnDirection.run([out], [x, eps, noise], params);
  else ddim.run([out], [x, eps, dir, noise], params);
  return out;
}

/**
 * PLMS: eps' from the current and up to three older eps (the Adams–Bashforth weights, or the
 * pseudo improved Euler mean on the first step), then sqrt(ᾱ_prev)·pred_x0(eps') + sqrt(1 − ᾱ_prev)·eps'.
 * Params: s1m, sqrtA, sqrtAPrev, dirScale, then the weights and divisor.
 */
function plmsExpr(history: 0 | 1 | 2 | 3 | "plain"): { inputs: number; params: number; out: Expr } {
  const p = (k: number): Expr => e.param(4 + k);
  const eps = e.in(1);
  let ePrime: Expr;
  let inputs = 2;
  let params = 4;
  switch (history) {
    case "plain":
      ePrime = eps;
      break;
    case 0:
      // (e + e_next)/2 as a multiplication by 0.5: the same bits (see heun), a cheaper operation.
      ePrime = e.mul(e.add(eps, e.in(2)), p(0));
      inputs = 3;
      params = 5;
      break;
    case 1:
      ePrime = e.div(e.sub(e.mul(p(0), eps), e.in(2)), p(1));
      inputs = 3;
      params = 6;
      break;
    case 2:
      ePrime = e.div(e.add(e.sub(e.mul(p(0), eps), e.mul(p(1), e.in(2))), e.mul(p(2), e.in(3))), p(3));
      inputs = 4;
      params = 8;
      break;
    case 3:
      ePrime = e.div(e.sub(e.add(e.sub(e.mul(p(0), eps), e.mul(p(1), e.in(2))), e.mul(p(2), e.in(3))), e.mul(p(3), e.in(4))), p(4));
      inputs = 5;
      params = 9;
      break;
  }
  const predX0 = e.div(e.sub(X, e.mul(e.param(0), ePrime)), e.param(1));
  return { inputs, params, out: e.add(e.mul(e.param(2), predX0), e.mul(e.param(3), ePrime)) };
}

const plmsKernels = new Map<string, Kernel>();
const PLMS_WEIGHTS: Record<string, readonly number[]> = { "0": [0.5], "1": [3, 2], "2": [23, 16, 5, 12], "3": [55, 59, 37, 9, 24] };

/** `older` newest first (e₁, e₂, e₃); with `eNext` (first step) the mean (e + e_next)/2 is used. */
export function plmsStep(
  out: Float32Array,
  x: Float32Array,
  eps: Float32Array,
  older: readonly Float32Array[] | "plain",
  eNext: Float32Array | undefined,
  coefficients: { s1m: number; sqrtA: number; sqrtAPrev: number; dirScale: number },
): Float32Array {
  const history = older === "plain" ? "plain" : eNext !== undefined ? 0 : (older.length as 1 | 2 | 3);
  const key = String(history);
  let kernel = plmsKernels.get(key);
  if (kernel === undefined) {
    const { inputs, params, out: expr } = plmsExpr(history);
    kernel = new Kernel({ inputs, params, outputs: [expr] });
    plmsKernels.set(key, kernel);
  }
  const ins = [x, eps, ...(eNext !== undefined ? [eNext] : older === "plain" ? [] : older)];
  const params = [
    coefficients.s1m,
    coefficients.sqrtA,
    coefficients.sqrtAPrev,
    coefficients.dirScale,
    ...(history === "plain" ? [] : PLMS_WEIGHTS[key]!),
  ];
  kernel.run([out], ins, params);
  return out;
}

/** LCM: x_0 = c_out·(x − σ·eps) + c_skip·x, then + σ_next·n when there is a next step. */
const lcmExpr = e.add(e.mul(e.param(1), e.add(X, e.mul(e.in(1), e.param(0)))), e.mul(e.param(2), X));
const lcmKernel = new Kernel({ inputs: 2, params: 3, outputs: [lcmExpr] });
const lcmNoiseKernel = new Kernel({ inputs: 3, params: 4, outputs: [e.add(lcmExpr, e.mul(e.param(3), e.in(2)))] });

export function lcmStep(
  out: Float32Array,
  x: Float32Array,
  eps: Float32Array,
  negSigma: number,
  cOut: number,
  cSkip: number,
  noise?: { noise: Float32Array; sigmaNext: number },
): Float32Array {
  if (noise === undefined) lcmKernel.run([out], [x, eps], [negSigma, cOut, cSkip]);
  else lcmNoiseKernel.run([out], [x, eps, noise.noise], [negSigma, cOut, cSkip, noise.sigmaNext]);
  return out;
}

/**
 * UniPC (B(h) variants). In A1111's terms the predictor is x_t = x_base − scale·Σ ρ_p,j·D1_j with
 * x_base = ratio·x − baseScale·m₀ and D1_j = (m_j − m₀)/r_j, and the corrector, with the data prediction
 * m_t = (x_t − σ_t·eps)/α_t, is x_base − scale·(Σ ρ_c,j·D1_j + ρ_c,last·(m_t − m₀)). Both are linear in
 * the arrays, and they share x_base, so the kernels compute
 * - the predictor as one weighted sum, ratio·x + w₀·m₀ + w₁·m₁ + …;
 * - the corrector as a correction of its own predictor, x_t + c₀·m₀ + c₁·m₁ + … + c_t·m_t, so that it
 *   needs no x (ratio·x cancels) and an update reads x_t, which the model was just asked about;
 * with the weights worked out once per step in float64 (`uniPcWeights`) and rounded once. The corrected x
 * is only ever the next predictor's input, so the fused kernel keeps it in registers: an order-3 update
 * reads x_t, m₀, m₁, m₂ and eps and writes m_t and the next x_t, 7 streams of memory where the textbook
 * form needs 8 (plus x), and does 18 float32 operations per value with 1 division where it did 38 with 5.
 * No float32 order can be A1111's: it sums Σ ρ_j·D1_j with an einsum, whose BLAS (or TF32 matmul on CUDA)
 * reduction order is its own. The data prediction keeps its division, as the tensor code's.
 */
export interface UniPcTerms {
  ratio: number;
  baseScale: number;
  scale: number;
  /** r_j of each older model output (newest first), and the predictor/corrector weights. */
  rks: readonly number[];
  rhosP: readonly number[];
  rhosC: readonly number[];
}

/**
 * The weights of m₀, m₁…m_k in the predictor or the corrector (float64, unrounded): m_j (j ≥ 1) weighs
 * −scale·ρ_j/r_j, m₀ −baseScale plus all of those back, and the corrector's m_t −scale·ρ_c,last (which
 * m₀ gets back too).
 */
function uniPcWeights(t: UniPcTerms, mode: "predict" | "correct"): { m: number[]; modelT: number } {
  const rhos = mode === "predict" ? t.rhosP : t.rhosC;
  const older = t.rks.map((r, j) => (t.scale * (rhos[j] ?? 0)) / r);
  const last = mode === "correct" ? t.scale * (rhos[rhos.length - 1] ?? 0) : 0;
  const m0 = -t.baseScale + older.reduce((sum, w) => sum + w, 0) + last;
  return { m: [m0, ...older.map((w) => -w)], modelT: -last };
}

/** acc + Σ w_j·m_j, added left to right, w_j at `p(j)`. */
function weightedSum(acc: Expr, ms: readonly Expr[], p: (j: number) => Expr): Expr {
  return ms.reduce<Expr>((sum, m, j) => e.add(sum, e.mul(p(j), m)), acc);
}

/** The predictor over x and m₀…m_k, its params from `at`: ratio, w₀…w_k. */
function uniPcPredictorExpr(x: Expr, ms: readonly Expr[], at: number): Expr {
  return weightedSum(e.mul(e.param(at), x), ms, (j) => e.param(at + 1 + j));
}

const uniPcKernels = new Map<string, Kernel>();

/**
 * Kernels by older count k and mode: "predict" (operands x, m₀…m_k), "correct" (operands x_t, m₀…m_k,
 * eps; writes m_t and the corrected x), or the next predictor's older count (same operands; writes m_t
 * and the next x_t, the corrected x kept in registers; the next step's older m's are this step's m₀,
 * m₁…, already operands). Params: σ_t, α_t, c₀…c_k, c_t, then the next predictor's.
 */
function uniPcKernel(k: number, mode: "predict" | "correct" | number): Kernel {
  const key = `${k}/${mode}`;
  let kernel = uniPcKernels.get(key);
  if (kernel !== undefined) return kernel;
  const ms = Array.from({ length: k + 1 }, (_, j) => e.in(1 + j));
  if (mode === "predict") {
    kernel = new Kernel({ inputs: 2 + k, params: 2 + k, outputs: [uniPcPredictorExpr(e.in(0), ms, 0)] });
  } else {
    const xt = e.in(0);
    const modelT = e.div(e.sub(xt, e.mul(e.param(0), e.in(2 + k))), e.param(1));
    const corrected = e.add(
      weightedSum(xt, ms, (j) => e.param(2 + j)),
      e.mul(e.param(3 + k), modelT),
    );
    const params = 4 + k;
    kernel =
      mode === "correct"
        ? new Kernel({ inputs: 3 + k, params, outputs: [modelT, corrected] })
        : new Kernel({
            inputs: 3 + k,
            params: params + 2 + mode,
            outputs: [modelT, uniPcPredictorExpr(corrected, [modelT, ...ms.slice(0, mode)], params)],
          });
  }
  uniPcKernels.set(key, kernel);
  return kernel;
}

function uniPcPredictParams(t: UniPcTerms): number[] {
  return [t.ratio, ...uniPcWeights(t, "predict").m.map((w) => fround(w))];
}

/** The corrector as a correction of its own predictor: c_j = corrector weight − predictor weight. */
function uniPcCorrectParams(t: UniPcTerms, sigmaT: number, alphaT: number): number[] {
  const predictor = uniPcWeights(t, "predict").m;
  const { m, modelT } = uniPcWeights(t, "correct");
  return [sigmaT, alphaT, ...m.map((w, j) => fround(w - predictor[j]!)), fround(modelT)];
}

/** The predictor x_t (`older`: m₁…m_k, newest first). */
export function uniPcPredict(
  out: Float32Array,
  x: Float32Array,
  m0: Float32Array,
  older: readonly Float32Array[],
  t: UniPcTerms,
): Float32Array {
  uniPcKernel(older.length, "predict").run([out], [x, m0, ...older], uniPcPredictParams(t));
  return out;
}

/**
 * The corrector at the update's predictor `xt` (uniPcPredict with the same terms and m's): writes the data
 * prediction m_t into `modelT` and the corrected x into `out`. The sampler always runs it fused with the
 * next predictor (uniPcCorrectThenPredict); this unfused form is what that fusion is tested against.
 */
export function uniPcCorrect(
  modelT: Float32Array,
  out: Float32Array,
  xt: Float32Array,
  m0: Float32Array,
  older: readonly Float32Array[],
  eps: Float32Array,
  t: UniPcTerms,
  sigmaT: number,
  alphaT: number,
): void {
  uniPcKernel(older.length, "correct").run([modelT, out], [xt, m0, ...older, eps], uniPcCorrectParams(t, sigmaT, alphaT));
}

/**
 * One update's corrector fused with the next update's predictor, prepared from the times alone: its kernel
 * and params are worked out before the run's first model call, not between two calls (the bookkeeping
 * took 55 µs there on the test VM, a quarter of the kernel).
 */
export interface UniPcFusedStep {
  readonly olderCount: number;
  readonly kernel: Kernel;
  readonly params: readonly number[];
}

/**
 * The next step's older m's must be [m₀, …older] from the front (newest first), which is how the history
 * moves on by one step: the next step may use at most one more than this one.
 */
export function prepareUniPcFusedStep(t: UniPcTerms, sigmaT: number, alphaT: number, next: UniPcTerms): UniPcFusedStep {
  const olderCount = t.rks.length;
  const nextCount = next.rks.length;
  if (nextCount > olderCount + 1) throw new RangeError("the next UniPC step uses older model outputs than this one has");
  return {
    olderCount,
    kernel: uniPcKernel(olderCount, nextCount),
    params: [...uniPcCorrectParams(t, sigmaT, alphaT), ...uniPcPredictParams(next)],
  };
}

/**
 * uniPcCorrect, then the next step's predictor on the corrected x (`uniPcPredict(nextXt, corrected, modelT,
 * nextOlder, next)`), in one pass that writes m_t and the next x_t only.
 */
export function uniPcCorrectThenPredict(
  modelT: Float32Array,
  nextXt: Float32Array,
  xt: Float32Array,
  m0: Float32Array,
  older: readonly Float32Array[],
  eps: Float32Array,
  step: UniPcFusedStep,
): void {
  if (older.length !== step.olderCount)
    throw new RangeError(`this UniPC step reads ${step.olderCount} older model outputs, not ${older.length}`);
  step.kernel.run([modelT, nextXt], [xt, m0, ...older, eps], step.params);
}

/** The data prediction (x − σ·eps)/α alone. */
const dataPrediction = new Kernel({ inputs: 2, params: 2, outputs: [e.div(e.sub(X, e.mul(e.param(0), e.in(1))), e.param(1))] });

export function uniPcDataPrediction(out: Float32Array, x: Float32Array, eps: Float32Array, sigma: number, alpha: number): Float32Array {
  dataPrediction.run([out], [x, eps], [sigma, alpha]);
  return out;
}

/**
 * DPM adaptive's error ratio r = (low − high)/δ with δ = max(atol, rtol·max(|low|, |x_prev|)), one
 * float32 rounding per operation as the scalar form max(atol, f32(rtol·max(…))), f32(f32(low − high)/δ).
 * Both maxima are pmax, with the operand that may be NaN first: torch.maximum's NaN where it decides r
 * (|x_prev| NaN; |low| NaN makes the numerator NaN anyway), no signed zeros to tell apart (magnitudes,
 * rtol and atol positive), and a third of the kernel's time where NaN-exact max took it.
 */
const adaptiveErrorExpr = (low: Expr, high: Expr, xPrev: Expr, atol: Expr, rtol: Expr): Expr =>
  e.div(e.sub(low, high), e.pmax(e.mul(rtol, e.pmax(e.abs(xPrev), e.abs(low))), atol));

/**
 * DPM adaptive's attempts, in as few passes over cold latents as their model calls allow without more
 * divisions (each a few cycles per vector, while a latent read from memory costs about as much as two of them
 * here). Where a pass can make a point from operands it reads anyway with a multiplication and a subtraction,
 * it computes it again instead of reading it back: the same float32 operations on the same values give the
 * same bits as where it was first made. Each pass writes over the answer it has just read, when it is the
 * run's own and no later pass reads it (latent-pool.ts resultInPlaceOf), so that those writes go to lines
 * already in the cache. eps = (x − D)/σ.
 *
 * Order 3 (`low` DPM-Solver-2 with r₁ = 1/3, `high` DPM-Solver-3), 16 latents read or written, not 17:
 *   stage 1: u₁ = x − c₁·eps (dpmEpsStages)
 *   stage 2: low = (x − a_l·eps) − b_l·(eps₁ − eps) and u₂ = (x − c₂·eps) − c₃·(eps₁ − eps),
 *            eps₁ = (u₁ − D₁)/σ₁ with u₁ made again from x and eps, not read
 *   last:    high = (x − a_h·eps) − b_h·(eps₂ − eps), eps₂ = (u₂ − D₂)/σ₂
 * Order 2 (`low` DPM-Solver-1, `high` DPM-Solver-2 with r₁ = 1/2), 10 latents, not 12:
 *   stage 1: u₁ = x − c₁·eps
 *   last:    low = x − a_l·eps, high = (x − a_h·eps) − b_h·(eps₁ − eps), u₁ made again
 * The last pass writes high + n·c (k-diffusion's separate x_high + su·s_noise·noise pass, same roundings;
 * made whether or not the attempt is accepted, so that an accepted one needs no pass of its own) and returns
 * Σ r² of the error of `high` itself against `low` (adaptiveErrorExpr) over the latent, in float64 in the
 * kernels' order (KernelSpec.sumOfSquares). k-diffusion takes torch's norm, whose CPU reduction has a blocked
 * order of its own, so no order is A1111's; this one is fixed.
 */
export interface DpmAdaptiveCoefficients {
  /** σ at the start, at u₁ and (order 3) at u₂. */
  sigma: number;
  sigma1: number;
  sigma2: number;
  /** u₁ = x − c₁·eps. */
  c1: number;
  /** Order 3: (c₂, c₃) of u₂. */
  stage2: readonly [number, number];
  /** (a_l, b_l) of low; order 2 reads a_l only. */
  low: readonly [number, number];
  /** (a_h, b_h) of high. */
  high: readonly [number, number];
}

/** Order 3, stage 2: x, D, D₁ in; low and u₂ out. Params σ, c₁, σ₁, a_l, b_l, c₂, c₃. */
const adaptive3Stage2Kernel = (() => {
  const p = e.param;
  const eps = toD(X, D, p(0));
  const eps1 = toD(e.sub(X, e.mul(p(1), eps)), e.in(2), p(2));
  return new Kernel({ inputs: 3, params: 7, outputs: [dpmCombine(X, eps, p(3), p(4), eps1), dpmCombine(X, eps, p(5), p(6), eps1)] });
})();

/** Order 3, last: u₂, D₂, x, D, low, x_prev, n in; high + n·c out, Σ r² returned. Params σ₂, σ, a_h, b_h, atol, rtol, c. */
const adaptive3LastKernel = (() => {
  const [high] = dpmCombineExprs(1, e.param);
  return new Kernel({
    inputs: 7,
    params: 7,
    outputs: [plusNoise(high!, e.in(6), e.param(6))],
    sumOfSquares: adaptiveErrorExpr(e.in(4), high!, e.in(5), e.param(4), e.param(5)),
  });
})();

/** Order 2, last: x, D, D₁, x_prev, n in; high + n·c and low out, Σ r² returned. Params σ, c₁, σ₁, a_l, a_h, b_h, atol, rtol, c. */
const adaptive2LastKernel = (() => {
  const p = e.param;
  const eps = toD(X, D, p(0));
  const eps1 = toD(e.sub(X, e.mul(p(1), eps)), e.in(2), p(2));
  const low = e.sub(X, e.mul(p(3), eps));
  const high = dpmCombine(X, eps, p(4), p(5), eps1);
  return new Kernel({
    inputs: 5,
    params: 9,
    outputs: [plusNoise(high, e.in(4), p(8)), low],
    sumOfSquares: adaptiveErrorExpr(low, high, e.in(3), p(6), p(7)),
  });
})();

/** Order 3, stage 2: low and u₂ from the start and the answer at u₁; low may be written over den1. */
export function dpmAdaptive3Stage2(
  low: Float32Array,
  u2: Float32Array,
  start: DpmStart,
  den1: Float32Array,
  k: DpmAdaptiveCoefficients,
): void {
  adaptive3Stage2Kernel.run(
    [low, u2],
    [start.x, start.den, den1],
    [start.sigma, k.c1, k.sigma1, k.low[0], k.low[1], k.stage2[0], k.stage2[1]],
  );
}

/** Order 3, last: writes highPlusNoise (which may be den2) and returns Σ r². */
export function dpmAdaptive3Last(
  highPlusNoise: Float32Array,
  u2: Float32Array,
  den2: Float32Array,
  start: DpmStart,
  low: Float32Array,
  k: DpmAdaptiveCoefficients,
  xPrev: Float32Array,
  atol: number,
  rtol: number,
  { noise, scale }: ScaledNoise,
): number {
  return adaptive3LastKernel.runSumOfSquares(
    [highPlusNoise],
    [u2, den2, start.x, start.den, low, xPrev, noise],
    [k.sigma2, start.sigma, k.high[0], k.high[1], atol, rtol, scale],
  );
}

/** Order 2, last: writes highPlusNoise (which may be den1) and low (which may be start.den), returns Σ r². */
export function dpmAdaptive2Last(
  highPlusNoise: Float32Array,
  low: Float32Array,
  start: DpmStart,
  den1: Float32Array,
  k: DpmAdaptiveCoefficients,
  xPrev: Float32Array,
  atol: number,
  rtol: number,
  { noise, scale }: ScaledNoise,
): number {
  return adaptive2LastKernel.runSumOfSquares(
    [highPlusNoise, low],
    [start.x, start.den, den1, xPrev, noise],
    [start.sigma, k.c1, k.sigma1, k.low[0], k.high[0], k.high[1], atol, rtol, scale],
  );
}
