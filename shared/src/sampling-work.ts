/**
 * What a task's sampling costs, as the coordinator estimates it before an agent runs it: the sampling
 * steps the agent will report and the UNet evaluations they take. The coordinator's speed model keeps
 * seconds per model call, so a Heun job (two evaluations a step) and an img2img job (fewer steps than
 * asked for) are estimated from the same measurements as any other job of that model and size.
 */
import type { GenerationParams } from "./gen/latentfarm/v1/generation_pb.js";
import { resolveSampler } from "./sampler-catalog.js";

export interface SamplingWork {
  /** Sampling steps the agent reports as progress. */
  readonly steps: number;
  /** UNet evaluations (of the image's rows: prompt and negative prompt) they take, about. */
  readonly modelCalls: number;
}

/** A1111's UI value for the hires sampler "same as the first pass's". */
const SAME_SAMPLER = "Use same sampler";

/** UNet evaluations per step of a sampler (1 for a name that does not resolve: validation reports it). */
export function modelCallsPerStep(samplerName: string): number {
  try {
    return resolveSampler(samplerName).sampler.modelCallsPerStep ?? 1;
  } catch {
    return 1;
  }
}

/** `steps` sampling steps of a sampler. */
export function passWork(steps: number, samplerName: string): SamplingWork {
  return { steps, modelCalls: steps * modelCallsPerStep(samplerName) };
}

/** The sampler of a Hires.fix second pass (hr_sampler_name, else the first pass's). */
export function secondPassSamplerName(p: Pick<GenerationParams, "hrSamplerName" | "samplerName">): string {
  return p.hrSamplerName !== "" && p.hrSamplerName !== SAME_SAMPLER ? p.hrSamplerName : p.samplerName;
}

/**
 * The work of an image rendered as one task (txt2img, img2img): img2img runs int(min(d, 0.999)·steps) + 1
 * of its steps (A1111's setup_img2img_steps), all of them with the option img2img_fix_steps. A Hires.fix
 * image is planned as stages, each a pass of its own (passWork).
 */
export function imageWork(
  p: Pick<GenerationParams, "steps" | "samplerName" | "initImages" | "denoisingStrength" | "overrideSettings">,
): SamplingWork {
  const steps = p.steps ?? 50;
  if (p.initImages.length === 0 || p.overrideSettings?.img2imgFixSteps === true) return passWork(steps, p.samplerName);
  const d = Math.min(p.denoisingStrength ?? 0.75, 0.999);
  return passWork(Math.min(steps, Math.trunc(d * steps) + 1), p.samplerName);
}
