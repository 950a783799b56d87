import { test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { GenerationParamsSchema } from "@latentfarm/shared";
import { modelsFromInfotext } from "./infotext-models.js";
import { validateJob } from "./validate.js";

const agent = (models: Record<string, string>) => ({
  models: new Map(
    Object.entries(models).map(([name, modelHash]) => [
      name,
      { format: modelHash ? "safetensors" : "diffusers-onnx", modelHash, family: "" },
    ]),
  ),
});
const farm = [
  agent({ "dreamshaper-local": "aaaaaaaaaa", "sd15-mine": "bbbbbbbbbb", onnx: "" }),
  agent({ "dreamshaper-local": "aaaaaaaaaa" }),
];

/** Submit's order: validateJob (which applies the infotext), then the lookup. */
function submit(init: MessageInitShape<typeof GenerationParamsSchema>) {
  const v = validateJob(create(GenerationParamsSchema, init), { defaultModel: "onnx" });
  modelsFromInfotext(v, farm);
  return v;
}

test("a pasted infotext's Model hash picks the farm's checkpoint of those weights, whatever its name", () => {
  const v = submit({ infotext: "a cat\nSteps: 3, Seed: 1, Model hash: AAAAAAAAAA, Model: dreamshaper_8" });
  assert.equal(v.params.model, "dreamshaper-local");
  assert.deepEqual(v.warnings, []);
  // The request's own model wins over the infotext's.
  assert.equal(
    submit({ model: "onnx", infotext: "a cat\nSteps: 3, Seed: 1, Model hash: aaaaaaaaaa, Model: dreamshaper_8" }).params.model,
    "onnx",
  );
  // No hash match: the infotext's name stands; a checkpoint of that name with other weights is warned about.
  const other = submit({ infotext: "a cat\nSteps: 3, Seed: 1, Model hash: 0123456789, Model: sd15-mine" });
  assert.equal(other.params.model, "sd15-mine");
  assert.deepEqual(other.warnings, [
    'infotext: no checkpoint here has the Model hash 0123456789; "sd15-mine" (bbbbbbbbbb) renders instead',
  ]);
  assert.equal(submit({ infotext: "a cat\nSteps: 3, Seed: 1, Model: elsewhere" }).params.model, "elsewhere");
});

test("a pasted Hires checkpoint 'name [hash]' is found by its hash too", () => {
  const text =
    "a cat\nSteps: 3, Seed: 1, Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent, Hires checkpoint: sd15 [bbbbbbbbbb]";
  const v = submit({ model: "onnx", infotext: text });
  assert.equal(v.params.hrCheckpointName, "sd15-mine");
  assert.equal(submit({ model: "onnx", hrCheckpointName: "onnx", infotext: text }).params.hrCheckpointName, "onnx");
  assert.equal(submit({ model: "onnx", infotext: text.replace("bbbbbbbbbb", "cccccccccc") }).params.hrCheckpointName, "sd15");
});

test("a pasted Refiner 'name [hash]' is found by its hash too", () => {
  const text = "a cat\nSteps: 3, Seed: 1, Refiner: sd15 [bbbbbbbbbb], Refiner switch at: 0.8";
  assert.equal(submit({ model: "onnx", infotext: text }).params.refinerCheckpoint, "sd15-mine");
  assert.equal(submit({ model: "onnx", refinerCheckpoint: "onnx", infotext: text }).params.refinerCheckpoint, "onnx");
  const unknown = submit({ model: "onnx", infotext: text.replace("bbbbbbbbbb", "cccccccccc") });
  assert.equal(unknown.params.refinerCheckpoint, "sd15");
});
