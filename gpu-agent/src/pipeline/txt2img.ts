import * as grpc from "@grpc/grpc-js";
import { FarmError, RngSource as WireRng, TaskStage, type Image, type RunTaskRequest } from "@latentfarm/shared";
import { ImageRng, prepareSampling } from "../sampling/index.js";
import type { PreparedConditioning } from "../conditioning/index.js";
import { checkAborted, decodeLatent, denoise } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { buildInfotext } from "./infotext.js";
import { toRgb8 } from "./png.js";
import { finishImage, loraHashesEntry, recordConditioningInfotext, requestSettingsOf } from "./render-common.js";
import { renderImg2img } from "./img2img.js";
import { renderTxt2imgExtended, runHiresStage, type StageOutput } from "./hires.js";

/** Folders and limits a task may use beyond its model, from the agent's configuration. */
export interface RenderResources {
  /** ESRGAN-family ONNX upscalers, named after their file stems. */
  upscalersDir?: string;
  /** Face restoration models (CodeFormer, face detector). */
  faceModelsDir?: string;
  /** Limits for decoded input images (img2img, masks). */
  maxInputPixels: number;
  maxInputBytes: number;
}

export const DEFAULT_RESOURCES: RenderResources = { maxInputPixels: 4096 * 4096, maxInputBytes: 32 * 1024 * 1024 };

export interface RenderContext {
  signal: AbortSignal;
  agentId: string;
  onStep: (step: number, totalSteps: number) => void;
  onWarning: (message: string) => void;
  resources?: RenderResources;
}

const RNG_NAMES: Record<WireRng, "GPU" | "CPU" | "NV"> = {
  [WireRng.UNSPECIFIED]: "GPU",
  [WireRng.GPU]: "GPU",
  [WireRng.CPU]: "CPU",
  [WireRng.NV]: "NV",
};

/** Runs a task: a whole image (FULL), or one stage of a Hires.fix image split across agents. */
export async function runTask(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<StageOutput> {
  if (req.stage === TaskStage.FULL) return { case: "result", value: await renderTask(pipe, req, ctx) };
  if (req.params?.initImages.length) throw FarmError.invalid("stage", "Hires.fix stages apply to txt2img, not to img2img with init_images");
  return runHiresStage(pipe, req, ctx);
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
  const steps = p.steps ?? 50;
  const width = p.width ?? 512;
  const height = p.height ?? 512;
  const cfg = p.cfgScale ?? 7;
  const clipSkip = p.clipSkip ?? 1;
  const seed = Number(req.seed);
  const subseed = Number(req.subseed);
  const rng = RNG_NAMES[p.rng] ?? "GPU";
  const h = height / 8;
  const w = width / 8;
  const C = pipe.model.config.latentChannels;
  const ensd = Number(p.etaNoiseSeedDelta);

  const imageRng = new ImageRng({
    shape: [C, h, w],
    seeds: [seed],
    subseeds: [subseed],
    subseedStrength: p.subseedStrength,
    seedResizeFromH: p.seedResizeFromH,
    seedResizeFromW: p.seedResizeFromW,
    source: rng,
    etaNoiseSeedDelta: ensd,
  });
  const { sampling: settings, conditioning } = requestSettingsOf(p);
  const sampler = prepareSampling({
    samplerName: p.samplerName,
    scheduler: p.scheduler,
    steps,
    noise: () => imageRng.next(),
    // SDE samplers: A1111's Brownian tree per image, seeded with the plain seed (no ENSD).
    brownian: { seeds: [seed], shape: [C, h, w], source: rng },
    settings,
  });
  const resolved = sampler.choice;

  const conditioner = await pipe.conditioner();
  checkAborted(ctx.signal);
  // Prompt schedules count denoiser calls, which second-order samplers make twice per step.
  const cond: PreparedConditioning = await conditioner.prepare({
    prompt: p.prompt,
    negativePrompt: p.negativePrompt,
    steps: sampler.promptScheduleSteps,
    clipSkip,
    emphasis: conditioning.emphasis,
    useOldScheduling: conditioning.useOldScheduling,
    signal: ctx.signal,
  });
  recordConditioningInfotext(sampler, cond, p.negativePrompt, conditioning, { steps: sampler.promptScheduleSteps });
  for (const u of cond.extraNetworks.unknown) ctx.onWarning(`unknown extra network tag ${u.raw} removed from the prompt`);

  const latent = await denoise(pipe, {
    sampler,
    cond,
    cfgScale: cfg,
    h,
    w,
    start: sampler.startLatent(imageRng.first()),
    signal: ctx.signal,
    onStep: ctx.onStep,
    noiseRng: imageRng,
  });
  const image = await decodeLatent(pipe, latent, h, w, ctx.signal);
  const rgb = toRgb8(image, width, height);
  const infotext = buildInfotext({
    prompt: p.prompt,
    negativePrompt: p.negativePrompt,
    steps,
    sampler: resolved.sampler.name,
    scheduleType: String(sampler.infotext["Schedule type"] ?? "Automatic"),
    cfgScale: cfg,
    seed,
    width,
    height,
    model: pipe.name,
    modelHash: pipe.modelHash,
    subseed,
    subseedStrength: p.subseedStrength,
    seedResizeFrom: { w: p.seedResizeFromW, h: p.seedResizeFromH },
    clipSkip,
    ensd: resolved.sampler.usesEnsd && ensd !== 0 ? ensd : undefined,
    rng,
    extra: [loraHashesEntry(pipe), ...Object.entries(sampler.infotext).filter(([k]) => k !== "Schedule type")],
  });
  return finishImage(req, ctx, rgb, width, height, infotext);
}
