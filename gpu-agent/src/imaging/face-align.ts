/**
 * Face alignment for restoration (A1111 face_restoration_utils + facexlib FaceRestoreHelper with
 * upscale_factor 1, face_size 512): 5 landmarks → similarity transform onto the FFHQ 512 template,
 * warp to a 512² crop, restore, warp back with the inverse transform and blend through a soft mask.
 *
 * Warps follow OpenCV's warpAffine (INTER_LINEAR): source positions quantised to 1/32 px through its
 * 10-bit fixed-point mapping, bilinear weights in 1/32768 for 8-bit images, constant border per tap.
 * The transform is the least-squares similarity (what estimateAffinePartial2D's LMEDS refinement
 * converges to on inlier landmarks; with 5 consistent points they coincide).
 */
import type { Image8 } from "./resize-modes.js";

export type Point = readonly [number, number];

/** 2×3 row-major affine [a, b, c, d, e, f]: x' = a·x + b·y + c, y' = d·x + e·y + f (OpenCV layout). */
export type Affine = readonly [number, number, number, number, number, number];

export const FACE_SIZE = 512;

/** facexlib's 5-point template for a 512 face (eyes, nose tip, mouth corners), in pixels. */
export const FFHQ_TEMPLATE_512: readonly Point[] = Object.freeze([
  [192.98138, 239.94708],
  [318.90277, 240.1936],
  [256.63416, 314.01935],
  [201.26117, 371.41043],
  [313.08905, 371.15118],
] as const);

/** facexlib's gray border (BGR 135,133,132) in RGB order. */
export const ALIGN_BORDER_RGB: readonly [number, number, number] = [132, 133, 135];

/** Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src onto dst. */
export function estimateSimilarity(src: readonly Point[], dst: readonly Point[]): Affine {
  if (src.length !== dst.length || src.length < 2) throw new RangeError("need at least 2 matching point pairs");
  const n = src.length;
  let sx = 0,
    sy = 0,
    dx = 0,
    dy = 0;
  for (let i = 0; i < n; i++) {
    sx += src[i]![0];
    sy += src[i]![1];
    dx += dst[i]![0];
    dy += dst[i]![1];
  }
  sx /= n;
  sy /= n;
  dx /= n;
  dy /= n;
  let norm = 0,
    dot = 0,
    cross = 0;
  for (let i = 0; i < n; i++) {
    const px = src[i]![0] - sx;
    const py = src[i]![1] - sy;
    const qx = dst[i]![0] - dx;
    const qy = dst[i]![1] - dy;
    norm += px * px + py * py;
    dot += px * qx + py * qy;
    cross += px * qy - py * qx;
  }
  if (norm === 0) throw new RangeError("source points are all identical");
  const a = dot / norm;
  const b = cross / norm;
  return [a, -b, dx - (a * sx - b * sy), b, a, dy - (b * sx + a * sy)];
}

/** OpenCV invertAffineTransform. */
export function invertAffine(m: Affine): Affine {
  const [a, b, c, d, e, f] = m;
  const det = a * e - b * d;
  const D = det !== 0 ? 1 / det : 0;
  const A11 = e * D,
    A22 = a * D,
    A12 = -b * D,
    A21 = -d * D;
  return [A11, A12, -A11 * c - A12 * f, A21, A22, -A21 * c - A22 * f];
}

export function applyAffine(m: Affine, p: Point): [number, number] {
  return [m[0] * p[0] + m[1] * p[1] + m[2], m[3] * p[0] + m[4] * p[1] + m[5]];
}

/** Scale, rotation (radians) and translation of a similarity matrix. */
export function decomposeSimilarity(m: Affine): { scale: number; rotation: number; tx: number; ty: number } {
  return { scale: Math.hypot(m[0], m[3]), rotation: Math.atan2(m[3], m[0]), tx: m[2], ty: m[5] };
}

/** The matrix that takes image landmarks onto the template of a `faceSize` crop. */
export function alignmentMatrix(landmarks: readonly Point[], faceSize = FACE_SIZE): Affine {
  if (landmarks.length !== 5) throw new RangeError(`expected 5 landmarks, got ${landmarks.length}`);
  const k = faceSize / 512;
  return estimateSimilarity(
    landmarks,
    FFHQ_TEMPLATE_512.map(([x, y]) => [x * k, y * k] as const),
  );
}

export interface FloatImage {
  width: number;
  height: number;
  channels: number;
  data: Float32Array | Float64Array;
}

const AB_BITS = 10;
const AB_SCALE = 1 << AB_BITS;
const INTER_BITS = 5;
const INTER_TAB_SIZE = 1 << INTER_BITS;
const ROUND_DELTA = AB_SCALE / INTER_TAB_SIZE / 2;

/** cvRound: nearest, ties to even. */
function cvRound(v: number): number {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * cv2.warpAffine(src, M, (dstW, dstH), INTER_LINEAR, BORDER_CONSTANT, border): dst(x, y) = src(M⁻¹(x, y)).
 * 8-bit images use OpenCV's integer weights; float images the same 1/32 positions with float weights.
 */
export function warpAffine<T extends Image8 | FloatImage>(
  src: T,
  m: Affine,
  dstW: number,
  dstH: number,
  border: readonly number[] = [],
): T {
  const inv = invertAffine(m);
  const ch = src.channels;
  const isByte = src.data instanceof Uint8Array;
  const out = isByte
    ? new Uint8Array(dstW * dstH * ch)
    : new (src.data.constructor as new (n: number) => Float32Array | Float64Array)(dstW * dstH * ch);
  const bval = Array.from({ length: ch }, (_, c) => border[c] ?? 0);
  const adelta = new Int32Array(dstW);
  const bdelta = new Int32Array(dstW);
  for (let x = 0; x < dstW; x++) {
    adelta[x] = cvRound(inv[0] * x * AB_SCALE);
    bdelta[x] = cvRound(inv[3] * x * AB_SCALE);
  }
  const { width: W, height: H, data } = src;
  const taps = [0, 0, 0, 0];
  for (let y = 0; y < dstH; y++) {
    const X0 = cvRound((inv[1] * y + inv[2]) * AB_SCALE) + ROUND_DELTA;
    const Y0 = cvRound((inv[4] * y + inv[5]) * AB_SCALE) + ROUND_DELTA;
    for (let x = 0; x < dstW; x++) {
      const X = (X0 + adelta[x]!) >> (AB_BITS - INTER_BITS);
      const Y = (Y0 + bdelta[x]!) >> (AB_BITS - INTER_BITS);
      const sx = X >> INTER_BITS;
      const sy = Y >> INTER_BITS;
      const fx = X & (INTER_TAB_SIZE - 1);
      const fy = Y & (INTER_TAB_SIZE - 1);
      const o = (y * dstW + x) * ch;
      if (sx >= W || sx + 1 < 0 || sy >= H || sy + 1 < 0) {
        for (let c = 0; c < ch; c++) out[o + c] = bval[c]!;
        continue;
      }
      const in0 = sy >= 0 && sy < H;
      const in1 = sy + 1 >= 0 && sy + 1 < H;
      const inx0 = sx >= 0 && sx < W;
      const inx1 = sx + 1 >= 0 && sx + 1 < W;
      for (let c = 0; c < ch; c++) {
        taps[0] = in0 && inx0 ? data[(sy * W + sx) * ch + c]! : bval[c]!;
        taps[1] = in0 && inx1 ? data[(sy * W + sx + 1) * ch + c]! : bval[c]!;
        taps[2] = in1 && inx0 ? data[((sy + 1) * W + sx) * ch + c]! : bval[c]!;
        taps[3] = in1 && inx1 ? data[((sy + 1) * W + sx + 1) * ch + c]! : bval[c]!;
        if (isByte) {
          // Weights (32−fx)(32−fy)·32 … sum to 2¹⁵; FixedPtCast rounds with +2¹⁴ >> 15.
          const acc =
            taps[0]! * (32 - fx) * (32 - fy) * 32 +
            taps[1]! * fx * (32 - fy) * 32 +
            taps[2]! * (32 - fx) * fy * 32 +
            taps[3]! * fx * fy * 32;
          out[o + c] = Math.min(255, Math.max(0, (acc + (1 << 14)) >> 15));
        } else {
          const wx = fx / INTER_TAB_SIZE;
          const wy = fy / INTER_TAB_SIZE;
          out[o + c] = taps[0]! * (1 - wy) * (1 - wx) + taps[1]! * (1 - wy) * wx + taps[2]! * wy * (1 - wx) + taps[3]! * wy * wx;
        }
      }
    }
  }
  return { width: dstW, height: dstH, channels: ch, data: out } as T;
}

export interface AlignedFace {
  face: Image8;
  /** image → crop */
  matrix: Affine;
  /** crop → image (invertAffineTransform of matrix) */
  inverse: Affine;
}

/** align_warp_face: the 512² crop of an RGB image for the given 5 landmarks (image pixels). */
export function alignFace(image: Image8, landmarks: readonly Point[], faceSize = FACE_SIZE): AlignedFace {
  const matrix = alignmentMatrix(landmarks, faceSize);
  return { face: warpAffine(image, matrix, faceSize, faceSize, ALIGN_BORDER_RGB), matrix, inverse: invertAffine(matrix) };
}

/** CodeFormer/GFPGAN input: NCHW float32, (v/255 − 0.5)/0.5. */
export function faceToTensor(face: Image8): Float32Array {
  const { width, height } = face;
  const plane = width * height;
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) out[c * plane + i] = Math.fround(Math.fround(Math.fround(face.data[i * 3 + c]! / 255) - 0.5) / 0.5);
  }
  return out;
}

/** Network output NCHW in [−1, 1] → RGB bytes: clamp, (x+1)/2, ×255, truncate (A1111's rgb_tensor_to_bgr_image path). */
export function tensorToFace(tensor: Float32Array, width = FACE_SIZE, height = FACE_SIZE): Image8 {
  const plane = width * height;
  if (tensor.length !== 3 * plane) throw new RangeError(`expected ${3 * plane} values, got ${tensor.length}`);
  const data = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = Math.min(Math.max(tensor[c * plane + i]!, -1), 1);
      data[i * 3 + c] = Math.trunc(Math.fround(Math.fround(Math.fround(v + 1) / 2) * 255));
    }
  }
  return { width, height, channels: 3, data };
}

/** cv2.getGaussianKernel for sigma > 0. */
function gaussianKernel(size: number, sigma: number): Float64Array {
  const k = new Float64Array(size);
  const mid = (size - 1) / 2;
  let sum = 0;
  for (let i = 0; i < size; i++) sum += k[i] = Math.exp(-((i - mid) ** 2) / (2 * sigma * sigma));
  for (let i = 0; i < size; i++) k[i] = k[i]! / sum;
  return k;
}

/** BORDER_REFLECT_101 index. */
function reflect101(i: number, n: number): number {
  if (n === 1) return 0;
  const period = 2 * (n - 1);
  let j = ((i % period) + period) % period;
  if (j >= n) j = period - j;
  return j;
}

/** Separable Gaussian blur of a single-channel float image with reflect-101 borders. */
export function gaussianBlur(data: Float64Array, width: number, height: number, ksize: number, sigma: number): Float64Array {
  const k = gaussianKernel(ksize, sigma);
  const r = (ksize - 1) / 2;
  const tmp = new Float64Array(data.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      let s = 0;
      for (let j = 0; j < ksize; j++) s += k[j]! * data[y * width + reflect101(x + j - r, width)]!;
      tmp[y * width + x] = s;
    }
  }
  const out = new Float64Array(data.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      let s = 0;
      for (let j = 0; j < ksize; j++) s += k[j]! * tmp[reflect101(y + j - r, height) * width + x]!;
      out[y * width + x] = s;
    }
  }
  return out;
}

/** ParseNet classes that are not face (background, neck, cloth, hair, hat) — facexlib's MASK_COLORMAP zeros. */
const NON_FACE_CLASSES = new Set([0, 14, 16, 17, 18]);

/**
 * facexlib's parse mask: face classes → 255, two 101×101 σ = 11 Gaussian blurs, a 10 px black frame,
 * /255. `classes` is the argmax map of a 19-class face parser at the crop size.
 */
export function parseMask(classes: Uint8Array, size = FACE_SIZE): Float64Array {
  if (classes.length !== size * size) throw new RangeError(`expected a ${size}² class map`);
  const step = new Float64Array(size * size);
  for (let i = 0; i < step.length; i++) step[i] = NON_FACE_CLASSES.has(classes[i]!) ? 0 : 255;
  const m = gaussianBlur(gaussianBlur(step, size, size, 101, 11), size, size, 101, 11);
  const frame = 10;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const i = y * size + x;
      m[i] = y < frame || y >= size - frame || x < frame || x >= size - frame ? 0 : m[i]! / 255;
    }
  }
  return m;
}

const boxMaskCache = new Map<string, Float64Array>();

/**
 * Feathered box mask for when no face parser is available: ones with a `margin` px black frame, Gaussian
 * blurred with `sigma` (kernel 8σ+1, OpenCV's automatic size for float images). The defaults put the
 * frame 4σ deep so the crop border carries no weight (no square edge after paste-back). Separable, so it
 * is the outer product of one blurred 1-D profile. Cached per parameter set.
 */
export function boxFeatherMask(size = FACE_SIZE, margin = Math.round(size * 0.1), sigma = size * 0.025): Float64Array {
  const key = `${size}/${margin}/${sigma}`;
  const cached = boxMaskCache.get(key);
  if (cached) return cached;
  const ksize = cvRound(sigma * 8 + 1) | 1;
  const line = new Float64Array(size);
  for (let i = margin; i < size - margin; i++) line[i] = 1;
  const profile = gaussianBlur(line, size, 1, ksize, sigma);
  const mask = new Float64Array(size * size);
  for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) mask[y * size + x] = profile[y]! * profile[x]!;
  boxMaskCache.set(key, mask);
  return mask;
}

export interface RestoredFace {
  /** Restored crop (RGB, faceSize²). */
  face: Image8;
  /** crop → image */
  inverse: Affine;
  /** Soft mask at crop size in [0, 1] (parseMask or boxFeatherMask). */
  mask: Float64Array;
}

/**
 * paste_faces_to_input_image (upscale 1): for each face in order, warp the crop and its mask back,
 * blend `mask·face + (1 − mask)·image` in float64, and truncate to bytes at the end.
 */
export function pasteFaces(image: Image8, faces: readonly RestoredFace[]): Image8 {
  if (image.channels !== 3) throw new RangeError(`expected RGB, got ${image.channels} channels`);
  const { width: W, height: H } = image;
  const acc = Float64Array.from(image.data);
  for (const f of faces) {
    const size = f.face.width;
    if (f.face.height !== size || f.mask.length !== size * size)
      throw new RangeError("face crop and mask must be square and the same size");
    const back = warpAffine(f.face, f.inverse, W, H);
    const mask = warpAffine({ width: size, height: size, channels: 1, data: f.mask }, f.inverse, W, H);
    for (let p = 0; p < W * H; p++) {
      const m = mask.data[p]!;
      for (let c = 0; c < 3; c++) acc[p * 3 + c] = m * back.data[p * 3 + c]! + (1 - m) * acc[p * 3 + c]!;
    }
  }
  const out = new Uint8Array(acc.length);
  for (let i = 0; i < acc.length; i++) out[i] = Math.trunc(acc[i]!);
  return { width: W, height: H, channels: 3, data: out };
}
