/**
 * Inpainting as A1111 v1.10 runs it (StableDiffusionProcessingImg2Img with a mask):
 *
 * 1. The mask (create_binary_mask, optional invert, cv2 blur along x then y).
 * 2. "Only masked" (inpaint_full_res): the blurred mask's bounding box ± padding, grown to the
 *    processing aspect ratio; mask and picture are cropped to it and "resize and fill"ed to
 *    width×height. A blank mask turns the task into plain img2img. "Whole picture": the mask is
 *    resized with the request's resize mode and doubled for the overlay.
 * 3. The overlay (the init picture, transparent where the mask is) and masked content "fill".
 * 4. Init latent; latent mask = processed mask at latent size, rounded; "latent noise" / "latent
 *    nothing" replace the masked latent.
 * 5. Sampling blends `x·nmask + init·mask` at every model call (denoise.ts) and once at the end.
 * 6. The decoded picture is pasted back (crop-and-resize into the box) under the overlay.
 *
 * Inpainting UNets (9 input channels) get A1111's conditioning: the rounded mask and the latent of
 * the picture with the masked part blanked by `inpainting_mask_weight`.
 */
import * as grpc from "@grpc/grpc-js";
import { FarmError, InpaintingFill, type GenerationParams, type RunTaskRequest } from "@latentfarm/shared";
import { ImageRng, type PreparedSampling } from "../sampling/index.js";
import { interpolate, type Image8 } from "../imaging/index.js";
import {
  applyOverlay,
  binaryMask,
  blurMask,
  cropRegion,
  decodeMask,
  doubledMask,
  expandCropRegion,
  fillMasked,
  invertMask,
  latentMask,
  overlayImage,
  resizeImageA1111,
  roundHalfEven,
  type CropBox,
  type DecodedMask,
} from "../imaging/mask.js";
import { pilCrop } from "../imaging/mask-pil.js";
import { blendLatent, checkAborted, type MaskBlend } from "./denoise.js";
import type { InfotextValue } from "./infotext.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { asFarmError, encodeRgb, resourcesOf, rgbToVaeInput, type TaskBasics } from "./render-common.js";
import type { RenderContext } from "./render-common.js";

/** A1111's mask_blur_x / mask_blur_y default. */
export const DEFAULT_MASK_BLUR = 4;
/** Largest mask blur accepted (A1111's UI slider maximum): the blur's cost grows with σ. */
export const MAX_MASK_BLUR = 64;
/** A1111's option `inpainting_mask_weight` default. */
export const DEFAULT_INPAINTING_MASK_WEIGHT = 1;

export interface InpaintSettings {
  blurX: number;
  blurY: number;
  invert: boolean;
  fill: InpaintingFill;
  fullRes: boolean;
  padding: number;
  round: boolean;
  /** Option inpainting_mask_weight (inpainting UNets only). */
  maskWeight: number;
}

function intIn(field: string, v: number, lo: number, hi: number): void {
  if (!Number.isInteger(v) || v < lo || v > hi) throw FarmError.invalid(field, `must be an integer in [${lo}, ${hi}], got ${v}`);
}

/** Option `inpainting_mask_weight` for this request: given, or A1111's default 1.0. */
export function inpaintingMaskWeight(p: GenerationParams): number {
  const w = p.inpaintingMaskWeight ?? DEFAULT_INPAINTING_MASK_WEIGHT;
  if (!Number.isFinite(w) || w < 0 || w > 1) throw FarmError.invalid("inpainting_mask_weight", `must be in [0, 1], got ${w}`);
  return w;
}

/** The request's inpainting fields with A1111's API defaults; out-of-range values are INVALID_ARGUMENT. */
export function inpaintSettings(p: GenerationParams): InpaintSettings {
  // A1111's mask_blur property setter overrides both axes when mask_blur is given.
  const blurX = p.maskBlur ?? p.maskBlurX ?? DEFAULT_MASK_BLUR;
  const blurY = p.maskBlur ?? p.maskBlurY ?? DEFAULT_MASK_BLUR;
  intIn(p.maskBlur !== undefined ? "mask_blur" : "mask_blur_x", blurX, 0, MAX_MASK_BLUR);
  intIn(p.maskBlur !== undefined ? "mask_blur" : "mask_blur_y", blurY, 0, MAX_MASK_BLUR);
  intIn("inpaint_full_res_padding", p.inpaintFullResPadding, 0, 2 ** 31 - 1);
  if (!(p.inpaintingFill in InpaintingFill)) throw FarmError.invalid("inpainting_fill", `must be 0..3, got ${p.inpaintingFill}`);
  const maskWeight = inpaintingMaskWeight(p);
  return {
    blurX,
    blurY,
    invert: p.inpaintingMaskInvert,
    fill: p.inpaintingFill,
    fullRes: p.inpaintFullRes ?? true,
    padding: p.inpaintFullResPadding,
    round: p.maskRound ?? true,
    maskWeight,
  };
}

/** True for UNets that take A1111's inpainting conditioning (latent + mask + masked-picture latent). */
export function takesInpaintingConditioning(pipe: LoadedPipeline): boolean {
  return pipe.model.unetInChannels === 2 * pipe.model.config.latentChannels + 1;
}

/**
 * `inpainting_image_conditioning`: the mask (rounded to 0/1 when `round`; all ones without a mask),
 * the picture lerped towards picture·(1 − mask) by `weight` and VAE-encoded (posterior mean × scaling
 * factor, as this farm encodes init pictures), and the mask nearest-resized to the latent: [1 + C, h, w].
 */
export async function inpaintingImageConditioning(
  pipe: LoadedPipeline,
  picture: Image8,
  mask: Image8 | undefined,
  h: number,
  w: number,
  round: boolean,
  weight: number,
  signal: AbortSignal,
): Promise<Float32Array> {
  const { width, height } = picture;
  const plane = width * height;
  if (mask !== undefined && (mask.width !== width || mask.height !== height)) {
    throw FarmError.invalid("resize_mode", `the mask (${mask.width}x${mask.height}) and the picture (${width}x${height}) differ in size`);
  }
  const m = new Float32Array(plane);
  for (let i = 0; i < plane; i++) {
    if (mask === undefined) m[i] = 1;
    else {
      const v = Math.fround(mask.data[i]! / 255);
      m[i] = round ? roundHalfEven(v) : v;
    }
  }
  const src = rgbToVaeInput(picture.data, width, height);
  const wt = Math.fround(weight);
  const masked = new Float32Array(src.length);
  // torch.lerp: start + w·(end − start) below 0.5, end − (end − start)·(1 − w) from 0.5 up.
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < plane; i++) {
      const s = src[c * plane + i]!;
      const e = Math.fround(s * Math.fround(1 - m[i]!));
      const d = Math.fround(e - s);
      masked[c * plane + i] = wt < 0.5 ? Math.fround(s + Math.fround(wt * d)) : Math.fround(e - Math.fround(d * Math.fround(1 - wt)));
    }
  }
  const enc = await pipe.model.vaeEncode(masked, height, width, signal);
  const C = pipe.model.config.latentChannels;
  if (enc.h !== h || enc.w !== w) {
    throw FarmError.invalid(
      "resize_mode",
      `the conditioning picture encodes to ${enc.w}x${enc.h} latent cells, the task samples ${w}x${h}`,
    );
  }
  const k = pipe.model.config.scalingFactor;
  const small = interpolate(m, [1, 1, height, width], { mode: "nearest", size: [h, w] }).data;
  const out = new Float32Array((1 + C) * h * w);
  out.set(small, 0);
  for (let i = 0; i < C * h * w; i++) out[h * w + i] = Math.fround(enc.latent[i]! * k);
  return out;
}

export interface InpaintInput {
  pipe: LoadedPipeline;
  req: RunTaskRequest;
  ctx: RenderContext;
  b: TaskBasics;
  settings: InpaintSettings;
  sampler: PreparedSampling;
  /** The decoded init picture (flattened RGB, its own size). */
  init: Image8;
  /** img2img's placement of a picture on the canvas for resize modes 0–2. */
  place: (img: Image8, mode: number, width: number, height: number) => Promise<Image8>;
}

export interface PreparedInpaint {
  /** The init latent after masked-content handling: sampling starts from it and blends back to it. */
  initLatent: Float32Array;
  /** Undefined when "only masked" found a blank mask (A1111 then runs plain img2img). */
  maskBlend: MaskBlend | undefined;
  /** c_concat for 9-channel UNets. */
  imageCond: Float32Array | undefined;
  /** A1111's extra_generation_params from init, in its order. */
  infotext: Array<[string, InfotextValue]>;
  /** `samples·nmask + init·mask` after sampling. */
  finishLatent(samples: Float32Array): Float32Array;
  /** The decoded picture under the overlay (pasted back into the init picture for "only masked"). */
  finishImage(rgb: Image8): Image8;
}

/** A1111 seeds "latent noise" with all_seeds[batch position]: this image's batch slot, not its own seed. */
function latentNoiseSeed(b: TaskBasics, imageIndex: number): number {
  if (b.p.subseedStrength !== 0) return b.seed;
  const batch = b.p.batchSize ?? 1;
  return b.seed - batch * Math.floor(imageIndex / batch);
}

export async function prepareInpaint(input: InpaintInput): Promise<PreparedInpaint> {
  const { pipe, req, ctx, b, settings: s, sampler } = input;
  const { width: W, height: H } = b;
  const mode = b.p.resizeMode;
  const C = pipe.model.config.latentChannels;
  const h = H / 8;
  const w = W / 8;
  const r = resourcesOf(ctx);
  if (sampler.choice.sampler.name === "LCM") {
    throw FarmError.unimplemented("sampler_name", "LCM cannot blend an inpainting mask into its denoised latent yet");
  }
  const infotext: Array<[string, InfotextValue]> = [];

  let decoded: DecodedMask;
  try {
    decoded = await decodeMask(b.p.mask, { maxBytes: r.maxInputBytes, maxPixels: r.maxInputPixels }, "mask");
  } catch (err) {
    throw asFarmError(err);
  }
  checkAborted(ctx.signal);
  let m = binaryMask(decoded, s.round);
  if (s.invert) {
    m = invertMask(m);
    infotext.push(["Mask mode", "Inpaint not masked"]);
  }
  m = blurMask(m, s.blurX, s.blurY);
  if (s.blurX > 0 || s.blurY > 0) infotext.push(["Mask blur", s.blurX === s.blurY ? s.blurX : undefined]);

  let crop: CropBox | undefined;
  let imageMask: Image8 | undefined;
  let maskForOverlay: Image8 | undefined;
  let pasteTo: [number, number, number, number] | undefined;
  if (s.fullRes) {
    const region = cropRegion(m, s.padding);
    if (region) {
      crop = expandCropRegion(region, W, H, m.width, m.height);
      const [x1, y1, x2, y2] = crop;
      maskForOverlay = m;
      imageMask = resizeImageA1111(2, pilCrop(m, crop), W, H);
      pasteTo = [x1, y1, x2 - x1, y2 - y1];
      infotext.push(["Inpaint area", "Only masked"], ["Masked area padding", s.padding]);
    } else {
      ctx.onWarning('Unable to perform "Inpaint Only mask" because mask is blank, switch to img2img mode.');
    }
  } else {
    imageMask = resizeImageA1111(mode, m, W, H);
    maskForOverlay = doubledMask(imageMask);
  }

  // The latent-resize mode keeps the picture at its own size; A1111 then fails to fit the W×H mask
  // onto it (fill, overlay, conditioning), so such a task cannot be inpainted.
  const mismatched = mode === 3 && (input.init.width !== W || input.init.height !== H);
  if (imageMask !== undefined && crop === undefined && mismatched) {
    throw FarmError.invalid(
      "resize_mode",
      `"Just resize (latent upscale)" cannot inpaint a ${input.init.width}x${input.init.height} init image at ${W}x${H}: A1111 fails on the size mismatch; use another resize mode or "only masked"`,
    );
  }

  let picture = input.init;
  if (crop === undefined && mode !== 3) picture = await input.place(picture, mode, W, H);
  let overlay: Image8 | undefined;
  if (imageMask !== undefined && maskForOverlay !== undefined) {
    if (maskForOverlay.width !== picture.width || maskForOverlay.height !== picture.height) {
      maskForOverlay = resizeImageA1111(mode, maskForOverlay, picture.width, picture.height);
    }
    overlay = overlayImage(picture, maskForOverlay);
  }
  if (crop !== undefined) picture = resizeImageA1111(2, pilCrop(picture, crop), W, H);
  if (imageMask !== undefined && s.fill !== InpaintingFill.ORIGINAL) {
    picture = await fillMasked(picture, imageMask, ctx.signal);
    if (s.fill === InpaintingFill.FILL) infotext.push(["Masked content", "fill"]);
  }

  checkAborted(ctx.signal);
  let init = (await encodeRgb(pipe, picture.data, picture.width, picture.height, ctx.signal)).latent;
  if (mode === 3 && (picture.width !== W || picture.height !== H)) {
    init = interpolate(init, [1, C, Math.floor(picture.height / 8), Math.floor(picture.width / 8)], {
      mode: "bilinear",
      size: [h, w],
    }).data;
  }

  let maskBlend: MaskBlend | undefined;
  if (imageMask !== undefined) {
    const lm = latentMask(imageMask, w, h, s.round);
    const plane = h * w;
    const nmask = new Float32Array(C * plane);
    const keep = new Float32Array(C * plane);
    for (let c = 0; c < C; c++) {
      for (let i = 0; i < plane; i++) {
        nmask[c * plane + i] = lm[i]!;
        keep[c * plane + i] = Math.fround(1 - lm[i]!);
      }
    }
    if (s.fill === InpaintingFill.LATENT_NOISE) {
      const noise = new ImageRng({ shape: [C, h, w], seeds: [latentNoiseSeed(b, req.imageIndex)], source: b.rng }).first();
      const filled = new Float32Array(init.length);
      for (let i = 0; i < init.length; i++) filled[i] = Math.fround(init[i]! * keep[i]!) + Math.fround(noise[i]! * nmask[i]!);
      init = filled;
      infotext.push(["Masked content", "latent noise"]);
    } else if (s.fill === InpaintingFill.LATENT_NOTHING) {
      init = init.map((v, i) => v * keep[i]!);
      infotext.push(["Masked content", "latent nothing"]);
    }
    maskBlend = { init, nmask, mask: keep, beforeModel: sampler.timesteps !== undefined };
  }

  const imageCond = takesInpaintingConditioning(pipe)
    ? await inpaintingImageConditioning(pipe, picture, imageMask, h, w, s.round, s.maskWeight, ctx.signal)
    : undefined;

  const blend = maskBlend;
  return {
    initLatent: init,
    maskBlend,
    imageCond,
    infotext,
    finishLatent: (samples) => (blend === undefined ? samples : blendLatent(samples, blend)),
    finishImage(rgb) {
      if (overlay === undefined) return rgb;
      if (rgb.width !== W || rgb.height !== H) {
        throw new FarmError(grpc.status.INTERNAL, `decoded ${rgb.width}x${rgb.height}, expected ${W}x${H}`);
      }
      return applyOverlay(rgb, pasteTo, overlay);
    },
  };
}

/** A Python float as A1111's infotext prints it: 1.0 stays "1.0". */
export function pyFloat(v: number): string {
  return Number.isInteger(v) ? v.toFixed(1) : String(v);
}
