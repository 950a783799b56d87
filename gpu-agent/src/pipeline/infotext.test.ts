import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { GenerationParamsSchema } from "@latentfarm/shared";
import { buildInfotext, formatInfotext, hashListName } from "./infotext.js";
import { loraHashesEntry, loraHashesInPromptOrder, mergeLoraHashes } from "./render-common.js";

test("infotext follows A1111's key order, omissions and quoting", () => {
  const s = buildInfotext({
    prompt: "a photo of a cat",
    negativePrompt: "blurry",
    steps: 20,
    sampler: "DPM++ 2M",
    scheduleType: "Karras",
    cfgScale: 7,
    seed: 1234,
    width: 512,
    height: 512,
    model: "v1-5-pruned-emaonly",
    modelHash: "6ce0161689",
    clipSkip: 1,
    rng: "GPU",
    ensd: 0,
  });
  assert.equal(
    s,
    "a photo of a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: latentfarm-0.1.0",
  );
});

test("values with commas, colons or newlines are JSON-quoted; non-default RNG, clip skip, ENSD appear", () => {
  const s = buildInfotext({
    prompt: "x",
    negativePrompt: "",
    steps: 10,
    sampler: "Euler a",
    scheduleType: "Automatic",
    cfgScale: 6.5,
    seed: 7,
    width: 64,
    height: 96,
    model: "tiny",
    clipSkip: 2,
    ensd: 31337,
    rng: "CPU",
    subseed: 5,
    subseedStrength: 0.25,
    extra: [["Hires prompt", 'a, "b"']],
  });
  assert.equal(
    s,
    'x\nSteps: 10, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 7, Size: 64x96, Model: tiny, Variation seed: 5, Variation seed strength: 0.25, Clip skip: 2, ENSD: 31337, RNG: CPU, Hires prompt: "a, \\"b\\"", Version: latentfarm-0.1.0',
  );
});

test("a key whose value equals the key is written alone", () => {
  assert.equal(
    formatInfotext("p", "", [
      ["Tiling", "Tiling"],
      ["Steps", 1],
    ]),
    "p\nTiling, Steps: 1",
  );
});

test("Lora hashes: in the order the prompt names the LoRAs, then the request's; names without ':' and ','; passes merged as A1111's dict", () => {
  const model = { name: "m", modelHash: undefined, vae: undefined, loraHashes: ["a,x: 222", "b: 111", "c: 333"] };
  const p = create(GenerationParamsSchema, { prompt: "<lora:b:1> x <lora:a,x:0.5>", loras: [{ name: "c", teWeight: 1, unetWeight: 1 }] });
  assert.deepEqual(loraHashesEntry(model, { p, unmergedLoraHashes: new Map() }), ["Lora hashes", "b: 111, ax: 222, c: 333"]);
  assert.deepEqual(loraHashesEntry({ ...model, loraHashes: [] }, { p, unmergedLoraHashes: new Map() }), ["Lora hashes", undefined]);
  // A weight-0 tag merges nothing: its entry comes from the unmerged ones, in its place in the prompt, and
  // only where the prompt names it; a hash of a LoRA no prompt names keeps its place after them.
  assert.deepEqual(loraHashesInPromptOrder(["a: 1", "z: 9"], "<lora:q:0> <lora:a:1>", []), ["a: 1", "z: 9"]);
  const unmerged = new Map([
    ["q", "q: 5"],
    ["r", "r: 6"],
  ]);
  assert.deepEqual(loraHashesInPromptOrder(["a: 1", "z: 9"], "<lora:q:0> <lora:a:1>", [], unmerged), ["q: 5", "a: 1", "z: 9"]);
  assert.deepEqual(mergeLoraHashes(["b: 1", "a: 2"], ["c: 3", "b: 4"]), ["b: 4", "a: 2", "c: 3"]);
});

test("hash lists name things without ':' and ',' (A1111's Lora hashes and TI hashes)", () => {
  assert.equal(hashListName("a:b,c d"), "abc d");
});
