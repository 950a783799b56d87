import { test } from "node:test";
import assert from "node:assert/strict";
import { isResident, residentArraysOut } from "../kernels.js";
import { listSamplers, prepareSampling, type PrepareSamplingInput } from "../plan.js";
import { sampleEuler, sampleHeun } from "./kdiffusion.js";
import { LatentScope, freshLatent, inLatentScope, releaseLatent, setLatentResidency } from "./latent-pool.js";
import type { ModelRequest, ModelResponse, SamplerRun } from "./types.js";
import { withPoisonedResidency } from "./test-harness.js";

const SHAPE = [4, 4, 6] as const;
const LENGTH = SHAPE[0] * SHAPE[1] * SHAPE[2];

/** Fresh noise arrays from a fixed sequence (xorshift32 → roughly normal sums). */
function noiseSource(seed: number): () => Float32Array {
  let s = seed >>> 0 || 1;
  const next = (): number => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
  return () => Float32Array.from({ length: LENGTH }, () => next() + next() + next() - 1.5);
}

/** A nonlinear stand-in model, so that every operand of every update changes the result. */
function answer(request: ModelRequest): ModelResponse {
  const scale = request.kind === "denoise" ? 1 / (1 + request.sigma * request.sigma) : 0.7 * request.inputScale;
  const out = Float32Array.from(request.x, (v, k) => v * scale + 0.05 * Math.sin(v * 3 + k));
  return request.kind === "eps" && request.needUncond === true ? { output: out, uncond: out.map((v) => v * 0.9) } : out;
}

interface Case {
  samplerName: string;
  scheduler?: string;
  steps: number;
  settings?: PrepareSamplingInput["settings"];
  brownian?: boolean;
}

/** `answer`, written into the request's `into` when it offers one (as the agent's CFG combine does). */
function answerInto(request: ModelRequest): ModelResponse {
  const response = answer(request);
  const into = request.into;
  if (into === undefined) return response;
  if (response instanceof Float32Array) return (into.set(response), into);
  into.set(response.output);
  return { output: into, uncond: response.uncond };
}

/**
 * The driver keeps nothing of a request past the resume (the rule), but checks each one's bits on the way,
 * and counts the arrays the run holds in the kernels' memory at each request.
 */
function render(c: Case): { x: Float32Array; requests: Float32Array[]; mostHeld: number } {
  const noise = noiseSource(11);
  const prepared = prepareSampling({
    samplerName: c.samplerName,
    steps: c.steps,
    noise,
    ...(c.scheduler !== undefined && { scheduler: c.scheduler }),
    ...(c.settings !== undefined && { settings: c.settings }),
    ...(c.brownian === true && { brownian: { seeds: [5], shape: [...SHAPE], source: "NV" as const } }),
  });
  const run = prepared.run(prepared.startLatent(noise()));
  const requests: Float32Array[] = [];
  const before = residentArraysOut();
  let mostHeld = 0;
  let r = run.next();
  while (!r.done) {
    requests.push(r.value.x.slice());
    mostHeld = Math.max(mostHeld, residentArraysOut() - before);
    r = run.next(answerInto(r.value));
  }
  return { x: r.value, requests, mostHeld };
}

const sameBits = (a: Float32Array, b: Float32Array): boolean =>
  a.length === b.length && a.every((v, k) => Object.is(v, b[k]) || (Number.isNaN(v) && Number.isNaN(b[k])));

const CASES: Case[] = [
  ...listSamplers().map((s) => ({ samplerName: s.name, steps: 9, brownian: s.options["brownian_noise"] === true })),
  { samplerName: "Euler", steps: 8, settings: { sChurn: 1.5 } },
  { samplerName: "Heun", steps: 6, settings: { sChurn: 2, sTmin: 0.5 } },
  { samplerName: "DPM2", scheduler: "Karras", steps: 7, settings: { sChurn: 1 } },
  { samplerName: "DPM++ 2M SDE", steps: 8, settings: { eta: 0 } },
  { samplerName: "DPM++ 3M SDE", scheduler: "Exponential", steps: 8 },
  { samplerName: "DPM++ SDE", steps: 5 },
  { samplerName: "DPM adaptive", steps: 5, settings: { eta: 0 } },
  { samplerName: "LMS", scheduler: "Karras", steps: 12 },
  { samplerName: "UniPC", steps: 10, settings: { uniPcVariant: "bh2", uniPcOrder: 2 } },
  { samplerName: "UniPC", steps: 10, settings: { uniPcVariant: "vary_coeff" } },
  { samplerName: "Restart", steps: 12 },
];

test("every sampler gives the same bits with its latents and model answers resident, slots poisoned with NaN when fresh or released, and holds no more arrays over a longer run", () => {
  for (const c of CASES) {
    const label = `${c.samplerName} ${c.scheduler ?? ""} ${JSON.stringify(c.settings ?? {})}`;
    setLatentResidency(false);
    const copied = render(c);
    const resident = withPoisonedResidency(() => render(c));
    assert.ok(copied.x.every(Number.isFinite), `${label}: a finite result to compare`);
    assert.equal(resident.requests.length, copied.requests.length, label);
    resident.requests.forEach((x, k) => assert.ok(sameBits(x, copied.requests[k]!), `${label}: request ${k}`));
    assert.ok(sameBits(resident.x, copied.x), `${label}: result`);
    assert.ok(!isResident(resident.x), `${label}: the result is copied out of the kernels' memory`);
    // A sampler that kept its answers or old latents would hold more the longer it runs: DPM adaptive's
    // calls do not grow with steps, but it makes 36 here.
    assert.ok(resident.mostHeld <= 10, `${label}: holds ${resident.mostHeld} arrays at once`);
    const longer = render({ ...c, steps: c.steps * 3 });
    if (c.samplerName !== "DPM adaptive") {
      assert.ok(longer.requests.length > resident.requests.length, `${label}: more calls over more steps`);
    }
    assert.ok(
      longer.mostHeld <= resident.mostHeld,
      `${label}: holds ${longer.mostHeld} arrays over ${longer.requests.length} calls, ${resident.mostHeld} over ${resident.requests.length}`,
    );
  }
});

test("a step writes its result over the x it replaces: one-call samplers ask at the same array from the second call on", () => {
  // The first call is at the caller's start latent, which is never written; every later x is the first
  // step's result, written over again by each step (resultInPlaceOf). A step that took a fresh array
  // instead would alternate between two released slots.
  for (const samplerName of ["Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "DDIM", "UniPC", "LCM"]) {
    const noise = noiseSource(5);
    const prepared = prepareSampling({ samplerName, steps: 6, noise });
    const run = prepared.run(prepared.startLatent(noise()));
    const xs: Float32Array[] = [];
    for (let r = run.next(); !r.done; r = run.next(answerInto(r.value))) xs.push(r.value.x);
    assert.ok(xs.length >= 4, samplerName);
    assert.ok(!isResident(xs[0]!), `${samplerName}: the start latent is the caller's`);
    assert.equal(new Set(xs.slice(1)).size, 1, `${samplerName}: ${new Set(xs.slice(1)).size} arrays after the first call`);
  }
});

test("a run's requests are resident, and a finished or abandoned run gives all its slots back", () => {
  const noise = noiseSource(3);
  const sigmas = Float32Array.from([14.6, 7, 3, 1.2, 0.4, 0]);
  const scope = new LatentScope();
  const run = inLatentScope(sampleHeun(noise(), { sigmas, noise }), scope);
  let r = run.next();
  assert.ok(!r.done && !isResident(r.value.x), "the start latent is the caller's array");
  r = run.next(answer(r.value as ModelRequest));
  assert.ok(!r.done && isResident(r.value.x), "Heun's Euler half-step lives in the kernels' memory");
  r = run.next(answer(r.value as ModelRequest));
  // The step's result (the next request) and the slot offered for its answer: the half-step and both
  // answers (the driver's own arrays here) were released once the step was done.
  assert.ok(!r.done && isResident(r.value.x));
  assert.ok(r.value.into !== undefined && isResident(r.value.into));
  assert.equal(scope.size, 2);
  run.return(new Float32Array(0));
  assert.equal(scope.size, 0, "return() closes the scope");

  const held = new LatentScope();
  const long = inLatentScope(
    (function* (): SamplerRun {
      const a = freshLatent(LENGTH);
      const b = freshLatent(LENGTH);
      a.fill(1);
      b.fill(2);
      releaseLatent(a);
      // A released slot is the next one handed out.
      const c = freshLatent(LENGTH);
      assert.equal(c.byteOffset, a.byteOffset);
      c.fill(3);
      yield { kind: "denoise", x: c, sigma: 1, timestep: 999, step: 0, call: 0 };
      return b;
    })(),
    held,
  );
  const request = long.next();
  assert.ok(!request.done && isResident((request.value as ModelRequest).x));
  assert.equal(held.size, 2);
  const done = long.next(new Float32Array(LENGTH));
  assert.ok(done.done && done.value.every((v) => v === 2) && !isResident(done.value));
  assert.equal(held.size, 0, "the scope closes when the run ends");
});

test("a model answer goes into the offered slot or an array of the driver's own; a run's own array is refused", () => {
  const noise = noiseSource(4);
  const sigmas = Float32Array.from([14.6, 7, 3, 1, 0]);
  const scope = new LatentScope();
  const run = inLatentScope(sampleEuler(noise(), { sigmas, noise }), scope);
  let r = run.next();
  assert.ok(!r.done && r.value.into !== undefined && isResident(r.value.into));
  assert.equal(scope.size, 1, "the slot for the first answer");
  // In an array of the driver's: the slot goes back.
  r = run.next(answer(r.value));
  assert.ok(!r.done);
  assert.equal(scope.size, 2, "the step's result and the next slot");
  // In the slot: the sampler releases it once the step is done with it.
  r = run.next(answerInto(r.value));
  assert.ok(!r.done);
  assert.equal(scope.size, 2);
  const request = r.value;
  assert.throws(() => run.next(request.x), /`into` or an array of the driver's own/);
  assert.equal(scope.size, 0, "the failed run gave its slots back");
});

test("outside a scope fresh latents are ordinary zero-filled arrays, and a scope has a byte budget", () => {
  const a = freshLatent(LENGTH);
  assert.ok(!isResident(a) && a.every((v) => v === 0));
  releaseLatent(a); // a no-op outside a scope
  const scope = new LatentScope({ maxBytes: LENGTH * 4 * 2 });
  const run = inLatentScope(
    (function* (): SamplerRun {
      const inside = [freshLatent(LENGTH), freshLatent(LENGTH), freshLatent(LENGTH)];
      assert.deepEqual(
        inside.map((v) => isResident(v)),
        [true, true, false],
      );
      inside[0]!.fill(1);
      yield { kind: "denoise", x: inside[0]!, sigma: 1, timestep: 999, step: 0, call: 0 };
      return inside[2]!;
    })(),
    scope,
  );
  assert.ok(!run.next().done);
  assert.ok(run.next(new Float32Array(LENGTH)).done);
});

test("a run hands its released arrays out again, last released first, and gives them back when it ends", () => {
  const before = residentArraysOut();
  const run = inLatentScope(
    (function* (): SamplerRun {
      const [a, b] = [freshLatent(LENGTH), freshLatent(LENGTH)];
      releaseLatent(a, b);
      // Released, still the run's: the kernels' memory hands out nothing new for them.
      assert.equal(residentArraysOut(), before + 2);
      assert.equal(freshLatent(LENGTH), b);
      assert.equal(freshLatent(LENGTH), a);
      const c = freshLatent(LENGTH);
      assert.ok(c !== a && c !== b && isResident(c));
      yield { kind: "denoise", x: c, sigma: 1, timestep: 999, step: 0, call: 0 };
      return c;
    })(),
  );
  assert.ok(!run.next().done);
  assert.ok(run.next(new Float32Array(LENGTH)).done);
  assert.equal(residentArraysOut(), before);
});

test("a sampler that throws closes its scope", () => {
  const scope = new LatentScope();
  const run = inLatentScope(
    (function* (): SamplerRun {
      const x = freshLatent(LENGTH);
      if (x.length > 0) throw new RangeError("boom");
      yield { kind: "denoise", x, sigma: 1, timestep: 999, step: 0, call: 0 };
      return x;
    })(),
    scope,
  );
  assert.throws(() => run.next(), /boom/);
  assert.equal(scope.size, 0);
});
