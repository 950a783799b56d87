/**
 * A1111's Extras tab (modules/postprocessing.py with the Upscale, GFPGAN and CodeFormer postprocessing
 * scripts, in that order) for one image of an Extras job: no Stable Diffusion model runs, only the
 * upscalers and face models the job names, on an Extras host's auxiliary sessions.
 */
import { create } from "@bufbuild/protobuf";
import sharp from "sharp";
import {
  FarmError,
  ImageSchema,
  MAX_EXTRAS_OUTPUT_PIXELS,
  checkExtras,
  type ExtrasSettings,
  type Image,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { upscaleTarget, type Image8 } from "../imaging/index.js";
import { checkAborted } from "./denoise.js";
import { faceModelPaths, restoreFaces } from "./face-restore.js";
import { decodeInputImage } from "./img2img.js";
import { formatInfotext } from "./infotext.js";
import { pyFloat } from "./inpaint.js";
import { readTextChunks, withTextChunks } from "./png.js";
import { resourcesOf, type RenderContext } from "./render-common.js";
import { resolveUpscaler, upscaleBy, type AuxiliaryRunner } from "./upscalers.js";

/** PIL's Image.blend(a, b, alpha) on 8-bit RGB: a + alpha·(b − a) in float32, clipped and truncated. */
export function blendImages(a: Image8, b: Image8, alpha: number): Image8 {
  if (a.width !== b.width || a.height !== b.height) throw new RangeError(`cannot blend ${a.width}x${a.height} with ${b.width}x${b.height}`);
  const f = Math.fround(alpha);
  const data = new Uint8Array(a.data.length);
  for (let i = 0; i < data.length; i++) {
    const x = a.data[i]!;
    const t = Math.fround(x + Math.fround(f * (b.data[i]! - x)));
    data[i] = t <= 0 ? 0 : t >= 255 ? 255 : Math.trunc(t);
  }
  return { width: a.width, height: a.height, channels: 3, data };
}

/** PIL's paste of `img` onto a black w×h canvas at (left, top), clipped to the canvas. */
function pasteOnBlack(img: Image8, w: number, h: number, left: number, top: number): Image8 {
  const data = new Uint8Array(w * h * 3);
  for (let y = Math.max(0, top); y < Math.min(h, top + img.height); y++) {
    const x0 = Math.max(0, left);
    const x1 = Math.min(w, left + img.width);
    if (x1 <= x0) continue;
    const from = ((y - top) * img.width + (x0 - left)) * 3;
    data.set(img.data.subarray(from, from + (x1 - x0) * 3), (y * w + x0) * 3);
  }
  return { width: w, height: h, channels: 3, data };
}

/** Python's str(round(v, 3)) of a float, as A1111's postprocessing text prints it. */
const round3 = (v: number): string => pyFloat(Math.round(v * 1000) / 1000);

/**
 * One image of an Extras job: the Upscale script (upscaler 1, blended with upscaler 2 by its visibility;
 * scale by, or to a size with an optional centred crop), then GFPGAN, then CodeFormer, each blended with
 * the image before it by its visibility and skipped at 0. The PNG keeps the input's "parameters" and gets
 * A1111's "postprocessing" and "extras" text, which is also the Image's infotext.
 */
/** A FarmError that names a field, re-addressed to `field`; anything else as it is. */
function withField(err: unknown, field: string): unknown {
  if (!(err instanceof FarmError) || err.field === undefined) return err;
  return new FarmError(err.code, err.detail, { field, cause: err, retryable: err.retryable, handBack: err.handBack });
}

export async function runExtras(aux: AuxiliaryRunner, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const p = req.params!;
  const x = checkExtras(p);
  const source = p.initImages[req.imageIndex];
  if (source === undefined)
    throw FarmError.invalid("init_images", `an Extras job of ${p.initImages.length} images has no image ${req.imageIndex}`);
  const field = `init_images[${req.imageIndex}]`;
  let image = await decodeInputImage(source, ctx, field);
  const info = new Map<string, string>();
  image = await upscaleStep(aux, image, x, info, ctx);
  for (const [restorer, visibility] of [
    ["GFPGAN", x.gfpganVisibility],
    ["CodeFormer", x.codeformerVisibility],
  ] as const) {
    if (visibility === 0) continue;
    checkAborted(ctx.signal);
    let restored: Image8;
    try {
      const paths = faceModelPaths(resourcesOf(ctx).faceModelsDir, restorer);
      restored = (await restoreFaces(aux, paths, image, x.codeformerWeight, ctx.signal)).image;
    } catch (err) {
      // The face code names txt2img's fields (restore_faces, face_restoration_model); here it is the visibility's.
      throw withField(err, restorer === "GFPGAN" ? "extras.gfpgan_visibility" : "extras.codeformer_visibility");
    }
    image = visibility < 1 ? blendImages(image, restored, visibility) : restored;
    info.set(`${restorer} visibility`, round3(visibility));
    if (restorer === "CodeFormer") info.set("CodeFormer weight", round3(x.codeformerWeight));
  }
  const text = formatInfotext("", "", [...info.entries()]).trimStart();
  // The input's text stays with the image, in A1111's order: read_info_from_image takes "parameters" out
  // and puts it back last, then "postprocessing" and "extras" are set (an earlier run's keep their places).
  const given = Buffer.from(source);
  const inputTexts = given.subarray(1, 4).toString("latin1") === "PNG" ? readTextChunks(given) : {};
  const texts = new Map(Object.entries(inputTexts).filter(([k]) => k !== "parameters"));
  if (inputTexts["parameters"] !== undefined) texts.set("parameters", inputTexts["parameters"]);
  texts.set("postprocessing", text);
  texts.set("extras", text);
  const png = await sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } })
    .png({ compressionLevel: 6 })
    .toBuffer();
  return create(ImageSchema, {
    index: req.imageIndex,
    seed: req.seed,
    png: withTextChunks(png, Object.fromEntries(texts)),
    infotext: text,
    width: image.width,
    height: image.height,
  });
}

/** The Upscale script: nothing when upscaler 1 is None. */
async function upscaleStep(
  aux: AuxiliaryRunner,
  image: Image8,
  x: ExtrasSettings,
  info: Map<string, string>,
  ctx: RenderContext,
): Promise<Image8> {
  if (x.upscaler1 === "None") return image;
  const by = x.resizeMode === 1 ? Math.max(x.upscalingResizeW / image.width, x.upscalingResizeH / image.height) : x.upscalingResize;
  const dest = upscaleTarget(image, by);
  if (dest.width < 1 || dest.height < 1 || dest.width * dest.height > MAX_EXTRAS_OUTPUT_PIXELS) {
    throw FarmError.invalid(
      x.resizeMode === 1 ? "extras.upscaling_resize_w" : "extras.upscaling_resize",
      `would make a ${dest.width}x${dest.height} image from ${image.width}x${image.height}; at most ${MAX_EXTRAS_OUTPUT_PIXELS} pixels and 8 a side`,
    );
  }
  const one = async (name: string, fieldName: string): Promise<Image8> => {
    const upscaler = await resolveUpscaler(aux, name, resourcesOf(ctx), fieldName, ctx.signal);
    if (x.resizeMode === 1) info.set("Postprocess upscale to", `${x.upscalingResizeW}x${x.upscalingResizeH}`);
    else info.set("Postprocess upscale by", pyFloat(by));
    let out = await upscaleBy(image, by, upscaler, ctx.signal);
    if (x.resizeMode === 1 && x.upscalingCrop) {
      const [w, h] = [x.upscalingResizeW, x.upscalingResizeH];
      out = pasteOnBlack(out, w, h, Math.floor(w / 2) - Math.floor(out.width / 2), Math.floor(h / 2) - Math.floor(out.height / 2));
      info.set("Postprocess crop to", `${w}x${h}`);
    }
    return out;
  };
  let out = await one(x.upscaler1, "extras.upscaler_1");
  info.set("Postprocess upscaler", x.upscaler1);
  if (x.upscaler2 !== "None" && x.upscaler2Visibility > 0) {
    out = blendImages(out, await one(x.upscaler2, "extras.upscaler_2"), x.upscaler2Visibility);
    info.set("Postprocess upscaler 2", x.upscaler2);
  }
  return out;
}
