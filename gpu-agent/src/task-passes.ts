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
import {
  FarmError,
  MAX_MESSAGE_BYTES,
  RunTaskRequestSchema,
  TaskStage,
  isHiresTxt2img,
  refinerCheckpoint,
  refinerInPass,
  type RunTaskRequest,
} from "@latentfarm/shared";
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
 * Whether this agent offers a checkpoint (its refiner): one that does not hands a pass's switch back to
 * the coordinator rather than load it.
 */
export type OffersModel = (name: string) => Promise<boolean>;

/**
 * Runs a task on its pipelines: one for most tasks; two in a row for a FULL Hires.fix task whose second
 * pass needs another, or which has a refiner (each pass may then switch to the refiner and back, as
 * A1111 reloads the model for the second pass). A pass that reaches its refiner switch runs again on
 * the refiner's pipeline from there (pipeline/refiner.ts), on this agent when it offers the refiner;
 * otherwise a single-pass task returns the switch for the coordinator to place. A task that comes
 * with a resume runs on the refiner's pipeline alone. Progress counts both passes, as a FULL task's does.
 */
export async function runTaskPasses(
  req: RunTaskRequest,
  ctx: RenderContext,
  runOn: RunOnPipeline,
  keyOf: PassKeyOf = checkpointVae,
  offers: OffersModel = () => Promise.resolve(true),
  /** Each pass that reaches its refiner switch: whether the refiner runs here or the switch is handed back. */
  onSwitch: (where: "local" | "handed_back") => void = () => {},
): Promise<TaskOutput> {
  const p = req.params!;
  const hires = req.stage === TaskStage.FULL && isHiresTxt2img(p);
  if (req.refinerResume !== undefined) {
    if (hires) throw FarmError.invalid("refiner_resume", "a FULL Hires.fix task cannot resume a pass: its stages can");
    return finished(await runOn(await keyOf(p, stagePass(req), true), req, ctx));
  }
  const first = await stagePipelineKey(req, keyOf);
  if (!hires) return runWithRefiner(first, req, ctx, runOn, keyOf, offers, onSwitch, true);
  const second = await keyOf(p, "second");
  if (second === first && !refinerInPass(p, "first") && !refinerInPass(p, "second")) {
    return runWithRefiner(first, req, ctx, runOn, keyOf, offers, onSwitch, true);
  }
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
    offers,
    onSwitch,
    false,
  );
  if (handover.case !== "handover") throw new FarmError(grpc.status.INTERNAL, "the first pass returned an image instead of its hand-over");
  return runWithRefiner(
    second,
    create(RunTaskRequestSchema, { ...req, stage: TaskStage.SECOND_PASS, inputs: [handover.value] }),
    { ...ctx, onStep: (step, total, previewPng) => ctx.onStep(firstSteps + step, firstSteps + total, previewPng) },
    runOn,
    keyOf,
    offers,
    onSwitch,
    false,
  );
}

/**
 * Runs a task on `key`, and when its pass switches, on the refiner's pipeline from the switch; or, with
 * `mayHandBack` on an agent without the refiner, returns the switch.
 */
async function runWithRefiner(
  key: string,
  req: RunTaskRequest,
  ctx: RenderContext,
  runOn: RunOnPipeline,
  keyOf: PassKeyOf,
  offers: OffersModel,
  onSwitch: (where: "local" | "handed_back") => void,
  mayHandBack: boolean,
): Promise<TaskOutput> {
  const out = await runOn(key, req, ctx);
  if (out.case !== "refinerSwitch") return out;
  const p = req.params!;
  if (!(await offers(refinerCheckpoint(p)!))) {
    if (mayHandBack) {
      const bytes = out.value.start.byteLength + [...out.value.answers, ...out.value.uncondAnswers].reduce((n, a) => n + a.byteLength, 0);
      // It goes to the coordinator and on to the refiner's agent in one gRPC message each way.
      if (bytes > MAX_MESSAGE_BYTES - 1024 * 1024) {
        throw new FarmError(
          grpc.status.FAILED_PRECONDITION,
          `the pass's state at its refiner switch (${Math.ceil(bytes / 2 ** 20)} MiB) is too large to hand to another agent; give this agent the refiner "${refinerCheckpoint(p)}" too`,
          { field: "refiner_checkpoint" },
        );
      }
      onSwitch("handed_back");
      return out;
    }
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `this agent does not offer the refiner "${refinerCheckpoint(p)}"`, {
      field: "refiner_checkpoint",
    });
  }
  onSwitch("local");
  return finished(
    await runOn(await keyOf(p, stagePass(req), true), create(RunTaskRequestSchema, { ...req, refinerResume: out.value }), ctx),
  );
}

/** A refiner's run's output, which never switches again. */
function finished(out: PipelineOutput): TaskOutput {
  if (out.case === "refinerSwitch") throw new FarmError(grpc.status.INTERNAL, "the refiner's run of a pass switched to the refiner again");
  return out;
}
