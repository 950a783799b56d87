/**
 * txt2img with Hires.fix and/or face restoration in one task (A1111 StableDiffusionProcessingTxt2Img):
 * first pass, upscale in latent space (torch interpolate) or pixel space (Lanczos/Nearest/ESRGAN,
 * then VAE encode), crop, and an img2img second pass with new noise from the same seeds at the new
 * size that runs exactly `hr_second_pass_steps or steps` steps.
 */
import { FarmError, type Image, type RunTaskRequest } from "@latentfarm/shared";
import { prepareSampling, type PreparedSampling } from "../sampling/index.js";
import {
  cropLatent,
  hiresInfotextFields,
  hiresSchedulerName,
  hiresTarget,
  interpolate,
  latentUpscaleMode,
  type HiresTarget,
} from "../imaging/index.js";
import { denoise } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./txt2img.js";
import {
  a1111Infotext,
  baseInfotext,
  conditioningFor,
  decodeToRgb,
  encodeRgb,
  finishImage,
  imageRngFor,
  resourcesOf,
  samplerExtras,
  taskBasics,
  type TaskBasics,
} from "./render-common.js";
import { resolveUpscaler, upscaleImage } from "./upscalers.js";
import { restoreFacesIfRequested } from "./face-restore.js";
import { DEFAULT_DENOISING_STRENGTH } from "./img2img.js";

function scheduleLabel(s: PreparedSampling): string | undefined {
  return s.choice.scheduleType !== undefined ? s.choice.label : undefined;
}

/** The hires upscaler as the request names it; '' (proto default) means A1111's None = "Latent". */
function upscalerName(b: TaskBasics): string | null {
  return b.p.hrUpscaler === "" ? null : b.p.hrUpscaler;
}

export interface HiresSecondPassInput {
  /** First-pass latent [1,C,h,w] (already scaled by the VAE factor). */
  latent: Float32Array;
  h: number;
  w: number;
  target: HiresTarget;
}

/** The upscaled and cropped latent the second pass starts from, with its size. */
export async function upscaleForSecondPass(
  pipe: LoadedPipeline, b: TaskBasics, ctx: RenderContext, input: HiresSecondPassInput,
): Promise<{ latent: Float32Array; h: number; w: number }> {
  const C = pipe.model.config.latentChannels;
  const name = upscalerName(b);
  const mode = latentUpscaleMode(name);
  const { target } = input;
  let up: Float32Array;
  let shape: [number, number, number, number];
  if (mode !== undefined) {
    const size = [target.upscaledLatent.height, target.upscaledLatent.width] as const;
    up = interpolate(input.latent, [1, C, input.h, input.w], { mode: mode.mode, antialias: mode.antialias, size }).data;
    shape = [1, C, size[0], size[1]];
  } else {
    const upscaler = await resolveUpscaler(pipe.model, name!, resourcesOf(ctx), "hr_upscaler", ctx.signal);
    const rgb = await decodeToRgb(pipe, input.latent, input.h, input.w, ctx.signal);
    const img = await upscaleImage({ width: input.w * 8, height: input.h * 8, channels: 3, data: rgb }, target.upscaleTo, upscaler, ctx.signal);
    const enc = await encodeRgb(pipe, img.data, img.width, img.height, ctx.signal);
    up = enc.latent;
    shape = [1, C, enc.h, enc.w];
  }
  const cropped = cropLatent(up, shape, target.latentCrop);
  return { latent: cropped.data, h: cropped.shape[2], w: cropped.shape[3] };
}

export async function renderTxt2imgExtended(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const b = taskBasics(pipe, req);
  const { p } = b;
  let target: HiresTarget | undefined;
  if (p.enableHr) {
    try {
      target = hiresTarget({ width: b.width, height: b.height, hrScale: p.hrScale ?? 2, hrResizeX: p.hrResizeX, hrResizeY: p.hrResizeY });
    } catch (err) {
      throw FarmError.invalid("hr_scale", (err as Error).message);
    }
  }
  const width = target?.firstPass.width ?? b.width;
  const height = target?.firstPass.height ?? b.height;
  const h = height / 8;
  const w = width / 8;
  const strength = p.denoisingStrength ?? DEFAULT_DENOISING_STRENGTH;
  const hrSteps = p.hrSecondPassSteps || b.steps;

  // Sampler names are validated before any model work, so a bad hires request fails fast.
  const rng1 = imageRngFor(b, h, w);
  const sampler1 = prepareSampling({
    samplerName: p.samplerName,
    scheduler: p.scheduler,
    steps: b.steps,
    noise: () => rng1.next(),
    brownian: { seeds: [b.seed], shape: [b.channels, h, w], source: b.rng },
    settings: b.settings,
  });
  const totalSteps = sampler1.steps + (target ? hrSteps : 0);
  let offset = 0;
  const onStep = (s: number): void => ctx.onStep(offset + s, totalSteps);

  const cond1 = await conditioningFor(pipe, ctx, b, p.prompt, p.negativePrompt, sampler1);
  const latent1 = await denoise(pipe, { sampler: sampler1, cond: cond1, cfgScale: b.cfgScale, h, w, start: sampler1.startLatent(rng1.first()), signal: ctx.signal, onStep });
  offset = sampler1.steps;

  let final = { latent: latent1, h, w };
  let hiresExtras: Array<[string, string | number]> = [];
  let sampler2: PreparedSampling | undefined;
  if (target) {
    const up = await upscaleForSecondPass(pipe, b, ctx, { latent: latent1, h, w, target });
    const rng2 = imageRngFor(b, up.h, up.w);
    const hrScheduler = hiresSchedulerName(p.hrScheduler) ?? p.scheduler;
    const hrSampler = p.hrSamplerName && p.hrSamplerName !== "Use same sampler" ? p.hrSamplerName : p.samplerName;
    sampler2 = prepareSampling({
      samplerName: hrSampler,
      scheduler: hrScheduler,
      steps: hrSteps,
      noise: () => rng2.next(),
      brownian: { seeds: [b.seed], shape: [b.channels, up.h, up.w], source: b.rng },
      settings: b.settings,
      img2img: { denoisingStrength: strength, fixSteps: true },
      fields: { sampler: "hr_sampler_name", scheduler: "hr_scheduler" },
    });
    const cond2 = await conditioningFor(pipe, ctx, b, p.hrPrompt || p.prompt, p.hrNegativePrompt || p.negativePrompt, sampler2, { prompt: "hr_prompt" });
    const start = sampler2.startLatent(rng2.first(), up.latent);
    const latent2 = await denoise(pipe, { sampler: sampler2, cond: cond2, cfgScale: b.cfgScale, h: up.h, w: up.w, start, signal: ctx.signal, onStep });
    final = { latent: latent2, h: up.h, w: up.w };
    hiresExtras = hiresInfotextFields({
      width: b.width,
      height: b.height,
      hrScale: p.hrScale ?? 2,
      hrResizeX: p.hrResizeX,
      hrResizeY: p.hrResizeY,
      denoisingStrength: strength,
      samplerName: sampler1.choice.sampler.name,
      hrSamplerName: p.hrSamplerName ? sampler2.choice.sampler.name : null,
      prompt: p.prompt,
      negativePrompt: p.negativePrompt,
      hrPrompt: p.hrPrompt,
      hrNegativePrompt: p.hrNegativePrompt,
      firstPassScheduleLabel: scheduleLabel(sampler1),
      hiresScheduleLabel: scheduleLabel(sampler2),
      hrSecondPassSteps: p.hrSecondPassSteps,
      hrUpscaler: upscalerName(b),
    }).map(([k, v]) => [k, v]);
  }

  const outW = final.w * 8;
  const outH = final.h * 8;
  const rgb = await decodeToRgb(pipe, final.latent, final.h, final.w, ctx.signal);
  const restored = await restoreFacesIfRequested(pipe, ctx, p, { width: outW, height: outH, channels: 3, data: rgb });
  const base = baseInfotext(pipe, b, sampler1, { width, height });
  const infotext = a1111Infotext({
    ...base,
    denoisingStrength: target ? strength : undefined,
    faceRestoration: restored.infotext,
    extra: [...hiresExtras, ...samplerExtras(sampler1), ...(sampler2 ? samplerExtras(sampler2).filter(([k]) => !(base.extra ?? []).some(([e]) => e === k)) : [])],
  });
  return finishImage(req, ctx, restored.image.data, outW, outH, infotext);
}
