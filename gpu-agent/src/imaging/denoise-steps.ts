/**
 * How A1111 maps denoising strength to sampler steps (sd_samplers_common.setup_img2img_steps and the
 * samplers' sample_img2img), written over an injected schedule builder so this module does not depend
 * on the sampling package.
 */
import { img2imgStepPlan, type Img2imgStepPlan } from "@latentfarm/shared";

export type { Img2imgStepPlan };

export interface Img2imgStepInput {
  /** p.steps */
  steps: number;
  /** p.denoising_strength */
  denoisingStrength: number;
  /**
   * The steps argument of sample_img2img: the hires pass passes `hr_second_pass_steps or steps`;
   * plain img2img passes nothing.
   */
  requestedSteps?: number;
  /** Option img2img_fix_steps ("with img2img, do exactly the amount of steps the slider specifies"). */
  fixSteps?: boolean;
}

/** `setup_img2img_steps`: Python float arithmetic and int() truncation, reproduced with JS doubles. */
export function setupImg2imgSteps(input: Img2imgStepInput): Img2imgStepPlan {
  const { steps, denoisingStrength: d } = input;
  if (!Number.isInteger(steps) || steps < 1) throw new RangeError(`steps must be a positive integer, got ${steps}`);
  if (!(d >= 0 && d <= 1)) throw new RangeError(`denoising strength must be in [0, 1], got ${d}`);
  // A hires pass passes its steps, which fixes them as the option does; `steps or p.steps`: 0 falls back
  // to p.steps like Python's `or`.
  const fixed = input.fixSteps === true || input.requestedSteps !== undefined;
  return img2imgStepPlan(fixed ? input.requestedSteps || steps : steps, d, fixed);
}

/** Builds the full sigma list for `steps` (k-diffusion get_sigmas, including discard-penultimate handling). */
export type BuildSigmas = (steps: number) => Float32Array;

export interface KdiffusionImg2imgSchedule {
  /** `sigma_sched = sigmas[steps − t_enc − 1 :]`: the sampler runs `sigmas.length − 1` steps over it. */
  sigmas: Float32Array;
  /** sigma_sched[0]: `x_start = init_latent + noise · startSigma`. */
  startSigma: number;
  /** sigma_sched[−2]: what samplers that take sigma_min (DPM adaptive) receive. */
  sigmaMin: number;
  samplingSteps: number;
}

/**
 * k-diffusion `sample_img2img` slicing. With denoise 0 in the fixed-steps branch A1111 builds an empty
 * schedule; we return the single sigma 0 it ends up with, i.e. no sampling at all.
 */
export function kdiffusionImg2imgSchedule(plan: Img2imgStepPlan, buildSigmas: BuildSigmas): KdiffusionImg2imgSchedule {
  if (plan.scheduleSteps === 0) {
    return { sigmas: Float32Array.of(0), startSigma: 0, sigmaMin: 0, samplingSteps: 0 };
  }
  const full = buildSigmas(plan.scheduleSteps);
  const start = pythonSliceStart(plan.scheduleSteps - plan.tEnc - 1, full.length);
  const sigmas = full.slice(start);
  if (sigmas.length < 2) throw new RangeError(`img2img schedule too short: ${sigmas.length} sigmas`);
  return {
    sigmas,
    startSigma: sigmas[0]!,
    sigmaMin: sigmas[sigmas.length - 2]!,
    samplingSteps: sigmas.length - 1,
  };
}

/** Timestep samplers' table: `clip(range(0, 1000, 1000 // steps) + 1, 0, 999)` (steps already +1 when discarding). */
export function a1111Timesteps(steps: number): Int32Array {
  if (!Number.isInteger(steps) || steps < 1) throw new RangeError(`steps must be a positive integer, got ${steps}`);
  const stride = Math.floor(1000 / steps);
  const out: number[] = [];
  for (let t = 0; t < 1000; t += stride) out.push(Math.min(Math.max(t + 1, 0), 999));
  return Int32Array.from(out);
}

export interface TimestepImg2imgSchedule {
  /** `timesteps[:t_enc]`, the timesteps the DDIM/PLMS/UniPC loop visits (last = first visited). */
  timesteps: Int32Array;
  /** `timesteps[t_enc]`: the init latent is noised with ᾱ at this timestep. */
  encodeTimestep: number;
}

/** DDIM/PLMS/UniPC `sample_img2img` slicing over an injected timestep table builder. */
export function timestepImg2imgSchedule(
  plan: Img2imgStepPlan,
  buildTimesteps: (steps: number) => Int32Array = a1111Timesteps,
): TimestepImg2imgSchedule {
  const table = buildTimesteps(plan.scheduleSteps);
  const encodeTimestep = table[plan.tEnc];
  if (encodeTimestep === undefined) {
    throw new RangeError(`t_enc ${plan.tEnc} is outside a ${table.length}-entry timestep table`);
  }
  return { timesteps: table.slice(0, plan.tEnc), encodeTimestep };
}

function pythonSliceStart(start: number, length: number): number {
  return start < 0 ? Math.max(length + start, 0) : Math.min(start, length);
}
