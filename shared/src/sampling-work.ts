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

/** A1111's img2img default denoising strength. */
export const DEFAULT_DENOISING_STRENGTH = 0.75;

/** A1111's setup_img2img_steps for a denoising strength in [0, 1]: the schedule built and how deep t_enc goes in it. */
export interface Img2imgStepPlan {
  /** Length of the schedule that is built (`steps` of get_sigmas / get_timesteps). */
  scheduleSteps: number;
  /** A1111 t_enc: t_enc + 1 sampler steps run. */
  tEnc: number;
}

/**
 * setup_img2img_steps: plain img2img runs int(min(d, 0.999)·steps) + 1 steps of a `steps` schedule;
 * hires passes (and option img2img_fix_steps) run exactly `steps` steps of an int(steps/d) schedule.
 */
export function img2imgStepPlan(steps: number, denoisingStrength: number, fixSteps: boolean): Img2imgStepPlan {
  const d = Math.min(denoisingStrength, 0.999);
  if (fixSteps) return { scheduleSteps: denoisingStrength > 0 ? Math.trunc(steps / d) : 0, tEnc: steps - 1 };
  return { scheduleSteps: steps, tEnc: Math.trunc(d * steps) };
}

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

/**
 * The work of an image rendered as one task (txt2img, img2img, img2img's steps by img2imgStepPlan). A
 * Hires.fix image is planned as stages, each a pass of its own (passWork).
 */
export function imageWork(
  p: Pick<GenerationParams, "steps" | "samplerName" | "initImages" | "denoisingStrength" | "overrideSettings"> & {
    extras?: GenerationParams["extras"];
  },
): SamplingWork {
  // An Extras image samples nothing: its work is one model's pass over it, about a model call's worth.
  if (p.extras !== undefined) return { steps: 0, modelCalls: 1 };
  const steps = p.steps ?? 50;
  if (p.initImages.length === 0) return passWork(steps, p.samplerName);
  const plan = img2imgStepPlan(steps, p.denoisingStrength ?? DEFAULT_DENOISING_STRENGTH, p.overrideSettings?.img2imgFixSteps ?? false);
  return passWork(plan.tEnc + 1, p.samplerName);
}
