/**
 * Face restoration after generation (A1111 §9.1 with ONNX models, onnx-notes §E): a YOLO-face style
 * detector gives boxes and 5 landmarks, each face is aligned to the FFHQ 512 template, restored by
 * A1111's face_restoration_model (CodeFormer at fidelity w, or GFPGAN v1.4, which A1111 runs through the
 * same helper with only the network swapped), and pasted back through a feathered mask.
 */
import { existsSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import sharp from "sharp";
import { FarmError, checkOverrideSettings, type FaceRestorationModel, type GenerationParams } from "@latentfarm/shared";
import {
  alignFace,
  boxFeatherMask,
  faceToTensor,
  pasteFaces,
  tensorToFace,
  type Image8,
  type Point,
  type RestoredFace,
} from "../imaging/index.js";
import type { AuxiliaryRunner } from "./upscalers.js";
import type { TensorType, WireTensor } from "../runtime/protocol.js";
import { checkAborted } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import { resourcesOf } from "./render-common.js";

export const CODEFORMER_FILE = "codeformer.onnx";
/** GFPGAN v1.4 exported to ONNX, under the names its exports are published with, in the order tried. */
export const GFPGAN_FILES = ["GFPGANv1.4.onnx", "gfpgan_1.4.onnx"] as const;
export const DETECTOR_FILE = "yoloface_8n.onnx";
export const DETECTOR_SIZE = 640;
export const DEFAULT_CODEFORMER_WEIGHT = 0.5;

export interface DetectedFace {
  score: number;
  /** x0, y0, x1, y1 in image pixels. */
  box: [number, number, number, number];
  /** Eyes, nose, mouth corners in image pixels. */
  landmarks: Point[];
}

export interface DetectorOptions {
  scoreThreshold?: number;
  iouThreshold?: number;
  /** A1111 drops faces whose eyes are closer than this (px). */
  minEyeDistance?: number;
}

function iou(a: DetectedFace["box"], b: DetectedFace["box"]): number {
  const ix = Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]));
  const iy = Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
  const inter = ix * iy;
  const union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
  return union > 0 ? inter / union : 0;
}

/**
 * YOLO-face output [1, 20, N] (or [1, N, 20]): per candidate cx, cy, w, h, score, then 5 × (x, y,
 * visibility) in detector pixels. `scale` maps detector pixels back to the image (letterbox at top-left).
 */
export function decodeYoloFaces(out: Float32Array, dims: readonly number[], scale: number, options: DetectorOptions = {}): DetectedFace[] {
  const threshold = options.scoreThreshold ?? 0.5;
  const iouThreshold = options.iouThreshold ?? 0.4;
  const minEye = options.minEyeDistance ?? 5;
  const featuresFirst = dims[1] === 20;
  const n = featuresFirst ? Number(dims[2]) : Number(dims[1]);
  const at = (k: number, i: number): number => (featuresFirst ? out[k * n + i]! : out[i * 20 + k]!);
  const candidates: DetectedFace[] = [];
  for (let i = 0; i < n; i++) {
    const score = at(4, i);
    if (!(score > threshold)) continue;
    const cx = at(0, i),
      cy = at(1, i),
      bw = at(2, i),
      bh = at(3, i);
    const landmarks: Point[] = [];
    for (let k = 0; k < 5; k++) landmarks.push([at(5 + 3 * k, i) / scale, at(6 + 3 * k, i) / scale]);
    candidates.push({
      score,
      box: [(cx - bw / 2) / scale, (cy - bh / 2) / scale, (cx + bw / 2) / scale, (cy + bh / 2) / scale],
      landmarks,
    });
  }
  candidates.sort((a, b) => b.score - a.score);
  const kept: DetectedFace[] = [];
  for (const c of candidates) {
    if (kept.some((k) => iou(k.box, c.box) > iouThreshold)) continue;
    const [l, r] = c.landmarks;
    if (Math.hypot(l![0] - r![0], l![1] - r![1]) < minEye) continue;
    kept.push(c);
  }
  return kept;
}

/** Letterboxes the image top-left into a DETECTOR_SIZE² zero canvas: BGR planes in [0, 1]. */
export async function detectorInput(image: Image8, size = DETECTOR_SIZE): Promise<{ tensor: Float32Array; scale: number }> {
  const scale = Math.min(size / image.width, size / image.height);
  const rw = Math.max(1, Math.round(image.width * scale));
  const rh = Math.max(1, Math.round(image.height * scale));
  let pixels = image.data;
  if (rw !== image.width || rh !== image.height) {
    const buf = await sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } })
      .resize(rw, rh, { fit: "fill", kernel: "lanczos3" })
      .raw()
      .toBuffer();
    pixels = new Uint8Array(buf.buffer, buf.byteOffset, buf.length);
  }
  const plane = size * size;
  const tensor = new Float32Array(3 * plane);
  for (let y = 0; y < rh; y++) {
    for (let x = 0; x < rw; x++) {
      for (let c = 0; c < 3; c++) tensor[(2 - c) * plane + y * size + x] = pixels[(y * rw + x) * 3 + c]! / 255;
    }
  }
  return { tensor, scale };
}

/** The face restorers whose files `dir` holds (the detector and the restorer's network). */
export async function listFaceRestorers(dir: string | undefined): Promise<FaceRestorationModel[]> {
  // One readdir off the event loop: the heartbeat asks every second.
  const files = new Set(dir === undefined ? [] : await readdir(dir).catch(() => [] as string[]));
  if (!files.has(DETECTOR_FILE)) return [];
  const out: FaceRestorationModel[] = [];
  if (files.has(CODEFORMER_FILE)) out.push("CodeFormer");
  if (GFPGAN_FILES.some((f) => files.has(f))) out.push("GFPGAN");
  return out;
}

/** The detector and the restoring network restore_faces runs. */
export interface FaceModelPaths {
  detector: string;
  restorer: FaceRestorationModel;
  /** The restorer's ONNX file. */
  network: string;
}

/** The model files restore_faces needs with `restorer`; a missing one is FAILED_PRECONDITION naming it. */
export function faceModelPaths(dir: string | undefined, restorer: FaceRestorationModel = "CodeFormer"): FaceModelPaths {
  const files: readonly string[] = restorer === "GFPGAN" ? GFPGAN_FILES : [CODEFORMER_FILE];
  if (!dir) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `restore_faces needs ${DETECTOR_FILE} and ${files.join(" or ")}, but this agent has no face model folder (--face-models)`,
      { field: "restore_faces" },
    );
  }
  const detector = join(dir, DETECTOR_FILE);
  if (!existsSync(detector)) {
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `face restoration model ${detector} not found`, { field: "restore_faces" });
  }
  const network = files.map((f) => join(dir, f)).find((f) => existsSync(f));
  if (network === undefined) {
    const field = restorer === "CodeFormer" ? "restore_faces" : "override_settings.face_restoration_model";
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `face restoration model ${files.map((f) => join(dir, f)).join(" or ")} not found`,
      { field },
    );
  }
  return { detector, restorer, network };
}

export async function detectFaces(
  model: AuxiliaryRunner,
  path: string,
  image: Image8,
  signal: AbortSignal,
  options: DetectorOptions = {},
): Promise<DetectedFace[]> {
  const info = await model.loadAuxiliary(path, signal);
  const input = info.inputs[0];
  const output = info.outputs[0];
  if (!input || !output)
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `face detector ${path} has no input or output`, { field: "restore_faces" });
  const { tensor, scale } = await detectorInput(image);
  const out = (
    await model.runAuxiliary(
      path,
      { [input.name]: { type: "float32", dims: [1, 3, DETECTOR_SIZE, DETECTOR_SIZE], data: tensor } },
      [output.name],
      signal,
    )
  )[output.name]!;
  return decodeYoloFaces(out.data as Float32Array, out.dims, scale, options);
}

/** CodeFormer on one aligned 512² face: `input` in [-1,1] and the fidelity `weight` (float64 or float32, if declared). */
export async function codeFormer(model: AuxiliaryRunner, path: string, face: Image8, weight: number, signal: AbortSignal): Promise<Image8> {
  const info = await model.loadAuxiliary(path, signal);
  const image = info.inputs.find((i) => i.shape.length === 4) ?? info.inputs[0];
  const w = info.inputs.find((i) => i !== image);
  const output = info.outputs[0];
  if (!image || !output)
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `CodeFormer ${path} has no input or output`, { field: "restore_faces" });
  const feeds: Record<string, WireTensor> = {
    [image.name]: { type: "float32", dims: [1, 3, face.height, face.width], data: faceToTensor(face) },
  };
  if (w) {
    // The worker hands (type, data) straight to ort.Tensor, which accepts float64; the wire type list lacks it.
    feeds[w.name] =
      w.type === "float64"
        ? { type: "float64" as TensorType, dims: [1], data: new Float64Array([weight]) as unknown as Float32Array }
        : { type: "float32", dims: [1], data: new Float32Array([weight]) };
  }
  const out = (await model.runAuxiliary(path, feeds, [output.name], signal))[output.name]!;
  return tensorToFace(out.data as Float32Array, face.width, face.height);
}

/** GFPGAN on one aligned 512² face: its one input in [-1,1], its first output (A1111's `net(x, return_rgb=False)[0]`). */
export async function gfpgan(model: AuxiliaryRunner, path: string, face: Image8, signal: AbortSignal): Promise<Image8> {
  const info = await model.loadAuxiliary(path, signal);
  const image = info.inputs[0];
  const output = info.outputs[0];
  if (!image || !output || info.inputs.length !== 1) {
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `GFPGAN ${path} must take one image input and give an output`, {
      field: "override_settings.face_restoration_model",
    });
  }
  const feeds = { [image.name]: { type: "float32" as const, dims: [1, 3, face.height, face.width], data: faceToTensor(face) } };
  const out = (await model.runAuxiliary(path, feeds, [output.name], signal))[output.name]!;
  return tensorToFace(out.data as Float32Array, face.width, face.height);
}

/** Detect, align, restore and paste back every face; `weight` is CodeFormer's fidelity (GFPGAN has none). */
export async function restoreFaces(
  model: AuxiliaryRunner,
  paths: FaceModelPaths,
  image: Image8,
  weight: number,
  signal: AbortSignal,
): Promise<{ image: Image8; faces: DetectedFace[] }> {
  const faces = await detectFaces(model, paths.detector, image, signal);
  const restored: RestoredFace[] = [];
  for (const f of faces) {
    checkAborted(signal);
    const aligned = alignFace(image, f.landmarks);
    const out =
      paths.restorer === "GFPGAN"
        ? await gfpgan(model, paths.network, aligned.face, signal)
        : await codeFormer(model, paths.network, aligned.face, weight, signal);
    restored.push({ face: out, inverse: aligned.inverse, mask: boxFeatherMask() });
  }
  return { image: restored.length > 0 ? pasteFaces(image, restored) : image, faces };
}

/** The post-processing step of a task: a no-op unless restore_faces; returns the infotext value too. */
export async function restoreFacesIfRequested(
  pipe: LoadedPipeline,
  ctx: RenderContext,
  p: GenerationParams,
  image: Image8,
): Promise<{ image: Image8; infotext: string | undefined }> {
  if (!p.restoreFaces) return { image, infotext: undefined };
  const weight = p.codeFormerWeight ?? DEFAULT_CODEFORMER_WEIGHT;
  if (!(weight >= 0 && weight <= 1)) throw FarmError.invalid("code_former_weight", `code_former_weight must be within 0..1, got ${weight}`);
  const restorer = checkOverrideSettings(p).faceRestorationModel ?? "CodeFormer";
  const paths = faceModelPaths(resourcesOf(ctx).faceModelsDir, restorer);
  const out = await restoreFaces(pipe.model, paths, image, weight, ctx.signal);
  // A1111 writes the face_restoration_model's name.
  return { image: out.image, infotext: restorer };
}
