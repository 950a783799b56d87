/**
 * img2img as A1111 runs it: init image decoded within the agent's limits, placed on the canvas by the
 * resize mode, VAE-encoded (posterior mean), noised to the first σ of the truncated schedule
 * (setup_img2img_steps), sampled and decoded. With a mask it inpaints (inpaint.ts).
 */
import * as grpc from "@grpc/grpc-js";
import sharp from "sharp";
import { DEFAULT_DENOISING_STRENGTH, FarmError, samplingPass, type Image, type RunTaskRequest } from "@latentfarm/shared";
import { passIdentity, refinerRun, refinerSampling } from "./refiner.js";
import { prepareSampling } from "../sampling/index.js";
import { composeOnCanvas, decodeImage, interpolate, planImg2imgResize, type Image8 } from "../imaging/index.js";
import { checkpointRun } from "./checkpoint.js";
import { checkAborted, denoise } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import {
  a1111Infotext,
  asFarmError,
  baseInfotext,
  conditioningFor,
  decodeToRgb,
  encodeRgb,
  finishImage,
  imageRngFor,
  resourcesOf,
  taskBasics,
} from "./render-common.js";
import { restoreFacesIfRequested } from "./face-restore.js";
import {
  inpaintSettings,
  inpaintingMaskWeight,
  inpaintingImageConditioning,
  prepareInpaint,
  pyFloat,
  takesInpaintingConditioning,
  type PreparedInpaint,
} from "./inpaint.js";

/** Decodes a user image with the agent's byte and pixel limits; problems are INVALID_ARGUMENT naming `field`. */
export async function decodeInputImage(bytes: Uint8Array, ctx: RenderContext, field: string): Promise<Image8> {
  const r = resourcesOf(ctx);
  try {
    const img = await decodeImage(bytes, { maxBytes: r.maxInputBytes, maxPixels: r.maxInputPixels }, field);
    return { width: img.width, height: img.height, channels: 3, data: img.data };
  } catch (err) {
    throw asFarmError(err);
  }
}

/** Resize modes 0–2: Lanczos to the plan's size, then PIL-exact placement and edge fill on the canvas. */
export async function placeOnCanvas(img: Image8, mode: number, width: number, height: number): Promise<Image8> {
  const plan = planImg2imgResize(mode, { width: img.width, height: img.height }, { width, height });
  if (plan.resize === undefined) throw new RangeError("the latent resize mode has no pixel canvas");
  let resized = img;
  if (img.width !== plan.resize.width || img.height !== plan.resize.height) {
    const { data, info } = await sharp(img.data, { raw: { width: img.width, height: img.height, channels: 3 } })
      .resize(plan.resize.width, plan.resize.height, { fit: "fill", kernel: "lanczos3" })
      .raw()
      .toBuffer({ resolveWithObject: true });
    resized = { width: info.width, height: info.height, channels: 3, data: new Uint8Array(data.buffer, data.byteOffset, data.length) };
  }
  return composeOnCanvas(resized, plan);
}

/**
 * Encodes a picture placed for `resize_mode` (modes 0–2: already on the canvas). "Just resize (latent
 * upscale)" encodes the picture at its own size and bilinearly resizes the latent instead.
 */
export async function encodeInit(
  pipe: LoadedPipeline,
  picture: Image8,
  mode: number,
  width: number,
  height: number,
  signal: AbortSignal,
): Promise<Float32Array> {
  const C = pipe.model.config.latentChannels;
  const h = Math.floor(height / 8);
  const w = Math.floor(width / 8);
  const enc = await encodeRgb(pipe, picture.data, picture.width, picture.height, signal);
  if (mode !== 3 || (enc.h === h && enc.w === w)) return enc.latent;
  return interpolate(enc.latent, [1, C, enc.h, enc.w], { mode: "bilinear", size: [h, w] }).data;
}

export async function renderImg2img(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const b = taskBasics(pipe, req, ctx);
  const { p } = b;
  if (p.enableHr) throw FarmError.invalid("enable_hr", "Hires.fix applies to txt2img, not to img2img with init_images");
  const C = pipe.model.config.latentChannels;
  const inpaintingUnet = takesInpaintingConditioning(pipe);
  if (pipe.model.unetInChannels !== C && !inpaintingUnet) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `model "${pipe.name}" has a ${pipe.model.unetInChannels}-channel UNet, which this farm cannot condition`,
      { field: "model" },
    );
  }
  const inpaint = p.mask.length > 0 ? inpaintSettings(p) : undefined;
  const maskWeight = inpaint?.maskWeight ?? inpaintingMaskWeight(p);
  const strength = p.denoisingStrength ?? DEFAULT_DENOISING_STRENGTH;
  const h = b.height / 8;
  const w = b.width / 8;
  const imageRng = imageRngFor(b, h, w);
  const settings = { ...b.settings, ...(p.initialNoiseMultiplier !== undefined && { initialNoiseMultiplier: p.initialNoiseMultiplier }) };
  const sampler = prepareSampling({
    samplerName: p.samplerName,
    scheduler: p.scheduler,
    steps: b.steps,
    noise: () => imageRng.next(),
    brownian: { seeds: [b.seed], shape: [b.channels, h, w], source: b.rng },
    settings,
    img2img: { denoisingStrength: strength, fixSteps: b.img2imgFixSteps },
    refiner: refinerSampling(req, "first"),
  });
  // An inpainting model switches to a plain refiner, which ignores A1111's c_concat; an inpainting refiner
  // would take the model's conditioning, made with the model's VAE, which its run does not have.
  const resumed = req.refinerResume !== undefined && samplingPass(req.stage) === "first" ? req.refinerResume : undefined;
  if (inpaintingUnet && resumed !== undefined) {
    throw FarmError.unimplemented(
      "refiner_checkpoint",
      `an inpainting (9-channel) refiner ("${pipe.name}") is not implemented yet: it would take the model's image conditioning`,
    );
  }

  const source = p.initImages[req.imageIndex % p.initImages.length]!;
  const img = await decodeInputImage(source, ctx, "init_images");
  checkAborted(ctx.signal);
  const cond = await conditioningFor(pipe, ctx, b, p.prompt, p.negativePrompt, sampler);
  let init: Float32Array;
  let imageCond: Float32Array | undefined;
  let prepared: PreparedInpaint | undefined;
  if (inpaint) {
    prepared = await prepareInpaint({ pipe, req, ctx, b, settings: inpaint, sampler, init: img, place: placeOnCanvas });
    init = prepared.initLatent;
    imageCond = prepared.imageCond;
  } else {
    const picture = p.resizeMode === 3 ? img : await placeOnCanvas(img, p.resizeMode, b.width, b.height);
    init = await encodeInit(pipe, picture, p.resizeMode, b.width, b.height, ctx.signal);
    // Without a mask an inpainting UNet sees the whole picture masked (A1111's all-ones mask).
    if (inpaintingUnet) imageCond = await inpaintingImageConditioning(pipe, picture, undefined, h, w, true, maskWeight, ctx.signal);
  }
  // A1111 img2img: noise = rng.next() (the first draw), scaled by initial_noise_multiplier inside startLatent.
  const start = sampler.startLatent(imageRng.next(), init);
  let latent = await denoise(pipe, {
    sdxlCrop: b.conditioning.sdxlCrop,
    aestheticScore: b.conditioning.aestheticScore,
    sampler,
    cond,
    cfgScale: b.cfgScale,
    h,
    w,
    start,
    signal: ctx.signal,
    onStep: ctx.onStep,
    preview: b.preview,
    noiseRng: imageRng,
    ...(imageCond && { imageCond }),
    ...(prepared?.maskBlend && { maskBlend: prepared.maskBlend }),
    refiner: refinerRun(pipe, req, "first", sampler),
    checkpoint: checkpointRun(req, ctx, "first"),
  });
  if (prepared) latent = prepared.finishLatent(latent);
  const rgb = await decodeToRgb(pipe, latent, h, w, ctx.signal);
  const restored = await restoreFacesIfRequested(pipe, ctx, p, { width: b.width, height: b.height, channels: 3, data: rgb });
  const out = prepared ? prepared.finishImage(restored.image) : restored.image;
  const base = baseInfotext(passIdentity(pipe, req, "first"), b, sampler, { width: b.width, height: b.height });
  const infotext = a1111Infotext({
    ...base,
    denoisingStrength: strength,
    conditionalMaskWeight: inpaintingUnet || resumed?.inpaintingConditioning ? pyFloat(maskWeight) : undefined,
    faceRestoration: restored.infotext,
    extra: [...(prepared?.infotext ?? []), ...(base.extra ?? [])],
  });
  return finishImage(req, ctx, out.data, out.width, out.height, infotext);
}
