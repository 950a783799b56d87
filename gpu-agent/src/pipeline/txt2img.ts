import * as grpc from "@grpc/grpc-js";
import { FarmError, TaskStage, type Image, type RefinerResume, type RunTaskRequest } from "@latentfarm/shared";
import { prepareSampling } from "../sampling/index.js";
import { RefinerSwitch, denoise } from "./denoise.js";
import { checkpointRun } from "./checkpoint.js";
import { passIdentity, refinerResumeOf, refinerRun, refinerSampling } from "./refiner.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { buildInfotext } from "./infotext.js";
import { baseInfotext, conditioningFor, decodeToRgb, finishImage, imageRngFor, taskBasics, type RenderContext } from "./render-common.js";
import { renderImg2img } from "./img2img.js";
import { renderTxt2imgExtended, runHiresStage, type StageOutput } from "./hires.js";

/** What a task's run on one pipeline gives: its stage's output, or where its pass switched to the refiner. */
export type PipelineOutput = StageOutput | { case: "refinerSwitch"; value: RefinerResume };

/**
 * Runs a task: a whole image (FULL), or one stage of a Hires.fix image split across agents. A pass that
 * reaches its refiner switch ends the run here; the caller runs the task again on the refiner's pipeline
 * with the resume (task-passes.ts).
 */
export async function runTask(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<PipelineOutput> {
  try {
    if (req.stage === TaskStage.FULL) return { case: "result", value: await renderTask(pipe, req, ctx) };
    if (req.params?.initImages.length)
      throw FarmError.invalid("stage", "Hires.fix stages apply to txt2img, not to img2img with init_images");
    return await runHiresStage(pipe, req, ctx);
  } catch (err) {
    if (err instanceof RefinerSwitch) return { case: "refinerSwitch", value: refinerResumeOf(pipe, err) };
    throw err;
  }
}

/**
 * Renders one txt2img image: conditioning, the sampler's model calls through the step batcher
 * (so concurrent images share UNet calls), CFG, VAE decode and a PNG with A1111's infotext.
 */
export async function renderTask(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const p = req.params!;
  if (p.initImages.length > 0) return renderImg2img(pipe, req, ctx);
  if (p.mask.length > 0) throw FarmError.invalid("mask", "a mask needs init_images to inpaint");
  if (pipe.model.unetInChannels !== pipe.model.config.latentChannels) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `txt2img on "${pipe.name}", an inpainting (${pipe.model.unetInChannels}-channel) UNet, is not implemented yet; give it init_images`,
      { field: "model" },
    );
  }
  if (p.enableHr || p.restoreFaces) return renderTxt2imgExtended(pipe, req, ctx);
  const b = taskBasics(pipe, req, ctx);
  const h = b.height / 8;
  const w = b.width / 8;
  const imageRng = imageRngFor(b, h, w);
  const sampler = prepareSampling({
    samplerName: p.samplerName,
    scheduler: p.scheduler,
    steps: b.steps,
    noise: () => imageRng.next(),
    // SDE samplers: A1111's Brownian tree per image, seeded with the plain seed (no ENSD).
    brownian: { seeds: [b.seed], shape: [b.channels, h, w], source: b.rng },
    settings: b.settings,
    refiner: refinerSampling(req, "first"),
  });
  // Prompt schedules count denoiser calls, which second-order samplers make twice per step.
  const cond = await conditioningFor(pipe, ctx, b, p.prompt, p.negativePrompt, sampler);
  const latent = await denoise(pipe, {
    sdxlCrop: b.conditioning.sdxlCrop,
    aestheticScore: b.conditioning.aestheticScore,
    sampler,
    cond,
    cfgScale: b.cfgScale,
    h,
    w,
    start: sampler.startLatent(imageRng.first()),
    signal: ctx.signal,
    onStep: ctx.onStep,
    preview: b.preview,
    noiseRng: imageRng,
    refiner: refinerRun(pipe, req, "first", sampler),
    checkpoint: checkpointRun(req, ctx, "first"),
  });
  const rgb = await decodeToRgb(pipe, latent, h, w, ctx.signal);
  const infotext = buildInfotext(baseInfotext(passIdentity(pipe, req, "first"), b, sampler, { width: b.width, height: b.height }));
  return finishImage(req, ctx, rgb, b.width, b.height, infotext);
}
