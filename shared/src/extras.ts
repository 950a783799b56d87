// A1111's Extras tab as a farm job (GenerationParams.extras): its defaults and its checks, shared by the
// coordinator, which refuses a bad job at Submit, and the agent, which runs it.
import { FarmError } from "./errors.js";
import { isPlainName } from "./names.js";
import type { ExtrasParams, GenerationParams } from "./gen/latentfarm/v1/generation_pb.js";

/**
 * The model an Extras task is placed by: none. Every agent can take one (it loads no Stable Diffusion
 * model, only the upscalers and face models it names).
 */
export const EXTRAS_MODEL = "";

/** The largest image an Extras job may make, in pixels (8192 × 8192). */
export const MAX_EXTRAS_OUTPUT_PIXELS = 8192 * 8192;

/** ExtrasParams with A1111's API defaults (ExtrasBaseRequest). */
export interface ExtrasSettings {
  /** 0: scale by `upscalingResize`; 1: scale to `upscalingResizeW` × `upscalingResizeH`. */
  resizeMode: 0 | 1;
  upscalingResize: number;
  upscalingResizeW: number;
  upscalingResizeH: number;
  upscalingCrop: boolean;
  upscaler1: string;
  upscaler2: string;
  upscaler2Visibility: number;
  gfpganVisibility: number;
  codeformerVisibility: number;
  codeformerWeight: number;
}

const FIELD = "extras";

function unit(name: string, v: number): number {
  if (!Number.isFinite(v) || v < 0 || v > 1) throw FarmError.invalid(`${FIELD}.${name}`, `must be in [0, 1], got ${v}`);
  return v;
}

function upscalerName(name: string, v: string): string {
  const s = v === "" ? "None" : v;
  if (!isPlainName(s)) throw FarmError.invalid(`${FIELD}.${name}`, `"${s.slice(0, 200)}" is not an upscaler name`);
  return s;
}

/** Checks an Extras job (INVALID_ARGUMENT naming the field) and fills A1111's defaults. */
export function checkExtras(p: Pick<GenerationParams, "initImages"> & { extras?: ExtrasParams | undefined }): ExtrasSettings {
  const x = p.extras;
  if (x === undefined) throw FarmError.invalid(FIELD, "missing");
  if (p.initImages.length === 0) throw FarmError.invalid("init_images", "an Extras job upscales its init_images: give at least one");
  if (x.resizeMode !== 0 && x.resizeMode !== 1)
    throw FarmError.invalid(`${FIELD}.resize_mode`, `must be 0 (scale by) or 1 (scale to), got ${x.resizeMode}`);
  const by = x.upscalingResize ?? 2;
  if (!Number.isFinite(by) || by <= 0 || by > 8) throw FarmError.invalid(`${FIELD}.upscaling_resize`, `must be in (0, 8], got ${by}`);
  const w = x.upscalingResizeW ?? 512;
  const h = x.upscalingResizeH ?? 512;
  for (const [name, v] of [
    ["upscaling_resize_w", w],
    ["upscaling_resize_h", h],
  ] as const) {
    if (!Number.isInteger(v) || v < 1 || v > 8192) throw FarmError.invalid(`${FIELD}.${name}`, `must be an integer in [1, 8192], got ${v}`);
  }
  return {
    resizeMode: x.resizeMode,
    upscalingResize: by,
    upscalingResizeW: w,
    upscalingResizeH: h,
    upscalingCrop: x.upscalingCrop ?? true,
    upscaler1: upscalerName("upscaler_1", x.upscaler1),
    upscaler2: upscalerName("upscaler_2", x.upscaler2),
    upscaler2Visibility: unit("extras_upscaler_2_visibility", x.extrasUpscaler2Visibility),
    gfpganVisibility: unit("gfpgan_visibility", x.gfpganVisibility),
    codeformerVisibility: unit("codeformer_visibility", x.codeformerVisibility),
    codeformerWeight: unit("codeformer_weight", x.codeformerWeight),
  };
}
