/**
 * Checkpoints of a task's sampling pass (RunTaskRequest.checkpoint_every_steps and resume_from): the
 * pass's answers go to the coordinator as it runs, and a retry after a failed attempt replays them
 * instead of sampling those steps again. The replay is denoise's, which a refiner's run uses too, so a
 * resumed image is the image of an uninterrupted run.
 */
import { create } from "@bufbuild/protobuf";
import {
  PassCheckpointSchema,
  TaskStage,
  float32Bytes,
  float32FromBytes,
  isHiresTxt2img,
  refinerInPass,
  samplingPass,
  type PassCheckpoint,
  type RunTaskRequest,
} from "@latentfarm/shared";
import type { CheckpointPart, CheckpointRun, PassProgress } from "./denoise.js";
import type { RenderContext } from "./render-common.js";
import type { Pass } from "./refiner.js";

/**
 * denoise's `checkpoint` for `pass` of the task: undefined unless the task samples that pass alone (a
 * FULL Hires.fix task runs two passes, whose checkpoints one list cannot hold), the pass has no refiner
 * (the refiner's switch carries its own resume), and the request asks for checkpoints or resumes.
 */
export function checkpointRun(req: RunTaskRequest, ctx: RenderContext, pass: Pass): CheckpointRun | undefined {
  const p = req.params!;
  if (samplingPass(req.stage) !== pass || refinerInPass(p, pass)) return undefined;
  if (req.stage === TaskStage.FULL && isHiresTxt2img(p)) return undefined;
  const every = Math.max(0, req.checkpointEverySteps);
  const resume = req.resumeFrom === undefined ? undefined : passProgressOf(req.resumeFrom);
  if (every === 0 && resume === undefined) return undefined;
  return { every, resume, emit: (part) => ctx.onCheckpoint?.(passCheckpointOf(part)) };
}

export function passCheckpointOf(part: CheckpointPart): PassCheckpoint {
  return create(PassCheckpointSchema, {
    firstCall: part.firstCall,
    answers: part.answers.map(float32Bytes),
    uncondAnswers: part.uncondAnswers.map(float32Bytes),
    ...(part.start !== undefined && { start: float32Bytes(part.start) }),
    ...(part.init !== undefined && { init: float32Bytes(part.init) }),
  });
}

function passProgressOf(c: PassCheckpoint): PassProgress {
  return {
    start: float32FromBytes(c.start, "resume_from.start"),
    init: c.init.length > 0 ? float32FromBytes(c.init, "resume_from.init") : undefined,
    answers: c.answers.map((a, i) => float32FromBytes(a, `resume_from.answers[${i}]`)),
    uncondAnswers: c.uncondAnswers.map((a, i) => float32FromBytes(a, `resume_from.uncond_answers[${i}]`)),
  };
}
