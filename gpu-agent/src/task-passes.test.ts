import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import sharp from "sharp";
import type { GenerationParamsSchema } from "@latentfarm/shared";
import { FarmError, RngSource, RunTaskRequestSchema, TaskStage, type Image, type RunTaskRequest } from "@latentfarm/shared";
import { parsePipelineKey, passPipelineKey } from "./models/model-loader.js";
import type { LoadedPipeline } from "./pipeline/loaded-pipeline.js";
import type { RenderContext } from "./pipeline/render-common.js";
import { renderTask, runTask } from "./pipeline/txt2img.js";
import { CatalogPipelines } from "./test-support/lora-catalog.js";
import { runTaskPasses, stagePipelineKey } from "./task-passes.js";
import type { PipelineOutput } from "./pipeline/txt2img.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;

/** The image's pixels: its PNG also holds the infotext, which differs where the request does. */
const pixels = async (image: Image): Promise<Buffer> => sharp(image.png).raw().toBuffer();

const request = (params: Params, stage = TaskStage.FULL): RunTaskRequest =>
  create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed: 11n, stage, params });

test("a stage runs on its pass's pipeline: the hires checkpoint and the hires prompt's LoRAs from the second pass on", async () => {
  const params: Params = {
    model: "a",
    prompt: "x <lora:s:1>",
    hrPrompt: "y <lora:t:0.5>",
    hrCheckpointName: "b",
    enableHr: true,
    loras: [{ name: "u", teWeight: 1, unetWeight: 1 }],
  };
  const key = async (stage: TaskStage, p: Params = params) => parsePipelineKey(await stagePipelineKey(request(p, stage)));
  assert.deepEqual(await key(TaskStage.FIRST_PASS), {
    model: "a",
    loras: [
      { name: "s", teWeight: 1, unetWeight: 1 },
      { name: "u", teWeight: 1, unetWeight: 1 },
    ],
  });
  for (const stage of [TaskStage.SECOND_PASS, TaskStage.UPSCALE, TaskStage.SECOND_PASS_TILE, TaskStage.ASSEMBLE]) {
    assert.deepEqual(await key(stage), {
      model: "b",
      loras: [
        { name: "t", teWeight: 0.5, unetWeight: 0.5 },
        { name: "u", teWeight: 1, unetWeight: 1 },
      ],
    });
  }
  // No hires prompt: the second pass has the first pass's LoRAs; "Use same checkpoint" is the first pass's model.
  assert.equal(
    await stagePipelineKey(request({ ...params, hrPrompt: "", hrCheckpointName: "Use same checkpoint" }, TaskStage.SECOND_PASS)),
    await stagePipelineKey(request(params, TaskStage.FIRST_PASS)),
  );
  // Without Hires.fix (or for img2img, where A1111 ignores it) the hires fields choose nothing.
  assert.equal((await key(TaskStage.FULL, { ...params, enableHr: false })).model, "a");
  assert.equal(
    passPipelineKey(create(RunTaskRequestSchema, { params: { ...params, initImages: [new Uint8Array(1)] } }).params!, "second"),
    passPipelineKey(create(RunTaskRequestSchema, { params: { ...params, enableHr: false } }).params!, "second"),
  );
});

describe("a Hires.fix second pass with its own checkpoint or LoRAs runs on its own pipeline", { concurrency: false }, () => {
  let pipelines: CatalogPipelines;
  before(async () => {
    pipelines = await CatalogPipelines.create({ "tiny-b": 4 });
  });
  after(() => pipelines.close());
  const pipe = (key: string): Promise<LoadedPipeline> => pipelines.get(key);
  const base: Params = {
    model: "tiny",
    prompt: "a cat <lora:style:1>",
    samplerName: "Euler",
    steps: 3,
    width: 64,
    height: 64,
    rng: RngSource.CPU,
    enableHr: true,
    hrScale: 1.5,
    hrSecondPassSteps: 2,
    denoisingStrength: 0.6,
  };

  /** The agent's way: runTaskPasses over pipelines keyed as the agent's cache keys them. */
  async function throughPasses(params: Params) {
    const keys: string[] = [];
    const steps: Array<[number, number]> = [];
    const ctx: RenderContext = {
      signal: new AbortController().signal,
      agentId: "t",
      onStep: (step, total) => steps.push([step, total]),
      onWarning: () => {},
    };
    const output = await runTaskPasses(request(params), ctx, async (key, req, c): Promise<PipelineOutput> => {
      keys.push(key);
      return runTask(await pipe(key), req, c);
    });
    assert.equal(output.case, "result");
    return { image: output.value as Image, keys: keys.map((k) => parsePipelineKey(k)), steps };
  }

  /** The farm's way: FIRST_PASS and SECOND_PASS as separate tasks, each on its stage's pipeline. */
  async function asStages(params: Params): Promise<Image> {
    const ctx: RenderContext = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} };
    const first = request(params, TaskStage.FIRST_PASS);
    const handover = await runTask(await pipe(await stagePipelineKey(first)), first, ctx);
    assert.equal(handover.case, "handover");
    const second = create(RunTaskRequestSchema, { ...request(params, TaskStage.SECOND_PASS), inputs: [handover.value as never] });
    const image = await runTask(await pipe(await stagePipelineKey(second)), second, ctx);
    return image.value as Image;
  }

  test("a hires prompt without the first pass's LoRA: its second pass runs on the base model, as A1111 deactivates the LoRA", async () => {
    const params = { ...base, hrPrompt: "a cat, detailed" };
    const { image, keys, steps } = await throughPasses(params);
    assert.deepEqual(
      keys.map((k) => [k.model, k.loras.map((l) => l.name)]),
      [
        ["tiny", ["style"]],
        ["tiny", []],
      ],
    );
    // One task's progress: the first pass's steps, then the second's, out of both.
    assert.deepEqual(steps, [
      [1, 5],
      [2, 5],
      [3, 5],
      [4, 5],
      [5, 5],
    ]);
    // The same bytes and text as the stages run by the farm on two agents.
    const staged = await asStages(params);
    assert.deepEqual(Buffer.from(staged.png), Buffer.from(image.png));
    assert.equal(staged.infotext, image.infotext);
    // A1111 keeps the first pass's LoRA hashes and model, and names the hires prompt.
    assert.match(image.infotext, /Model hash: [0-9a-f]{10}, Model: tiny, /);
    assert.match(image.infotext, /Hires prompt: "a cat, detailed"/);
    assert.match(image.infotext, /Lora hashes: "style: [0-9a-f]{12}"/);
    // The LoRA in both passes is another image: the second pass's weights are its own.
    const withLora = await throughPasses({ ...params, hrPrompt: "a cat, detailed <lora:style:1>" });
    assert.equal(withLora.keys.length, 1, "the same pipeline runs both passes");
    assert.notDeepEqual(await pixels(withLora.image), await pixels(image));
  });

  test("a LoRA only in the hires prompt: the second pass merges it and the infotext adds its hash", async () => {
    const params = { ...base, prompt: "a cat", hrPrompt: "a cat <lora:style:0.8>" };
    const { image, keys } = await throughPasses(params);
    assert.deepEqual(
      keys.map((k) => k.loras.map((l) => `${l.name}:${l.unetWeight}`)),
      [[], ["style:0.8"]],
    );
    assert.match(image.infotext, /Lora hashes: "style: [0-9a-f]{12}"/);
    const staged = await asStages(params);
    assert.deepEqual(Buffer.from(staged.png), Buffer.from(image.png));
    const without = await throughPasses({ ...params, hrPrompt: "" });
    assert.notDeepEqual(await pixels(without.image), await pixels(image), "the LoRA changed the second pass");
    assert.doesNotMatch(without.image.infotext, /Lora hashes/);
  });

  test("Lora hashes list the LoRAs in prompt order, the first pass's before the ones only the hires prompt adds", async () => {
    const { image } = await throughPasses({ ...base, prompt: "a cat <lora:style:1>", hrPrompt: "a cat <lora:ink:1> <lora:style:1>" });
    assert.match(image.infotext, /Lora hashes: "style: [0-9a-f]{12}, ink: [0-9a-f]{12}"/);
    const plain = await throughPasses({ ...base, enableHr: false, prompt: "a cat <lora:style:0.5> <lora:ink:0.5>" });
    assert.match(plain.image.infotext, /Lora hashes: "style: [0-9a-f]{12}, ink: [0-9a-f]{12}"/);
  });

  test("Hires checkpoint: the second pass runs on it; the infotext names the first model and the hires checkpoint's title", async () => {
    for (const hrUpscaler of ["Latent", "Lanczos"]) {
      const params = { ...base, prompt: "a cat", hrCheckpointName: "tiny-b", hrUpscaler };
      const { image, keys } = await throughPasses(params);
      assert.deepEqual(
        keys.map((k) => k.model),
        ["tiny", "tiny-b"],
      );
      const [a, b] = [
        await pipe(passPipelineKey(request(params).params!, "first")),
        await pipe(passPipelineKey(request(params).params!, "second")),
      ];
      assert.ok(a.modelHash && b.modelHash && a.modelHash !== b.modelHash);
      assert.match(image.infotext, new RegExp(`Model hash: ${a.modelHash}, Model: tiny, `));
      assert.match(image.infotext, new RegExp(`Hires checkpoint: tiny-b \\[${b.modelHash}\\]`));
      const staged = await asStages(params);
      assert.deepEqual(Buffer.from(staged.png), Buffer.from(image.png), hrUpscaler);
      assert.equal(staged.infotext, image.infotext);
      const same = await throughPasses({ ...params, hrCheckpointName: "" });
      assert.notDeepEqual(await pixels(same.image), await pixels(image), `${hrUpscaler}: the second checkpoint's weights show`);
      assert.doesNotMatch(same.image.infotext, /Hires checkpoint/);
    }
  });

  test("naming the first pass's own checkpoint runs one pipeline and writes Hires checkpoint, as A1111 does", async () => {
    const params = { ...base, prompt: "a cat", hrCheckpointName: "tiny" };
    const { image, keys } = await throughPasses(params);
    assert.equal(keys.length, 1);
    const plain = await throughPasses({ ...params, hrCheckpointName: "Use same checkpoint" });
    assert.deepEqual(await pixels(plain.image), await pixels(image));
    assert.match(image.infotext, /Hires checkpoint: tiny \[[0-9a-f]{10}\]/);
    assert.doesNotMatch(plain.image.infotext, /Hires checkpoint/);
  });

  test("a pipeline that is not the second pass's own refuses it rather than render with the wrong weights", async () => {
    const tiny = await pipe(passPipelineKey(request({ ...base, prompt: "a cat" }).params!, "first"));
    const ctx: RenderContext = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} };
    const refuses = (params: Params, field: string) =>
      assert.rejects(renderTask(tiny, request(params), ctx), (e: unknown) => {
        const err = FarmError.from(e);
        return err.codeName === "UNIMPLEMENTED" && err.field === field;
      });
    await refuses({ ...base, prompt: "a cat", hrCheckpointName: "tiny-b" }, "hr_checkpoint_name");
    await refuses({ ...base, prompt: "a cat", hrPrompt: "a cat <lora:style:1>" }, "hr_prompt");
  });
});
