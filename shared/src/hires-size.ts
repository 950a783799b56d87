/**
 * Hires.fix sizing as A1111 v1.10 computes it (processing.py StableDiffusionProcessingTxt2Img:
 * calculate_target_resolution, init). Pure arithmetic, shared because both sides need it: the
 * coordinator plans the second pass (and whether it is tiled) from it, the agent runs it.
 */
/** opt_f: VAE downsampling factor. */
export const LATENT_FACTOR = 8;

export interface HiresSizeInput {
  /** First-pass width/height as requested (p.width/p.height). */
  width: number;
  height: number;
  /** hr_scale, default 2.0. */
  hrScale?: number;
  /** hr_resize_x / hr_resize_y, 0 = unset. */
  hrResizeX?: number;
  hrResizeY?: number;
  /** Legacy API firstphase_width/height: when either is non-zero they become the first-pass size. */
  firstphaseWidth?: number;
  firstphaseHeight?: number;
  /** Option use_old_hires_fix_width_height: width/height are the final size, the first pass is derived. */
  useOldHiresFixWidthHeight?: boolean;
}

export interface HiresTarget {
  firstPass: { width: number; height: number };
  /** hr_upscale_to_x/y: what the upscaler (latent or pixel) produces before cropping. */
  upscaleTo: { width: number; height: number };
  /** Latent size the latent upscaler interpolates to: (upscaleTo // 8). */
  upscaledLatent: { width: number; height: number };
  /** truncate_x/y in latent cells (both resize values given: cover, then crop). */
  truncate: { x: number; y: number };
  /** Latent crop `[top : h − bottom, left : w − right]` applied after upscaling. */
  latentCrop: { top: number; bottom: number; left: number; right: number };
  /** Second-pass latent size after the crop, and the final image size (×8). */
  secondPassLatent: { width: number; height: number };
  final: { width: number; height: number };
  /** The infotext entry this sizing adds: "Hires upscale" (the scale) or "Hires resize" ("XxY"). */
  infotext: readonly ["Hires upscale", number] | readonly ["Hires resize", string];
}

export function hiresTarget(input: HiresSizeInput): HiresTarget {
  let width = input.width;
  let height = input.height;
  let hrResizeX = input.hrResizeX ?? 0;
  let hrResizeY = input.hrResizeY ?? 0;
  const hrScale = input.hrScale ?? 2;
  for (const [name, v] of [
    ["width", width],
    ["height", height],
  ] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`${name} must be a positive integer, got ${v}`);
  }
  if (!Number.isInteger(hrResizeX) || !Number.isInteger(hrResizeY) || hrResizeX < 0 || hrResizeY < 0) {
    throw new RangeError(`hr_resize_x/y must be non-negative integers, got ${hrResizeX}x${hrResizeY}`);
  }
  if ((input.firstphaseWidth ?? 0) !== 0 || (input.firstphaseHeight ?? 0) !== 0) {
    width = input.firstphaseWidth ?? 0;
    height = input.firstphaseHeight ?? 0;
  }
  if (input.useOldHiresFixWidthHeight) {
    hrResizeX = width;
    hrResizeY = height;
    const scale = Math.sqrt((512 * 512) / (width * height));
    width = Math.ceil((scale * width) / 64) * 64;
    height = Math.ceil((scale * height) / 64) * 64;
  }

  let upW: number;
  let upH: number;
  let truncX = 0;
  let truncY = 0;
  let infotext: HiresTarget["infotext"];
  if (hrResizeX === 0 && hrResizeY === 0) {
    if (!(hrScale > 0)) throw new RangeError(`hr_scale must be positive, got ${hrScale}`);
    infotext = ["Hires upscale", hrScale];
    upW = Math.trunc(width * hrScale);
    upH = Math.trunc(height * hrScale);
  } else {
    infotext = ["Hires resize", `${hrResizeX}x${hrResizeY}`];
    if (hrResizeY === 0) {
      upW = hrResizeX;
      upH = Math.floor((hrResizeX * height) / width);
    } else if (hrResizeX === 0) {
      upW = Math.floor((hrResizeY * width) / height);
      upH = hrResizeY;
    } else {
      // Cover the requested box keeping the aspect ratio, then crop the overhang in whole latent cells.
      if (width / height < hrResizeX / hrResizeY) {
        upW = hrResizeX;
        upH = Math.floor((hrResizeX * height) / width);
      } else {
        upW = Math.floor((hrResizeY * width) / height);
        upH = hrResizeY;
      }
      truncX = Math.floor((upW - hrResizeX) / LATENT_FACTOR);
      truncY = Math.floor((upH - hrResizeY) / LATENT_FACTOR);
    }
  }
  const latentW = Math.floor(upW / LATENT_FACTOR);
  const latentH = Math.floor(upH / LATENT_FACTOR);
  const latentCrop = {
    top: Math.floor(truncY / 2),
    bottom: Math.floor((truncY + 1) / 2),
    left: Math.floor(truncX / 2),
    right: Math.floor((truncX + 1) / 2),
  };
  const secondPassLatent = { width: latentW - truncX, height: latentH - truncY };
  if (secondPassLatent.width < 1 || secondPassLatent.height < 1) {
    throw new RangeError(`hires target ${upW}x${upH} is smaller than one latent cell`);
  }
  return {
    firstPass: { width, height },
    upscaleTo: { width: upW, height: upH },
    upscaledLatent: { width: latentW, height: latentH },
    truncate: { x: truncX, y: truncY },
    latentCrop,
    secondPassLatent,
    final: { width: secondPassLatent.width * LATENT_FACTOR, height: secondPassLatent.height * LATENT_FACTOR },
    infotext,
  };
}
