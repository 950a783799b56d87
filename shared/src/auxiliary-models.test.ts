import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { TaskStage } from "./gen/latentfarm/v1/agent_pb.js";
import { GenerationParamsSchema } from "./gen/latentfarm/v1/generation_pb.js";
import { auxiliaryNeeds, loraKey } from "./auxiliary-models.js";

test("the upscalers and face restorers a task runs, by stage; built-in upscalers need no file", () => {
  const hires = create(GenerationParamsSchema, { enableHr: true, hrUpscaler: "4x-UltraSharp", restoreFaces: true });
  assert.deepEqual(auxiliaryNeeds(hires), {
    upscalers: [{ name: "4x-UltraSharp", field: "hr_upscaler" }],
    faceRestorers: [{ name: "CodeFormer", field: "restore_faces" }],
    loras: [],
  });
  // The first pass neither upscales nor restores; the tiles of a tiled second pass neither; UPSCALE upscales; ASSEMBLE restores.
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.FIRST_PASS), { upscalers: [], faceRestorers: [], loras: [] });
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.SECOND_PASS_TILE), { upscalers: [], faceRestorers: [], loras: [] });
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
    loras: [],
  });
});

test("the LoRAs a task merges, by pass: its prompt's tags and `loras`, weight 0 and repeats left out", () => {
  const p = create(GenerationParamsSchema, {
    prompt: "a cat <lora:Style:0.8> <lora:off:0> <lyco:detail:1:0> <hypernet:h:1> <lora:style.safetensors:1>",
    loras: [
      { name: "extra", teWeight: 1, unetWeight: 1 },
      { name: "zero", teWeight: 0, unetWeight: 0 },
    ],
  });
  const firstPass = [
    { name: "Style", field: "prompt" },
    { name: "detail", field: "prompt" },
    { name: "extra", field: "loras[0].name" },
  ];
  assert.deepEqual(auxiliaryNeeds(p).loras, firstPass);
  // A Hires.fix second pass merges its own prompt's LoRAs (the first prompt's when it has none), and `loras`.
  const hires = create(GenerationParamsSchema, { ...p, enableHr: true, hrPrompt: "<lora:hiresonly:0.5>" });
  const secondPass = [
    { name: "hiresonly", field: "hr_prompt" },
    { name: "extra", field: "loras[0].name" },
  ];
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.FIRST_PASS).loras, firstPass);
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.SECOND_PASS_TILE).loras, secondPass);
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.UPSCALE).loras, []);
  assert.deepEqual(auxiliaryNeeds(hires, TaskStage.FULL).loras, [...firstPass, secondPass[0]]);
  assert.deepEqual(auxiliaryNeeds(create(GenerationParamsSchema, { ...p, enableHr: true }), TaskStage.SECOND_PASS).loras, firstPass);
  // A tag the agent refuses to parse names nothing here (Submit refuses the prompt).
  assert.deepEqual(auxiliaryNeeds(create(GenerationParamsSchema, { prompt: "<lora:x:notanumber>" })).loras, []);
  assert.equal(loraKey("My_LoRA.SafeTensors"), "my_lora");
  assert.equal(loraKey("Old.PT"), "old");
  assert.equal(loraKey(".ckpt"), ".ckpt");
});
