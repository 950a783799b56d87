import { test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { GenerationParamsSchema } from "./gen/latentfarm/v1/generation_pb.js";
import { secondPassSamplerName } from "./hires-passes.js";
import { imageWork, modelCallsPerStep, passWork } from "./sampling-work.js";

test("model calls per step: two for the second-order samplers, by any of their names", () => {
  for (const name of ["Heun", "k_heun", "DPM2 a Karras", "DPM++ SDE", "DPM++ 2S a", "Restart", "DPM adaptive"]) {
    assert.equal(modelCallsPerStep(name), 2, name);
  }
  for (const name of ["Euler a", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC", "LCM", ""]) assert.equal(modelCallsPerStep(name), 1, name);
  assert.equal(modelCallsPerStep("no such sampler"), 1);
  assert.deepEqual(passWork(20, "Heun"), { steps: 20, modelCalls: 40 });
});

test("an image's work: txt2img its steps; img2img A1111's int(min(d, 0.999)·steps) + 1, all steps with img2img_fix_steps", () => {
  const p = (init: MessageInitShape<typeof GenerationParamsSchema> = {}) =>
    create(GenerationParamsSchema, { steps: 20, samplerName: "Euler a", ...init });
  const init = { initImages: [new Uint8Array(1)] };
  assert.deepEqual(imageWork(p()), { steps: 20, modelCalls: 20 });
  assert.deepEqual(imageWork(p({ ...init, denoisingStrength: 0.75 })), { steps: 16, modelCalls: 16 });
  assert.deepEqual(imageWork(p({ ...init })), { steps: 16, modelCalls: 16 }, "A1111's default strength 0.75");
  assert.deepEqual(imageWork(p({ ...init, denoisingStrength: 1 })), { steps: 20, modelCalls: 20 });
  assert.deepEqual(imageWork(p({ ...init, denoisingStrength: 0.3, samplerName: "Heun" })), { steps: 7, modelCalls: 14 });
  assert.deepEqual(imageWork(p({ ...init, denoisingStrength: 0.3, overrideSettings: { img2imgFixSteps: true } })), {
    steps: 20,
    modelCalls: 20,
  });
  assert.equal(secondPassSamplerName(p({ hrSamplerName: "Use same sampler" })), "Euler a");
  assert.equal(secondPassSamplerName(p({ hrSamplerName: "Heun" })), "Heun");
});
