/**
 * Safe decoding of user-supplied images (img2img init images, masks): byte limit before anything is
 * parsed, a magic-byte allowlist so only the PNG/JPEG/WebP decoders ever see the data, the pixel limit
 * checked on the header before any pixel buffer exists, and every failure reported as one
 * INVALID_ARGUMENT error naming the request field. A decompression bomb is refused from its header.
 */
import sharp, { type Metadata, type OutputInfo, type Sharp } from "sharp";
import type { Image8 } from "./resize-modes.js";

export type ImageFormat = "png" | "jpeg" | "webp";

export type ImageInputProblem = "empty" | "too-many-bytes" | "unsupported-format" | "too-many-pixels" | "undecodable";

/** A bad input image. `code` matches the gRPC status name the API layer maps it to. */
export class ImageInputError extends Error {
  readonly code = "INVALID_ARGUMENT" as const;

  constructor(
    readonly field: string,
    readonly problem: ImageInputProblem,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${field}: ${message}`, options);
    this.name = "ImageInputError";
  }
}

export interface ImageLimits {
  /** Largest encoded input accepted, in bytes. */
  maxBytes: number;
  /** Largest width × height accepted (per frame). */
  maxPixels: number;
  /** Accepted containers; default PNG, JPEG and WebP. */
  formats?: readonly ImageFormat[];
}

export const DEFAULT_IMAGE_LIMITS: Readonly<ImageLimits> = Object.freeze({
  maxBytes: 32 * 1024 * 1024,
  maxPixels: 4096 * 4096,
});

const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** Container from the leading bytes, or undefined. */
export function sniffImageFormat(buf: Uint8Array): ImageFormat | undefined {
  if (buf.length >= 8 && PNG_MAGIC.every((b, i) => buf[i] === b)) return "png";
  if (buf.length >= 3 && buf[0] === 0xff && buf[1] === 0xd8 && buf[2] === 0xff) return "jpeg";
  if (buf.length >= 12 && ascii(buf, 0, 4) === "RIFF" && ascii(buf, 8, 4) === "WEBP") return "webp";
  return undefined;
}

function ascii(buf: Uint8Array, start: number, length: number): string {
  return String.fromCharCode(...buf.subarray(start, start + length));
}

export interface ImageInfo {
  format: ImageFormat;
  width: number;
  height: number;
  /** Channels as stored (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; palette images report their expansion). */
  channels: number;
  hasAlpha: boolean;
  isPalette: boolean;
  /** EXIF orientation tag (1–8) when present. */
  orientation: number | undefined;
}

function checkBytes(buf: Uint8Array, limits: ImageLimits, field: string): ImageFormat {
  if (buf.length === 0) throw new ImageInputError(field, "empty", "image is empty");
  if (buf.length > limits.maxBytes) {
    throw new ImageInputError(field, "too-many-bytes", `image is ${buf.length} bytes, the limit is ${limits.maxBytes}`);
  }
  const format = sniffImageFormat(buf);
  const allowed = limits.formats ?? ["png", "jpeg", "webp"];
  if (format === undefined || !allowed.includes(format)) {
    throw new ImageInputError(field, "unsupported-format", `not a ${allowed.map((f) => f.toUpperCase()).join(", ")} image`);
  }
  return format;
}

function open(buf: Uint8Array, limits: ImageLimits): Sharp {
  // failOn "error": truncated or corrupt pixel data is an error, not a silently grey image.
  return sharp(buf, { limitInputPixels: limits.maxPixels, failOn: "error", pages: 1, sequentialRead: true });
}

function toInputError(err: unknown, field: string): ImageInputError {
  if (err instanceof ImageInputError) return err;
  const message = err instanceof Error ? err.message : String(err);
  if (/pixel limit/i.test(message)) return new ImageInputError(field, "too-many-pixels", message, { cause: err });
  return new ImageInputError(field, "undecodable", `cannot decode image: ${message}`, { cause: err });
}

/** Header-only check: sizes, format and limits, without decoding pixels. */
export async function inspectImage(buf: Uint8Array, limits: ImageLimits = DEFAULT_IMAGE_LIMITS, field = "image"): Promise<ImageInfo> {
  const format = checkBytes(buf, limits, field);
  let meta: Metadata;
  try {
    meta = await open(buf, limits).metadata();
  } catch (err) {
    throw toInputError(err, field);
  }
  if (meta.format !== format) {
    throw new ImageInputError(field, "undecodable", `content is ${meta.format}, header says ${format}`);
  }
  const { width, height } = meta;
  if (!(width > 0 && height > 0)) throw new ImageInputError(field, "undecodable", "image has no size");
  if (width * height > limits.maxPixels) {
    throw new ImageInputError(
      field,
      "too-many-pixels",
      `image is ${width}x${height} = ${width * height} pixels, the limit is ${limits.maxPixels}`,
    );
  }
  return {
    format,
    width,
    height,
    channels: meta.channels,
    hasAlpha: meta.hasAlpha,
    isPalette: meta.isPalette,
    orientation: meta.orientation,
  };
}

export interface DecodeOptions {
  /** A1111 `img2img_background_color` (default white) under transparent RGBA pixels. */
  background?: readonly [number, number, number];
  /** Apply the EXIF orientation (A1111's UI path does, its API path does not). Default false. */
  autoOrient?: boolean;
}

export interface DecodedImage extends Image8 {
  info: ImageInfo;
}

/**
 * Decodes to packed 8-bit RGB the way A1111's `images.flatten` + `convert('RGB')` sees it: truecolour
 * RGBA is composited onto the background with PIL's paste rounding; gray+alpha and palette
 * transparency are dropped (PIL converts those modes to RGB without compositing).
 */
export async function decodeImage(
  buf: Uint8Array,
  limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
  field = "image",
  options: DecodeOptions = {},
): Promise<DecodedImage> {
  const info = await inspectImage(buf, limits, field);
  let raw: { data: Buffer; info: OutputInfo };
  try {
    let pipeline = open(buf, limits);
    if (options.autoOrient) pipeline = pipeline.autoOrient();
    raw = await pipeline.toColourspace("srgb").raw({ depth: "uchar" }).toBuffer({ resolveWithObject: true });
  } catch (err) {
    throw toInputError(err, field);
  }
  const { width, height, channels } = raw.info;
  const px = width * height;
  const src = raw.data;
  if (channels === 3) return { width, height, channels: 3, data: new Uint8Array(src.buffer, src.byteOffset, px * 3).slice(), info };
  if (channels !== 4) throw new ImageInputError(field, "undecodable", `unexpected ${channels}-channel decode`);
  const flatten = !info.isPalette && info.channels === 4;
  const [br, bg, bb] = options.background ?? [255, 255, 255];
  const out = new Uint8Array(px * 3);
  for (let i = 0; i < px; i++) {
    const r = src[i * 4]!;
    const g = src[i * 4 + 1]!;
    const b = src[i * 4 + 2]!;
    if (!flatten) {
      out[i * 3] = r;
      out[i * 3 + 1] = g;
      out[i * 3 + 2] = b;
      continue;
    }
    const a = src[i * 4 + 3]!;
    out[i * 3] = div255(br * (255 - a) + r * a);
    out[i * 3 + 1] = div255(bg * (255 - a) + g * a);
    out[i * 3 + 2] = div255(bb * (255 - a) + b * a);
  }
  return { width, height, channels: 3, data: out, info };
}

function div255(a: number): number {
  const t = a + 128;
  return ((t >> 8) + t) >> 8;
}
