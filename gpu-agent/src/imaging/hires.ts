/**
 * Hires.fix planning as A1111 v1.10 does it (processing.py StableDiffusionProcessingTxt2Img:
 * calculate_target_resolution, init, sample_hr_pass). Pure arithmetic; the caller runs the passes.
 */
import { SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER, hiresTarget, type HiresSizeInput, type HiresTarget } from "@latentfarm/shared";
import { latentUpscaleMode, type LatentUpscaleMode } from "./interpolate.js";
import { setupImg2imgSteps, type Img2imgStepPlan } from "./denoise-steps.js";

export { LATENT_FACTOR, hiresTarget, type HiresSizeInput, type HiresTarget } from "@latentfarm/shared";

/** Applies `samples[:, :, top : h − bottom, left : w − right]` to an NCHW latent. */
export function cropLatent(
  latent: Float32Array,
  shape: readonly [number, number, number, number],
  crop: HiresTarget["latentCrop"],
): { data: Float32Array; shape: [number, number, number, number] } {
  const [n, c, h, w] = shape;
  const outH = h - crop.top - crop.bottom;
  const outW = w - crop.left - crop.right;
  if (outH < 1 || outW < 1) throw new RangeError(`crop ${JSON.stringify(crop)} leaves nothing of ${h}x${w}`);
  if (crop.top === 0 && crop.bottom === 0 && crop.left === 0 && crop.right === 0) {
    return { data: latent.slice(), shape: [n, c, h, w] };
  }
  const out = new Float32Array(n * c * outH * outW);
  for (let p = 0; p < n * c; p++) {
    for (let y = 0; y < outH; y++) {
      const src = p * h * w + (y + crop.top) * w + crop.left;
      out.set(latent.subarray(src, src + outW), p * outH * outW + y * outW);
    }
  }
  return { data: out, shape: [n, c, outH, outW] };
}

export interface HiresPassInput {
  steps: number;
  denoisingStrength: number;
  /** hr_second_pass_steps; 0 = same as the first pass. */
  hrSecondPassSteps?: number;
  /** hr_upscaler; null/undefined = "Latent". */
  hrUpscaler?: string | null;
}

export interface HiresPassPlan {
  /** `hr_second_pass_steps or steps`: the second pass always runs exactly this many sampler steps. */
  secondPassSteps: number;
  /** Schedule length and t_enc for the second pass (the fixed-steps branch of setup_img2img_steps). */
  img2img: Img2imgStepPlan;
  /** The latent interpolation to use, or undefined when a pixel-space upscaler (decode → upscale → encode) runs. */
  latentUpscale: LatentUpscaleMode | undefined;
  /** The pixel upscaler name when latentUpscale is undefined. */
  pixelUpscaler: string | undefined;
}

export function hiresPassPlan(input: HiresPassInput): HiresPassPlan {
  const hrSteps = input.hrSecondPassSteps ?? 0;
  if (!Number.isInteger(hrSteps) || hrSteps < 0) throw new RangeError(`hr_second_pass_steps must be ≥ 0, got ${hrSteps}`);
  const secondPassSteps = hrSteps || input.steps;
  const latentUpscale = latentUpscaleMode(input.hrUpscaler);
  return {
    secondPassSteps,
    img2img: setupImg2imgSteps({ steps: input.steps, denoisingStrength: input.denoisingStrength, requestedSteps: secondPassSteps }),
    latentUpscale,
    pixelUpscaler: latentUpscale === undefined ? (input.hrUpscaler ?? undefined) : undefined,
  };
}

// The UI's "keep the first-pass value" choices arrive as these strings instead of null.

export interface HiresInfotextInput extends HiresSizeInput {
  denoisingStrength: number;
  samplerName: string;
  hrSamplerName?: string | null;
  /** Title of the hires checkpoint (A1111 writes its short_title), unless the same one is used. */
  hrCheckpointTitle?: string | null;
  /** This image's first-pass prompt texts and hires prompt texts ('' = same as first pass). */
  prompt: string;
  negativePrompt: string;
  hrPrompt?: string;
  hrNegativePrompt?: string;
  /**
   * Label of the scheduler function each pass used ("Karras", …), or undefined when the sampler ran
   * without one (the uniform discrete schedule). Only these labels are compared, as A1111 does.
   */
  firstPassScheduleLabel?: string;
  hiresScheduleLabel?: string;
  hrSecondPassSteps?: number;
  hrUpscaler?: string | null;
}

export type InfotextValue = string | number;

/**
 * The extra_generation_params entries a hires job adds, in A1111's insertion order (the infotext writer
 * keeps this order; "Denoising strength" also has an earlier fixed slot, which wins).
 */
export function hiresInfotextFields(input: HiresInfotextInput): Array<readonly [string, InfotextValue]> {
  const fields: Array<readonly [string, InfotextValue]> = [["Denoising strength", input.denoisingStrength]];
  if (input.hrCheckpointTitle && input.hrCheckpointTitle !== SAME_CHECKPOINT) {
    fields.push(["Hires checkpoint", input.hrCheckpointTitle]);
  }
  const hrSampler = input.hrSamplerName === SAME_SAMPLER ? null : input.hrSamplerName;
  if (hrSampler != null && hrSampler !== input.samplerName) fields.push(["Hires sampler", hrSampler]);
  const hrPrompt = input.hrPrompt || input.prompt;
  if (hrPrompt !== input.prompt) fields.push(["Hires prompt", hrPrompt]);
  const hrNegative = input.hrNegativePrompt || input.negativePrompt;
  if (hrNegative !== input.negativePrompt) fields.push(["Hires negative prompt", hrNegative]);
  if (input.hiresScheduleLabel !== undefined && input.hiresScheduleLabel !== input.firstPassScheduleLabel) {
    fields.push(["Hires schedule type", input.hiresScheduleLabel]);
  }
  fields.push(hiresTarget(input).infotext);
  if (input.hrSecondPassSteps) fields.push(["Hires steps", input.hrSecondPassSteps]);
  if (input.hrUpscaler != null) fields.push(["Hires upscaler", input.hrUpscaler]);
  return fields;
}

/** Normalises the UI's "Use same scheduler" to null, so callers fall back to the first-pass scheduler. */
export function hiresSchedulerName(hrScheduler: string | null | undefined): string | null {
  return hrScheduler == null || hrScheduler === SAME_SCHEDULER ? null : hrScheduler;
}
