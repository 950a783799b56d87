/**
 * Pixel-space upscalers for Hires.fix and img2img: Lanczos and Nearest through sharp, and ONNX models
 * from the agent's upscaler folder, tiled as A1111 tiles each family: ESRGAN-family models (RRDBNet,
 * SRVGGNetCompact, DAT) by images.split_grid with an 8-bit blend, SwinIR and ScuNET by tensor tiles
 * averaged where they overlap (upscale_2).
 */
import { existsSync } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import sharp from "sharp";
import { FarmError } from "@latentfarm/shared";
import {
  bgrTensorToTile,
  planPixelUpscale,
  planUpscaleBy,
  tileToBgrTensor,
  upscaleWithModel,
  upscaleWithTensorTiles,
  type Image8,
  type Size,
  type UpscaleStep,
  type UpscaleTensor,
} from "../imaging/index.js";
import type { SdModel } from "../models/sd-model.js";
import type { WireTensor } from "../runtime/protocol.js";
import { f16ToF32, f32ToF16 } from "../model-graph/index.js";
import { roundToF16 } from "../model-graph/half.js";
import type { RenderResources } from "./render-common.js";
import { checkAborted } from "./denoise.js";

/** A1111 upscaler names → the file stems their models are usually published under. */
const KNOWN_FILES: Readonly<Record<string, readonly string[]>> = {
  "R-ESRGAN 4x+": ["RealESRGAN_x4plus"],
  "R-ESRGAN 4x+ Anime6B": ["RealESRGAN_x4plus_anime_6B"],
  "R-ESRGAN 2x+": ["RealESRGAN_x2plus"],
  "R-ESRGAN General 4xV3": ["realesr-general-x4v3"],
  "R-ESRGAN General WDN 4xV3": ["realesr-general-wdn-x4v3"],
  "R-ESRGAN AnimeVideo": ["realesr-animevideov3"],
  ESRGAN_4x: ["ESRGAN_x4", "ESRGAN_4x"],
  // A1111 saves SwinIR's download as its name with "_"; ScuNET's and DAT's under their release names.
  "SwinIR 4x": ["SwinIR_4x"],
  "ScuNET GAN": ["scunet_color_real_gan", "ScuNET"],
  "ScuNET PSNR": ["scunet_color_real_psnr"],
  "DAT x2": ["DAT_x2"],
  "DAT x3": ["DAT_x3"],
  "DAT x4": ["DAT_x4"],
};

/**
 * Families A1111 upscales with tensor tiles (upscale_2), with their tile settings (SWIN_tile and
 * SCUNET_tile with their overlaps, A1111's defaults): its built-in names, and any model in the folder of
 * that name under the upscaler folder, as A1111 lists models/SwinIR and models/ScuNET.
 */
const TENSOR_TILED: Readonly<Record<string, { tileSize: number; tileOverlap: number }>> = {
  SwinIR: { tileSize: 192, tileOverlap: 8 },
  ScuNET: { tileSize: 256, tileOverlap: 8 },
};
const TENSOR_TILED_NAMES: Readonly<Record<string, keyof typeof TENSOR_TILED>> = {
  "SwinIR 4x": "SwinIR",
  "ScuNET GAN": "ScuNET",
  "ScuNET PSNR": "ScuNET",
};

/** What the upscaler and face paths need from a model host: SdModel's auxiliary sessions. */
export type AuxiliaryRunner = Pick<SdModel, "loadAuxiliary" | "runAuxiliary">;

export type PixelUpscaler =
  | { kind: "resize"; name: "Lanczos" | "Nearest" | "None" }
  | {
      kind: "model";
      name: string;
      path: string;
      scale: number;
      run: (tile: Image8, signal: AbortSignal) => Promise<Image8>;
      /** SwinIR and ScuNET: upscale_2's tensor tiles, the model on tensors, sums in the model's precision. */
      tensorTiles?: {
        tileSize: number;
        tileOverlap: number;
        /** The model on one BGR tensor tile (an UpscaleTensor that takes a signal). */
        runTensor: (bgr: Float32Array, width: number, height: number, signal: AbortSignal) => ReturnType<UpscaleTensor>;
        round: (v: number) => number;
      };
    };

/**
 * The upscalers `dir` holds a model file for (what resolveUpscaler finds), by the names a job may give:
 * each .onnx file's stem, in the folder and its SwinIR/ and ScuNET/ subfolders, and A1111's names of the
 * files it knows (R-ESRGAN 4x+ for RealESRGAN_x4plus.onnx). Sorted; none without a folder.
 */
export async function listUpscalers(dir: string | undefined): Promise<string[]> {
  if (dir === undefined) return [];
  const stems = new Set<string>();
  for (const sub of [undefined, ...Object.keys(TENSOR_TILED)]) {
    const files = await readdir(sub === undefined ? dir : join(dir, sub)).catch(() => [] as string[]);
    for (const f of files) if (f.endsWith(".onnx")) stems.add(f.slice(0, -".onnx".length));
  }
  const names = new Set(stems);
  for (const [name, known] of Object.entries(KNOWN_FILES)) if (known.some((k) => stems.has(k))) names.add(name);
  return [...names].sort();
}

/** The files an upscaler name may be stored as, in the order they are tried. */
export function upscalerFileCandidates(name: string): string[] {
  const stems = [name, ...(KNOWN_FILES[name] ?? [])];
  return [...new Set(stems)].map((s) => `${s}.onnx`);
}

/**
 * Scales measured by a 16×16 probe, by file (path, size and mtime: a replaced file is probed again), so
 * that each Hires.fix task or Extras image does not run the network once more just to learn it.
 */
const measuredScales = new Map<string, number>();
const MAX_MEASURED_SCALES = 64;

async function fileIdentity(path: string): Promise<string> {
  const s = await stat(path);
  return `${path}\u0000${s.size}\u0000${s.mtimeMs}`;
}

/**
 * Resolves an upscaler name. Model upscalers must exist in `resources.upscalersDir`; otherwise the
 * task fails with FAILED_PRECONDITION naming the files looked for, since no retry elsewhere with the
 * same configuration would help.
 */
export async function resolveUpscaler(
  model: AuxiliaryRunner,
  name: string,
  resources: RenderResources,
  field: string,
  signal: AbortSignal,
): Promise<PixelUpscaler> {
  if (name === "Lanczos" || name === "Nearest" || name === "None") return { kind: "resize", name };
  const files = upscalerFileCandidates(name);
  if (!resources.upscalersDir) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `upscaler "${name}" needs ${files.join(" or ")}, but this agent has no upscaler folder (--upscalers)`,
      { field },
    );
  }
  // The folder itself, then A1111's per-family folders whose models it tiles as tensors.
  const places = [undefined, ...Object.keys(TENSOR_TILED)].flatMap((family) =>
    files.map((f) => ({
      family,
      path: family === undefined ? join(resources.upscalersDir!, f) : join(resources.upscalersDir!, family, f),
    })),
  );
  const place = places.find((p) => existsSync(p.path));
  if (place === undefined) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `upscaler "${name}": ${files.map((f) => join(resources.upscalersDir!, f)).join(" or ")} not found (nor in its ${Object.keys(TENSOR_TILED).join(" or ")} folder)`,
      { field },
    );
  }
  const found = place.path;
  const family = TENSOR_TILED_NAMES[name] ?? place.family;
  const info = await model.loadAuxiliary(found, signal);
  const input = info.inputs[0];
  const output = info.outputs[0];
  if (!input || !output) throw new FarmError(grpc.status.FAILED_PRECONDITION, `upscaler ${found} has no input or output`, { field });
  const half = input.type === "float16";
  const runOn = async (x: Float32Array, width: number, height: number, sig: AbortSignal) => {
    const feed: WireTensor = half
      ? { type: "float16", dims: [1, 3, height, width], data: f32ToF16(x) }
      : { type: "float32", dims: [1, 3, height, width], data: x };
    const out = (await model.runAuxiliary(found, { [input.name]: feed }, [output.name], sig))[output.name]!;
    const data = out.type === "float16" ? f16ToF32(out.data as Uint16Array) : (out.data as Float32Array);
    return { data, width: Number(out.dims[3]), height: Number(out.dims[2]) };
  };
  const run = async (tile: Image8, sig: AbortSignal): Promise<Image8> => {
    const out = await runOn(tileToBgrTensor(tile), tile.width, tile.height, sig);
    return bgrTensorToTile(out.data, out.width, out.height);
  };
  // The scale is a property of the network, not of its metadata (often symbolic): measure it once per file.
  const identity = await fileIdentity(found);
  let scale = measuredScales.get(identity);
  if (scale === undefined) {
    const probe = await run({ width: 16, height: 16, channels: 3, data: new Uint8Array(16 * 16 * 3) }, signal);
    scale = probe.width / 16;
    if (!Number.isInteger(scale) || scale < 1 || probe.height !== 16 * scale) {
      throw new FarmError(
        grpc.status.FAILED_PRECONDITION,
        `upscaler ${found} maps 16x16 to ${probe.width}x${probe.height}, not an integer scale`,
        { field },
      );
    }
    if (measuredScales.size >= MAX_MEASURED_SCALES) measuredScales.delete(measuredScales.keys().next().value!);
    measuredScales.set(identity, scale);
  }
  const tiling = family === undefined ? undefined : TENSOR_TILED[family];
  return {
    kind: "model",
    name,
    path: found,
    scale,
    run,
    ...(tiling && {
      tensorTiles: { ...tiling, runTensor: runOn, round: half ? roundToF16 : Math.fround },
    }),
  };
}

async function sharpResize(img: Image8, to: Size, kernel: "lanczos3" | "nearest"): Promise<Image8> {
  const { data, info } = await sharp(img.data, { raw: { width: img.width, height: img.height, channels: img.channels as 3 } })
    .resize(to.width, to.height, { fit: "fill", kernel })
    .raw()
    .toBuffer({ resolveWithObject: true });
  return {
    width: info.width,
    height: info.height,
    channels: info.channels,
    data: new Uint8Array(data.buffer, data.byteOffset, data.length),
  };
}

/** What the upscale planners need of an upscaler: its name and a model's scale. */
const planned = (upscaler: PixelUpscaler): { name: string; modelScale?: number } => ({
  name: upscaler.name,
  ...(upscaler.kind === "model" && { modelScale: upscaler.scale }),
});

/** A1111 `images.resize_image(0, img, W, H, upscaler)`: the upscaler's passes, then Lanczos to the exact size. */
export async function upscaleImage(img: Image8, target: Size, upscaler: PixelUpscaler, signal: AbortSignal): Promise<Image8> {
  const steps = planPixelUpscale({ width: img.width, height: img.height }, target, planned(upscaler));
  return runUpscaleSteps(img, steps, upscaler, signal);
}

/** A1111 `Upscaler.upscale(img, scale)` (the Extras tab's upscale): its passes and a Lanczos resize to (w·scale)//8·8. */
export async function upscaleBy(img: Image8, scale: number, upscaler: PixelUpscaler, signal: AbortSignal): Promise<Image8> {
  const { steps } = planUpscaleBy({ width: img.width, height: img.height }, scale, planned(upscaler));
  return runUpscaleSteps(img, steps, upscaler, signal);
}

async function runUpscaleSteps(img: Image8, steps: readonly UpscaleStep[], upscaler: PixelUpscaler, signal: AbortSignal): Promise<Image8> {
  let cur = img;
  for (const step of steps) {
    checkAborted(signal);
    if (step.op === "resize") {
      cur = await sharpResize(cur, step.to, step.kernel);
    } else {
      if (upscaler.kind !== "model") throw new RangeError(`${upscaler.name} has no model`);
      const tensor = upscaler.tensorTiles;
      cur = tensor
        ? await upscaleWithTensorTiles(cur, (x, w, h) => tensor.runTensor(x, w, h, signal), tensor)
        : await upscaleWithModel(cur, (tile) => upscaler.run(tile, signal));
    }
  }
  return cur;
}
