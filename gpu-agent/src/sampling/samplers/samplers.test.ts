import { createHash } from "node:crypto";
import { test } from "node:test";
import assert from "node:assert/strict";
import { sd1Schedule } from "../sigmas.js";
import { karrasSigmas } from "../schedules.js";
import {
  sampleDpm2,
  sampleDpm2Ancestral,
  sampleDpmpp2m,
  sampleDpmpp2mSde,
  sampleDpmpp3mSde,
  sampleDpmppSde,
  sampleDpmppSecondOrderAncestral,
  sampleEuler,
  sampleEulerAncestral,
  sampleHeun,
  sampleLms,
  linearMultistepCoefficient,
} from "./kdiffusion.js";
import { sampleRestart, restartStepList } from "./restart.js";
import { sampleDpmAdaptive, sampleDpmFast } from "./dpm-solver.js";
import { ddimTimesteps, sampleDdim, sampleDdimCfgpp, samplePlms, sampleUniPc } from "./timesteps.js";
import { LatentScope, inLatentScope } from "./latent-pool.js";
import { drive, exactFlow, gaussianModel } from "./test-harness.js";
import type { ModelRequest, SamplerOptions, SamplerRun } from "./types.js";

const S = 0.8; // data standard deviation
const START = [1.5, -0.7, 0.2, 3.1];

/** x at σmax for the test: a fixed "noise" vector scaled by σ₀. */
function startLatent(sigma0: number): Float32Array {
  return Float32Array.from(START, (v) => v * sigma0);
}

function noMoreNoise(): Float32Array {
  throw new Error("a deterministic sampler drew noise");
}

function zeros(length: number): () => Float32Array {
  return () => new Float32Array(length);
}

/** Exact flow down to σ_end; when `denoiseLast` the final step to σ = 0 is the one-step denoise x·s²/(s²+σ²). */
function expectedFinal(sigma0: number, sigmaEnd: number, denoiseLast = false): number[] {
  const scale = denoiseLast ? (S * S) / (S * S + sigmaEnd * sigmaEnd) : 1;
  return START.map((v) => exactFlow(v * sigma0, sigma0, sigmaEnd, S) * scale);
}

function assertRelative(actual: ArrayLike<number>, expected: number[], tol: number, what: string): void {
  for (let k = 0; k < expected.length; k++) {
    const e = expected[k]!;
    const a = actual[k]!;
    assert.ok(Math.abs(a - e) <= tol * Math.max(Math.abs(e), 1e-3), `${what}[${k}]: ${a} vs ${e}`);
  }
}

test("Euler trajectory matches the hand-derived recurrence x ← x·(1 + σᵢ(σᵢ₊₁ − σᵢ)/(s² + σᵢ²)) step by step", () => {
  const sigmas = sd1Schedule().getSigmas(10);
  const x = startLatent(sigmas[0]!);
  // s_churn = 0: A1111 draws a churn noise every step and reads none, so no draw is made (see the churn test).
  const run = sampleEuler(x, { sigmas, noise: noMoreNoise });
  const model = gaussianModel(S);
  let expected = Array.from(x);
  let r = run.next();
  let step = 0;
  while (!r.done) {
    const req = r.value;
    assert.equal(req.kind, "denoise");
    assert.equal(req.step, step);
    assert.equal(req.call, step);
    assert.equal(req.sigma, sigmas[step]);
    assertRelative(req.x, expected, 2e-6, `x before step ${step}`);
    const sigma = sigmas[step]!;
    const next = sigmas[step + 1]!;
    expected = expected.map((v) => v * (1 + (sigma * (next - sigma)) / (S * S + sigma * sigma)));
    r = run.next(model(req));
    step++;
  }
  assert.equal(step, 10);
  assertRelative(r.value, expected, 5e-6, "final");
});

test("Euler, Heun and DPM2 churn: every step draws up to the last one with γ > 0, whose draw is the generator's at its step; none after", () => {
  const sigmas = sd1Schedule().getSigmas(6);
  // γ > 0 at step 2 alone: the s_tmin…s_tmax window holds σ₂ only.
  const window = { sChurn: 1, sTmin: sigmas[2]!, sTmax: sigmas[2]! };
  for (const sample of [sampleEuler, sampleHeun, sampleDpm2]) {
    const what = sample.name;
    // A1111's default, s_churn = 0: no draw is ever read, so none is made.
    assert.doesNotThrow(() => drive(sample(startLatent(sigmas[0]!), { sigmas, noise: noMoreNoise }), gaussianModel(S)), what);

    let made = 0;
    const indexed = (): Float32Array => new Float32Array(4).fill(made++);
    const { x, requests } = drive(sample(startLatent(sigmas[0]!), { sigmas, noise: indexed, ...window }), gaussianModel(S));
    // Steps 0 and 1 draw and discard, as A1111's do, so that step 2 reads the generator's third draw.
    assert.equal(made, 3, what);
    const third = drive(
      sample(startLatent(sigmas[0]!), { sigmas, noise: () => new Float32Array(4).fill(2), ...window }),
      gaussianModel(S),
    ).x;
    assert.deepEqual(x, third, `${what}: step 2 reads the third draw`);
    const none = drive(sample(startLatent(sigmas[0]!), { sigmas, noise: zeros(4), ...window }), gaussianModel(S)).x;
    assert.notDeepEqual(x, none, `${what}: the churn noise moves the result`);
    // The next step's draw is announced during a step's model calls: steps 1 and 2's, and no later one.
    const announcing = new Set(requests.filter((r) => r.upcoming?.draws === 1).map((r) => r.step));
    assert.deepEqual([...announcing], [0, 1], what);
  }
});

test("Heun trajectory matches the hand-derived two-stage update; the last step is plain Euler", () => {
  const sigmas = sd1Schedule().getSigmas(6);
  const x = startLatent(sigmas[0]!);
  const a = (sigma: number): number => sigma / (S * S + sigma * sigma); // d = a(σ)·x for this model
  let expected = Array.from(x);
  for (let i = 0; i < 6; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const dt = next - sigma;
    expected = expected.map((v) => {
      const d = a(sigma) * v;
      if (next === 0) return v + d * dt;
      const x2 = v + d * dt;
      return v + ((d + a(next) * x2) / 2) * dt;
    });
  }
  const { x: out, requests } = drive(sampleHeun(x, { sigmas, noise: zeros(4) }), gaussianModel(S));
  assertRelative(out, expected, 5e-6, "Heun");
  // 5 two-call steps + a final one-call step; calls count up, steps repeat for the second evaluation.
  assert.equal(requests.length, 11);
  assert.deepEqual(
    requests.map((r) => r.step),
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5],
  );
  assert.deepEqual(
    requests.map((r) => r.call),
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
  );
  assert.equal(requests[1]!.sigma, sigmas[1]);
});

test("DPM++ 2M trajectory matches the multistep formula evaluated in double precision", () => {
  const model = sd1Schedule();
  const sigmas = karrasSigmas(8, model.sigmaMin, model.sigmaMax);
  const x = startLatent(sigmas[0]!);
  const D = (v: number, sigma: number): number => (v * S * S) / (S * S + sigma * sigma);
  let expected = Array.from(x);
  let old: number[] | undefined;
  for (let i = 0; i < 8; i++) {
    const sigma = sigmas[i]!;
    const next = sigmas[i + 1]!;
    const den = expected.map((v) => D(v, sigma));
    if (next === 0) {
      expected = den;
    } else {
      const h = Math.log(sigma) - Math.log(next);
      let target = den;
      if (old !== undefined) {
        const r = (Math.log(sigmas[i - 1]!) - Math.log(sigma)) / h;
        target = den.map((v, k) => (1 + 1 / (2 * r)) * v - (1 / (2 * r)) * old![k]!);
      }
      expected = expected.map((v, k) => (next / sigma) * v - Math.expm1(-h) * target[k]!);
    }
    old = den;
  }
  const { x: out } = drive(sampleDpmpp2m(x, { sigmas, noise: noMoreNoise }), gaussianModel(S));
  assertRelative(out, expected, 1e-5, "DPM++ 2M");
});

test("Euler a: one step equals x + d·(σ_down − σ) + n·σ_up with the injected noise; none after the last step", () => {
  const sigmas = Float32Array.from([10, 4, 0]);
  const x = Float32Array.from([2, -1]);
  const noise = Float32Array.from([0.5, -2]);
  const draws: Float32Array[] = [];
  const run = sampleEulerAncestral(x, { sigmas, noise: () => (draws.push(noise), noise) });
  const model = gaussianModel(S);
  let r = run.next();
  const first = r.value as ModelRequest;
  r = run.next(model(first));
  const second = r.value as ModelRequest;
  const up = Math.min(4, Math.sqrt((16 * (100 - 16)) / 100));
  const down = Math.sqrt(16 - up * up);
  const expected = [2, -1].map((v, k) => {
    const d = (v - (v * S * S) / (S * S + 100)) / 10;
    return v + d * (down - 10) + noise[k]! * up;
  });
  assertRelative(second.x, expected, 1e-6, "after step 0");
  r = run.next(model(second));
  assert.ok(r.done);
  assert.equal(draws.length, 1);
});

test("eta 0 turns the ancestral samplers into deterministic solvers of the same flow", () => {
  const model = sd1Schedule();
  const sigmas = karrasSigmas(100, model.sigmaMin, model.sigmaMax);
  const x = startLatent(sigmas[0]!);
  const expected = expectedFinal(sigmas[0]!, model.sigmaMin, true);
  for (const [name, fn, tol] of [
    ["Euler a", sampleEulerAncestral, 3e-2],
    ["DPM2 a", sampleDpm2Ancestral, 2e-3],
    ["DPM++ 2S a", sampleDpmppSecondOrderAncestral, 2e-3],
  ] as const) {
    const { x: out } = drive(fn(x, { sigmas, noise: zeros(4), eta: 0 }), gaussianModel(S));
    assertRelative(out, expected, tol, name);
  }
});

const deterministic: Array<[string, (x: Float32Array, o: SamplerOptions) => SamplerRun, number]> = [
  ["Euler", sampleEuler, 3e-2],
  ["Heun", sampleHeun, 1.5e-3],
  ["DPM2", sampleDpm2, 1.5e-3],
  ["LMS", (x, o) => sampleLms(x, o), 1.5e-3],
  ["DPM++ 2M", sampleDpmpp2m, 1.5e-3],
  // DPM++ SDE asks its noise sampler even at eta 0 (the increment is then scaled by 0).
  ["DPM++ SDE (eta 0)", (x, o) => sampleDpmppSde(x, { ...o, eta: 0, noiseSampler: () => new Float32Array(x.length) }), 1.5e-3],
  ["DPM++ 2M SDE (eta 0)", (x, o) => sampleDpmpp2mSde(x, { ...o, eta: 0 }), 1.5e-3],
  ["DPM++ 2M SDE Heun (eta 0)", (x, o) => sampleDpmpp2mSde(x, { ...o, eta: 0 }, "heun"), 1.5e-3],
  ["DPM++ 3M SDE (eta 0)", (x, o) => sampleDpmpp3mSde(x, { ...o, eta: 0 }), 1e-3],
];

for (const [name, fn, tol] of deterministic) {
  test(`${name} converges to the exact flow solution for Gaussian data (100 Karras steps)`, () => {
    const model = sd1Schedule();
    const sigmas = karrasSigmas(100, model.sigmaMin, model.sigmaMax);
    const x = startLatent(sigmas[0]!);
    const { x: out } = drive(fn(x, { sigmas, noise: zeros(4), noiseSampler: noMoreNoise }), gaussianModel(S));
    // The last step σmin → 0 is a plain denoise in all of them, the rest follows the flow.
    assertRelative(out, expectedFinal(sigmas[0]!, model.sigmaMin, true), tol, name);
  });
}

test("LMS coefficients integrate the Lagrange basis exactly (they sum to the step, reproduce τ)", () => {
  const t = [10, 7, 4.5, 2.5, 1.2];
  for (let order = 1; order <= 4; order++) {
    const i = order - 1 + 0;
    const coefficients = Array.from({ length: order }, (_, j) => linearMultistepCoefficient(order, t, i, j));
    const sum = coefficients.reduce((a, b) => a + b, 0);
    assert.ok(Math.abs(sum - (t[i + 1]! - t[i]!)) < 1e-12, `order ${order} sum`);
    if (order >= 2) {
      // ∫ τ dτ = Σ_j c_j · t[i−j]
      const first = coefficients.reduce((acc, c, j) => acc + c * t[i - j]!, 0);
      assert.ok(Math.abs(first - (t[i + 1]! ** 2 - t[i]! ** 2) / 2) < 1e-10, `order ${order} first moment`);
    }
  }
});

test("SDE samplers take their noise from the injected noise sampler with (σ, σnext) pairs", () => {
  const sigmas = Float32Array.from([8, 3, 1, 0]);
  const x = startLatent(8);
  const pairs: Array<[number, number]> = [];
  const noiseSampler = (a: number, b: number): Float32Array => (pairs.push([a, b]), new Float32Array(4));
  drive(sampleDpmpp2mSde(x, { sigmas, noise: noMoreNoise, noiseSampler }), gaussianModel(S));
  assert.deepEqual(pairs, [
    [8, 3],
    [3, 1],
  ]);
  pairs.length = 0;
  const { requests } = drive(sampleDpmppSde(x, { sigmas, noise: noMoreNoise, noiseSampler }), gaussianModel(S));
  // Two noise increments per two-stage step: (σ, σ_mid) and (σ, σnext).
  assert.equal(pairs.length, 4);
  assert.ok(Math.abs(pairs[0]![1] - Math.sqrt(8 * 3)) < 1e-4, `midpoint ${pairs[0]![1]}`);
  assert.ok(Math.abs(pairs[1]![0] - 8) < 1e-5 && Math.abs(pairs[1]![1] - 3) < 1e-5);
  assert.deepEqual(
    requests.map((r) => r.step),
    [0, 0, 1, 1, 2],
  );
});

test("SDE samplers without a Brownian sampler fall back to plain noise() draws", () => {
  const sigmas = Float32Array.from([8, 3, 1, 0]);
  let draws = 0;
  drive(sampleDpmpp3mSde(startLatent(8), { sigmas, noise: () => (draws++, new Float32Array(4)) }), gaussianModel(S));
  assert.equal(draws, 2);
});

test("Restart: below 20 steps it is Heun on the given σ list; from 20 steps it inserts a restart segment", () => {
  const model = sd1Schedule();
  const short = karrasSigmas(10, model.sigmaMin, model.sigmaMax);
  assert.equal(restartStepList(short).length, 10);
  const x = startLatent(short[0]!);
  const heun = drive(sampleHeun(x, { sigmas: short, noise: zeros(4) }), gaussianModel(S)).x;
  const restart = drive(sampleRestart(x, { sigmas: short, noise: noMoreNoise }), gaussianModel(S)).x;
  assert.deepEqual(restart, heun);

  const long = karrasSigmas(20, model.sigmaMin, model.sigmaMax);
  const list = restartStepList(long);
  // 11 Karras steps + 9 restart steps (10 sigmas from ≈2 down to ≈0.1).
  assert.equal(list.length, 20);
  const jumpIndex = list.findIndex(([from], i) => i > 0 && from > list[i - 1]![1]);
  assert.ok(jumpIndex > 0, "there is a jump back up");
  assert.ok(Math.abs(list[jumpIndex]![0] - 2) < 0.5, `restart from σ≈2, got ${list[jumpIndex]![0]}`);
  assert.ok(Math.abs(list[jumpIndex - 1]![1] - 0.1) < 0.05, `restart at σ≈0.1, got ${list[jumpIndex - 1]![1]}`);
  // At the jump the sampler adds noise·sqrt(σ_from² − σ_last²) to the finished Heun step, then evaluates.
  const jumpNoise = Float32Array.from([0.25, -0.5, 1, 2]);
  let draws = 0;
  const run = sampleRestart(startLatent(long[0]!), { sigmas: long, noise: () => (draws++, jumpNoise) });
  const answer = gaussianModel(S);
  const seen: Array<{ request: ModelRequest; result: Float32Array }> = [];
  let r = run.next();
  while (!r.done) {
    const result = answer(r.value);
    seen.push({ request: r.value, result });
    r = run.next(result);
  }
  assert.equal(draws, 1);
  // Requests 2k, 2k+1 are the two Heun evaluations of step k; the jump step is `jumpIndex`.
  const before = seen[2 * (jumpIndex - 1)]!;
  const corrector = seen[2 * (jumpIndex - 1) + 1]!;
  const after = seen[2 * jumpIndex]!;
  const [sigmaA, sigmaB] = list[jumpIndex - 1]!;
  const sigmaOld = list[jumpIndex]![0];
  const dt = sigmaB - sigmaA;
  const expected = Array.from(before.request.x, (v, k) => {
    const d = (v - before.result[k]!) / sigmaA;
    const d2 = (corrector.request.x[k]! - corrector.result[k]!) / sigmaB;
    return v + ((d + d2) / 2) * dt + jumpNoise[k]! * Math.sqrt(sigmaOld * sigmaOld - sigmaB * sigmaB);
  });
  assert.equal(after.request.sigma, sigmaOld);
  assertRelative(after.request.x, expected, 1e-5, "after the restart jump");
});

test("DPM fast makes exactly n model calls and DPM adaptive converges (eta 0)", () => {
  const model = sd1Schedule();
  const x = startLatent(model.sigmaMax);
  for (const n of [6, 7, 8, 20]) {
    let draws = 0;
    const { x: out, requests } = drive(
      sampleDpmFast(x, n, { sigmaMin: model.sigmaMin, sigmaMax: model.sigmaMax, noise: () => (draws++, new Float32Array(4)), eta: 0 }),
      gaussianModel(S),
    );
    assert.equal(requests.length, n, `n=${n}`);
    // One (eta-scaled) noise draw per outer step, consumed even at eta 0.
    assert.equal(draws, Math.floor(n / 3) + 1, `draws for n=${n}`);
    if (n === 20) assertRelative(out, expectedFinal(model.sigmaMax, model.sigmaMin), 5e-3, "DPM fast");
  }
  const { x: adaptive } = drive(
    sampleDpmAdaptive(x, { sigmaMin: model.sigmaMin, sigmaMax: model.sigmaMax, noise: zeros(4), eta: 0 }),
    gaussianModel(S),
  );
  // rtol 0.05 / atol 0.0078 are loose: A1111's adaptive solver stops after a few attempts here.
  assertRelative(adaptive, expectedFinal(model.sigmaMax, model.sigmaMin), 5e-2, "DPM adaptive");
});

test("DPM fast and adaptive keep every model input's bits and take one noise draw per accepted step, rejected attempts included", () => {
  // Pinned before DPM adaptive's noise moved into the pass that makes `high`: a rejected attempt keeps its
  // draw for the next one, so draws stay one per accepted step, in order. The wavy model makes the
  // adaptive runs reject some attempts (more attempts than draws), which exercises that path.
  const model = sd1Schedule();
  const pinned: ReadonlyArray<[string, number, 0 | 2 | 3, number, number, string]> = [
    ["adaptive", 1, 3, 75, 22, "60a642a5df24c2d5"],
    ["adaptive", 1, 2, 68, 31, "b0abd7937464d030"],
    ["adaptive", 0, 3, 36, 10, "c791d64efcab534e"],
    ["fast", 1, 0, 12, 5, "1073a8a4c93be2fe"],
  ];
  for (const [name, eta, order, wantCalls, wantDraws, digest] of pinned) {
    for (const resident of [false, true]) {
      let seed = 7;
      const rnd = (): number => {
        seed = (seed * 1103515245 + 12345) >>> 0;
        return seed / 2 ** 32 - 0.5;
      };
      const x0 = Float32Array.from({ length: 1027 }, () => rnd() * 2 * model.sigmaMax);
      let draws = 0;
      const noise = (): Float32Array => (draws++, Float32Array.from({ length: 1027 }, () => rnd() * 2));
      const common = { sigmaMin: model.sigmaMin, sigmaMax: model.sigmaMax, noise, eta };
      const inner = name === "fast" ? sampleDpmFast(x0, 12, common) : sampleDpmAdaptive(x0, { ...common, order: order as 2 | 3 });
      const run = resident ? inLatentScope(inner, new LatentScope({ poison: true })) : inner;
      const hash = createHash("sha256");
      const bytes = (a: Float32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
      let calls = 0;
      let r = run.next();
      while (!r.done) {
        const q = r.value;
        calls++;
        hash.update(bytes(q.x));
        const out = q.into ?? new Float32Array(q.x.length);
        const f = 1 / (1 + q.sigma * q.sigma);
        for (let i = 0; i < out.length; i++) out[i] = q.x[i]! * f * (1 + 0.3 * Math.sin(i * 0.37 + q.call));
        r = run.next(out);
      }
      hash.update(bytes(r.value));
      const key = `${name} eta ${eta} order ${order}${resident ? " resident" : ""}`;
      assert.equal(calls, wantCalls, `${key}: model calls`);
      assert.equal(draws, wantDraws, `${key}: noise draws`);
      if (name === "adaptive") assert.ok(calls / order > draws, `${key}: some attempts are rejected`);
      assert.equal(hash.digest("hex").slice(0, 16), digest, key);
    }
  }
});

test("DDIM timesteps, call count and convergence; CFG++ asks for the unconditional eps", () => {
  assert.deepEqual(
    Array.from(ddimTimesteps(20)),
    Array.from({ length: 20 }, (_, i) => 1 + 50 * i),
  );
  const schedule = sd1Schedule();
  const ts = ddimTimesteps(100);
  const noise = Float32Array.from(START);
  let draws = 0;
  const { x: out, requests } = drive(sampleDdim(noise, { timesteps: ts, noise: () => (draws++, new Float32Array(4)) }), gaussianModel(S));
  assert.equal(requests.length, 99);
  assert.equal(draws, 99);
  assert.deepEqual(
    requests.slice(0, 2).map((r) => r.timestep),
    [991, 981],
  );
  // VP → VE: x/sqrt(ᾱ) follows the flow from σ(t=991) down to σ(t=1), where DDIM stops.
  const a = schedule.alphasCumprod;
  const sigmaOf = (t: number): number => Math.sqrt((1 - a[t]!) / a[t]!);
  const expected = START.map((v) => Math.sqrt(a[1]!) * exactFlow(v / Math.sqrt(a[991]!), sigmaOf(991), sigmaOf(1), S));
  assertRelative(out, expected, 3e-2, "DDIM");

  const cfgpp = sampleDdimCfgpp(noise, { timesteps: ddimTimesteps(5), noise: zeros(4) });
  const first = cfgpp.next().value as ModelRequest;
  assert.ok(first.kind === "eps" && first.needUncond === true && first.cfgScaleMultiplier === 1 / 12.5);
  assert.throws(() => cfgpp.next(new Float32Array(4)), /needs \{ output, uncond \}/);
});

test("PLMS: two calls in its first step, then one per step; converges like DDIM", () => {
  const schedule = sd1Schedule();
  const ts = ddimTimesteps(100);
  const { x: out, requests } = drive(samplePlms(Float32Array.from(START), { timesteps: ts, noise: noMoreNoise }), gaussianModel(S));
  assert.equal(requests.length, 100);
  assert.deepEqual(
    requests.slice(0, 3).map((r) => [r.timestep, r.step]),
    [
      [991, 0],
      [981, 0],
      [981, 1],
    ],
  );
  const a = schedule.alphasCumprod;
  const sigmaOf = (t: number): number => Math.sqrt((1 - a[t]!) / a[t]!);
  const expected = START.map((v) => Math.sqrt(a[1]!) * exactFlow(v / Math.sqrt(a[991]!), sigmaOf(991), sigmaOf(1), S));
  assertRelative(out, expected, 2e-3, "PLMS");
});

test("UniPC: N model calls for N steps at fractional timesteps; bh1, bh2 and vary_coeff converge", () => {
  const schedule = sd1Schedule();
  const a = schedule.alphasCumprod;
  const sigmaOf = (t: number): number => Math.sqrt((1 - a[t]!) / a[t]!);
  // UniPC integrates from model time 999 to model time 0 and returns the VP latent there (no final denoise).
  const expected = START.map((v) => Math.sqrt(a[0]!) * exactFlow(v / Math.sqrt(a[999]!), sigmaOf(999), sigmaOf(0), S));
  // The discrete schedule's log ᾱ is only piecewise linear in t, so every variant converges at about
  // first order here; the error must still shrink with the step count.
  const coarse = drive(sampleUniPc(Float32Array.from(START), { timesteps: ddimTimesteps(20) }), gaussianModel(S)).x;
  const fine = drive(sampleUniPc(Float32Array.from(START), { timesteps: ddimTimesteps(500) }), gaussianModel(S)).x;
  assert.ok(Math.abs(fine[0]! - expected[0]!) < Math.abs(coarse[0]! - expected[0]!) / 10, "UniPC converges");
  assertRelative(fine, expected, 5e-4, "UniPC 500 steps");
  for (const [variant, tol] of [
    ["bh1", 5e-3],
    ["bh2", 5e-3],
    ["vary_coeff", 1.5e-2],
  ] as const) {
    const { x: out, requests } = drive(sampleUniPc(Float32Array.from(START), { timesteps: ddimTimesteps(100), variant }), gaussianModel(S));
    assert.equal(requests.length, 100, variant);
    assert.ok(Math.abs(requests[0]!.timestep - 999) < 1e-3, `first t ${requests[0]!.timestep}`);
    assert.ok(
      requests.some((r) => !Number.isInteger(r.timestep)),
      "fractional timesteps",
    );
    assertRelative(out, expected, tol, `UniPC ${variant}`);
  }
  assert.throws(
    () => drive(sampleUniPc(Float32Array.from(START), { timesteps: ddimTimesteps(2) }), gaussianModel(S)),
    /needs at least 3 steps/,
  );
});
