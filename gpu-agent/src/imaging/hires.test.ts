import { test } from "node:test";
import assert from "node:assert/strict";
import { cropLatent, hiresInfotextFields, hiresPassPlan, hiresSchedulerName, hiresTarget } from "./hires.js";
import { a1111Timesteps, kdiffusionImg2imgSchedule, setupImg2imgSteps, timestepImg2imgSchedule } from "./denoise-steps.js";

// a1111-behaviour.md §4.3: Uniform/Normal sigmas for 20 steps (float32 emulation).
const UNIFORM_20 = Float32Array.from([
  14.6146, 10.7468, 8.08152, 6.20493, 4.85565, 3.86538, 3.12376, 2.55717, 2.11566, 1.76482, 1.48058, 1.24581, 1.04814, 0.878428, 0.729719,
  0.596434, 0.473585, 0.355545, 0.232164, 0.0291675, 0,
]);

// Karras (ρ = 7) from its closed form with the SD1 model σ bounds (§4.1, §4.3), independent of the sampler code.
const SIGMA_MIN = 0.029167532920837402;
const SIGMA_MAX = 14.614642143249512;
function karras(n: number): Float32Array {
  const out = new Float32Array(n + 1);
  const lo = SIGMA_MIN ** (1 / 7);
  const hi = SIGMA_MAX ** (1 / 7);
  for (let i = 0; i < n; i++) out[i] = (hi + (n === 1 ? 0 : i / (n - 1)) * (lo - hi)) ** 7;
  out[n] = 0;
  return out;
}

test("karras helper reproduces the spec's 20-step table", () => {
  const k = karras(20);
  const spec = [14.6146, 11.7254, 9.34021, 7.38363, 5.78942, 4.49984, 3.46475, 2.64085, 1.99092, 1.48322, 1.09079];
  spec.forEach((s, i) => assert.ok(Math.abs(k[i]! - s) < 1e-4 * s, `karras[${i}]`));
});

test("img2img: strength 0.75, 20 steps → 16 steps from σ = 4.85565 (Euler a, uniform)", () => {
  const plan = setupImg2imgSteps({ steps: 20, denoisingStrength: 0.75 });
  assert.deepEqual(plan, { scheduleSteps: 20, tEnc: 15 });
  const sched = kdiffusionImg2imgSchedule(plan, (n) => {
    assert.equal(n, 20);
    return UNIFORM_20;
  });
  assert.equal(sched.samplingSteps, 16);
  assert.equal(sched.sigmas.length, 17);
  assert.equal(sched.startSigma, Math.fround(4.85565));
  assert.equal(sched.sigmaMin, Math.fround(0.0291675));
});

test("hires: steps 20, denoise 0.7 → exactly 20 steps from sigmas₂₈[8] (Karras 3.82133)", () => {
  const plan = hiresPassPlan({ steps: 20, denoisingStrength: 0.7 });
  assert.equal(plan.secondPassSteps, 20);
  assert.deepEqual(plan.img2img, { scheduleSteps: 28, tEnc: 19 });
  const full = karras(28);
  const sched = kdiffusionImg2imgSchedule(plan.img2img, karras);
  assert.equal(sched.samplingSteps, 20);
  assert.equal(sched.startSigma, full[8]);
  assert.ok(Math.abs(sched.startSigma - 3.82133) < 1e-5, `start σ ${sched.startSigma}`);
  assert.deepEqual(Array.from(sched.sigmas), Array.from(full.slice(8)));
});

test("step mapping follows Python float arithmetic and int() truncation", () => {
  // 0.57·100 = 56.99999999999999 in doubles → t_enc 56, not 57.
  assert.deepEqual(setupImg2imgSteps({ steps: 100, denoisingStrength: 0.57 }), { scheduleSteps: 100, tEnc: 56 });
  // strength ≥ 0.999 is capped: plain img2img runs all 20, the hires branch builds int(20/0.999) = 20.
  assert.deepEqual(setupImg2imgSteps({ steps: 20, denoisingStrength: 1 }), { scheduleSteps: 20, tEnc: 19 });
  assert.deepEqual(setupImg2imgSteps({ steps: 20, denoisingStrength: 1, requestedSteps: 20 }), { scheduleSteps: 20, tEnc: 19 });
  // hr_second_pass_steps 10 at 0.3: int(10/0.3) = 33 → start index 23 → 10 steps.
  const plan = hiresPassPlan({ steps: 30, denoisingStrength: 0.3, hrSecondPassSteps: 10 });
  assert.deepEqual(plan.img2img, { scheduleSteps: 33, tEnc: 9 });
  const sched = kdiffusionImg2imgSchedule(plan.img2img, karras);
  assert.equal(sched.samplingSteps, 10);
  assert.equal(sched.startSigma, karras(33)[23]);
  // img2img_fix_steps option takes the same branch as the hires pass.
  assert.deepEqual(setupImg2imgSteps({ steps: 20, denoisingStrength: 0.5, fixSteps: true }), { scheduleSteps: 40, tEnc: 19 });
  // denoise 0 in the fixed-steps branch: nothing to sample.
  const zero = kdiffusionImg2imgSchedule(setupImg2imgSteps({ steps: 20, denoisingStrength: 0, requestedSteps: 20 }), () => {
    throw new Error("must not build a schedule");
  });
  assert.equal(zero.samplingSteps, 0);
  assert.throws(() => setupImg2imgSteps({ steps: 20, denoisingStrength: 1.5 }), RangeError);
});

test("timestep samplers: table and img2img slice", () => {
  const ts = a1111Timesteps(20);
  assert.equal(ts.length, 20);
  assert.equal(ts[0], 1);
  assert.equal(ts[19], 951);
  assert.equal(a1111Timesteps(3).length, 4); // 1000//3 = 333 → 0,333,666,999 → +1 clipped to 999
  assert.equal(a1111Timesteps(3)[3], 999);
  const s = timestepImg2imgSchedule(setupImg2imgSteps({ steps: 20, denoisingStrength: 0.75 }));
  assert.equal(s.timesteps.length, 15);
  assert.equal(s.encodeTimestep, 751);
  assert.equal(s.timesteps[14], 701);
});

test("hires target from hr_scale", () => {
  const t = hiresTarget({ width: 512, height: 512 });
  assert.deepEqual(t.upscaleTo, { width: 1024, height: 1024 });
  assert.deepEqual(t.final, { width: 1024, height: 1024 });
  assert.deepEqual(t.infotext, ["Hires upscale", 2]);
  // int(512·1.33) = 680, int(768·1.33) = 1021 → latent 85×127 → 680×1016
  const odd = hiresTarget({ width: 512, height: 768, hrScale: 1.33 });
  assert.deepEqual(odd.upscaleTo, { width: 680, height: 1021 });
  assert.deepEqual(odd.upscaledLatent, { width: 85, height: 127 });
  assert.deepEqual(odd.final, { width: 680, height: 1016 });
});

test("hires target from hr_resize_x/y: one side, and cover-then-crop with both", () => {
  const onlyX = hiresTarget({ width: 512, height: 768, hrResizeX: 1000 });
  assert.deepEqual(onlyX.upscaleTo, { width: 1000, height: 1500 }); // 1000·768//512
  assert.deepEqual(onlyX.final, { width: 1000, height: 1496 });
  assert.deepEqual(onlyX.infotext, ["Hires resize", "1000x0"]);
  const onlyY = hiresTarget({ width: 640, height: 512, hrResizeY: 700 });
  assert.deepEqual(onlyY.upscaleTo, { width: 875, height: 700 }); // 700·640//512
  // portrait into a square: cover by width → 1024×1536, crop (1536−1024)//8 = 64 cells, 32 each side
  const both = hiresTarget({ width: 512, height: 768, hrResizeX: 1024, hrResizeY: 1024 });
  assert.deepEqual(both.upscaleTo, { width: 1024, height: 1536 });
  assert.deepEqual(both.truncate, { x: 0, y: 64 });
  assert.deepEqual(both.latentCrop, { top: 32, bottom: 32, left: 0, right: 0 });
  assert.deepEqual(both.final, { width: 1024, height: 1024 });
  // odd truncation: 640×512 → 1000×708: cover 1000×800, (800−708)//8 = 11 → top 5, bottom 6 → 712 high
  const oddCrop = hiresTarget({ width: 640, height: 512, hrResizeX: 1000, hrResizeY: 708 });
  assert.deepEqual(oddCrop.truncate, { x: 0, y: 11 });
  assert.deepEqual(oddCrop.latentCrop, { top: 5, bottom: 6, left: 0, right: 0 });
  assert.deepEqual(oddCrop.final, { width: 1000, height: 712 });
  // landscape into a tall box: cover by height
  const tall = hiresTarget({ width: 768, height: 512, hrResizeX: 600, hrResizeY: 800 });
  assert.deepEqual(tall.upscaleTo, { width: 1200, height: 800 });
  assert.deepEqual(tall.latentCrop, { top: 0, bottom: 0, left: 37, right: 38 });
  assert.deepEqual(tall.final, { width: 600, height: 800 });
});

test("legacy sizing: firstphase and use_old_hires_fix_width_height", () => {
  const old = hiresTarget({ width: 1024, height: 768, useOldHiresFixWidthHeight: true });
  // √(512²/(1024·768)) = 0.5774 → ceil(591.2/64)·64 = 640, ceil(443.4/64)·64 = 448
  assert.deepEqual(old.firstPass, { width: 640, height: 448 });
  assert.deepEqual(old.infotext, ["Hires resize", "1024x768"]);
  assert.deepEqual(old.final, { width: 1024, height: 768 });
  const fp = hiresTarget({ width: 1024, height: 1024, firstphaseWidth: 384, firstphaseHeight: 384 });
  assert.deepEqual(fp.firstPass, { width: 384, height: 384 });
  assert.deepEqual(fp.upscaleTo, { width: 768, height: 768 });
});

test("cropLatent slices NCHW like samples[:, :, t:h−b, l:w−r]", () => {
  const shape = [1, 2, 4, 5] as const;
  const x = Float32Array.from({ length: 40 }, (_, i) => i);
  const { data, shape: s } = cropLatent(x, shape, { top: 1, bottom: 2, left: 1, right: 1 });
  assert.deepEqual(s, [1, 2, 1, 3]);
  assert.deepEqual(Array.from(data), [6, 7, 8, 26, 27, 28]);
});

test("hires pass plan: latent vs pixel upscalers", () => {
  assert.deepEqual(hiresPassPlan({ steps: 20, denoisingStrength: 0.7 }).latentUpscale, { mode: "bilinear", antialias: false });
  const px = hiresPassPlan({ steps: 20, denoisingStrength: 0.7, hrUpscaler: "R-ESRGAN 4x+", hrSecondPassSteps: 12 });
  assert.equal(px.latentUpscale, undefined);
  assert.equal(px.pixelUpscaler, "R-ESRGAN 4x+");
  assert.equal(px.secondPassSteps, 12);
});

test("hires infotext entries, in A1111's insertion order", () => {
  const base = { width: 512, height: 512, denoisingStrength: 0.7, samplerName: "DPM++ 2M", prompt: "a cat", negativePrompt: "" };
  assert.deepEqual(hiresInfotextFields({ ...base, hrUpscaler: "Latent" }), [
    ["Denoising strength", 0.7],
    ["Hires upscale", 2],
    ["Hires upscaler", "Latent"],
  ]);
  assert.deepEqual(
    hiresInfotextFields(base),
    [
      ["Denoising strength", 0.7],
      ["Hires upscale", 2],
    ],
    "no upscaler named → none written",
  );
  assert.deepEqual(
    hiresInfotextFields({
      ...base,
      hrCheckpointTitle: "other.safetensors [abc]",
      hrSamplerName: "Euler a",
      hrPrompt: "a dog",
      hrNegativePrompt: "blurry",
      firstPassScheduleLabel: "Karras",
      hiresScheduleLabel: "Exponential",
      hrResizeX: 1024,
      hrResizeY: 768,
      hrSecondPassSteps: 10,
      hrUpscaler: "R-ESRGAN 4x+",
    }),
    [
      ["Denoising strength", 0.7],
      ["Hires checkpoint", "other.safetensors [abc]"],
      ["Hires sampler", "Euler a"],
      ["Hires prompt", "a dog"],
      ["Hires negative prompt", "blurry"],
      ["Hires schedule type", "Exponential"],
      ["Hires resize", "1024x768"],
      ["Hires steps", 10],
      ["Hires upscaler", "R-ESRGAN 4x+"],
    ],
  );
  const same = hiresInfotextFields({
    ...base,
    hrSamplerName: "DPM++ 2M",
    hrPrompt: "a cat",
    hrCheckpointTitle: "Use same checkpoint",
    firstPassScheduleLabel: "Karras",
    hiresScheduleLabel: "Karras",
  });
  assert.deepEqual(same, [
    ["Denoising strength", 0.7],
    ["Hires upscale", 2],
  ]);
  assert.equal(hiresSchedulerName("Use same scheduler"), null);
  assert.equal(hiresSchedulerName("Karras"), "Karras");
});
