/**
 * img2img as A1111 runs it: init image decoded within the agent's limits, placed on the canvas by the
 * resize mode, VAE-encoded (posterior mean), noised to the first σ of the truncated schedule
 * (setup_img2img_steps), sampled and decoded.
 */
import sharp from "sharp";
import { FarmError, type Image, type RunTaskRequest } from "@latentfarm/shared";
import { prepareSampling } from "../sampling/index.js";
import {
  composeOnCanvas,
  decodeImage,
  interpolate,
  planImg2imgResize,
  type Image8,
} from "../imaging/index.js";
import { checkAborted, denoise } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./txt2img.js";
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

/** A1111's img2img default denoising strength. */
export const DEFAULT_DENOISING_STRENGTH = 0.75;

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
 * The init latent for a task: decoded, resized by `resize_mode`, encoded. "Just resize (latent
 * upscale)" encodes the image at its own size and bilinearly resizes the latent instead.
 */
export async function initLatent(
  pipe: LoadedPipeline, img: Image8, mode: number, width: number, height: number, signal: AbortSignal,
): Promise<Float32Array> {
  const C = pipe.model.config.latentChannels;
  const h = Math.floor(height / 8);
  const w = Math.floor(width / 8);
  if (mode === 3) {
    const enc = await encodeRgb(pipe, img.data, img.width, img.height, signal);
    if (enc.h === h && enc.w === w) return enc.latent;
    return interpolate(enc.latent, [1, C, enc.h, enc.w], { mode: "bilinear", size: [h, w] }).data;
  }
  const canvas = await placeOnCanvas(img, mode, width, height);
  return (await encodeRgb(pipe, canvas.data, canvas.width, canvas.height, signal)).latent;
}

export async function renderImg2img(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const b = taskBasics(pipe, req);
  const { p } = b;
  if (p.mask.length > 0) throw FarmError.unimplemented("mask", "inpainting (img2img with a mask) is not implemented by this farm yet");
  if (p.enableHr) throw FarmError.invalid("enable_hr", "Hires.fix applies to txt2img, not to img2img with init_images");
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
    img2img: { denoisingStrength: strength },
  });

  const source = p.initImages[req.imageIndex % p.initImages.length]!;
  const img = await decodeInputImage(source, ctx, "init_images");
  checkAborted(ctx.signal);
  const cond = await conditioningFor(pipe, ctx, b, p.prompt, p.negativePrompt, sampler);
  const init = await initLatent(pipe, img, p.resizeMode, b.width, b.height, ctx.signal);
  // A1111 img2img: noise = rng.next() (the first draw), scaled by initial_noise_multiplier inside startLatent.
  const start = sampler.startLatent(imageRng.next(), init);
  const latent = await denoise(pipe, { sampler, cond, cfgScale: b.cfgScale, h, w, start, signal: ctx.signal, onStep: ctx.onStep });
  let rgb = await decodeToRgb(pipe, latent, h, w, ctx.signal);
  const restored = await restoreFacesIfRequested(pipe, ctx, p, { width: b.width, height: b.height, channels: 3, data: rgb });
  rgb = restored.image.data;
  const infotext = a1111Infotext({
    ...baseInfotext(pipe, b, sampler, { width: b.width, height: b.height }),
    denoisingStrength: strength,
    faceRestoration: restored.infotext,
  });
  return finishImage(req, ctx, rgb, b.width, b.height, infotext);
}
