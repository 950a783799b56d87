/**
 * The Pillow 9.5 8-bit operations A1111's inpainting runs its masks and overlays through, reproduced
 * bit for bit: `convert("L")`, `resize` (BICUBIC and LANCZOS, two-pass fixed point), `GaussianBlur`
 * (three extended box blurs), `paste` with an "L" matte, premultiplied-alpha conversions and
 * `alpha_composite`.
 *
 * sharp cannot stand in for these. Its `blur(sigma)` is a true Gaussian cut where the kernel falls
 * below 0.2 of its peak (about ±1.8σ) with a clamped edge, while PIL's GaussianBlur(r) is three box
 * passes whose support is about ±3σ. Its reductions box-shrink by an integer factor before the cubic
 * kernel, so an 8× bicubic mask reduction lands on different bytes than PIL's, and A1111 rounds the
 * latent mask right after that reduction — a one-byte change there flips a latent cell.
 */
import type { Image8 } from "./resize-modes.js";

const f32 = Math.fround;

/** PIL's ITU-R 601-2 luma in 16-bit fixed point (Convert.c `L24`), rounding half up. */
export function luma601(r: number, g: number, b: number): number {
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
}

/** `Image.convert("L")` of packed RGB. */
export function rgbToL(img: Image8): Image8 {
  if (img.channels !== 3) throw new RangeError(`rgbToL needs RGB, got ${img.channels} channels`);
  const px = img.width * img.height;
  const out = new Uint8Array(px);
  const d = img.data;
  for (let i = 0; i < px; i++) out[i] = luma601(d[i * 3]!, d[i * 3 + 1]!, d[i * 3 + 2]!);
  return { width: img.width, height: img.height, channels: 1, data: out };
}

// ---------------------------------------------------------------------------------------------
// Resampling (libImaging/Resample.c)
// ---------------------------------------------------------------------------------------------

export type PilFilter = "bicubic" | "lanczos";

const PRECISION_BITS = 32 - 8 - 2;

function bicubicFilter(x: number): number {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function sincFilter(x: number): number {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function lanczosFilter(x: number): number {
  if (-3 <= x && x < 3) return sincFilter(x) * sincFilter(x / 3);
  return 0;
}

const FILTERS: Record<PilFilter, { fn: (x: number) => number; support: number }> = {
  bicubic: { fn: bicubicFilter, support: 2 },
  lanczos: { fn: lanczosFilter, support: 3 },
};

interface Coefficients {
  ksize: number;
  /** [xmin, count] per output pixel. */
  bounds: Int32Array;
  /** Fixed-point weights, ksize per output pixel. */
  kk: Int32Array;
}

/** precompute_coeffs + normalize_coeffs_8bpc for the whole input range. */
function coefficients(inSize: number, outSize: number, filter: PilFilter): Coefficients {
  const { fn, support: baseSupport } = FILTERS[filter];
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = baseSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < ksize; x++) {
      const v = x < xmax ? (ww !== 0 ? k[x]! / ww : k[x]!) : 0;
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss: number): number {
  const v = ss >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/**
 * `Image.resize((width, height), filter)` for 8-bit images of any channel count (each channel is
 * resampled alone, as PIL does for L and RGB). The same size returns a copy, as PIL does.
 */
export function pilResize(img: Image8, width: number, height: number, filter: PilFilter): Image8 {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new RangeError(`resize target must be positive integers, got ${width}x${height}`);
  }
  const ch = img.channels;
  if (img.width === width && img.height === height) return { ...img, data: img.data.slice() };
  let cur = img;
  if (width !== img.width) {
    const { ksize, bounds, kk } = coefficients(img.width, width, filter);
    const out = new Uint8Array(width * img.height * ch);
    const src = img.data;
    for (let y = 0; y < img.height; y++) {
      const row = y * img.width * ch;
      for (let xx = 0; xx < width; xx++) {
        const xmin = bounds[xx * 2]!;
        const xmax = bounds[xx * 2 + 1]!;
        const kOff = xx * ksize;
        for (let c = 0; c < ch; c++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) ss += src[row + (x + xmin) * ch + c]! * kk[kOff + x]!;
          out[(y * width + xx) * ch + c] = clip8(ss);
        }
      }
    }
    cur = { width, height: img.height, channels: ch, data: out };
  }
  if (height !== cur.height) {
    const { ksize, bounds, kk } = coefficients(cur.height, height, filter);
    const out = new Uint8Array(width * height * ch);
    const src = cur.data;
    const stride = cur.width * ch;
    for (let yy = 0; yy < height; yy++) {
      const ymin = bounds[yy * 2]!;
      const ymax = bounds[yy * 2 + 1]!;
      const kOff = yy * ksize;
      for (let i = 0; i < stride; i++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let y = 0; y < ymax; y++) ss += src[(y + ymin) * stride + i]! * kk[kOff + y]!;
        out[yy * stride + i] = clip8(ss);
      }
    }
    cur = { width, height, channels: ch, data: out };
  }
  return cur;
}

// ---------------------------------------------------------------------------------------------
// GaussianBlur (libImaging/BoxBlur.c)
// ---------------------------------------------------------------------------------------------

/** The extended-box radius PIL uses for a Gaussian of `radius` in `passes` passes, in float32 as C computes it. */
export function pilBoxRadius(radius: number, passes = 3): number {
  const r = f32(radius);
  const sigma2 = f32(f32(r * r) / passes);
  const L = f32(Math.sqrt(12.0 * sigma2 + 1.0));
  const l = f32(Math.floor((L - 1.0) / 2.0));
  let a = f32(f32(f32(2 * l) + 1) * f32(f32(l * f32(l + 1)) - f32(3 * sigma2)));
  a = f32(a / f32(6 * f32(sigma2 - f32(f32(l + 1) * f32(l + 1)))));
  return f32(l + a);
}

const U32 = 4294967296;

/**
 * ImagingHorizontalBoxBlur applied to every column, in place (PIL runs it on rows and transposes for
 * columns; here rows are blurred as columns of the transposed picture). All columns advance together
 * row by row, which keeps memory access sequential. C's three loops per line (left edge, middle, right
 * edge) are one loop here with the window's indices clamped to the line, which reads the same pixels
 * in the same order. Each column is blurred from its values before the pass.
 */
function boxBlurColumns(img: Image8, floatRadius: number): void {
  const { width, height, channels: ch, data } = img;
  const src = data.slice();
  const radius = Math.trunc(floatRadius);
  const ww = Math.trunc(f32(16777216 / f32(f32(floatRadius * 2) + 1)));
  // UINT32 arithmetic as in C.
  const fw = Math.floor((((1 << 24) - (((radius * 2 + 1) * ww) % U32) + U32) % U32) / 2);
  const lastx = height - 1;
  const edgeA = Math.min(radius + 1, height);
  const lanes = width * ch;
  const acc = new Int32Array(lanes);
  for (let j = 0; j < lanes; j++) acc[j] = src[j]! * (radius + 1) + src[lastx * lanes + j]! * (radius - edgeA + 1);
  for (let y = 0; y < edgeA - 1; y++) for (let j = 0; j < lanes; j++) acc[j] = acc[j]! + src[y * lanes + j]!;
  for (let y = 0; y <= lastx; y++) {
    const l = (y - radius - 1 < 0 ? 0 : y - radius - 1) * lanes;
    const a = (y + radius > lastx ? lastx : y + radius) * lanes;
    const r = (y + radius + 1 > lastx ? lastx : y + radius + 1) * lanes;
    const o = y * lanes;
    for (let j = 0; j < lanes; j++) {
      const sum = acc[j]! + src[a + j]! - src[l + j]!;
      acc[j] = sum;
      // C's UINT32 arithmetic: imul keeps the low 32 bits, >>> 24 takes the sum modulo 2^32.
      data[o + j] = (Math.imul(sum, ww) + Math.imul(src[l + j]! + src[r + j]!, fw) + 8388608) >>> 24;
    }
  }
}

function transpose(img: Image8): Image8 {
  const { width, height, channels: ch, data } = img;
  const out = new Uint8Array(data.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const s = (y * width + x) * ch;
      const d = (x * height + y) * ch;
      for (let c = 0; c < ch; c++) out[d + c] = data[s + c]!;
    }
  }
  return { width: height, height: width, channels: ch, data: out };
}

/** `image.filter(ImageFilter.GaussianBlur(radius))`: three box passes along rows, then three along columns. */
export function pilGaussianBlur(img: Image8, radius: number): Image8 {
  const r = pilBoxRadius(radius, 3);
  const t = transpose(img);
  for (let i = 0; i < 3; i++) boxBlurColumns(t, r);
  const out = transpose(t);
  for (let i = 0; i < 3; i++) boxBlurColumns(out, r);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Alpha (Convert.c, Paste.c, AlphaComposite.c)
// ---------------------------------------------------------------------------------------------

/** PIL's DIV255: (a + 128 + ((a + 128) >> 8)) >> 8, exact x/255 rounding for 16-bit products. */
function div255(a: number): number {
  const t = a + 128;
  return ((t >> 8) + t) >> 8;
}

/** `convert("RGBA")` of RGB (alpha 255). */
export function rgbToRgba(img: Image8): Image8 {
  if (img.channels !== 3) throw new RangeError(`expected RGB, got ${img.channels} channels`);
  const px = img.width * img.height;
  const out = new Uint8Array(px * 4);
  for (let i = 0; i < px; i++) {
    out[i * 4] = img.data[i * 3]!;
    out[i * 4 + 1] = img.data[i * 3 + 1]!;
    out[i * 4 + 2] = img.data[i * 3 + 2]!;
    out[i * 4 + 3] = 255;
  }
  return { width: img.width, height: img.height, channels: 4, data: out };
}

/** `convert("RGB")` of RGBA or RGBa: the alpha band is dropped. */
export function rgbaToRgb(img: Image8): Image8 {
  if (img.channels !== 4) throw new RangeError(`expected RGBA, got ${img.channels} channels`);
  const px = img.width * img.height;
  const out = new Uint8Array(px * 3);
  for (let i = 0; i < px; i++) {
    out[i * 3] = img.data[i * 4]!;
    out[i * 3 + 1] = img.data[i * 4 + 1]!;
    out[i * 3 + 2] = img.data[i * 4 + 2]!;
  }
  return { width: img.width, height: img.height, channels: 3, data: out };
}

/** RGBA → RGBa: colours multiplied by alpha with PIL's MULDIV255 rounding. */
export function premultiply(img: Image8): Image8 {
  const out = img.data.slice();
  for (let i = 0; i < out.length; i += 4) {
    const a = out[i + 3]!;
    for (let c = 0; c < 3; c++) out[i + c] = div255(out[i + c]! * a);
  }
  return { ...img, data: out };
}

/** RGBa → RGBA: colours divided by alpha (floor, clipped) unless alpha is 0 or 255. */
export function unpremultiply(img: Image8): Image8 {
  const out = img.data.slice();
  for (let i = 0; i < out.length; i += 4) {
    const a = out[i + 3]!;
    if (a === 0 || a === 255) continue;
    for (let c = 0; c < 3; c++) out[i + c] = Math.min(Math.floor((255 * out[i + c]!) / a), 255);
  }
  return { ...img, data: out };
}

/**
 * `dst.paste(src, (0, 0), mask)` with an "L" matte on same-size images of any channel count:
 * every band becomes DIV255(dst·(255 − m) + src·m).
 */
export function pasteWithMask(dst: Image8, src: Image8, mask: Image8): Image8 {
  if (src.width !== dst.width || src.height !== dst.height || mask.width !== dst.width || mask.height !== dst.height) {
    throw new RangeError("images do not match");
  }
  if (src.channels !== dst.channels || mask.channels !== 1) throw new RangeError("paste needs same-mode images and an L mask");
  const ch = dst.channels;
  const out = dst.data.slice();
  const px = dst.width * dst.height;
  for (let i = 0; i < px; i++) {
    const m = mask.data[i]!;
    for (let c = 0; c < ch; c++) out[i * ch + c] = div255(out[i * ch + c]! * (255 - m) + src.data[i * ch + c]! * m);
  }
  return { ...dst, data: out };
}

const PRECISION = 7;

/** `dst.alpha_composite(src)` on same-size RGBA images (Pillow's 7-bit-extra integer "over"). */
export function alphaComposite(dst: Image8, src: Image8): Image8 {
  if (src.width !== dst.width || src.height !== dst.height) throw new RangeError("images do not match");
  if (src.channels !== 4 || dst.channels !== 4) throw new RangeError("alpha_composite needs RGBA images");
  const out = new Uint8Array(dst.data.length);
  const d = dst.data;
  const s = src.data;
  const shiftDiv255 = (a: number): number => Math.floor((Math.floor(a / 256) + a) / 256);
  for (let i = 0; i < out.length; i += 4) {
    const sa = s[i + 3]!;
    if (sa === 0) {
      out[i] = d[i]!;
      out[i + 1] = d[i + 1]!;
      out[i + 2] = d[i + 2]!;
      out[i + 3] = d[i + 3]!;
      continue;
    }
    const blend = d[i + 3]! * (255 - sa);
    const outa255 = sa * 255 + blend;
    const coef1 = Math.floor((sa * 255 * 255 * (1 << PRECISION)) / outa255);
    const coef2 = 255 * (1 << PRECISION) - coef1;
    for (let c = 0; c < 3; c++) {
      const tmp = s[i + c]! * coef1 + d[i + c]! * coef2;
      out[i + c] = Math.floor(shiftDiv255(tmp + (0x80 << PRECISION)) / (1 << PRECISION));
    }
    out[i + 3] = shiftDiv255(outa255 + 0x80);
  }
  return { ...dst, data: out };
}

/** `img.crop((x1, y1, x2, y2))`: pixels outside the image are zero, as PIL pads them. */
export function pilCrop(img: Image8, box: readonly [number, number, number, number]): Image8 {
  const [x1, y1, x2, y2] = box;
  const width = Math.max(x2 - x1, 0);
  const height = Math.max(y2 - y1, 0);
  const ch = img.channels;
  const out = new Uint8Array(width * height * ch);
  for (let y = 0; y < height; y++) {
    const sy = y + y1;
    if (sy < 0 || sy >= img.height) continue;
    const from = Math.max(x1, 0);
    const to = Math.min(x2, img.width);
    if (to <= from) continue;
    out.set(img.data.subarray((sy * img.width + from) * ch, (sy * img.width + to) * ch), (y * width + (from - x1)) * ch);
  }
  return { width, height, channels: ch, data: out };
}
