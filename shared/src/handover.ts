/**
 * Stage outputs as they travel between agents through the coordinator (proto Handover): latents as
 * float32 little-endian NCHW, images as 8-bit RGB. The coordinator only crops them (a tile's input);
 * only agents compute with them.
 */
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { FarmError } from "./errors.js";
import { HandoverSchema, type Handover } from "./gen/latentfarm/v1/agent_pb.js";
import { cropNchw, extractTile, type TileRect } from "./tiling.js";
import { LATENT_FACTOR } from "./hires-size.js";

// Float32Array views use the platform's byte order; every platform Node supports in practice is
// little-endian, and the wire format is defined as little-endian, so a big-endian host is refused.
const LITTLE_ENDIAN = new Uint8Array(new Float32Array([1]).buffer)[3] === 0x3f;

function assertLittleEndian(): void {
  if (!LITTLE_ENDIAN) throw new FarmError(grpc.status.UNIMPLEMENTED, "latent hand-over needs a little-endian host");
}

const bad = (field: string, message: string): FarmError => FarmError.invalid(field, message);

/** float32 values as the wire's little-endian bytes (a view, no copy). */
export function float32Bytes(data: Float32Array): Uint8Array {
  assertLittleEndian();
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** The wire's little-endian float32 bytes copied into an aligned array; INVALID_ARGUMENT naming `field` if they are not whole values. */
export function float32FromBytes(bytes: Uint8Array, field: string): Float32Array {
  assertLittleEndian();
  if (bytes.byteLength % 4 !== 0) throw bad(field, `${bytes.byteLength} bytes are not float32 values`);
  const out = new Float32Array(bytes.byteLength / 4);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

export function latentHandover(data: Float32Array, shape: readonly number[]): Handover {
  if (shape.reduce((a, b) => a * b, 1) !== data.length)
    throw new RangeError(`shape [${shape.join(",")}] does not hold ${data.length} values`);
  return create(HandoverSchema, { data: { case: "latent", value: { shape: [...shape], data: float32Bytes(data) } } });
}

export function rgbHandover(data: Uint8Array, width: number, height: number): Handover {
  if (data.length !== width * height * 3)
    throw new RangeError(`${width}x${height} RGB needs ${width * height * 3} bytes, got ${data.length}`);
  return create(HandoverSchema, { data: { case: "rgb", value: { width, height, data } } });
}

/** The latent in a hand-over, copied to an aligned array; INVALID_ARGUMENT naming `field` if it is not one. */
export function readLatent(h: Handover | undefined, field = "inputs"): { data: Float32Array; shape: [number, number, number, number] } {
  assertLittleEndian();
  if (h?.data.case !== "latent") throw bad(field, `expected a latent, got ${h?.data.case ?? "nothing"}`);
  const { shape, data } = h.data.value;
  if (shape.length !== 4 || shape.some((d) => !Number.isInteger(d) || d < 1))
    throw bad(field, `latent shape [${shape.join(",")}] is not NCHW`);
  const n = shape.reduce((a, b) => a * b, 1);
  if (data.byteLength !== n * 4) throw bad(field, `latent [${shape.join(",")}] needs ${n * 4} bytes, got ${data.byteLength}`);
  return { data: float32FromBytes(data, field), shape: shape as [number, number, number, number] };
}

/** The RGB image in a hand-over; INVALID_ARGUMENT naming `field` if it is not one. */
export function readRgb(h: Handover | undefined, field = "inputs"): { data: Uint8Array; width: number; height: number } {
  if (h?.data.case !== "rgb") throw bad(field, `expected an RGB image, got ${h?.data.case ?? "nothing"}`);
  const { width, height, data } = h.data.value;
  if (width < 1 || height < 1 || data.length !== width * height * 3) throw bad(field, `RGB ${width}x${height} with ${data.length} bytes`);
  return { data, width, height };
}

/**
 * A tile's input: its rectangle (in second-pass pixels) cut from the upscaled source, which is
 * either the latent (the rectangle divided by the VAE factor) or the 8-bit image.
 */
export function cropHandover(source: Handover, rect: Pick<TileRect, "x" | "y" | "width" | "height">): Handover {
  const crop = cropData(source, rect);
  crop.firstPassInfotext = source.firstPassInfotext;
  if (source.firstPassModel) crop.firstPassModel = source.firstPassModel;
  crop.secondPassInfotext = source.secondPassInfotext;
  return crop;
}

function cropData(source: Handover, rect: Pick<TileRect, "x" | "y" | "width" | "height">): Handover {
  if (source.data.case === "latent") {
    const { data, shape } = readLatent(source);
    const f = LATENT_FACTOR;
    if ([rect.x, rect.y, rect.width, rect.height].some((v) => v % f !== 0))
      throw new RangeError(`tile ${JSON.stringify(rect)} is not on the latent grid`);
    const r = { x: rect.x / f, y: rect.y / f, width: rect.width / f, height: rect.height / f };
    return latentHandover(cropNchw(data, shape, r), [shape[0], shape[1], r.height, r.width]);
  }
  const img = readRgb(source);
  const t: TileRect = { index: 0, row: 0, col: 0, ...rect };
  if (rect.x < 0 || rect.y < 0 || rect.x + rect.width > img.width || rect.y + rect.height > img.height) {
    throw new RangeError(`tile ${JSON.stringify(rect)} is outside ${img.width}x${img.height}`);
  }
  return rgbHandover(extractTile(img.data, img.width, 3, t), rect.width, rect.height);
}

/** Bytes a hand-over holds (for memory accounting and logs). */
export function handoverBytes(h: Handover): number {
  return h.data.case === undefined ? 0 : h.data.value.data.byteLength;
}
