import { test } from "node:test";
import assert from "node:assert/strict";
import {
  img2imgSteps,
  listSamplers,
  listSchedulers,
  prepareSampling,
  promptScheduleSteps,
  resolveSampler,
  type SamplingSettings,
} from "./plan.js";
import { InvalidSamplingParameter } from "./errors.js";
import { modelCallsPerStep } from "@latentfarm/shared";
import { ImageRng } from "./image-rng.js";
import { createBrownianNoiseSampler } from "./brownian.js";
import { drive, gaussianModel } from "./samplers/test-harness.js";
import { INTERMEDIATE_DIR, assertClose, assertRelClose, fixturesAbsent, readF32, readJson } from "./test-support.js";
import type { ModelRequest } from "./samplers/types.js";
import { ddimCoefficients, vpScheduleOf } from "./samplers/timesteps.js";
import { sd1ScheduleWith } from "./sigmas.js";

test("legacy combined names split into sampler + schedule type; the default schedule becomes Automatic", () => {
  const a = resolveSampler("DPM++ 2M Karras");
  assert.equal(a.sampler.name, "DPM++ 2M");
  assert.equal(a.scheduler, "automatic");
  assert.equal(a.scheduleType, "karras");
  assert.equal(a.label, "Karras");
  const b = resolveSampler("Euler a Exponential");
  assert.equal(b.sampler.name, "Euler a");
  assert.equal(b.scheduleType, "exponential");
  assert.equal(b.label, "Exponential");
  const c = resolveSampler("k_euler_a");
  assert.equal(c.sampler.name, "Euler a");
  assert.equal(c.scheduleType, undefined);
  assert.equal(c.label, "Automatic");
  const d = resolveSampler("DPM++ 2M", "Karras");
  assert.deepEqual([d.scheduler, d.scheduleType], ["automatic", "karras"]);
  const e = resolveSampler("Euler", "sgmuniform");
  assert.equal(e.scheduleType, "sgm_uniform");
  assert.equal(resolveSampler("DPM++ 3M SDE").scheduleType, "exponential");
  // Timestep samplers ignore the schedule type but the infotext still shows the chosen one.
  const ddim = resolveSampler("DDIM", "Karras");
  assert.equal(ddim.scheduleType, undefined);
  assert.equal(ddim.label, "Karras");
});

test("unknown sampler or schedule names throw InvalidSamplingParameter naming the field", () => {
  assert.throws(
    () => resolveSampler("Nope"),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "sampler_name",
  );
  assert.throws(
    () => resolveSampler("Euler", "Sideways"),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "scheduler",
  );
  assert.throws(
    () => resolveSampler("Nope", undefined, { sampler: "hr_sampler_name", scheduler: "hr_scheduler" }),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "hr_sampler_name",
  );
});

test("UniPC with fewer model timesteps than its order is refused at prepare time, naming steps", () => {
  const prepare = (steps: number, uniPcOrder?: number) =>
    prepareSampling({ samplerName: "UniPC", steps, settings: uniPcOrder ? { uniPcOrder } : {}, noise: () => new Float32Array(4) });
  for (const [steps, order] of [[1], [2], [3, 5]] as const) {
    assert.throws(
      () => prepare(steps, order),
      (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "steps" && /needs at least/.test(e.message),
      `steps ${steps}, order ${order ?? 3}`,
    );
  }
  assert.doesNotThrow(() => prepare(3));
  assert.doesNotThrow(() => prepare(3, 4));
});

test("listings: 20 samplers with aliases/options, 12 schedulers with rho and inner-model flags", () => {
  const samplers = listSamplers();
  assert.equal(samplers.length, 20);
  assert.deepEqual(samplers.find((s) => s.name === "DPM2")?.options, {
    scheduler: "karras",
    second_order: true,
    discard_next_to_last_sigma: true,
  });
  assert.deepEqual(samplers.find((s) => s.name === "Euler a")?.aliases, ["k_euler_a", "k_euler_ancestral"]);
  const schedulers = listSchedulers();
  assert.equal(schedulers.length, 12);
  assert.deepEqual(
    schedulers.find((s) => s.name === "karras"),
    { name: "karras", label: "Karras", aliases: null, default_rho: 7, need_inner_model: false },
  );
  assert.deepEqual(schedulers.find((s) => s.name === "sgm_uniform")?.aliases, ["SGMUniform"]);
  assert.equal(schedulers.find((s) => s.name === "simple")?.need_inner_model, true);
});

test("prompt schedules use doubled steps for second-order samplers", () => {
  assert.equal(promptScheduleSteps(resolveSampler("Heun").sampler, 10), 20);
  assert.equal(promptScheduleSteps(resolveSampler("Euler").sampler, 10), 10);
});

test("img2img step mapping (spec §4.4)", () => {
  assert.deepEqual(img2imgSteps(20, 0.75), { scheduleSteps: 20, tEnc: 15 });
  assert.deepEqual(img2imgSteps(20, 1), { scheduleSteps: 20, tEnc: 19 });
  assert.deepEqual(img2imgSteps(20, 0.7, true), { scheduleSteps: 28, tEnc: 19 });
  assert.deepEqual(img2imgSteps(10, 0, true), { scheduleSteps: 0, tEnc: 9 });
  assert.throws(
    () => img2imgSteps(20, 1.5),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "denoising_strength",
  );
});

test("img2img: Euler a, 20 steps, denoise 0.75 → 16 steps from σ = 4.85565; hires Karras 0.7 → from 3.82133", () => {
  const plain = prepareSampling({
    samplerName: "Euler a",
    steps: 20,
    noise: () => new Float32Array(1),
    img2img: { denoisingStrength: 0.75 },
  });
  assert.equal(plain.sigmas.length, 17);
  assert.ok(Math.abs(plain.sigmas[0]! - 4.85565) < 1e-5);
  assert.equal(plain.steps, 16);
  const start = plain.startLatent(Float32Array.from([1]), Float32Array.from([0.5]));
  assert.ok(Math.abs(start[0]! - (0.5 + plain.sigmas[0]!)) < 1e-6);
  const noisier = prepareSampling({
    samplerName: "Euler a",
    steps: 20,
    noise: () => new Float32Array(1),
    img2img: { denoisingStrength: 0.75 },
    settings: { initialNoiseMultiplier: 1.5 },
  });
  assert.ok(Math.abs(noisier.startLatent(Float32Array.from([1]), Float32Array.from([0.5]))[0]! - (0.5 + 1.5 * plain.sigmas[0]!)) < 1e-5);
  assert.equal(noisier.infotext["Noise multiplier"], 1.5);
  const hires = prepareSampling({
    samplerName: "DPM++ 2M",
    steps: 20,
    noise: () => new Float32Array(1),
    img2img: { denoisingStrength: 0.7, fixSteps: true },
  });
  assert.equal(hires.sigmas.length, 21);
  assert.ok(Math.abs(hires.sigmas[0]! - 3.82133) < 1e-5, `${hires.sigmas[0]}`);
  assert.equal(hires.steps, 20);
});

test("DDIM 20 steps makes 19 model calls; img2img starts at timesteps[t_enc] noise level", () => {
  const prepared = prepareSampling({ samplerName: "DDIM", steps: 20, noise: () => new Float32Array(2) });
  assert.deepEqual(
    Array.from(prepared.timesteps!),
    Array.from({ length: 20 }, (_, i) => 1 + 50 * i),
  );
  const { requests } = drive(prepared.run(prepared.startLatent(Float32Array.from([1, -1]))), gaussianModel(0.8));
  assert.equal(requests.length, 19);
  const img = prepareSampling({ samplerName: "DDIM", steps: 20, noise: () => new Float32Array(1), img2img: { denoisingStrength: 0.5 } });
  assert.equal(img.timesteps!.length, 10);
  assert.equal(img.steps, 11);
});

test("the catalogue's model calls per step (the coordinator's cost estimates) are what each sampler makes, within one step's", () => {
  for (const { name } of listSamplers()) {
    // DPM adaptive takes as many calls as its error control needs, whatever the steps.
    if (name === "DPM adaptive") continue;
    for (const steps of [5, 20, 40]) {
      const rng = new ImageRng({ shape: [4, 4, 4], seeds: [1], source: "CPU" });
      const prepared = prepareSampling({
        samplerName: name,
        steps,
        noise: () => rng.next(),
        brownian: { seeds: [1], shape: [4, 4, 4], source: "CPU" },
      });
      const { requests } = drive(prepared.run(prepared.startLatent(rng.first())), (request) => {
        const out = gaussianModel(0.8)(request);
        // DDIM CFG++ asks for the negative prompt's prediction too.
        return request.kind === "eps" && request.needUncond ? { output: out, uncond: out } : out;
      });
      const perStep = modelCallsPerStep(name);
      assert.ok(Math.abs(requests.length - prepared.steps * perStep) <= perStep, `${name}, ${steps} steps: ${requests.length} calls`);
    }
  }
});

test("infotext entries: Schedule type for explicit schedules, Eta when not 1, Discard penultimate when forced", () => {
  assert.deepEqual(prepareSampling({ samplerName: "Euler a", steps: 5, noise: () => new Float32Array(1) }).infotext, {});
  assert.deepEqual(prepareSampling({ samplerName: "DPM++ 2M", steps: 5, noise: () => new Float32Array(1) }).infotext, {
    "Schedule type": "Karras",
  });
  assert.deepEqual(
    prepareSampling({
      samplerName: "Euler a",
      steps: 5,
      noise: () => new Float32Array(1),
      settings: { eta: 0.5, alwaysDiscardNextToLastSigma: true },
    }).infotext,
    { Eta: 0.5, "Discard penultimate sigma": true },
  );
  assert.deepEqual(
    prepareSampling({ samplerName: "DDIM", steps: 5, noise: () => new Float32Array(1), settings: { etaDdim: 0.3 } }).infotext,
    { "Eta DDIM": 0.3 },
  );
});

test("every catalog sampler runs end to end through prepareSampling on a closed-form model", () => {
  for (const { name } of listSamplers()) {
    const prepared = prepareSampling({ samplerName: name, steps: 12, noise: () => new Float32Array(4) });
    const x = prepared.startLatent(Float32Array.from([1, -0.5, 0.25, 2]));
    const answer = gaussianModel(0.8);
    const { x: out, requests } = drive(prepared.run(x), (r: ModelRequest) => {
      const eps = answer(r);
      return r.kind === "eps" && r.needUncond ? { output: eps, uncond: eps } : eps;
    });
    assert.ok(requests.length > 0, name);
    assert.ok(out.every(Number.isFinite), `${name} output finite`);
    assert.ok(Math.abs(out[3]!) < 5, `${name} output plausible: ${out[3]}`);
  }
});

test("a prepared sampling runs again with the same bits: its runs share what it worked out once (UniPC's plan) and leave it as it was", () => {
  const settings = [{}, { uniPcVariant: "bh2" as const }, { uniPcVariant: "vary_coeff" as const }, { uniPcOrder: 2 }];
  const cases = [...listSamplers().map((s) => ({ name: s.name, settings: {} })), ...settings.map((s) => ({ name: "UniPC", settings: s }))];
  for (const { name, settings: s } of cases) {
    const prepared = prepareSampling({ samplerName: name, steps: 9, settings: s, noise: () => Float32Array.from([0.3, -1.1, 0.7, 0.05]) });
    const answer = gaussianModel(0.8);
    const once = (): { x: Float32Array; seen: number[][] } => {
      const seen: number[][] = [];
      const x = prepared.startLatent(Float32Array.from([1, -0.5, 0.25, 2]));
      const result = drive(prepared.run(x), (r: ModelRequest) => {
        seen.push([...r.x, r.sigma]);
        const eps = answer(r);
        return r.kind === "eps" && r.needUncond ? { output: eps, uncond: eps } : eps;
      });
      return { x: result.x, seen };
    };
    const first = once();
    assert.deepEqual(once(), first, `${name} ${JSON.stringify(s)}`);
  }
});

interface Case {
  id: string;
  seed: number;
  rng: "CPU" | "NV";
  steps: number;
  sampler_name: string;
  scheduler?: string;
  width: number;
  height: number;
}
interface IndexEntry {
  sigmas: number[];
  timesteps: number[];
  noise: { file: string; shape: number[] };
}

test("fixture Euler a path (p1 CPU, p2 NV): σ/timestep per call and sampler noise = ImageRng draws 1…19", { skip: fixturesAbsent }, () => {
  const cases = readJson<Case[]>(`${INTERMEDIATE_DIR}/../cases.json`);
  const index = readJson<Record<string, IndexEntry>>(`${INTERMEDIATE_DIR}/index.json`);
  for (const id of ["p1-euler-a-cpu", "p2-euler-a-nv"]) {
    const c = cases.find((k) => k.id === id)!;
    const entry = index[id]!;
    const draws = readF32(`${INTERMEDIATE_DIR}/${entry.noise.file}`);
    const size = 4 * (c.height / 8) * (c.width / 8);
    const rng = new ImageRng({ shape: [4, c.height / 8, c.width / 8], seeds: [c.seed], source: c.rng });
    const consumed: Float32Array[] = [];
    const prepared = prepareSampling({
      samplerName: c.sampler_name,
      steps: c.steps,
      noise: () => {
        const n = rng.next();
        consumed.push(n);
        return n;
      },
    });
    assertRelClose(prepared.sigmas, entry.sigmas, 2.5e-7, `${id} sigmas`);
    const initial = rng.first();
    assertClose(initial, draws.subarray(0, size), 1e-5, `${id} initial noise`);
    const x = prepared.startLatent(initial);
    assertClose(
      x,
      Array.from(draws.subarray(0, size), (v) => v * entry.sigmas[0]!),
      2e-4,
      `${id} start latent`,
    );
    // A denoiser that returns zeros: each step is x·σ_down/σ + n·σ_up, so the noise draws are visible.
    const { requests } = drive(prepared.run(x), (r) => new Float32Array(r.x.length));
    assert.equal(requests.length, c.steps);
    assertClose(
      requests.map((r) => r.timestep),
      entry.timesteps,
      1e-4,
      `${id} timesteps`,
    );
    assert.equal(consumed.length, c.steps - 1);
    consumed.forEach((n, k) => assertClose(n, draws.subarray((k + 1) * size, (k + 2) * size), 1e-5, `${id} sampler draw ${k + 1}`));
  }
});

test("SDE samplers get A1111's Brownian tree over the full σ list when `brownian` is given", () => {
  const shape = [1, 2, 2] as const;
  const common = { samplerName: "DPM++ 2M SDE", steps: 6, noise: (): Float32Array => assert.fail("plain noise drawn") };
  const withTree = prepareSampling({ ...common, brownian: { seeds: [7], shape, source: "NV" } });
  assert.deepEqual(withTree.brownianRange, { sigmaMin: withTree.sigmas[withTree.sigmas.length - 2], sigmaMax: withTree.sigmas[0] });
  const manual = prepareSampling({
    ...common,
    noiseSampler: createBrownianNoiseSampler({ ...withTree.brownianRange!, seeds: [7], shape, source: "NV" }),
  });
  const start = Float32Array.from([1, -1, 0.5, 2]);
  const a = drive(withTree.run(withTree.startLatent(start)), gaussianModel(0.8)).x;
  const b = drive(manual.run(manual.startLatent(start)), gaussianModel(0.8)).x;
  assert.deepEqual(a, b);
  assert.equal(
    prepareSampling({ samplerName: "Euler", steps: 6, noise: () => new Float32Array(4), brownian: { seeds: [7], shape, source: "NV" } })
      .brownianRange,
    undefined,
  );
});

/** The model calls of a run on the closed-form model, with whether each ran without the negative prompt. */
function callsOf(prepared: ReturnType<typeof prepareSampling>): Array<{ call: number; sigma: number; timestep: number; skips: boolean }> {
  const answer = gaussianModel(0.8);
  const calls: Array<{ call: number; sigma: number; timestep: number; skips: boolean }> = [];
  const x = Float32Array.from([1, -0.5, 0.25, 2]);
  drive(prepared.run(prepared.startLatent(x, x)), (r: ModelRequest) => {
    calls.push({ call: r.call, sigma: r.sigma, timestep: r.timestep, skips: prepared.skipsUncond(r) });
    const eps = answer(r);
    return r.kind === "eps" && r.needUncond ? { output: eps, uncond: eps } : eps;
  });
  return calls;
}

const fourNoise = (): Float32Array => new Float32Array(4);

test("skip_early_cond: calls up to that fraction of A1111's total_steps (doubled for second-order samplers) skip the negative prompt", () => {
  const euler = prepareSampling({ samplerName: "Euler", steps: 20, noise: fourNoise, settings: { skipEarlyCond: 0.25 } });
  assert.deepEqual(euler.infotext["Skip Early CFG"], undefined, "recorded when a call first skips, not before");
  const eulerCalls = callsOf(euler);
  // call / 20 ≤ 0.25 for calls 0…5.
  assert.deepEqual(
    eulerCalls.filter((c) => c.skips).map((c) => c.call),
    [0, 1, 2, 3, 4, 5],
  );
  assert.equal(euler.infotext["Skip Early CFG"], 0.25);
  // Heun: total_steps = 40, 39 calls; call / 40 ≤ 0.25 for calls 0…10.
  const heun = prepareSampling({ samplerName: "Heun", steps: 20, noise: fourNoise, settings: { skipEarlyCond: 0.25 } });
  assert.equal(callsOf(heun).filter((c) => c.skips).length, 11);
  // img2img: total_steps is t_enc + 1 (16 for 20 steps at 0.75).
  const img2img = prepareSampling({
    samplerName: "Euler",
    steps: 20,
    noise: fourNoise,
    img2img: { denoisingStrength: 0.75 },
    settings: { skipEarlyCond: 0.25 },
  });
  assert.equal(callsOf(img2img).filter((c) => c.skips).length, 5);
  // Off (0, the default): no call skips and nothing is recorded.
  const off = prepareSampling({ samplerName: "Euler", steps: 20, noise: fourNoise, settings: { skipEarlyCond: 0 } });
  assert.ok(callsOf(off).every((c) => !c.skips));
  assert.deepEqual(off.infotext, {});
});

test("NGMS (s_min_uncond): odd calls below σ skip the negative prompt, every call with s_min_uncond_all; timestep samplers compare t", () => {
  const settings = { sMinUncond: 1.5 };
  const euler = prepareSampling({ samplerName: "Euler", scheduler: "Karras", steps: 20, noise: fourNoise, settings });
  const calls = callsOf(euler);
  const expected = calls.filter((c) => c.call % 2 === 1 && c.sigma < 1.5).map((c) => c.call);
  assert.ok(expected.length >= 3 && expected.length < 10, `${expected.length} calls expected to skip`);
  assert.deepEqual(
    calls.filter((c) => c.skips).map((c) => c.call),
    expected,
  );
  assert.equal(euler.infotext["NGMS"], 1.5);
  assert.equal(euler.infotext["NGMS all steps"], undefined);

  const all = prepareSampling({
    samplerName: "Euler",
    scheduler: "Karras",
    steps: 20,
    noise: fourNoise,
    settings: { ...settings, sMinUncondAll: true },
  });
  const allCalls = callsOf(all);
  assert.deepEqual(
    allCalls.filter((c) => c.skips).map((c) => c.call),
    allCalls.filter((c) => c.sigma < 1.5).map((c) => c.call),
  );
  assert.equal(all.infotext["NGMS all steps"], true);

  // A threshold below every call's σ: nothing skips, nothing is recorded.
  const never = prepareSampling({ samplerName: "Euler", steps: 20, noise: fourNoise, settings: { sMinUncond: 0.01 } });
  assert.ok(callsOf(never).every((c) => !c.skips));
  assert.equal(never.infotext["NGMS"], undefined);

  // DDIM's denoiser sees timesteps (1…951 here), so a σ-sized threshold never applies and 200 does.
  const ddimSigma = prepareSampling({ samplerName: "DDIM", steps: 20, noise: fourNoise, settings: { sMinUncond: 1.5 } });
  assert.ok(callsOf(ddimSigma).every((c) => !c.skips));
  const ddim = prepareSampling({ samplerName: "DDIM", steps: 20, noise: fourNoise, settings: { sMinUncond: 200 } });
  const ddimCalls = callsOf(ddim);
  assert.deepEqual(
    ddimCalls.filter((c) => c.skips).map((c) => c.call),
    ddimCalls.filter((c) => c.call % 2 === 1 && c.timestep < 200).map((c) => c.call),
  );
  assert.ok(ddimCalls.some((c) => c.skips));

  // skip_early_cond comes first: its calls record it, not NGMS.
  const both = prepareSampling({ samplerName: "Euler", steps: 20, noise: fourNoise, settings: { sMinUncond: 100, skipEarlyCond: 0.1 } });
  const bothCalls = callsOf(both);
  assert.deepEqual(
    bothCalls.filter((c) => c.skips).map((c) => c.call),
    bothCalls.filter((c) => c.call <= 2 || c.call % 2 === 1).map((c) => c.call),
  );
  assert.deepEqual([both.infotext["Skip Early CFG"], both.infotext["NGMS"]], [0.1, 100]);
});

test("Zero Terminal SNR: the σ table ends at pure noise, DDIM's ᾱ come from it too, and the infotext says so", () => {
  const plain = prepareSampling({ samplerName: "Euler", scheduler: "Karras", steps: 20, noise: fourNoise });
  const ztsnr = prepareSampling({
    samplerName: "Euler",
    scheduler: "Karras",
    steps: 20,
    noise: fourNoise,
    settings: { noiseSchedule: "Zero Terminal SNR" },
  });
  assertRelClose([plain.sigmas[0]!], [14.614642], 1e-6, "default σ_max");
  // σ_max = sqrt((1 − ᾱ)/ᾱ) at ᾱ = 4.8973451890853435e-8.
  assertRelClose([ztsnr.sigmas[0]!], [Math.sqrt((1 - 4.8973451890853435e-8) / 4.8973451890853435e-8)], 1e-5, "rescaled σ_max");
  assertRelClose([ztsnr.sigmas[19]!], [plain.sigmas[19]!], 1e-4, "σ_min kept (ᾱ₀ is kept)");
  assert.equal(ztsnr.infotext["Noise Schedule"], "Zero Terminal SNR");
  assert.equal(Object.keys(ztsnr.infotext)[0], "Noise Schedule", "set before the sampler's own entries, as A1111 does");
  assert.equal(plain.infotext["Noise Schedule"], undefined);
  // DDIM reads ᾱ at its timesteps (…, 901 for 10 steps) from the same rescaled table.
  const ddimPlain = prepareSampling({ samplerName: "DDIM", steps: 10, noise: fourNoise });
  const ddim = prepareSampling({ samplerName: "DDIM", steps: 10, noise: fourNoise, settings: { noiseSchedule: "Zero Terminal SNR" } });
  assert.ok(ddim.sigmas[0]! > 1.5 * ddimPlain.sigmas[0]!, `DDIM's first σ ${ddim.sigmas[0]} vs ${ddimPlain.sigmas[0]}`);
  assert.equal(ddim.infotext["Noise Schedule"], "Zero Terminal SNR");
});

test("A1111's sampler_extra_params: Euler, Heun and DPM2 take the churn settings, DPM2 a and the SDE samplers s_noise, Euler a none of them", () => {
  const noise = (): Float32Array => Float32Array.from([0.3, -0.2, 0.1, 0.5]);
  const final = (samplerName: string, settings: SamplingSettings) => {
    const prepared = prepareSampling({ samplerName, steps: 8, noise, settings });
    const answer = gaussianModel(0.8);
    const { x } = drive(prepared.run(prepared.startLatent(Float32Array.from([1, -0.5, 0.25, 2]))), (r: ModelRequest) => answer(r));
    return { x, infotext: prepared.infotext };
  };
  const churn = { sChurn: 0.5, sTmin: 0.1, sTmax: 0, sNoise: 0.9 };
  const euler = final("Euler", churn);
  // s_tmax 0 is A1111's "no bound", its default: not written.
  assert.deepEqual(Object.entries(euler.infotext), [
    ["Sigma churn", 0.5],
    ["Sigma tmin", 0.1],
    ["Sigma noise", 0.9],
  ]);
  assert.notDeepEqual(euler.x, final("Euler", {}).x);
  const eulerA = final("Euler a", churn);
  assert.deepEqual(eulerA.x, final("Euler a", {}).x, "Euler a ignores s_noise, as A1111 does");
  assert.deepEqual(eulerA.infotext, {});
  const dpm2a = final("DPM2 a", churn);
  assert.notDeepEqual(dpm2a.x, final("DPM2 a", {}).x);
  assert.deepEqual(Object.entries(dpm2a.infotext), [
    ["Schedule type", "Karras"],
    ["Sigma noise", 0.9],
  ]);
  assert.deepEqual(final("LMS", churn).infotext, {});
});

test("infotext entries keep A1111's order: processing, σ list, start latent, then the sampler's own (Eta, Sigma …)", () => {
  const keys = (input: Partial<Parameters<typeof prepareSampling>[0]>) =>
    Object.keys(prepareSampling({ samplerName: "Euler a", steps: 8, noise: fourNoise, ...input }).infotext);
  assert.deepEqual(keys({ scheduler: "Karras", settings: { sigmaMax: 10, eta: 0.5 } }), ["Schedule type", "Schedule max sigma", "Eta"]);
  assert.deepEqual(keys({ settings: { sgmNoiseMultiplier: true, eta: 0.5 } }), ["SGM noise multiplier", "Eta"]);
  const img2img = prepareSampling({
    samplerName: "Euler a",
    scheduler: "Karras",
    steps: 8,
    noise: fourNoise,
    img2img: { denoisingStrength: 0.5 },
    settings: { initialNoiseMultiplier: 0.9, img2imgExtraNoise: 0.1, eta: 0.5, noiseSchedule: "Zero Terminal SNR" },
  });
  assert.deepEqual(Object.entries(img2img.infotext), [
    ["Noise Schedule", "Zero Terminal SNR"],
    ["Noise multiplier", 0.9],
    ["Schedule type", "Karras"],
    ["Extra noise", 0.1],
    ["Eta", 0.5],
  ]);
  const ddim = prepareSampling({
    samplerName: "DDIM",
    steps: 8,
    noise: fourNoise,
    img2img: { denoisingStrength: 0.5 },
    settings: { alwaysDiscardNextToLastSigma: true, img2imgExtraNoise: 0.1, etaDdim: 0.3 },
  });
  assert.deepEqual(Object.keys(ddim.infotext), ["Discard penultimate sigma", "Extra noise", "Eta DDIM"]);
  // Written at preparation: a stage that only prepares the pass again writes the same text.
  const before = { ...img2img.infotext };
  img2img.startLatent(new Float32Array(4), new Float32Array(4));
  assert.deepEqual(img2img.infotext, before);
});

test("use_downcasted_alpha_bar: k-diffusion samplers get the float16 tables and the infotext entry", () => {
  const karras = (downcast: boolean) =>
    prepareSampling({
      samplerName: "DPM++ 2M",
      scheduler: "Karras",
      steps: 10,
      noise: fourNoise,
      settings: { downcastAlphasCumprod: downcast },
    });
  const old = karras(true);
  // Karras between the float16 table's ends (0.0312… vs 0.0292 without the downcast).
  assertRelClose([old.sigmas[0]!, old.sigmas[9]!], [14.609375, 0.03125], 1e-6, "Karras ends");
  assert.notDeepEqual(old.sigmas, karras(false).sigmas);
  assert.deepEqual(Object.keys(old.infotext), ["Downcast alphas_cumprod", "Schedule type"]);
});

test("use_downcasted_alpha_bar with UniPC and LCM: UniPC's log ᾱ is a float16 op, LCM's table float32 from the float16 ᾱ", () => {
  // numpy: ac16 = float16(float32(cumprod(1 − linspace(0.00085**.5, 0.012**.5, 1000)**2))); UniPC (A1111 1.6+,
  // sd_samplers_timesteps_impl.unipc → NoiseScheduleVP) takes float32(float16(0.5) * log(ac16)).
  const half = sd1ScheduleWith("Default", "float16");
  const logAlpha = vpScheduleOf(half).logAlpha;
  assert.deepEqual(
    [0, 1, 499, 999].map((t) => logAlpha[t]),
    [-0.0004887580871582031, -0.0007328987121582031, -0.640625, -2.68359375],
  );
  // Without the downcast the log is float32's, as before.
  assert.equal(
    vpScheduleOf(sd1ScheduleWith("Default", "float32")).logAlpha[499],
    Math.fround(0.5 * Math.fround(Math.log(sd1ScheduleWith("Default", "float32").alphasCumprod[499]!))),
  );
  // LCM (sd_samplers_lcm.LCMCompVisDenoiser) copies ac16 at timesteps 19, 39, … 999 into a float32 tensor:
  // σ = ((1 − a)/a)**0.5 in float32, and the schedule's first σ is exp(log σ) of the last, as k-diffusion's t_to_sigma.
  const lcm = prepareSampling({ samplerName: "LCM", steps: 4, noise: fourNoise, settings: { downcastAlphasCumprod: true } });
  assert.equal(lcm.sigmas[0], 14.612339973449707);
  assert.equal(Object.keys(lcm.infotext)[0], "Downcast alphas_cumprod");
  assert.notDeepEqual(lcm.sigmas, prepareSampling({ samplerName: "LCM", steps: 4, noise: fourNoise }).sigmas);

  const uniPc = (downcast: boolean): Float32Array => {
    const prepared = prepareSampling({ samplerName: "UniPC", steps: 9, noise: fourNoise, settings: { downcastAlphasCumprod: downcast } });
    if (downcast) assert.equal(Object.keys(prepared.infotext)[0], "Downcast alphas_cumprod");
    const answer = gaussianModel(0.8);
    return drive(prepared.run(prepared.startLatent(Float32Array.from([1, -0.5, 0.25, 2]))), (r: ModelRequest) => answer(r)).x;
  };
  const [downcast, plain] = [uniPc(true), uniPc(false)];
  assert.notDeepEqual(downcast, plain);
  assertRelClose([...downcast], [...plain], 1e-2, "the same flow, slightly moved");
});

test("use_downcasted_alpha_bar with DDIM and PLMS: their coefficients are float16 tensor ops on the float16 ᾱ, as numpy's float16 makes them", () => {
  // numpy: ac16 as in the σ-table test; sqrt(float16(1) − ac16[t]) in float16; eta sigmas in float64 from
  // float64 alphas_prev over the float16 difference (torch promotes against the float64 array).
  const timesteps = [1, 101, 501, 901];
  const c = ddimCoefficients(sd1ScheduleWith("Default", "float16"), timesteps, 1);
  assert.deepEqual([...c.alphas], [0.99853515625, 0.89306640625, 0.27490234375, 0.014007568359375]);
  assert.deepEqual([...c.sqrtOneMinusAlphas], [0.03826904296875, 0.326904296875, 0.8515625, 0.99267578125]);
  // Steps 10 puts alphas_prev one hundred timesteps back, as here for 101 and 901.
  assertRelClose([c.sigmas[1]!], [0.03803809767988753], 1e-12, "eta sigma at 101");
  assert.notEqual(ddimCoefficients(sd1ScheduleWith("Default", "float32"), [901], 0).sqrtOneMinusAlphas[0], 0.99267578125);

  for (const samplerName of ["DDIM", "DDIM CFG++", "PLMS"]) {
    const prepared = prepareSampling({ samplerName, steps: 10, noise: fourNoise, settings: { downcastAlphasCumprod: true } });
    assert.equal(Object.keys(prepared.infotext)[0], "Downcast alphas_cumprod", samplerName);
  }
  // img2img's start latent: x·sqrt(ᾱ) + noise·sqrt(1 − ᾱ) with both roots float16 (ᾱ at timestep 501).
  const img2img = prepareSampling({
    samplerName: "DDIM",
    steps: 10,
    noise: fourNoise,
    img2img: { denoisingStrength: 0.5 },
    settings: { downcastAlphasCumprod: true },
  });
  assert.deepEqual([...img2img.startLatent(new Float32Array(4), new Float32Array(4).fill(1))], Array(4).fill(0.5244140625));
  assert.deepEqual([...img2img.startLatent(new Float32Array(4).fill(1), new Float32Array(4))], Array(4).fill(0.8515625));
});
