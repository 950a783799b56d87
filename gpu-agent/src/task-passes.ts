/**
 * The pipelines a task runs on. A pipeline is one checkpoint with one set of LoRAs merged into its
 * weights, so each pass of a Hires.fix image runs on its own (passPipelineKey): the second pass on
 * the hires checkpoint with the hires prompt's LoRAs. A stage task runs on its pass's pipeline. A FULL
 * Hires.fix task whose passes need different pipelines runs as its two stages back to back on this
 * agent, the first pass's hand-over going straight to the second: the same bytes as a FULL task on
 * one pipeline or as stages on two agents.
 */
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { FarmError, RunTaskRequestSchema, TaskStage, isHiresTxt2img, refinerInPass, type RunTaskRequest } from "@latentfarm/shared";
import { passPipelineKey, type PassKeyOf } from "./models/model-loader.js";
import type { RenderContext } from "./pipeline/render-common.js";
import type { TaskOutput } from "./task-run.js";
import type { PipelineOutput } from "./pipeline/txt2img.js";

/** Stages that belong to the second pass: they run on its pipeline. */
const SECOND_PASS_STAGES: ReadonlySet<TaskStage> = new Set([
  TaskStage.SECOND_PASS,
  TaskStage.UPSCALE,
  TaskStage.SECOND_PASS_TILE,
  TaskStage.ASSEMBLE,
]);

/** The pass a stage task belongs to. */
function stagePass(req: RunTaskRequest): "first" | "second" {
  return SECOND_PASS_STAGES.has(req.stage) && isHiresTxt2img(req.params!) ? "second" : "first";
}

/** Pass keys without a VAE file: the checkpoint's own VAE decodes. */
const checkpointVae: PassKeyOf = (p, pass, refiner) => Promise.resolve(passPipelineKey(p, pass, undefined, refiner));

/** The pipeline key of the pass a stage task belongs to. */
export function stagePipelineKey(req: RunTaskRequest, keyOf: PassKeyOf = checkpointVae): Promise<string> {
  return keyOf(req.params!, stagePass(req));
}

/** Runs `req` on the pipeline of `key` (acquired and released by the caller's cache). */
export type RunOnPipeline = (key: string, req: RunTaskRequest, ctx: RenderContext) => Promise<PipelineOutput>;

/**
 * Runs a task on its pipelines: one for most tasks; two in a row for a FULL Hires.fix task whose second
 * pass needs another, or which has a refiner (each pass may then switch to the refiner and back, as
 * A1111 reloads the model for the second pass). A pass that reaches its refiner switch runs again on
 * the refiner's pipeline from there (pipeline/refiner.ts). Progress then counts both passes, as a FULL
 * task's does.
 */
export async function runTaskPasses(
  req: RunTaskRequest,
  ctx: RenderContext,
  runOn: RunOnPipeline,
  keyOf: PassKeyOf = checkpointVae,
): Promise<TaskOutput> {
  const p = req.params!;
  const first = await stagePipelineKey(req, keyOf);
  if (req.stage !== TaskStage.FULL || !isHiresTxt2img(p)) return runWithRefiner(first, req, ctx, runOn, keyOf);
  const second = await keyOf(p, "second");
  if (second === first && !refinerInPass(p, "first") && !refinerInPass(p, "second")) return runWithRefiner(first, req, ctx, runOn, keyOf);
  // A FULL task reports first-pass steps out of both passes' total; the first pass reports its own.
  let firstSteps = 0;
  const handover = await runWithRefiner(
    first,
    create(RunTaskRequestSchema, { ...req, stage: TaskStage.FIRST_PASS }),
    {
      ...ctx,
      onStep: (step, total, previewPng) => {
        firstSteps = total;
        ctx.onStep(step, total + (p.hrSecondPassSteps || total), previewPng);
      },
    },
    runOn,
    keyOf,
  );
  if (handover.case !== "handover") throw new FarmError(grpc.status.INTERNAL, "the first pass returned an image instead of its hand-over");
  return runWithRefiner(
    second,
    create(RunTaskRequestSchema, { ...req, stage: TaskStage.SECOND_PASS, inputs: [handover.value] }),
    {
      ...ctx,
      onStep: (step, total, previewPng) => ctx.onStep(firstSteps + step, firstSteps + total, previewPng),
    },
    runOn,
    keyOf,
  );
}

/** Runs a task on `key`, and again on its refiner's pipeline from the switch when its pass switches. */
async function runWithRefiner(
  key: string,
  req: RunTaskRequest,
  ctx: RenderContext,
  runOn: RunOnPipeline,
  keyOf: PassKeyOf,
): Promise<TaskOutput> {
  const out = await runOn(key, req, ctx);
  if (out.case !== "refinerSwitch") return out;
  const refined = await runOn(
    await keyOf(req.params!, stagePass(req), true),
    create(RunTaskRequestSchema, { ...req, refinerResume: out.value }),
    ctx,
  );
  if (refined.case === "refinerSwitch")
    throw new FarmError(grpc.status.INTERNAL, "the refiner's run of a pass switched to the refiner again");
  return refined;
}
