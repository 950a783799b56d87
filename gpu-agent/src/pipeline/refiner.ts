/**
 * A1111's refiner switch (refiner_checkpoint, refiner_switch_at) across pipelines. A pipeline holds one
 * checkpoint, so a pass that switches runs twice: on the model's pipeline until the switch (denoise
 * throws RefinerSwitch, which becomes the task's RefinerResume), then on the refiner's, which replays the
 * sampler with the same answers up to the switch and evaluates the refiner from there (denoise's
 * "resume"). Replaying gives the sampler exactly the state A1111's carries across its model reload:
 * its history, its noise draws and Brownian tree, its infotext entries.
 */
import { create } from "@bufbuild/protobuf";
import {
  FarmError,
  RefinerResumeSchema,
  float32Bytes,
  float32FromBytes,
  samplingPass,
  checkRefinerSwitchAt,
  isHiresTxt2img,
  refinerCheckpoint,
  refinerInPass,
  type RefinerResume,
  type RunTaskRequest,
} from "@latentfarm/shared";
import type { PrepareSamplingInput, PreparedSampling } from "../sampling/index.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RefinerMode, RefinerSwitch } from "./denoise.js";
import { passModel, modelIdentity, type ModelIdentity } from "./render-common.js";

export type Pass = "first" | "second";

/** prepareSampling's `refiner` for `pass` of the task (undefined when the pass never switches). */
export function refinerSampling(req: RunTaskRequest, pass: Pass): PrepareSamplingInput["refiner"] {
  const p = req.params!;
  if (!refinerInPass(p, pass)) return undefined;
  return { switchAt: checkRefinerSwitchAt(p) };
}

/**
 * denoise's `refiner` for `pass` of the task on `pipe`: "resume" on the refiner's pipeline with the
 * model's answers, "switch" on the model's, undefined when the pass has no refiner. At the take-over
 * the sampler records what A1111's apply_refiner writes: "Hires refiner" (a Hires.fix job whose
 * setting is not the default second pass), "Refiner" (the refiner's short title) and "Refiner switch at".
 */
export function refinerRun(pipe: LoadedPipeline, req: RunTaskRequest, pass: Pass, sampler: PreparedSampling): RefinerMode | undefined {
  const p = req.params!;
  if (!refinerInPass(p, pass)) return undefined;
  const resume = req.refinerResume;
  if (resume === undefined || samplingPass(req.stage) !== pass) return { mode: "switch" };
  if (pipe.name !== refinerCheckpoint(p)) {
    throw FarmError.invalid("refiner_resume", `the refiner's run is on "${pipe.name}", not on the refiner "${refinerCheckpoint(p)}"`);
  }
  const switchAt = checkRefinerSwitchAt(p);
  return {
    mode: "resume",
    start: float32FromBytes(resume.start, "refiner_resume.start"),
    init: resume.init.length > 0 ? float32FromBytes(resume.init, "refiner_resume.init") : undefined,
    answers: resume.answers.map((a, i) => float32FromBytes(a, `refiner_resume.answers[${i}]`)),
    uncondAnswers: resume.uncondAnswers.map((a, i) => float32FromBytes(a, `refiner_resume.uncond_answers[${i}]`)),
    onTakeOver: () => {
      const which = p.overrideSettings?.hiresFixRefinerPass || "second pass";
      if (isHiresTxt2img(p) && which !== "second pass") sampler.infotext["Hires refiner"] = which;
      sampler.infotext["Refiner"] = checkpointTitle(pipe);
      if (switchAt !== undefined) sampler.infotext["Refiner switch at"] = switchAt;
    },
  };
}

/**
 * The model `pass` of the task ran on as its infotext names it ("Model", its hash, LoRAs and VAE): the
 * pipeline's own, or on a refiner's take-over, the model's the pass started on.
 */
export function passIdentity(pipe: LoadedPipeline, req: RunTaskRequest, pass: Pass): ModelIdentity {
  const resume = req.refinerResume;
  if (resume === undefined || samplingPass(req.stage) !== pass) return pipe;
  return modelIdentity(resume.model, pipe);
}

/** A switch thrown by a pass on `pipe` as the task's output for the refiner's run. */
export function refinerResumeOf(pipe: ModelIdentity, s: RefinerSwitch): RefinerResume {
  return create(RefinerResumeSchema, {
    start: float32Bytes(s.start),
    answers: s.answers.map(float32Bytes),
    uncondAnswers: s.uncondAnswers.map(float32Bytes),
    ...(s.init !== undefined && { init: float32Bytes(s.init) }),
    model: passModel(pipe),
    inpaintingConditioning: s.inpaintingConditioning,
  });
}

/** A1111's short_title of a checkpoint, as "Hires checkpoint" and "Refiner" name it: "name [hash]" (an ONNX folder has no hash). */
export function checkpointTitle(model: ModelIdentity): string {
  return model.modelHash !== undefined ? `${model.name} [${model.modelHash}]` : model.name;
}
