import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { TaskStage } from "./gen/latentfarm/v1/agent_pb.js";
import { GenerationParamsSchema } from "./gen/latentfarm/v1/generation_pb.js";
import { auxiliaryNeeds } from "./auxiliary-models.js";

test("the upscalers and face restorers a task runs, by stage; built-in upscalers need no file", () => {
  const hires = create(GenerationParamsSchema, { enableHr: true, hrUpscaler: "4x-UltraSharp", restoreFaces: true });
  assert.deepEqual(auxiliaryNeeds(hires), {
    upscalers: [{ name: "4x-UltraSharp", field: "hr_upscaler" }],
    faceRestorers: [{ name: "CodeFormer", field: "restore_faces" }],
  });
  // The first pass neither upscales nor restores; the tiles of a tiled second pass neither; UPSCALE upscales; ASSEMBLE restores.
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.FIRST_PASS), { upscalers: [], faceRestorers: [] });
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.SECOND_PASS_TILE), { upscalers: [], faceRestorers: [] });
  assert.equal(auxiliaryNeeds(hires, TaskStage.UPSCALE).upscalers.length, 1);
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.ASSEMBLE).upscalers, []);
  for (const name of ["Latent (nearest)", "Lanczos", "Nearest", "None", ""]) {
    assert.deepEqual(auxiliaryNeeds(create(GenerationParamsSchema, { enableHr: true, hrUpscaler: name })).upscalers, [], name);
  }
  const gfpgan = create(GenerationParamsSchema, { restoreFaces: true, overrideSettings: { faceRestorationModel: "GFPGAN" } });
  assert.deepEqual(auxiliaryNeeds(gfpgan).faceRestorers, [{ name: "GFPGAN", field: "override_settings.face_restoration_model" }]);
  const extras = create(GenerationParamsSchema, {
    initImages: [new Uint8Array(1)],
    extras: { upscaler1: "R-ESRGAN 4x+", upscaler2: "SwinIR 4x", extrasUpscaler2Visibility: 0.5, codeformerVisibility: 1 },
  });
  assert.deepEqual(auxiliaryNeeds(extras), {
    upscalers: [
      { name: "R-ESRGAN 4x+", field: "extras.upscaler_1" },
      { name: "SwinIR 4x", field: "extras.upscaler_2" },
    ],
    faceRestorers: [{ name: "CodeFormer", field: "extras.codeformer_visibility" }],
  });
});
