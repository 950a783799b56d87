import { create } from "@bufbuild/protobuf";
import {
  EXTRAS_MODEL,
  FarmError,
  checkExtras,
  isPlainName,
  isLoraName,
  hiresCheckpoint,
  refinerCheckpoint,
  checkRefinerSwitchAt,
  GenerationParamsSchema,
  InpaintingFill,
  RngSource,
  UnknownNameError,
  applyInfotext,
  checkOverrideSettings,
  resolveSampler,
  type AppliedInfotext,
  type GenerationParams,
  type ResolvedSampler,
  extractExtraNetworks,
  PromptSyntaxError,
  type LoraNetwork,
} from "@latentfarm/shared";
import { applyStyles, type PromptStyle } from "./styles.js";

export interface Limits {
  maxSteps: number;
  maxBatchSize: number;
  maxNIter: number;
  maxImagesPerJob: number;
  maxSide: number;
  maxPromptChars: number;
}

export const DEFAULT_LIMITS: Limits = {
  maxSteps: 150,
  maxBatchSize: 64,
  maxNIter: 100,
  maxImagesPerJob: 1000,
  maxSide: 4096,
  maxPromptChars: 100_000,
};

/** Samplers the agents run today; the rest of A1111's list is known but refused as UNIMPLEMENTED. */
export type SamplerSupport = (resolved: ResolvedSampler) => boolean;

export interface ValidatedJob {
  /** The request with A1111's defaults filled in. */
  params: GenerationParams;
  sampler: ResolvedSampler;
  imageCount: number;
  /** For the job's Warning event: what an infotext asked for that the farm does not reproduce. */
  warnings: string[];
  /** The hashes of the checkpoints the infotext filled in (applyInfotext), to find them by. */
  checkpointHashes: AppliedInfotext["checkpointHashes"];
}

const SEED_MAX = 2 ** 53 - 1;

/** Largest mask blur accepted (A1111's UI maximum; the agent enforces the same bound). */
const MAX_MASK_BLUR = 64;

function finite(field: string, v: number | undefined): void {
  if (v !== undefined && !Number.isFinite(v)) throw FarmError.invalid(field, `must be a finite number, got ${v}`);
}

function intIn(field: string, v: number, lo: number, hi: number): void {
  if (!Number.isInteger(v) || v < lo || v > hi) throw FarmError.invalid(field, `must be an integer in [${lo}, ${hi}], got ${v}`);
}

/**
 * Checks a job field by field and fills A1111's API defaults (steps 50, cfg 7, 512×512, Euler).
 * Fields that later issues implement are refused with UNIMPLEMENTED rather than ignored.
 */
/** Styles one job may name. */
const MAX_STYLES = 64;

export function validateJob(
  input: GenerationParams,
  opts: {
    limits?: Limits;
    samplerSupported?: SamplerSupport;
    defaultModel?: string;
    /** The farm's prompt styles, which the job's `styles` name (none: a job naming one is refused). */
    styles?: ReadonlyMap<string, PromptStyle>;
  } = {},
): ValidatedJob {
  const L = opts.limits ?? DEFAULT_LIMITS;
  // A copy: the infotext, the styles and the defaults fill it in, and the caller's request stays as it asked.
  // (structuredClone, not protobuf's clone, which would refuse the malformed values checked below.)
  const p = create(GenerationParamsSchema, structuredClone(input));
  if (p.extras !== undefined) {
    // An Extras job (A1111's Extras tab) reads its init_images and its extras settings alone.
    checkExtras(p);
    const imageCount = p.initImages.length;
    if (imageCount > L.maxImagesPerJob) throw FarmError.invalid("init_images", `${imageCount} images exceed ${L.maxImagesPerJob} a job`);
    p.model = EXTRAS_MODEL;
    return { params: p, sampler: resolveSampler("", ""), imageCount, warnings: [], checkpointHashes: {} };
  }
  if (p.infotext.length > L.maxPromptChars * 3) throw FarmError.invalid("infotext", `is longer than ${L.maxPromptChars * 3} characters`);
  // First, so that the fields it fills are checked like the request's own.
  const { notReproduced, checkpointHashes } = applyInfotext(p);
  const warnings = notReproduced.length > 0 ? [`infotext: not reproduced by this farm: ${notReproduced.join("; ")}`] : [];
  // Then the styles, into the prompts the infotext may have filled, as A1111 merges them into its prompts.
  if (p.styles.length > MAX_STYLES) throw FarmError.invalid("styles", `names ${p.styles.length} styles; at most ${MAX_STYLES}`);
  applyStyles(p, opts.styles ?? new Map());

  if (p.prompt.length > L.maxPromptChars) throw FarmError.invalid("prompt", `is longer than ${L.maxPromptChars} characters`);
  if (p.negativePrompt.length > L.maxPromptChars)
    throw FarmError.invalid("negative_prompt", `is longer than ${L.maxPromptChars} characters`);
  // <lora:…> tags A1111 fails on, and names that are no file's: refused here, not by the agent once the job is in.
  for (const [field, text] of [
    ["prompt", p.prompt],
    ["hr_prompt", p.hrPrompt],
  ] as const) {
    let tags: LoraNetwork[];
    try {
      tags = extractExtraNetworks(text).networks;
    } catch (err) {
      if (err instanceof PromptSyntaxError) throw FarmError.invalid(field, err.detail);
      throw err;
    }
    for (const t of tags) if (!isLoraName(t.name)) throw FarmError.invalid(field, `${JSON.stringify(t.name)} is not a LoRA name`);
  }

  p.steps ??= 50;
  intIn("steps", p.steps, 1, L.maxSteps);
  intIn("preview_every_n_steps", p.previewEveryNSteps, 0, L.maxSteps);
  p.cfgScale ??= 7;
  finite("cfg_scale", p.cfgScale);
  if (p.cfgScale < 0) throw FarmError.invalid("cfg_scale", `must be ≥ 0, got ${p.cfgScale}`);
  p.width ??= 512;
  p.height ??= 512;
  for (const [f, v] of [
    ["width", p.width],
    ["height", p.height],
  ] as const) {
    intIn(f, v, 8, L.maxSide);
    if (v % 8 !== 0) throw FarmError.invalid(f, `must be a multiple of 8, got ${v}`);
  }
  p.batchSize ??= 1;
  intIn("batch_size", p.batchSize, 1, L.maxBatchSize);
  p.nIter ??= 1;
  intIn("n_iter", p.nIter, 1, L.maxNIter);
  const imageCount = p.batchSize * p.nIter;
  if (imageCount > L.maxImagesPerJob)
    throw FarmError.invalid("batch_size", `batch_size × n_iter = ${imageCount} exceeds ${L.maxImagesPerJob}`);
  p.clipSkip ??= 1;
  intIn("clip_skip", p.clipSkip, 1, 12);

  for (const [f, v] of [
    ["seed", p.seed],
    ["subseed", p.subseed],
  ] as const) {
    if (v !== undefined && v !== -1n && (v < 0n || v > BigInt(SEED_MAX)))
      throw FarmError.invalid(f, `must be -1 (random) or in [0, ${SEED_MAX}], got ${v}`);
  }
  finite("subseed_strength", p.subseedStrength);
  if (p.subseedStrength < 0 || p.subseedStrength > 1)
    throw FarmError.invalid("subseed_strength", `must be in [0, 1], got ${p.subseedStrength}`);
  if (p.seedResizeFromW < 0 && p.seedResizeFromW !== -1) throw FarmError.invalid("seed_resize_from_w", "must be ≥ 0 or -1");
  if (p.seedResizeFromH < 0 && p.seedResizeFromH !== -1) throw FarmError.invalid("seed_resize_from_h", "must be ≥ 0 or -1");
  if (!(p.rng in RngSource)) throw FarmError.invalid("rng", `unknown RNG source ${p.rng}`);
  if (p.etaNoiseSeedDelta < 0n || p.etaNoiseSeedDelta > BigInt(SEED_MAX)) throw FarmError.invalid("eta_noise_seed_delta", "must be ≥ 0");
  for (const [f, v] of [
    ["eta", p.eta],
    ["s_churn", p.sChurn],
    ["s_tmin", p.sTmin],
    ["s_tmax", p.sTmax],
    ["s_noise", p.sNoise],
  ] as const) {
    finite(f, v);
    if (v !== undefined && v < 0) throw FarmError.invalid(f, `must be ≥ 0, got ${v}`);
  }

  checkOverrideSettings(p);

  let sampler: ResolvedSampler;
  try {
    sampler = resolveSampler(p.samplerName, p.scheduler);
  } catch (err) {
    if (err instanceof UnknownNameError) throw FarmError.invalid(err.field, err.message.slice(err.field.length + 2));
    throw err;
  }
  if (opts.samplerSupported && !opts.samplerSupported(sampler)) {
    throw FarmError.unimplemented(
      "sampler_name",
      `"${sampler.sampler.name}" with schedule "${sampler.scheduler}" is not implemented by this farm yet`,
    );
  }

  if (p.model === "") p.model = opts.defaultModel ?? "";
  if (p.model === "") throw FarmError.invalid("model", "no model named and the farm has no default model");
  if (/[/\\\0]/.test(p.model) || p.model.startsWith(".")) throw FarmError.invalid("model", `"${p.model}" is not a model name`);

  // Fields of features not built yet: refused, never silently ignored.
  if (p.mask.length > 0) {
    // The mask's bytes are decoded (and their size checked) by the agent, like init_images.
    if (p.initImages.length === 0) throw FarmError.invalid("mask", "a mask needs init_images to inpaint");
    for (const [f, v] of [
      ["mask_blur", p.maskBlur],
      ["mask_blur_x", p.maskBlurX],
      ["mask_blur_y", p.maskBlurY],
    ] as const) {
      if (v !== undefined) intIn(f, v, 0, MAX_MASK_BLUR);
    }
    intIn("inpaint_full_res_padding", p.inpaintFullResPadding, 0, 2 ** 31 - 1);
    if (!(p.inpaintingFill in InpaintingFill)) throw FarmError.invalid("inpainting_fill", `must be 0..3, got ${p.inpaintingFill}`);
  }
  finite("inpainting_mask_weight", p.inpaintingMaskWeight);
  if (p.inpaintingMaskWeight !== undefined && (p.inpaintingMaskWeight < 0 || p.inpaintingMaskWeight > 1)) {
    throw FarmError.invalid("inpainting_mask_weight", `must be in [0, 1], got ${p.inpaintingMaskWeight}`);
  }
  if (p.enableHr && p.initImages.length > 0)
    throw FarmError.invalid("enable_hr", "hires fix applies to txt2img; it cannot be combined with init_images");
  for (const [i, l] of p.loras.entries()) {
    if (!isLoraName(l.name)) throw FarmError.invalid(`loras[${i}].name`, `"${l.name}" is not a LoRA name`);
    if (!Number.isFinite(l.teWeight) || !Number.isFinite(l.unetWeight)) throw FarmError.invalid(`loras[${i}]`, "weights must be finite");
  }
  const refiner = refinerCheckpoint(p);
  if (refiner !== undefined && !isPlainName(refiner))
    throw FarmError.invalid("refiner_checkpoint", `"${refiner.slice(0, 200)}" is not a model name`);
  checkRefinerSwitchAt(p);
  if (p.enableHr) {
    finite("hr_scale", p.hrScale);
    if (p.hrScale !== undefined && (p.hrScale < 1 || p.hrScale > 8))
      throw FarmError.invalid("hr_scale", `must be in [1, 8], got ${p.hrScale}`);
    for (const [f, v] of [
      ["hr_resize_x", p.hrResizeX],
      ["hr_resize_y", p.hrResizeY],
    ] as const) {
      if (v < 0 || v > L.maxSide) throw FarmError.invalid(f, `must be in [0, ${L.maxSide}], got ${v}`);
    }
    if (p.hrSecondPassSteps < 0 || p.hrSecondPassSteps > L.maxSteps)
      throw FarmError.invalid("hr_second_pass_steps", `must be in [0, ${L.maxSteps}]`);
    const checkpoint = hiresCheckpoint(p);
    if (checkpoint !== undefined && !isPlainName(checkpoint))
      throw FarmError.invalid("hr_checkpoint_name", `"${checkpoint.slice(0, 200)}" is not a model name`);
    if (p.hrSamplerName !== "" || p.hrScheduler !== "") {
      try {
        resolveSampler(p.hrSamplerName === "" ? p.samplerName : p.hrSamplerName, p.hrScheduler, {
          sampler: "hr_sampler_name",
          scheduler: "hr_scheduler",
        });
      } catch (err) {
        if (err instanceof UnknownNameError) throw FarmError.invalid(err.field, err.message.slice(err.field.length + 2));
        throw err;
      }
    }
  }
  if (p.denoisingStrength !== undefined && (!Number.isFinite(p.denoisingStrength) || p.denoisingStrength < 0 || p.denoisingStrength > 1)) {
    throw FarmError.invalid("denoising_strength", `must be in [0, 1], got ${p.denoisingStrength}`);
  }
  if (p.codeFormerWeight !== undefined && (!Number.isFinite(p.codeFormerWeight) || p.codeFormerWeight < 0 || p.codeFormerWeight > 1)) {
    throw FarmError.invalid("code_former_weight", `must be in [0, 1], got ${p.codeFormerWeight}`);
  }
  finite("denoising_strength", p.denoisingStrength);
  finite("hr_scale", p.hrScale);
  finite("code_former_weight", p.codeFormerWeight);
  finite("initial_noise_multiplier", p.initialNoiseMultiplier);

  return { params: p, sampler, imageCount, warnings, checkpointHashes };
}

/** A1111's seed bookkeeping (behaviour spec §3.1): -1 → random in [0, 4294967293]. */
export function resolveSeed(v: bigint | undefined): bigint {
  if (v === undefined || v === -1n) return BigInt(Math.floor(Math.random() * 4294967294));
  return v;
}

/** Image i's seed and subseed: seed + i unless a variation seed is in use (then all share seed). */
export function imageSeeds(
  seed: bigint,
  subseed: bigint,
  subseedStrength: number,
  count: number,
): Array<{ seed: bigint; subseed: bigint }> {
  return Array.from({ length: count }, (_, i) => ({
    seed: subseedStrength === 0 ? seed + BigInt(i) : seed,
    subseed: subseed + BigInt(i),
  }));
}
