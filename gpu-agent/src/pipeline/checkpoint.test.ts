import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  FarmError,
  PassCheckpointSchema,
  RngSource,
  RunTaskRequestSchema,
  type GenerationParamsSchema,
  type PassCheckpoint,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { rightHalfMask, solidPng } from "../test-support/images.js";
import { kitSkip } from "../test-support/kit.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import { renderTask } from "./txt2img.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;

const request = (params: Params, extra: Partial<Pick<RunTaskRequest, "checkpointEverySteps" | "resumeFrom">> = {}): RunTaskRequest =>
  create(RunTaskRequestSchema, {
    taskId: "t",
    jobId: "j",
    seed: 5n,
    params: {
      model: "tiny-sd15",
      prompt: "a red apple",
      negativePrompt: "blurry",
      steps: 6,
      width: 64,
      height: 64,
      rng: RngSource.NV,
      ...params,
    },
    ...extra,
  });

/** A render's image, its checkpoints and the steps it reported itself. */
async function render(pipe: LoadedPipeline, req: RunTaskRequest) {
  const checkpoints: PassCheckpoint[] = [];
  const steps: number[] = [];
  const ctx: RenderContext = {
    signal: new AbortController().signal,
    agentId: "t",
    onStep: (step) => steps.push(step),
    onWarning: () => {},
    onCheckpoint: (c) => checkpoints.push(c),
  };
  return { image: await renderTask(pipe, req, ctx), checkpoints, steps };
}

/** The first `n` checkpoints as one, as the coordinator appends them. */
function joined(parts: readonly PassCheckpoint[], n: number): PassCheckpoint {
  const taken = parts.slice(0, n);
  return create(PassCheckpointSchema, {
    start: taken[0]!.start,
    init: taken[0]!.init,
    answers: taken.flatMap((c) => c.answers),
    uncondAnswers: taken.flatMap((c) => c.uncondAnswers),
  });
}

describe("checkpoints of a sampling pass, and a retry that resumes from them", { skip: kitSkip("tiny-sd15") }, () => {
  let pipe: LoadedPipeline;
  before(async () => {
    pipe = await loadTinyPipeline();
  });
  after(() => pipe?.close());

  test("every n steps a checkpoint of the calls since the last; a resumed run gives the uninterrupted run's bytes", async () => {
    // One of each kind of sampler state: ancestral noise, a Brownian tree, a multistep history, two calls a
    // step, a timestep sampler with its negative prompt's own eps.
    for (const [samplerName, callsPerStep] of [
      ["Euler a", 1],
      ["DPM++ 2M SDE", 1],
      ["UniPC", 1],
      ["Heun", 2],
      ["DDIM CFG++", 1],
    ] as const) {
      const plain = await render(pipe, request({ samplerName }));
      assert.deepEqual(plain.checkpoints, [], "none unless asked for");
      const full = await render(pipe, request({ samplerName }, { checkpointEverySteps: 2 }));
      assert.deepEqual(Buffer.from(full.image.png), Buffer.from(plain.image.png), `${samplerName}: checkpoints change nothing`);
      // Steps 2 and 4 end with a checkpoint (6, the last, ends with the image), each of the calls since the
      // last: two a step for Heun, one for Euler a (UniPC's first step makes two, its last none).
      const calls = full.checkpoints.map((c) => c.answers.length);
      assert.equal(calls.length, 2, samplerName);
      if (samplerName === "Heun" || samplerName === "Euler a") assert.deepEqual(calls, [2 * callsPerStep, 2 * callsPerStep], samplerName);
      assert.deepEqual(
        full.checkpoints.map((c) => c.firstCall),
        [0, calls[0]],
        samplerName,
      );
      assert.ok(
        full.checkpoints[0]!.start.length === 4 * 8 * 8 * 4 && full.checkpoints[1]!.start.length === 0,
        "the first carries the start",
      );
      assert.equal(full.checkpoints[0]!.uncondAnswers.length, samplerName === "DDIM CFG++" ? calls[0] : 0, samplerName);
      for (const n of [1, 2]) {
        const resumeFrom = joined(full.checkpoints, n);
        const resumed = await render(pipe, request({ samplerName }, { checkpointEverySteps: 2, resumeFrom }));
        assert.deepEqual(Buffer.from(resumed.image.png), Buffer.from(full.image.png), `${samplerName}: resumed after ${n} checkpoints`);
        // It reports and checkpoints only the steps it made itself, numbering calls after the replayed ones.
        assert.deepEqual(
          resumed.steps,
          [2 * n + 1, 2 * n + 2, 2 * n + 3, 2 * n + 4, 2 * n + 5, 2 * n + 6].filter((s) => s <= 6),
        );
        assert.deepEqual(
          resumed.checkpoints.map((c) => c.firstCall),
          n === 1 ? [calls[0]] : [],
          samplerName,
        );
      }
    }
  });

  test("a resumed run takes the checkpoint's answers rather than making those model calls again", async () => {
    const full = await render(pipe, request({ samplerName: "Euler a" }, { checkpointEverySteps: 2 }));
    const first = joined(full.checkpoints, 1);
    // Were the replayed steps computed afresh, answers of zeros would change nothing.
    const zeroed = create(PassCheckpointSchema, { ...first, answers: first.answers.map((a) => new Uint8Array(a.length)) });
    const resumed = await render(pipe, request({ samplerName: "Euler a" }, { checkpointEverySteps: 2, resumeFrom: zeroed }));
    assert.notDeepEqual(Buffer.from(resumed.image.png), Buffer.from(full.image.png));
  });

  test("an inpainting pass resumes toward the first attempt's init latent; a checkpoint that does not fit is INVALID_ARGUMENT", async () => {
    const picture = await solidPng(64, 64, { r: 200, g: 90, b: 30 });
    const mask = await rightHalfMask();
    const inpaint: Params = {
      samplerName: "Euler a",
      initImages: [picture],
      mask,
      denoisingStrength: 0.7,
      maskBlur: 0,
    };
    const full = await render(pipe, request(inpaint, { checkpointEverySteps: 1 }));
    assert.ok(full.checkpoints[0]!.init.length > 0, "the first checkpoint carries the init latent");
    const resumed = await render(pipe, request(inpaint, { resumeFrom: joined(full.checkpoints, 2) }));
    assert.deepEqual(Buffer.from(resumed.image.png), Buffer.from(full.image.png));
    // A checkpoint of another size, or with more calls than the pass makes, is refused naming resume_from.
    const bad = async (resumeFrom: PassCheckpoint, field: string) =>
      assert.rejects(render(pipe, request(inpaint, { resumeFrom })), (e: unknown) => {
        const err = FarmError.from(e);
        return err.codeName === "INVALID_ARGUMENT" && err.field === field;
      });
    const first = joined(full.checkpoints, 1);
    await bad(create(PassCheckpointSchema, { ...first, start: first.start.subarray(0, 64) }), "resume_from.start");
    const all = joined(full.checkpoints, full.checkpoints.length);
    await bad(create(PassCheckpointSchema, { ...all, answers: [...all.answers, ...all.answers] }), "resume_from");
  });

  test("a FULL Hires.fix task (two passes) and a pass with a refiner (which carries its own resume) take no checkpoints", async () => {
    const hires = await render(
      pipe,
      request({ samplerName: "Euler", enableHr: true, hrScale: 1.5, denoisingStrength: 0.5 }, { checkpointEverySteps: 1 }),
    );
    assert.deepEqual(hires.checkpoints, []);
    const refiner = await render(
      pipe,
      request({ samplerName: "Euler", refinerCheckpoint: "tiny-sd15-b", refinerSwitchAt: 1 }, { checkpointEverySteps: 1 }),
    );
    assert.deepEqual(refiner.checkpoints, []);
  });
});
