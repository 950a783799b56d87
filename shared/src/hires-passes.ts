/**
 * Which model and prompt a Hires.fix second pass runs with (A1111 StableDiffusionProcessingTxt2Img:
 * hr_checkpoint_name, hr_prompt). Shared because the coordinator places a second pass on an agent
 * that offers its checkpoint, and the agent picks the pipeline it runs on.
 */
import type { GenerationParams } from "./gen/latentfarm/v1/generation_pb.js";

/** The UI's "keep the first pass's" choices for the hires fields, which A1111's UI sends as none. */
export const SAME_CHECKPOINT = "Use same checkpoint";
export const SAME_SAMPLER = "Use same sampler";
export const SAME_SCHEDULER = "Use same scheduler";

type HiresParams = Pick<GenerationParams, "enableHr" | "initImages" | "hrCheckpointName">;

/** Whether the request is a Hires.fix txt2img (A1111 ignores enable_hr for img2img). */
export function isHiresTxt2img(p: Pick<GenerationParams, "enableHr" | "initImages">): boolean {
  return p.enableHr && p.initImages.length === 0;
}

/**
 * The checkpoint a Hires.fix second pass was asked to run on, or undefined when none was named. A1111
 * switches to a named one and writes "Hires checkpoint" even when it names the first pass's own model.
 */
export function hiresCheckpoint(p: HiresParams): string | undefined {
  if (!isHiresTxt2img(p) || p.hrCheckpointName === "" || p.hrCheckpointName === SAME_CHECKPOINT) return undefined;
  return p.hrCheckpointName;
}

/** The model a Hires.fix second pass runs on. */
export function secondPassModel(p: HiresParams & Pick<GenerationParams, "model">): string {
  return hiresCheckpoint(p) ?? p.model;
}

/** The sampler of a Hires.fix second pass (hr_sampler_name, else the first pass's). */
export function secondPassSamplerName(p: Pick<GenerationParams, "hrSamplerName" | "samplerName">): string {
  return p.hrSamplerName !== "" && p.hrSamplerName !== SAME_SAMPLER ? p.hrSamplerName : p.samplerName;
}

/** The prompt a Hires.fix second pass is conditioned on, whose LoRAs it merges ('' = the first pass's). */
export function secondPassPrompt(p: Pick<GenerationParams, "hrPrompt" | "prompt">): string {
  return p.hrPrompt || p.prompt;
}
