// A1111's API responses (modules/api/models.py TextToImageResponse, ImageToImageResponse,
// ExtrasSingleImageResponse, ProgressResponse) from a finished job's images. The images' infotexts are
// A1111's own, so `info` (Processed.js()) is read back from them: prompts, seeds, sampler, model and
// VAE names and hashes are what A1111 would report for the same images.
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { parseInfotext, type GenerationParams, type Image } from "@latentfarm/shared";

export const API_VERSION = "latentfarm";

/** Numbers in an infotext as A1111 reports them in `info` (ints stay ints). */
function numberOr(v: string | undefined, fallback: number | null): number | null {
  if (v === undefined) return fallback;
  const n = Number(v);
  return Number.isFinite(n) ? n : fallback;
}

/** YYYYmmddHHMMSS, A1111's job_timestamp (local time there; UTC here, where the servers are). */
export function jobTimestamp(at: Date): string {
  return at.toISOString().replace(/[-:T]/g, "").slice(0, 14);
}

/**
 * The infotext keys processing.create_infotext writes from its own generation_params; the image's other
 * entries came from p.extra_generation_params (Schedule type, Hires …, Lora hashes, Refiner …), which
 * `info` reports apart.
 */
const GENERATION_PARAMS = new Set([
  "Steps",
  "Sampler",
  "CFG scale",
  "Image CFG scale",
  "Seed",
  "Face restoration",
  "Size-1",
  "Size-2",
  "Model hash",
  "Model",
  "FP8 weight",
  "Cache FP16 weight for LoRA",
  "VAE hash",
  "VAE",
  "Variation seed",
  "Variation seed strength",
  "Seed resize from-1",
  "Seed resize from-2",
  "Denoising strength",
  "Conditional mask weight",
  "Clip skip",
  "ENSD",
  "Init image hash",
  "RNG",
  "Tiling",
  "Version",
  "User",
]);

/** The entries outside GENERATION_PARAMS, with `WxH` values (parsed as Key-1 and Key-2) whole again. */
function extraGenerationParams(p: ReadonlyMap<string, string>): JsonObject {
  const out: JsonObject = {};
  for (const [key, value] of p) {
    if (GENERATION_PARAMS.has(key) || key.endsWith("-2")) continue;
    const base = key.endsWith("-1") ? key.slice(0, -2) : undefined;
    if (base !== undefined && p.has(`${base}-2`)) out[base] = `${value}x${p.get(`${base}-2`)!}`;
    else out[key] = value;
  }
  return out;
}

/** `info`: Processed.js() for images in index order. */
export function processedInfo(params: GenerationParams, images: readonly Image[], startedAt: Date): JsonObject {
  const parsed = images.map((i) => parseInfotext(i.infotext));
  const first = parsed[0];
  const p = first?.params ?? new Map<string, string>();
  const seeds = images.map((i) => Number(i.seed));
  const subseeds = images.map((i) => Number(i.subseed));
  return {
    prompt: first?.prompt ?? params.prompt,
    all_prompts: parsed.map((x) => x.prompt),
    negative_prompt: first?.negativePrompt ?? params.negativePrompt,
    all_negative_prompts: parsed.map((x) => x.negativePrompt),
    seed: seeds[0] ?? -1,
    all_seeds: seeds,
    subseed: subseeds[0] ?? -1,
    all_subseeds: subseeds,
    subseed_strength: params.subseedStrength,
    width: params.width ?? 512,
    height: params.height ?? 512,
    sampler_name: p.get("Sampler") ?? params.samplerName,
    cfg_scale: numberOr(p.get("CFG scale"), params.cfgScale ?? 7),
    steps: numberOr(p.get("Steps"), params.steps ?? 50),
    batch_size: params.batchSize ?? 1,
    restore_faces: params.restoreFaces,
    face_restoration_model: p.get("Face restoration") ?? null,
    sd_model_name: p.get("Model") ?? null,
    sd_model_hash: p.get("Model hash") ?? null,
    sd_vae_name: p.get("VAE") ?? null,
    sd_vae_hash: p.get("VAE hash") ?? null,
    seed_resize_from_w: params.seedResizeFromW || -1,
    seed_resize_from_h: params.seedResizeFromH || -1,
    denoising_strength: numberOr(p.get("Denoising strength"), null),
    extra_generation_params: extraGenerationParams(p),
    index_of_first_image: 0,
    infotexts: images.map((i) => i.infotext),
    styles: [...params.styles],
    job_timestamp: jobTimestamp(startedAt),
    clip_skip: numberOr(p.get("Clip skip"), 1),
    is_using_inpainting_conditioning: p.has("Conditional mask weight"),
    version: API_VERSION,
  };
}

const base64 = (png: Uint8Array): string => Buffer.from(png).toString("base64");

/**
 * txt2img and img2img: `images` (base64 PNGs with their infotext, when send_images), `parameters` (the
 * request as sent; img2img's init_images and mask blanked unless include_init_images, as A1111 does) and
 * `info` as a JSON string.
 */
export function generationResponse(
  body: JsonObject,
  img2img: boolean,
  params: GenerationParams,
  images: readonly Image[],
  sendImages: boolean,
  startedAt: Date,
): JsonObject {
  const parameters: JsonObject = { ...body };
  if (img2img && body["include_init_images"] !== true) {
    parameters["init_images"] = null;
    parameters["mask"] = null;
  }
  return {
    images: sendImages ? images.map((i) => base64(i.png)) : [],
    parameters,
    info: JSON.stringify(processedInfo(params, images, startedAt)),
  };
}

/** extra-single-image: the image and A1111's html_info (empty where it shows no generation info). */
export function extrasResponse(image: Image): JsonObject {
  return { html_info: "", image: base64(image.png) };
}

/** extra-batch-images: the images in the list's order. */
export function extrasBatchResponse(images: readonly Image[]): JsonObject {
  return { html_info: "", images: images.map((i) => base64(i.png)) };
}

/** What /progress reports of a job being watched for an API call. */
export interface JobProgress {
  jobId: string;
  imageCount: number;
  /** Steps of one image (A1111's sampling_steps; a Hires.fix image counts both passes). */
  totalSteps: number;
  /** Latest step per image index. */
  steps: Map<number, number>;
  /** Images finished. */
  done: number;
  startedAt: number;
  /** The latest live preview, when the request asked for them (preview_every_n_steps). */
  preview: Uint8Array | undefined;
}

/**
 * ProgressResponse: progress is the share of the job's steps made (A1111's job_no/job_count plus the
 * current step, here summed over images that run at once on different agents), eta_relative the time
 * left at the rate so far. Idle: zeros, as A1111 reports between jobs.
 */
export function progressResponse(job: JobProgress | undefined, now: number, skipCurrentImage: boolean): JsonObject {
  if (job === undefined) {
    return {
      progress: 0,
      eta_relative: 0,
      state: progressState(0, 0, 0, 0, ""),
      current_image: null,
      textinfo: null,
    };
  }
  const total = Math.max(1, job.totalSteps * job.imageCount);
  let made = 0;
  for (const s of job.steps.values()) made += s;
  const progress = Math.min(1, made / total);
  const elapsed = (now - job.startedAt) / 1000;
  const current = Math.max(0, ...job.steps.values());
  const value: JsonValue = {
    progress,
    eta_relative: progress > 0 ? elapsed / progress - elapsed : 0,
    state: progressState(job.imageCount, Math.min(job.done, job.imageCount - 1), current, job.totalSteps, job.jobId),
    current_image: !skipCurrentImage && job.preview !== undefined ? base64(job.preview) : null,
    textinfo: null,
  };
  return value;
}

function progressState(jobCount: number, jobNo: number, step: number, steps: number, job: string): JsonObject {
  return {
    skipped: false,
    interrupted: false,
    stopping_generation: false,
    job,
    job_count: jobCount,
    job_timestamp: "0",
    job_no: jobNo,
    sampling_step: step,
    sampling_steps: steps,
  };
}
