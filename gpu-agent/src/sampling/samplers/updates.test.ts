import { test } from "node:test";
import assert from "node:assert/strict";
import { setImmediate as nextTurn } from "node:timers/promises";
import {
  ddimStep,
  dpmAdaptive2Last,
  dpmAdaptive3Last,
  dpmAdaptive3Stage2,
  dpmEpsCombines,
  dpmEpsStages,
  eulerStep,
  heunStep,
  prepareUniPcFusedStep,
  uniPcCorrect,
  uniPcCorrectThenPredict,
  uniPcPredict,
  type UniPcTerms,
} from "./updates.js";
import { allocateAhead, clearLatentPool, freshLatent } from "./latent-pool.js";
import { createHash } from "node:crypto";
import { ddimTimesteps, sampleUniPc } from "./timesteps.js";

const f32 = Math.fround;

/** Latent-sized operands (several kernel blocks) with a spread of magnitudes, signs and zeros. */
function latent(seed: number, n = 65_536 + 6): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n }, (_, i) => {
    s = (s * 1_103_515_245 + 12_345) >>> 0;
    const v = (s / 2 ** 32 - 0.5) * 10 ** ((i % 7) - 3);
    return i % 97 === 0 ? 0 : i % 101 === 0 ? -0 : v;
  });
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
  return true;
}

test("heunStep (x₂ recomputed inside) gives the bits of the unfused Euler step and correction", () => {
  const x = latent(1);
  const den = latent(2);
  const den2 = latent(3);
  for (const [sigma, next] of [
    [14.614642, 9.7],
    [1.2, 0.03],
    [0.5, 0.49],
  ] as const) {
    const s = f32(sigma);
    const s2 = f32(next);
    const dt = f32(s2 - s);
    const x2 = eulerStep(new Float32Array(x.length), x, den, s, dt);
    const want = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) {
      const d = f32(f32(x[k]! - den[k]!) / s);
      const d2 = f32(f32(x2[k]! - den2[k]!) / s2);
      want[k] = f32(x[k]! + f32(f32(f32(d + d2) / 2) * dt));
    }
    assert.ok(sameBits(heunStep(new Float32Array(x.length), x, den, den2, s, s2, dt), want), `σ ${sigma} → ${next}`);
  }
});

/**
 * DPM adaptive's Σ r² by the scalar form: r = f32(f32(low − high)/δ), δ = max(atol, f32(rtol·max(|low|, |prev|))),
 * element k into running sum k mod 4 up to the last whole vector, (S₀ + S₁) + (S₂ + S₃), then the tail.
 */
function scalarErrorSum(low: Float32Array, high: Float32Array, prev: Float32Array, atol: number, rtol: number): number {
  const ratios = new Float32Array(low.length);
  for (let k = 0; k < low.length; k++) {
    const delta = Math.max(atol, f32(rtol * Math.max(Math.abs(low[k]!), Math.abs(prev[k]!))));
    ratios[k] = f32(f32(low[k]! - high[k]!) / delta);
  }
  const whole = ratios.length & ~3;
  const partial = [0, 0, 0, 0];
  for (let k = 0; k < whole; k++) partial[k % 4] = partial[k % 4]! + ratios[k]! * ratios[k]!;
  let sum = partial[0]! + partial[1]! + (partial[2]! + partial[3]!);
  for (let k = whole; k < ratios.length; k++) sum += ratios[k]! * ratios[k]!;
  return sum;
}

test("the latent pool hands out each array once, zero-filled, prepared while the event loop is free", async () => {
  clearLatentPool();
  const n = 65_536;
  const a = freshLatent(n);
  allocateAhead(n, 2);
  await nextTurn();
  const b = freshLatent(n);
  const c = freshLatent(n);
  const d = freshLatent(n);
  const all = [a, b, c, d];
  assert.equal(new Set(all.map((v) => v.buffer)).size, 4, "distinct arrays");
  for (const v of all) {
    assert.equal(v.length, n);
    assert.ok(v.every((x) => Object.is(x, 0)));
  }
  b.fill(1);
  allocateAhead(n, 1);
  await nextTurn();
  assert.ok(
    freshLatent(n).every((x) => x === 0),
    "a spare is new, not a returned array",
  );
  // Several samplers asking in one turn (a batch) get arrays for all of them.
  allocateAhead(n, 2);
  allocateAhead(n, 3);
  await nextTurn();
  const batch = Array.from({ length: 5 }, () => freshLatent(n));
  assert.equal(new Set([...all, ...batch].map((v) => v.buffer)).size, 9);
  assert.ok(batch.every((v) => v.every((x) => x === 0)));
  clearLatentPool();
});

test("DPM-Solver kernels, with eps recomputed from the start's answer in each, give the bits of eps stored in float32 and the unfused updates", () => {
  const x = latent(7);
  const den = latent(8);
  const u = latent(9);
  const denU = latent(10);
  const n = x.length;
  const sigma = f32(3.7);
  const sigmaU = f32(2.1);
  const cs = [f32(-0.31), f32(1.7)];
  const pairs = [
    [f32(0.9), f32(-0.2)],
    [f32(-1.3), f32(0.05)],
  ] as const;
  const start = { x, den, sigma };
  const stages = cs.map(() => new Float32Array(n));
  dpmEpsStages(stages, start, cs);
  const combined = pairs.map(() => new Float32Array(n));
  dpmEpsCombines(combined, u, denU, start, sigmaU, pairs);
  const wantEps = new Float32Array(n);
  for (let k = 0; k < n; k++) wantEps[k] = f32(f32(x[k]! - den[k]!) / sigma);
  cs.forEach((c, j) => {
    const want = x.map((v, k) => f32(v - f32(c * wantEps[k]!)));
    assert.ok(sameBits(stages[j]!, want), `stage ${j}`);
  });
  pairs.forEach(([a, b], j) => {
    const want = x.map((v, k) => {
      const epsU = f32(f32(u[k]! - denU[k]!) / sigmaU);
      return f32(f32(v - f32(a * wantEps[k]!)) - f32(b * f32(epsU - wantEps[k]!)));
    });
    assert.ok(sameBits(combined[j]!, want), `combination ${j}`);
  });
});

test("DDIM reads eps once when it is also the direction, with the same bits", () => {
  const x = latent(11);
  const eps = latent(12);
  const noise = latent(13);
  const params = [f32(0.8), f32(0.6), f32(0.7), f32(0.71), f32(0.02)] as const;
  const shared = ddimStep(new Float32Array(x.length), x, eps, eps, noise, ...params);
  const separate = ddimStep(new Float32Array(x.length), x, eps, eps.slice(), noise, ...params);
  assert.ok(sameBits(shared, separate));
});

/** Made-up UniPC update terms for `k` older model outputs (seed varies the scalars). */
const uniPcTerms = (k: number, seed: number): UniPcTerms => ({
  ratio: f32(0.93 + seed / 100),
  baseScale: f32(-0.12),
  scale: f32(0.27 - seed / 50),
  rks: Array.from({ length: k }, (_, j) => f32(-0.6 - j / 3)),
  rhosP: Array.from({ length: k }, (_, j) => f32(0.4 - j / 7)),
  rhosC: [...Array.from({ length: k }, (_, j) => f32(0.2 + j / 9)), f32(0.5)],
});

/** This step's older count, then the next step's (at most one more: the history moves on by one). */
const UNIPC_HISTORIES = [
  [0, 0],
  [0, 1],
  [1, 2],
  [2, 2],
  [2, 1],
] as const;

test("UniPC's corrector fused with the next predictor gives the bits of the two kernels run apart", () => {
  const m = [latent(15), latent(16), latent(17)];
  const xt = latent(18);
  const eps = latent(19);
  const n = xt.length;
  for (const [k, kNext] of UNIPC_HISTORIES) {
    const older = m.slice(1, 1 + k);
    const now = uniPcTerms(k, 1);
    const next = uniPcTerms(kNext, 2);
    const wantModelT = new Float32Array(n);
    const corrected = new Float32Array(n);
    uniPcCorrect(wantModelT, corrected, xt, m[0]!, older, eps, now, f32(0.3), f32(0.95));
    const wantNext = uniPcPredict(new Float32Array(n), corrected, wantModelT, [m[0]!, ...older].slice(0, kNext), next);
    const got = [new Float32Array(n), new Float32Array(n)] as const;
    uniPcCorrectThenPredict(got[0], got[1], xt, m[0]!, older, eps, prepareUniPcFusedStep(now, f32(0.3), f32(0.95), next));
    assert.ok(sameBits(got[0], wantModelT) && sameBits(got[1], wantNext), `${k} → ${kNext}`);
  }
});

test("UniPC's weighted sums (the corrector from its predictor x_t) agree with the textbook D1 form to float32 rounding", () => {
  const x = latent(32);
  const m = [latent(33), latent(34), latent(35)];
  const eps = latent(36);
  const n = x.length;
  const sigmaT = f32(0.3);
  const alphaT = f32(0.95);
  /** A1111's form in float64: x_base − scale·(Σ ρ_j·(m_j − m₀)/r_j [+ ρ_last·(m_t − m₀)]). */
  const textbook = (t: UniPcTerms, xi: number, ms: number[], rhos: readonly number[], last?: number): number => {
    let sum = 0;
    t.rks.forEach((r, j) => (sum += (rhos[j]! * (ms[j + 1]! - ms[0]!)) / r));
    if (last !== undefined) sum += rhos[rhos.length - 1]! * (last - ms[0]!);
    return t.ratio * xi - t.baseScale * ms[0]! - t.scale * sum;
  };
  let worst = 0;
  for (const [k, kNext] of UNIPC_HISTORIES) {
    const older = m.slice(1, 1 + k);
    const now = uniPcTerms(k, 1);
    const next = uniPcTerms(kNext, 2);
    const predicted = uniPcPredict(new Float32Array(n), x, m[0]!, older, now);
    const got = [new Float32Array(n), new Float32Array(n), new Float32Array(n)] as const;
    uniPcCorrect(got[0], got[1], predicted, m[0]!, older, eps, now, sigmaT, alphaT);
    uniPcCorrectThenPredict(got[0], got[2], predicted, m[0]!, older, eps, prepareUniPcFusedStep(now, sigmaT, alphaT, next));
    for (let i = 0; i < n; i++) {
      const ms = [m[0]![i]!, ...older.map((a) => a[i]!)];
      // Every operand at this index has the same order of magnitude (latent()), so one scale serves.
      const size = Math.abs(x[i]!) + ms.reduce((s, v) => s + Math.abs(v), 0) + Math.abs(eps[i]!);
      const xt = textbook(now, x[i]!, ms, now.rhosP);
      const modelT = (xt - sigmaT * eps[i]!) / alphaT;
      const corrected = textbook(now, x[i]!, ms, now.rhosC, modelT);
      const following = textbook(next, corrected, [modelT, ...ms].slice(0, kNext + 1), next.rhosP);
      const pairs = [
        [predicted[i]!, xt],
        [got[0][i]!, modelT],
        [got[1][i]!, corrected],
        [got[2][i]!, following],
      ] as const;
      for (const [have, want] of pairs) worst = Math.max(worst, Math.abs(have - want) / (size || 1));
    }
  }
  // A wrong weight is off by the size of an operand; the kernels' float32 roundings stay near 2^-24 of it
  // (1.4e-7 here), the corrector's included, though it starts from the rounded x_t.
  assert.ok(worst < 1e-6, `worst error ${worst} of the operands' size`);
});

test("UniPC's every model input and result keep their bits (variants, orders, time spacings)", () => {
  // Pinned when the B(h) corrector became a correction of its own x_t (the vary_coeff pins are older: its
  // path did not change); any change to the arithmetic shows here even where convergence tests still pass.
  const pinned = new Map<string, string>([
    ["bh1 2 time_uniform", "b764b41c95dea803"],
    ["bh1 2 logSNR", "b90a9bae21c33707"],
    ["bh1 3 time_uniform", "11b93a725dbd7e48"],
    ["bh1 3 logSNR", "db77223d5f1a7628"],
    ["bh2 2 time_uniform", "44168da23fbdb889"],
    ["bh2 2 logSNR", "84be97842a5fa9a8"],
    ["bh2 3 time_uniform", "97e07fa69b1b5681"],
    ["bh2 3 logSNR", "f234db5fac8c05e9"],
    ["vary_coeff 2 time_uniform", "b0a384b8a82d8443"],
    ["vary_coeff 2 logSNR", "76359778119d87f3"],
    ["vary_coeff 3 time_uniform", "e0a8b1706ff5bcea"],
    ["vary_coeff 3 logSNR", "db1471341ce362bd"],
  ]);
  for (const variant of ["bh1", "bh2", "vary_coeff"] as const) {
    for (const order of [2, 3]) {
      for (const skipType of ["time_uniform", "logSNR"] as const) {
        let seed = 5;
        const rnd = (): number => {
          seed = (seed * 1103515245 + 12345) >>> 0;
          return seed / 2 ** 32 - 0.5;
        };
        const x0 = Float32Array.from({ length: 1027 }, () => rnd() * 2);
        const run = sampleUniPc(x0, { timesteps: ddimTimesteps(8), variant, order, lowerOrderFinal: true, skipType });
        const hash = createHash("sha256");
        const bytes = (a: Float32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
        let r = run.next();
        while (!r.done) {
          const q = r.value;
          hash.update(bytes(q.x));
          r = run.next(q.x.map((v, i) => v * 0.3 + 0.05 * Math.sin(i * 0.37 + q.call)));
        }
        hash.update(bytes(r.value));
        const key = `${variant} ${order} ${skipType}`;
        assert.equal(hash.digest("hex").slice(0, 16), pinned.get(key), key);
      }
    }
  }
});

/** k-diffusion's separate noise pass x + su·s_noise·noise on a stored result: f32(x + f32(n·c)) per value. */
function plusScaledNoise(x: Float32Array, noise: Float32Array, c: number): Float32Array {
  return x.map((v, k) => f32(v + f32(noise[k]! * c)));
}

test("DPM-Solver kernels with the ancestral noise fused in give the bits of the separate passes", () => {
  const x = latent(25);
  const den = latent(26);
  const u = latent(27);
  const denU = latent(28);
  const noise = latent(29);
  const n = x.length;
  const sigma = f32(2.9);
  const sigmaU = f32(1.6);
  const c = f32(0.37);
  const scale = f32(0.21);
  const pair = [f32(-0.8), f32(0.11)] as const;
  const start = { x, den, sigma };
  const stage = new Float32Array(n);
  dpmEpsStages([stage], start, [c]);
  const wantStage = plusScaledNoise(stage, noise, scale);
  const gotStage = new Float32Array(n);
  dpmEpsStages([gotStage], start, [c], { noise, scale });
  assert.ok(sameBits(gotStage, wantStage), "stage + noise");
  const combined = new Float32Array(n);
  dpmEpsCombines([combined], u, denU, start, sigmaU, [pair]);
  const wantCombined = plusScaledNoise(combined, noise, scale);
  const gotCombined = new Float32Array(n);
  dpmEpsCombines([gotCombined], u, denU, start, sigmaU, [pair], { noise, scale });
  assert.ok(sameBits(gotCombined, wantCombined), "combination + noise");
});

/** A DPM adaptive attempt's coefficients (arbitrary float32 values: the kernels' algebra is what is tested). */
const adaptiveCoefficients = {
  sigma: f32(2.9),
  sigma1: f32(1.6),
  sigma2: f32(1.1),
  c1: f32(0.37),
  stage2: [f32(0.52), f32(-0.09)],
  low: [f32(-0.8), f32(0.11)],
  high: [f32(-0.77), f32(0.13)],
} as const;

/**
 * An attempt by its separate passes, as the sampler made it before the last pass recomputed the stage points:
 * each stage point stored, `low` and `high` combined from them, the noise added to `high` in a pass of its own.
 */
function adaptiveBySeparatePasses(
  order: 2 | 3,
  x: Float32Array,
  den: Float32Array,
  den1: Float32Array,
  den2: Float32Array,
  noise: Float32Array,
  scale: number,
): { u2: Float32Array; low: Float32Array; high: Float32Array; next: Float32Array } {
  const k = adaptiveCoefficients;
  const n = x.length;
  const start = { x, den, sigma: k.sigma };
  const [u1, u2, low, high] = [0, 1, 2, 3].map(() => new Float32Array(n)) as [Float32Array, Float32Array, Float32Array, Float32Array];
  if (order === 2) {
    dpmEpsStages([low, u1], start, [k.low[0], k.c1]);
    dpmEpsCombines([high], u1, den1, start, k.sigma1, [k.high]);
  } else {
    dpmEpsStages([u1], start, [k.c1]);
    dpmEpsCombines([low, u2], u1, den1, start, k.sigma1, [k.low, k.stage2]);
    dpmEpsCombines([high], u2, den2, start, k.sigma2, [k.high]);
  }
  return { u2, low, high, next: plusScaledNoise(high, noise, scale) };
}

test("DPM adaptive's passes, making stage points again and writing over answers, give the bits and the error sum of the separate passes", () => {
  const x = latent(25);
  const den = latent(26);
  const den1 = latent(27);
  const den2 = latent(28);
  const noise = latent(29);
  const prev = latent(31);
  const n = x.length;
  const scale = f32(0.21);
  const k = adaptiveCoefficients;
  const start = { x, den, sigma: k.sigma };
  // The latent has a tail past its whole vectors, which the kernels sum on their own.
  assert.equal(n % 4, 2);
  /** Order 3's passes as the sampler makes them: low over D₁, then high + n·c over D₂. */
  const order3 = (
    xArg: Float32Array,
    denArg: Float32Array,
    prevArg: Float32Array,
    atol: number,
    rtol: number,
    den1Arg = den1,
  ): { low: Float32Array; u2: Float32Array; next: Float32Array; sum: number } => {
    const low = Float32Array.from(den1Arg);
    const u2 = new Float32Array(n);
    const at = { x: xArg, den: denArg, sigma: k.sigma };
    dpmAdaptive3Stage2(low, u2, at, low, k);
    const next = Float32Array.from(den2);
    const sum = dpmAdaptive3Last(next, u2, next, at, low, k, prevArg, atol, rtol, { noise, scale });
    return { low, u2, next, sum };
  };
  for (const [atol, rtol] of [
    [f32(0.0078), f32(0.05)],
    [f32(1e-6), f32(0.5)],
  ] as const) {
    const want3 = adaptiveBySeparatePasses(3, x, den, den1, den2, noise, scale);
    const got3 = order3(x, den, prev, atol, rtol);
    assert.ok(sameBits(got3.low, want3.low) && sameBits(got3.u2, want3.u2), "order 3: low and u₂");
    assert.ok(sameBits(got3.next, want3.next), "order 3: high + noise");
    assert.ok(Object.is(got3.sum, scalarErrorSum(want3.low, want3.high, prev, atol, rtol)), `order 3: error sum ${got3.sum}`);
    // In separate arrays too.
    const low = new Float32Array(n);
    const u2 = new Float32Array(n);
    dpmAdaptive3Stage2(low, u2, start, den1, k);
    const next = new Float32Array(n);
    const sum = dpmAdaptive3Last(next, u2, den2, start, low, k, prev, atol, rtol, { noise, scale });
    assert.ok(sameBits(low, want3.low) && sameBits(u2, want3.u2) && sameBits(next, want3.next), "order 3, separate arrays");
    assert.ok(Object.is(sum, got3.sum), "order 3, separate arrays: error sum");

    const want2 = adaptiveBySeparatePasses(2, x, den, den1, den2, noise, scale);
    const wantSum2 = scalarErrorSum(want2.low, want2.high, prev, atol, rtol);
    const next2 = Float32Array.from(den1);
    const low2 = Float32Array.from(den);
    const sum2 = dpmAdaptive2Last(next2, low2, { x, den: low2, sigma: k.sigma }, next2, k, prev, atol, rtol, { noise, scale });
    assert.ok(sameBits(next2, want2.next) && sameBits(low2, want2.low), "order 2: high + noise and low, over D₁ and D");
    assert.ok(Object.is(sum2, wantSum2), `order 2: error sum ${sum2} vs ${wantSum2}`);
  }
  // δ's maxima where they are not plain: magnitudes of zero (δ = atol), an infinite x_prev, and NaN in x_prev
  // (torch.maximum's NaN: the error is NaN, whatever low is) or in low.
  const atol = f32(0.0078);
  const rtol = f32(0.05);
  const edgeX = Float32Array.from(x);
  const edgeDen = Float32Array.from(den);
  const edgePrev = Float32Array.from(prev);
  const edgeDen1 = Float32Array.from(den1);
  // x = D = D₁ = 0 make eps, eps₁ and low 0 there.
  edgeX[0] = 0;
  edgeDen[0] = 0;
  edgeDen1[0] = 0;
  edgePrev[0] = 0;
  edgePrev[5] = Infinity;
  edgePrev[9] = -0;
  const edge = adaptiveBySeparatePasses(3, edgeX, edgeDen, edgeDen1, den2, noise, scale);
  assert.equal(Math.abs(edge.low[0]!), 0);
  const finite = order3(edgeX, edgeDen, edgePrev, atol, rtol, edgeDen1).sum;
  assert.ok(Object.is(finite, scalarErrorSum(edge.low, edge.high, edgePrev, atol, rtol)), `edge sum ${finite}`);
  assert.ok(Number.isFinite(finite), "an infinite x_prev makes δ infinite and r 0");
  for (const at of [3, n - 1]) {
    const nanPrev = Float32Array.from(prev);
    nanPrev[at] = NaN;
    assert.ok(Number.isNaN(order3(x, den, nanPrev, atol, rtol).sum), `NaN in x_prev at ${at}`);
    // A NaN answer at the start makes low (and high) NaN there.
    const nanDen = Float32Array.from(den);
    nanDen[at] = NaN;
    assert.ok(Number.isNaN(order3(x, nanDen, prev, atol, rtol).sum), `NaN in low at ${at}`);
  }
});
