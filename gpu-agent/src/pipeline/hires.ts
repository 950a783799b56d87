/**
 * txt2img with Hires.fix and/or face restoration (A1111 StableDiffusionProcessingTxt2Img): first
 * pass, upscale in latent space (torch interpolate) or pixel space (Lanczos/Nearest/ESRGAN, then VAE
 * encode), crop, and an img2img second pass with new noise from the same seeds at the new size that
 * runs exactly `hr_second_pass_steps or steps` steps.
 *
 * The passes are stages a farm may run on different agents (proto TaskStage). A FULL task runs the
 * same stage functions back to back in this process, so an image is the same bytes whichever way
 * it was run. The hand-over between the passes is what A1111 keeps between them: the first-pass
 * latent (latent upscalers, exact float32) or the first pass decoded to 8-bit RGB (pixel upscalers
 * start from that PIL image). A second pass above the coordinator's threshold is tiled instead:
 * UPSCALE makes the cropped second-pass source once, each SECOND_PASS_TILE runs img2img on its crop
 * (Ultimate SD Upscale style: same seed for every tile, noise at the tile's size), and ASSEMBLE
 * blends the tiles in tile order, then restores faces and writes the infotext and PNG.
 */
import { create } from "@bufbuild/protobuf";
import {
  FarmError,
  TaskStage,
  hiresCheckpoint,
  latentHandover,
  refinerInPass,
  layoutFromStarts,
  readLatent,
  readRgb,
  rgbHandover,
  secondPassPrompt,
  secondPassSamplerName,
  DEFAULT_DENOISING_STRENGTH,
  type Handover,
  type Image,
  InfotextEntrySchema,
  type InfotextEntry,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { RUN_INFOTEXT_KEYS, prepareSampling, type PreparedSampling } from "../sampling/index.js";
import {
  TileBlender,
  cropLatent,
  hiresInfotextFields,
  hiresSchedulerName,
  hiresTarget,
  interpolate,
  latentUpscaleMode,
  tileSeed,
  type HiresTarget,
} from "../imaging/index.js";
import { checkpointRun } from "./checkpoint.js";
import { checkAborted, denoise } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import {
  a1111Infotext,
  baseInfotext,
  conditioningFor,
  decodeToRgb,
  encodeRgb,
  finishImage,
  imageRngFor,
  loraHashesInPromptOrder,
  mergeLoraHashes,
  modelIdentity,
  passModel,
  resourcesOf,
  putFirst,
  samplerExtras,
  taskBasics,
  type ModelIdentity,
  type TaskBasics,
} from "./render-common.js";
import { AFTER_SAMPLING_INFOTEXT_KEYS, CONDITIONING_INFOTEXT_KEYS } from "./infotext.js";
import { resolveUpscaler, upscaleImage } from "./upscalers.js";
import { checkpointTitle, passIdentity, refinerRun, refinerSampling } from "./refiner.js";
import { restoreFacesIfRequested } from "./face-restore.js";

function scheduleLabel(s: PreparedSampling): string | undefined {
  return s.choice.scheduleType !== undefined ? s.choice.label : undefined;
}

/** The hires upscaler as the request names it; '' (proto default) means A1111's None = "Latent". */
function upscalerName(b: TaskBasics): string | null {
  return b.p.hrUpscaler === "" ? null : b.p.hrUpscaler;
}

/** What every pass derives from the request: sizes, strength and step counts. */
interface HiresSetup {
  req: RunTaskRequest;
  b: TaskBasics;
  target: HiresTarget | undefined;
  /** First-pass size in pixels and latent cells. */
  width: number;
  height: number;
  h: number;
  w: number;
  strength: number;
  hrSteps: number;
}

function hiresSetup(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): HiresSetup {
  const b = taskBasics(pipe, req, ctx);
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
  return {
    req,
    b,
    target,
    width,
    height,
    h: height / 8,
    w: width / 8,
    strength: p.denoisingStrength ?? DEFAULT_DENOISING_STRENGTH,
    hrSteps: p.hrSecondPassSteps || b.steps,
  };
}

function requireTarget(s: HiresSetup): HiresTarget {
  if (!s.target) throw FarmError.invalid("stage", "a Hires.fix stage needs enable_hr");
  return s.target;
}

// Stages that only need the samplers for their infotext never draw noise from them.
const NO_NOISE = (): Float32Array => {
  throw new Error("this stage does not sample");
};

function firstPassSampler(s: HiresSetup, noise: () => Float32Array = NO_NOISE): PreparedSampling {
  const { b } = s;
  return prepareSampling({
    samplerName: b.p.samplerName,
    scheduler: b.p.scheduler,
    steps: b.steps,
    noise,
    brownian: { seeds: [b.seed], shape: [b.channels, s.h, s.w], source: b.rng },
    settings: b.settings,
    refiner: refinerSampling(s.req, "first"),
  });
}

function secondPassSampler(s: HiresSetup, h: number, w: number, seed: number, noise: () => Float32Array = NO_NOISE): PreparedSampling {
  const { b } = s;
  const { p } = b;
  return prepareSampling({
    samplerName: secondPassSamplerName(p),
    scheduler: hiresSchedulerName(p.hrScheduler) ?? p.scheduler,
    steps: s.hrSteps,
    noise,
    brownian: { seeds: [seed], shape: [b.channels, h, w], source: b.rng },
    settings: b.settings,
    img2img: { denoisingStrength: s.strength, fixSteps: true },
    fields: { sampler: "hr_sampler_name", scheduler: "hr_scheduler" },
    refiner: refinerSampling(s.req, "second"),
  });
}

/** The first pass's output as the second pass starts from it: a latent, or the decoded 8-bit image. */
export type FirstPassOutput =
  { kind: "latent"; latent: Float32Array; h: number; w: number } | { kind: "rgb"; rgb: Uint8Array; width: number; height: number };

export function firstPassHandover(out: FirstPassOutput, channels: number): Handover {
  return out.kind === "latent" ? latentHandover(out.latent, [1, channels, out.h, out.w]) : rgbHandover(out.rgb, out.width, out.height);
}

/** Reads a first-pass hand-over back, checked against the size this request's first pass has. */
function firstPassFromHandover(s: HiresSetup, h: Handover | undefined, channels: number): FirstPassOutput {
  if (latentUpscaleMode(upscalerName(s.b)) !== undefined) {
    const l = readLatent(h);
    if (l.shape[0] !== 1 || l.shape[1] !== channels || l.shape[2] !== s.h || l.shape[3] !== s.w) {
      throw FarmError.invalid("inputs", `first-pass latent is [${l.shape.join(",")}], this request's is [1,${channels},${s.h},${s.w}]`);
    }
    return { kind: "latent", latent: l.data, h: s.h, w: s.w };
  }
  const img = readRgb(h);
  if (img.width !== s.width || img.height !== s.height) {
    throw FarmError.invalid("inputs", `first-pass image is ${img.width}x${img.height}, this request's is ${s.width}x${s.height}`);
  }
  return { kind: "rgb", rgb: img.data, width: img.width, height: img.height };
}

/** Runs the first pass; its output is what the upscaler needs (A1111 decodes before a pixel upscaler). */
async function runFirstPass(
  pipe: LoadedPipeline,
  s: HiresSetup,
  ctx: RenderContext,
  onStep: (step: number, previewPng?: Uint8Array) => void,
): Promise<{ latent: Float32Array; sampler: PreparedSampling }> {
  const { b } = s;
  const rng = imageRngFor(b, s.h, s.w);
  // Sampler names are validated before any model work, so a bad hires request fails fast.
  const sampler = firstPassSampler(s, () => rng.next());
  if (s.target) secondPassSampler(s, s.target.secondPassLatent.height, s.target.secondPassLatent.width, b.seed);
  const cond = await conditioningFor(pipe, ctx, b, b.p.prompt, b.p.negativePrompt, sampler);
  const latent = await denoise(pipe, {
    sdxlCrop: b.conditioning.sdxlCrop,
    aestheticScore: b.conditioning.aestheticScore,
    sampler,
    cond,
    cfgScale: b.cfgScale,
    h: s.h,
    w: s.w,
    start: sampler.startLatent(rng.first()),
    signal: ctx.signal,
    onStep: (k, _total, previewPng) => onStep(k, previewPng),
    preview: b.preview,
    noiseRng: rng,
    refiner: refinerRun(pipe, s.req, "first", sampler),
    checkpoint: checkpointRun(s.req, ctx, "first"),
  });
  return { latent, sampler };
}

async function firstPassOutput(pipe: LoadedPipeline, s: HiresSetup, ctx: RenderContext, latent: Float32Array): Promise<FirstPassOutput> {
  if (latentUpscaleMode(upscalerName(s.b)) !== undefined) return { kind: "latent", latent, h: s.h, w: s.w };
  return { kind: "rgb", rgb: await decodeToRgb(pipe, latent, s.h, s.w, ctx.signal), width: s.width, height: s.height };
}

/** The upscaled and cropped latent the (untiled) second pass starts from, with its size. */
export async function upscaleForSecondPass(
  pipe: LoadedPipeline,
  b: TaskBasics,
  ctx: RenderContext,
  source: FirstPassOutput,
  target: HiresTarget,
): Promise<{ latent: Float32Array; h: number; w: number }> {
  const C = pipe.model.config.latentChannels;
  let up: Float32Array;
  let shape: [number, number, number, number];
  if (source.kind === "latent") {
    const mode = latentUpscaleMode(upscalerName(b))!;
    const size = [target.upscaledLatent.height, target.upscaledLatent.width] as const;
    up = interpolate(source.latent, [1, C, source.h, source.w], { mode: mode.mode, antialias: mode.antialias, size }).data;
    shape = [1, C, size[0], size[1]];
  } else {
    const img = await upscalePixels(pipe, b, ctx, source, target);
    const enc = await encodeRgb(pipe, img.data, img.width, img.height, ctx.signal);
    up = enc.latent;
    shape = [1, C, enc.h, enc.w];
  }
  const cropped = cropLatent(up, shape, target.latentCrop);
  return { latent: cropped.data, h: cropped.shape[2], w: cropped.shape[3] };
}

async function upscalePixels(
  pipe: LoadedPipeline,
  b: TaskBasics,
  ctx: RenderContext,
  source: Extract<FirstPassOutput, { kind: "rgb" }>,
  target: HiresTarget,
) {
  const upscaler = await resolveUpscaler(pipe.model, upscalerName(b)!, resourcesOf(ctx), "hr_upscaler", ctx.signal);
  return upscaleImage(
    { width: source.width, height: source.height, channels: 3, data: source.rgb },
    target.upscaleTo,
    upscaler,
    ctx.signal,
  );
}

/**
 * Face restoration, infotext and PNG of a finished hires image (untiled or assembled, the same). `pipe`
 * is the pipeline the task ends on, `firstModel` the first pass's model and `secondModel` the second
 * pass's (another where the second pass has a checkpoint or LoRAs of its own; the model it started on
 * where it switched to a refiner).
 */
async function finishHires(
  pipe: LoadedPipeline,
  req: RunTaskRequest,
  ctx: RenderContext,
  s: HiresSetup,
  firstModel: ModelIdentity,
  secondModel: ModelIdentity,
  sampler1: PreparedSampling,
  sampler2: PreparedSampling | undefined,
  rgb: Uint8Array,
  outW: number,
  outH: number,
): Promise<Image> {
  const { b } = s;
  const { p } = b;
  const restored = await restoreFacesIfRequested(pipe, ctx, p, { width: outW, height: outH, channels: 3, data: rgb });
  const model: ModelIdentity = {
    name: firstModel.name,
    modelHash: firstModel.modelHash,
    // A1111 takes "VAE" and "VAE hash" when processing starts, before a hires checkpoint (and its VAE) loads.
    vae: firstModel.vae,
    loraHashes: sampler2
      ? mergeLoraHashes(
          loraHashesInPromptOrder(firstModel.loraHashes, p.prompt, p.loras, b.unmergedLoraHashes),
          loraHashesInPromptOrder(secondModel.loraHashes, secondPassPrompt(p), p.loras, b.unmergedLoraHashes),
        )
      : firstModel.loraHashes,
  };
  const base = baseInfotext(model, b, sampler1, { width: s.width, height: s.height });
  const hiresExtras: Array<[string, string | number]> = !sampler2
    ? []
    : hiresInfotextFields({
        width: b.width,
        height: b.height,
        hrScale: p.hrScale ?? 2,
        hrResizeX: p.hrResizeX,
        hrResizeY: p.hrResizeY,
        denoisingStrength: s.strength,
        samplerName: sampler1.choice.sampler.name,
        hrSamplerName: p.hrSamplerName ? sampler2.choice.sampler.name : null,
        hrCheckpointTitle: hiresCheckpoint(p) !== undefined ? checkpointTitle(secondModel) : null,
        prompt: p.prompt,
        negativePrompt: p.negativePrompt,
        hrPrompt: p.hrPrompt,
        hrNegativePrompt: p.hrNegativePrompt,
        firstPassScheduleLabel: scheduleLabel(sampler1),
        hiresScheduleLabel: scheduleLabel(sampler2),
        hrSecondPassSteps: p.hrSecondPassSteps,
        hrUpscaler: upscalerName(b),
      }).map(([k, v]) => [k, v]);
  const infotext = a1111Infotext({
    ...base,
    denoisingStrength: sampler2 ? s.strength : undefined,
    faceRestoration: restored.infotext,
    extra: [
      ...hiresExtras,
      ...(base.extra ?? []),
      ...(sampler2 ? samplerExtras(sampler2).filter(([k]) => !(base.extra ?? []).some(([e]) => e === k)) : []),
    ],
  });
  return finishImage(req, ctx, restored.image.data, outW, outH, infotext);
}

/** The untiled second pass from the first pass's output, to the finished image. */
async function runSecondPass(
  pipe: LoadedPipeline,
  req: RunTaskRequest,
  ctx: RenderContext,
  s: HiresSetup,
  firstModel: ModelIdentity,
  sampler1: PreparedSampling,
  source: FirstPassOutput,
  onStep: (step: number, previewPng?: Uint8Array) => void,
): Promise<Image> {
  const { b } = s;
  const { p } = b;
  const target = requireTarget(s);
  const up = await upscaleForSecondPass(pipe, b, ctx, source, target);
  const rng = imageRngFor(b, up.h, up.w);
  const sampler2 = secondPassSampler(s, up.h, up.w, b.seed, () => rng.next());
  const cond = await conditioningFor(pipe, ctx, b, p.hrPrompt || p.prompt, p.hrNegativePrompt || p.negativePrompt, sampler2, {
    fields: { prompt: "hr_prompt" },
    firstPass: sampler1,
  });
  const start = sampler2.startLatent(rng.first(), up.latent);
  const latent = await denoise(pipe, {
    sdxlCrop: b.conditioning.sdxlCrop,
    aestheticScore: b.conditioning.aestheticScore,
    sampler: sampler2,
    cond,
    cfgScale: b.cfgScale,
    h: up.h,
    w: up.w,
    // A1111 conditions the second pass on hr_upscale_to, which may be off the latent grid.
    imageSize: target.upscaleTo,
    start,
    signal: ctx.signal,
    onStep: (k, _total, previewPng) => onStep(k, previewPng),
    preview: b.preview,
    noiseRng: rng,
    refiner: refinerRun(pipe, req, "second", sampler2),
    checkpoint: checkpointRun(req, ctx, "second"),
  });
  const rgb = await decodeToRgb(pipe, latent, up.h, up.w, ctx.signal);
  return finishHires(pipe, req, ctx, s, firstModel, passIdentity(pipe, req, "second"), sampler1, sampler2, rgb, up.w * 8, up.h * 8);
}

export async function renderTxt2imgExtended(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const s = hiresSetup(pipe, req, ctx);
  if (s.target && (refinerInPass(req.params!, "first") || refinerInPass(req.params!, "second"))) {
    // Each pass may switch to the refiner and back (A1111 reloads the model for the second pass).
    throw FarmError.unimplemented(
      "refiner_checkpoint",
      "a Hires.fix job with a refiner runs as its two stages (task-passes.ts), not as one FULL render",
    );
  }
  // Progress counts both passes, as A1111's total does (a txt2img sampler reports its requested steps).
  let offset = 0;
  const total = s.b.steps + (s.target ? s.hrSteps : 0);
  const onStep = (k: number, previewPng?: Uint8Array): void => ctx.onStep(offset + k, total, previewPng);
  const first = await runFirstPass(pipe, s, ctx, onStep);
  if (!s.target) {
    const rgb = await decodeToRgb(pipe, first.latent, s.h, s.w, ctx.signal);
    const model = passIdentity(pipe, req, "first");
    return finishHires(pipe, req, ctx, s, model, model, first.sampler, undefined, rgb, s.width, s.height);
  }
  offset = first.sampler.steps;
  const source = await firstPassOutput(pipe, s, ctx, first.latent);
  return runSecondPass(pipe, req, ctx, s, passIdentity(pipe, req, "first"), first.sampler, source, onStep);
}

/** The output of one stage task: the image (last stage) or what the next stage needs. */
export type StageOutput = { case: "result"; value: Image } | { case: "handover"; value: Handover };

/**
 * One stage of a split Hires.fix image (see the file comment). Progress is counted within the
 * stage (step of this stage's steps); the coordinator adds the stages up for the job's progress.
 */
export async function runHiresStage(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<StageOutput> {
  const s = hiresSetup(pipe, req, ctx);
  const target = requireTarget(s);
  const C = pipe.model.config.latentChannels;
  switch (req.stage) {
    case TaskStage.FIRST_PASS: {
      const first = await runFirstPass(pipe, s, ctx, (k, previewPng) => ctx.onStep(k, s.b.steps, previewPng));
      const out = firstPassHandover(await firstPassOutput(pipe, s, ctx, first.latent), C);
      out.firstPassInfotext = ranInfotext(first.sampler);
      out.firstPassModel = passModel(passIdentity(pipe, req, "first"));
      return { case: "handover", value: out };
    }
    case TaskStage.SECOND_PASS: {
      const source = firstPassFromHandover(s, req.inputs[0], C);
      const sampler1 = withRanInfotext(firstPassSampler(s), req.inputs[0]?.firstPassInfotext ?? []);
      const firstModel = modelIdentity(req.inputs[0]?.firstPassModel, pipe);
      const image = await runSecondPass(pipe, req, ctx, s, firstModel, sampler1, source, (k, previewPng) =>
        ctx.onStep(k, s.hrSteps, previewPng),
      );
      return { case: "result", value: image };
    }
    case TaskStage.UPSCALE: {
      const out = await upscaleForTiles(pipe, s, ctx, firstPassFromHandover(s, req.inputs[0], C), target);
      out.firstPassInfotext = req.inputs[0]?.firstPassInfotext ?? [];
      if (req.inputs[0]?.firstPassModel) out.firstPassModel = req.inputs[0].firstPassModel;
      return { case: "handover", value: out };
    }
    case TaskStage.SECOND_PASS_TILE:
      return { case: "handover", value: await runTile(pipe, req, ctx, s) };
    case TaskStage.ASSEMBLE:
      return { case: "result", value: await assemble(pipe, req, ctx, s, target) };
    default:
      throw FarmError.invalid("stage", `stage ${TaskStage[req.stage] ?? req.stage} is not a Hires.fix stage`);
  }
}

/**
 * The tiled second pass's source, made once: the upscaled latent cropped to the second-pass size
 * (latent upscalers), or the upscaled image cropped to it in whole latent cells (pixel upscalers;
 * each tile encodes its own crop, as Ultimate SD Upscale does).
 */
async function upscaleForTiles(
  pipe: LoadedPipeline,
  s: HiresSetup,
  ctx: RenderContext,
  source: FirstPassOutput,
  target: HiresTarget,
): Promise<Handover> {
  const C = pipe.model.config.latentChannels;
  if (source.kind === "latent") {
    const up = await upscaleForSecondPass(pipe, s.b, ctx, source, target);
    return latentHandover(up.latent, [1, C, up.h, up.w]);
  }
  const img = await upscalePixels(pipe, s.b, ctx, source, target);
  const f = 8;
  const x0 = target.latentCrop.left * f;
  const y0 = target.latentCrop.top * f;
  const W = target.final.width;
  const H = target.final.height;
  if (x0 + W > img.width || y0 + H > img.height)
    throw new RangeError(`upscaled ${img.width}x${img.height} cannot hold ${W}x${H}+${x0}+${y0}`);
  const out = new Uint8Array(W * H * 3);
  for (let y = 0; y < H; y++) out.set(img.data.subarray(((y0 + y) * img.width + x0) * 3, ((y0 + y) * img.width + x0 + W) * 3), y * W * 3);
  return rgbHandover(out, W, H);
}

/** One tile: img2img of its crop with the image's seed (the "same" rule) at the tile's size, decoded to 8-bit RGB. */
async function runTile(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext, s: HiresSetup): Promise<Handover> {
  const { b } = s;
  const { p } = b;
  const input = req.inputs[0];
  let latent: Float32Array;
  let h: number;
  let w: number;
  if (latentUpscaleMode(upscalerName(b)) !== undefined) {
    const l = readLatent(input);
    if (l.shape[0] !== 1 || l.shape[1] !== b.channels) throw FarmError.invalid("inputs", `tile latent is [${l.shape.join(",")}]`);
    ({ data: latent } = l);
    [h, w] = [l.shape[2], l.shape[3]];
  } else {
    const img = readRgb(input);
    if (img.width % 8 !== 0 || img.height % 8 !== 0)
      throw FarmError.invalid("inputs", `tile ${img.width}x${img.height} is not on the latent grid`);
    const enc = await encodeRgb(pipe, img.data, img.width, img.height, ctx.signal);
    ({ latent, h, w } = enc);
  }
  const seed = tileSeed(b.seed, req.tileIndex, "same");
  const rng = imageRngFor({ ...b, seed }, h, w);
  const sampler = secondPassSampler(s, h, w, seed, () => rng.next());
  const cond = await conditioningFor(pipe, ctx, b, p.hrPrompt || p.prompt, p.hrNegativePrompt || p.negativePrompt, sampler, {
    fields: { prompt: "hr_prompt" },
    firstPass: firstPassSampler(s),
  });
  const start = sampler.startLatent(rng.first(), latent);
  const out = await denoise(pipe, {
    sdxlCrop: b.conditioning.sdxlCrop,
    aestheticScore: b.conditioning.aestheticScore,
    sampler,
    cond,
    cfgScale: b.cfgScale,
    h,
    w,
    // A tile is conditioned as the whole second pass is, as if one agent rendered it.
    imageSize: requireTarget(s).upscaleTo,
    start,
    signal: ctx.signal,
    // No previews: one tile's would stand for the whole image's.
    onStep: (k) => ctx.onStep(k, s.hrSteps),
    noiseRng: rng,
    refiner: refinerRun(pipe, req, "second", sampler),
    checkpoint: checkpointRun(req, ctx, "second"),
  });
  const tile = rgbHandover(await decodeToRgb(pipe, out, h, w, ctx.signal), w * 8, h * 8);
  tile.firstPassInfotext = input?.firstPassInfotext ?? [];
  if (input?.firstPassModel) tile.firstPassModel = input.firstPassModel;
  tile.secondPassInfotext = ranInfotext(sampler);
  return tile;
}

/** Blends the tiles in index order (so the bytes never depend on which agent ran which tile), then finishes the image. */
async function assemble(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext, s: HiresSetup, target: HiresTarget): Promise<Image> {
  const plan = req.tiles;
  if (!plan) throw FarmError.invalid("tiles", "ASSEMBLE needs the tile layout");
  if (plan.width !== target.final.width || plan.height !== target.final.height) {
    throw FarmError.invalid(
      "tiles",
      `layout ${plan.width}x${plan.height} is not the second pass's ${target.final.width}x${target.final.height}`,
    );
  }
  let layout;
  try {
    layout = layoutFromStarts(plan.width, plan.height, plan.tileWidth, plan.tileHeight, plan.xs, plan.ys);
  } catch (err) {
    throw FarmError.invalid("tiles", (err as Error).message);
  }
  if (req.inputs.length !== layout.tiles.length)
    throw FarmError.invalid("inputs", `${layout.tiles.length} tiles, ${req.inputs.length} results`);
  const blender = new TileBlender(layout, 3);
  for (const t of layout.tiles) {
    checkAborted(ctx.signal);
    const img = readRgb(req.inputs[t.index], `inputs[${t.index}]`);
    if (img.width !== t.width || img.height !== t.height)
      throw FarmError.invalid(`inputs[${t.index}]`, `tile is ${img.width}x${img.height}, layout says ${t.width}x${t.height}`);
    blender.add(t.index, img.data);
  }
  const rgb = blender.resultUint8();
  const sampler1 = withRanInfotext(
    firstPassSampler(s),
    req.inputs.flatMap((t) => t.firstPassInfotext),
  );
  const sampler2 = withRanInfotext(
    secondPassSampler(s, target.secondPassLatent.height, target.secondPassLatent.width, s.b.seed),
    req.inputs.flatMap((t) => t.secondPassInfotext),
  );
  const firstModel = modelIdentity(req.inputs[0]?.firstPassModel, pipe);
  return finishHires(pipe, req, ctx, s, firstModel, pipe, sampler1, sampler2, rgb, layout.width, layout.height);
}

const CONDITIONING_KEYS: ReadonlySet<string> = new Set(CONDITIONING_INFOTEXT_KEYS);
/** What a pass records as it runs rather than at its setup: its prompts' encoding, its sampler's run and its end. */
const RAN_KEYS: ReadonlySet<string> = new Set([...CONDITIONING_INFOTEXT_KEYS, ...RUN_INFOTEXT_KEYS, ...AFTER_SAMPLING_INFOTEXT_KEYS]);

/** What a pass's run added to its infotext (Emphasis, NGMS, Skip Early CFG…), for a later stage's infotext. */
function ranInfotext(sampler: PreparedSampling): InfotextEntry[] {
  return Object.entries(sampler.infotext)
    .filter(([key]) => RAN_KEYS.has(key))
    .map(([key, v]) => create(InfotextEntrySchema, { key, value: typeof v === "boolean" ? (v ? "True" : "False") : String(v) }));
}

/**
 * A pass prepared again in a later stage, with what its run recorded in an earlier one. The values are
 * the strings the infotext prints, so the text is the one a single task writes.
 */
function withRanInfotext(sampler: PreparedSampling, entries: readonly InfotextEntry[]): PreparedSampling {
  const conditioning: Array<[string, string]> = [];
  for (const { key, value } of entries) {
    if (!RAN_KEYS.has(key)) throw FarmError.invalid("inputs", `"${key}" is not an entry a sampler's run records`);
    if (key in sampler.infotext || conditioning.some(([k]) => k === key)) continue;
    if (CONDITIONING_KEYS.has(key)) conditioning.push([key, value]);
    else sampler.infotext[key] = value;
  }
  // They arrive in the order ranInfotext read them, which is recordConditioningInfotext's: before the sampler's own.
  putFirst(sampler.infotext, conditioning);
  return sampler;
}
