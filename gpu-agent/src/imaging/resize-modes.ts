/**
 * Geometry of A1111's `images.resize_image` (img2img resize modes) and of `Upscaler.upscale`, as plans
 * the pipeline executes with sharp. The resampling itself (PIL LANCZOS there, sharp's lanczos3 here) is
 * not reproduced bit for bit; everything around it — sizes, offsets, crops, the edge fill of
 * "resize and fill" — is.
 */

export type ResizeModeName = "just resize" | "crop and resize" | "resize and fill" | "just resize (latent upscale)";

/** API `resize_mode` integers, in A1111's order. */
export const RESIZE_MODES: readonly ResizeModeName[] = [
  "just resize",
  "crop and resize",
  "resize and fill",
  "just resize (latent upscale)",
];

export function resizeModeName(mode: number | ResizeModeName): ResizeModeName {
  if (typeof mode === "string") {
    if (!RESIZE_MODES.includes(mode)) throw new RangeError(`unknown resize mode "${mode}"`);
    return mode;
  }
  const name = RESIZE_MODES[mode];
  if (name === undefined || !Number.isInteger(mode)) throw new RangeError(`resize_mode must be 0..3, got ${mode}`);
  return name;
}

export interface Size {
  width: number;
  height: number;
}

export interface Rect {
  left: number;
  top: number;
  width: number;
  height: number;
}

/**
 * How one band of "resize and fill" is made: PIL resizes a zero-height (or zero-width) box at the
 * image edge with its default BICUBIC filter, so each band line is 1.125·edge − 0.125·next-in.
 */
export interface FillBand {
  /** Region of the canvas the band covers (already clipped to the canvas). */
  rect: Rect;
  /** "top"/"bottom" bands repeat a row, "left"/"right" bands repeat a column. */
  edge: "top" | "bottom" | "left" | "right";
}

export interface Img2imgResizePlan {
  mode: ResizeModeName;
  /** Final canvas (the generation size). */
  canvas: Size;
  /**
   * Resize the source to this size first (Lanczos, or the img2img upscaler when it grows), then place it
   * on the canvas. Undefined for the latent mode, which encodes the source as it is.
   */
  resize: Size | undefined;
  /** Canvas position of the resized image's top-left pixel (negative = it overhangs and is cropped). */
  offset: { left: number; top: number };
  /** Part of the resized image that lands on the canvas (sharp `extract` for crop and resize). */
  visible: Rect | undefined;
  /** Edge-fill bands for "resize and fill" (empty otherwise). */
  fill: FillBand[];
  /** Latent mode: bilinear-interpolate the encoded latent to this [height, width] (latent cells). */
  latentResize: { height: number; width: number } | undefined;
}

export function planImg2imgResize(mode: number | ResizeModeName, source: Size, target: Size): Img2imgResizePlan {
  const name = resizeModeName(mode);
  for (const [label, s] of [
    ["source", source],
    ["target", target],
  ] as const) {
    if (!Number.isInteger(s.width) || !Number.isInteger(s.height) || s.width < 1 || s.height < 1) {
      throw new RangeError(`${label} size must be positive integers, got ${s.width}x${s.height}`);
    }
  }
  const { width, height } = target;
  const canvas = { width, height };
  const none = { canvas, fill: [], latentResize: undefined };
  if (name === "just resize") {
    return { mode: name, ...none, resize: { width, height }, offset: { left: 0, top: 0 }, visible: { left: 0, top: 0, width, height } };
  }
  if (name === "just resize (latent upscale)") {
    return {
      mode: name,
      canvas,
      resize: undefined,
      offset: { left: 0, top: 0 },
      visible: undefined,
      fill: [],
      latentResize: { height: Math.floor(height / 8), width: Math.floor(width / 8) },
    };
  }
  const ratio = width / height;
  const srcRatio = source.width / source.height;
  let srcW: number;
  let srcH: number;
  if (name === "crop and resize") {
    srcW = ratio > srcRatio ? width : Math.floor((source.width * height) / source.height);
    srcH = ratio <= srcRatio ? height : Math.floor((source.height * width) / source.width);
  } else {
    srcW = ratio < srcRatio ? width : Math.floor((source.width * height) / source.height);
    srcH = ratio >= srcRatio ? height : Math.floor((source.height * width) / source.width);
  }
  // PIL pastes at (W//2 − src_w//2, H//2 − src_h//2) on a black canvas.
  const left = Math.floor(width / 2) - Math.floor(srcW / 2);
  const top = Math.floor(height / 2) - Math.floor(srcH / 2);
  const visible = clipRect({ left: -left, top: -top, width, height }, { width: srcW, height: srcH });
  const fill: FillBand[] = [];
  if (name === "resize and fill") {
    if (ratio < srcRatio) {
      const band = Math.floor(height / 2) - Math.floor(srcH / 2);
      if (band > 0) {
        fill.push({ edge: "top", rect: clipRect({ left: 0, top: 0, width, height: band }, canvas) });
        fill.push({ edge: "bottom", rect: clipRect({ left: 0, top: band + srcH, width, height: band }, canvas) });
      }
    } else if (ratio > srcRatio) {
      const band = Math.floor(width / 2) - Math.floor(srcW / 2);
      if (band > 0) {
        fill.push({ edge: "left", rect: clipRect({ left: 0, top: 0, width: band, height }, canvas) });
        fill.push({ edge: "right", rect: clipRect({ left: band + srcW, top: 0, width: band, height }, canvas) });
      }
    }
  }
  return { mode: name, canvas, resize: { width: srcW, height: srcH }, offset: { left, top }, visible, fill, latentResize: undefined };
}

function clipRect(r: Rect, bounds: Size): Rect {
  const left = Math.max(r.left, 0);
  const top = Math.max(r.top, 0);
  const right = Math.min(r.left + r.width, bounds.width);
  const bottom = Math.min(r.top + r.height, bounds.height);
  return { left, top, width: Math.max(right - left, 0), height: Math.max(bottom - top, 0) };
}

/** A packed 8-bit image (RGB unless stated), row-major, `channels` values per pixel. */
export interface Image8 {
  width: number;
  height: number;
  channels: number;
  data: Uint8Array;
}

/**
 * Puts an already-resized image on the plan's canvas exactly as PIL does: black canvas, paste at the
 * offset (clipped), then the edge-fill bands. Use after sharp produced `plan.resize`.
 */
export function composeOnCanvas(resized: Image8, plan: Img2imgResizePlan): Image8 {
  if (plan.resize === undefined) throw new RangeError(`${plan.mode} has no pixel-space canvas`);
  if (resized.width !== plan.resize.width || resized.height !== plan.resize.height) {
    throw new RangeError(`expected a ${plan.resize.width}x${plan.resize.height} image, got ${resized.width}x${resized.height}`);
  }
  const { channels: ch } = resized;
  const { width, height } = plan.canvas;
  const out = new Uint8Array(width * height * ch);
  const vis = plan.visible;
  if (vis !== undefined) {
    for (let y = 0; y < vis.height; y++) {
      const srcStart = ((vis.top + y) * resized.width + vis.left) * ch;
      const dstStart = ((vis.top + y + plan.offset.top) * width + vis.left + plan.offset.left) * ch;
      out.set(resized.data.subarray(srcStart, srcStart + vis.width * ch), dstStart);
    }
  }
  for (const band of plan.fill) {
    const line = edgeFillLine(resized, band.edge);
    const { rect } = band;
    for (let y = rect.top; y < rect.top + rect.height; y++) {
      for (let x = rect.left; x < rect.left + rect.width; x++) {
        // A horizontal band repeats one filtered row (indexed by x); a vertical band one column (by y).
        const i = band.edge === "top" || band.edge === "bottom" ? x : y;
        for (let c = 0; c < ch; c++) out[(y * width + x) * ch + c] = line[i * ch + c]!;
      }
    }
  }
  return { width, height, channels: ch, data: out };
}

/**
 * PIL 8-bit BICUBIC (a = −0.5) of a zero-size box at an edge: taps at distance 0.5 and 1.5 with weights
 * 0.5625 and −0.0625, normalised to 1.125 and −0.125, fixed-point rounding half up, clamped.
 */
function edgeFillLine(img: Image8, edge: FillBand["edge"]): Uint8Array {
  const { width, height, channels: ch, data } = img;
  const horizontal = edge === "top" || edge === "bottom";
  const length = horizontal ? width : height;
  const extent = horizontal ? height : width;
  const near = edge === "top" || edge === "left" ? 0 : extent - 1;
  const next = extent < 2 ? near : edge === "top" || edge === "left" ? 1 : extent - 2;
  const line = new Uint8Array(length * ch);
  for (let i = 0; i < length; i++) {
    const a = horizontal ? (near * width + i) * ch : (i * width + near) * ch;
    const b = horizontal ? (next * width + i) * ch : (i * width + next) * ch;
    for (let c = 0; c < ch; c++) {
      const v = extent < 2 ? data[a + c]! : Math.floor((9 * data[a + c]! - data[b + c]! + 4) / 8);
      line[i * ch + c] = Math.min(Math.max(v, 0), 255);
    }
  }
  return line;
}

/** One step of a sharp pipeline that reproduces a plan (sharp's own option names). */
export type SharpOperation =
  | { op: "resize"; width: number; height: number; fit: "fill"; kernel: "lanczos3" | "nearest" }
  | { op: "extract"; left: number; top: number; width: number; height: number }
  | { op: "extend"; top: number; bottom: number; left: number; right: number; background: { r: 0; g: 0; b: 0 } };

/**
 * The plan as plain sharp calls. Exact for "just resize" and "crop and resize"; for "resize and fill"
 * this only places the image on black — run composeOnCanvas on the resized pixels to get the fill bands.
 */
export function sharpOperations(plan: Img2imgResizePlan): SharpOperation[] {
  if (plan.resize === undefined) return [];
  const ops: SharpOperation[] = [{ op: "resize", width: plan.resize.width, height: plan.resize.height, fit: "fill", kernel: "lanczos3" }];
  const vis = plan.visible;
  if (vis === undefined) return ops;
  if (vis.left !== 0 || vis.top !== 0 || vis.width !== plan.resize.width || vis.height !== plan.resize.height) {
    ops.push({ op: "extract", left: vis.left, top: vis.top, width: vis.width, height: vis.height });
  }
  const top = vis.top + plan.offset.top;
  const left = vis.left + plan.offset.left;
  const bottom = plan.canvas.height - top - vis.height;
  const right = plan.canvas.width - left - vis.width;
  if (top || left || bottom || right) ops.push({ op: "extend", top, bottom, left, right, background: { r: 0, g: 0, b: 0 } });
  return ops;
}

export type UpscaleStep = { op: "model"; from: Size; to: Size } | { op: "resize"; kernel: "lanczos3" | "nearest"; from: Size; to: Size };

/** The size A1111's `Upscaler.upscale(img, scale)` ends at: (w·scale)//8·8 by (h·scale)//8·8. */
export function upscaleTarget(source: Size, scale: number): Size {
  return {
    width: Math.trunc(Math.floor((source.width * scale) / 8) * 8),
    height: Math.trunc(Math.floor((source.height * scale) / 8) * 8),
  };
}

/**
 * A1111's `Upscaler.upscale(img, scale)`: up to 3 passes of the upscaler until the image covers
 * dest = (w·scale)//8·8 (or stops growing), then a Lanczos resize to dest. `modelScale` is the factor one
 * pass multiplies by (4 for R-ESRGAN 4x+); "Lanczos" and "Nearest" upscale by `scale` itself in one pass.
 * (At a scale of exactly 1 A1111 would pass a model over the image three times; one pass is made here.)
 */
export function planUpscaleBy(
  source: Size,
  scale: number,
  upscaler: { name: string; modelScale?: number },
): { steps: UpscaleStep[]; size: Size } {
  const steps: UpscaleStep[] = [];
  const { name } = upscaler;
  const dest = upscaleTarget(source, scale);
  let cur: Size = source;
  for (let i = 0; i < 3; i++) {
    if (cur.width >= dest.width && cur.height >= dest.height && (i > 0 || scale !== 1)) break;
    let next: Size;
    if (name === "Lanczos" || name === "Nearest") {
      next = { width: Math.trunc(cur.width * scale), height: Math.trunc(cur.height * scale) };
      steps.push({ op: "resize", kernel: name === "Lanczos" ? "lanczos3" : "nearest", from: cur, to: next });
    } else {
      const s = upscaler.modelScale;
      if (s === undefined || !Number.isInteger(s) || s < 1) throw new RangeError(`upscaler "${name}" needs its integer model scale`);
      next = { width: cur.width * s, height: cur.height * s };
      steps.push({ op: "model", from: cur, to: next });
    }
    if (next.width === cur.width && next.height === cur.height) break;
    cur = next;
  }
  if (cur.width !== dest.width || cur.height !== dest.height) steps.push({ op: "resize", kernel: "lanczos3", from: cur, to: dest });
  return { steps, size: dest };
}

/**
 * `images.resize_image(0, …, upscaler_name)` for one image: plain Lanczos when no upscaler or no growth,
 * otherwise `Upscaler.upscale(img, scale)` (planUpscaleBy) with scale = the larger of the two ratios, and a
 * final Lanczos resize to the exact target.
 */
export function planPixelUpscale(
  source: Size,
  target: Size,
  upscaler: { name: string | null | undefined; modelScale?: number },
): UpscaleStep[] {
  const name = upscaler.name;
  if (name == null || name === "None") {
    return source.width !== target.width || source.height !== target.height
      ? [{ op: "resize", kernel: "lanczos3", from: source, to: target }]
      : [];
  }
  const scale = Math.max(target.width / source.width, target.height / source.height);
  let cur: Size = source;
  const steps: UpscaleStep[] = [];
  if (scale > 1) {
    const by = planUpscaleBy(source, scale, { name, ...(upscaler.modelScale !== undefined && { modelScale: upscaler.modelScale }) });
    steps.push(...by.steps);
    cur = by.size;
  }
  if (cur.width !== target.width || cur.height !== target.height) {
    steps.push({ op: "resize", kernel: "lanczos3", from: cur, to: target });
  }
  return steps;
}
