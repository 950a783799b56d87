/**
 * What txt2img, img2img and Hires.fix tasks share: request defaults, per-image RNG, conditioning,
 * VAE encode/decode in A1111's pixel conventions, infotext with the img2img/face-restoration slots,
 * and the final PNG.
 */
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import {
  FarmError,
  ImageSchema,
  RngSource as WireRng,
  PassModelSchema,
  checkOverrideSettings,
  hiresCheckpoint,
  refinerCheckpoint,
  refinerInPass,
  parseInfotext,
  type GenerationParams,
  type PassModel,
  type Image,
  type LoraRef,
  type PassCheckpoint,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { ImageRng, type PreparedSampling, type SamplingSettings } from "../sampling/index.js";
import { getLearnedConditioningPromptSchedules, type EmphasisMode, type PreparedConditioning } from "../conditioning/index.js";
import { ImageInputError } from "../imaging/index.js";
import { checkAborted, type PreviewRequest } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { lorasOf, pipelineKey } from "../models/model-loader.js";
import { buildInfotext, hashListName, type CONDITIONING_INFOTEXT_KEYS, type InfotextFields, type InfotextValue } from "./infotext.js";
import { encodePng, toRgb8 } from "./png.js";
import type { VaeIdentity } from "../models/vae-files.js";

/** Folders and limits a task may use beyond its model, from the agent's configuration. */
export interface RenderResources {
  /** ESRGAN-family ONNX upscalers, named after their file stems. */
  upscalersDir?: string;
  /** Face restoration models (CodeFormer, face detector). */
  faceModelsDir?: string;
  /** Limits for decoded input images (img2img, masks). */
  maxInputPixels: number;
  maxInputBytes: number;
}

export const DEFAULT_RESOURCES: RenderResources = { maxInputPixels: 4096 * 4096, maxInputBytes: 32 * 1024 * 1024 };

export interface RenderContext {
  signal: AbortSignal;
  agentId: string;
  /** After each sampling step; with the request's preview_every_n_steps, a PNG preview on those steps. */
  onStep: (step: number, totalSteps: number, previewPng?: Uint8Array) => void;
  onWarning: (message: string) => void;
  resources?: RenderResources;
  /** A checkpoint of the task's sampling pass (RunTaskRequest.checkpoint_every_steps), for the coordinator. */
  onCheckpoint?: (checkpoint: PassCheckpoint) => void;
  /** The request's weight-0 LoRAs' "Lora hashes" entries by name (no pipeline merges them); see unmergedLoraHashes. */
  unmergedLoraHashes?: ReadonlyMap<string, string>;
}

const RNG_NAMES: Record<WireRng, "GPU" | "CPU" | "NV"> = {
  [WireRng.UNSPECIFIED]: "GPU",
  [WireRng.GPU]: "GPU",
  [WireRng.CPU]: "CPU",
  [WireRng.NV]: "NV",
};

/** The request's fields with A1111's API defaults applied. */
export interface TaskBasics {
  p: GenerationParams;
  steps: number;
  width: number;
  height: number;
  cfgScale: number;
  clipSkip: number;
  seed: number;
  subseed: number;
  rng: "GPU" | "CPU" | "NV";
  ensd: number;
  channels: number;
  settings: SamplingSettings;
  conditioning: ConditioningSettings;
  img2imgFixSteps: boolean;
  preview: PreviewRequest | undefined;
  /** RenderContext.unmergedLoraHashes: weight-0 LoRAs' entries, which the infotext lists where the pass's prompt names them. */
  unmergedLoraHashes: ReadonlyMap<string, string>;
}

export function taskBasics(pipe: LoadedPipeline, req: RunTaskRequest, ctx?: Pick<RenderContext, "unmergedLoraHashes">): TaskBasics {
  const p = req.params;
  if (!p) throw FarmError.invalid("params", "the task has no generation parameters");
  const { sampling: settings, conditioning, img2imgFixSteps, preview } = requestSettingsOf(p);
  return {
    p,
    steps: p.steps ?? 50,
    width: p.width ?? 512,
    height: p.height ?? 512,
    cfgScale: p.cfgScale ?? 7,
    clipSkip: p.clipSkip ?? 1,
    seed: Number(req.seed),
    subseed: Number(req.subseed),
    rng: RNG_NAMES[p.rng] ?? "GPU",
    ensd: Number(p.etaNoiseSeedDelta),
    channels: pipe.model.config.latentChannels,
    settings,
    conditioning,
    img2imgFixSteps,
    preview,
    unmergedLoraHashes: ctx?.unmergedLoraHashes ?? new Map(),
  };
}

/** The request's conditioning options (A1111's emphasis, use_old_scheduling and pad_cond_uncond(_v0) settings). */
export interface ConditioningSettings {
  emphasis: EmphasisMode;
  useOldScheduling: boolean;
  padCondUncond: boolean;
  padCondUncondV0: boolean;
  /** SDXL: CLIP skip applies to CLIP-L (sdxl_clip_l_skip); otherwise SDXL ignores it. */
  sdxlClipLSkip: boolean;
  /** SDXL's crop conditioning in pixels (sdxl_crop_top, sdxl_crop_left). */
  sdxlCrop: { top: number; left: number };
  /** The SDXL refiner's aesthetic scores (sdxl_refiner_high_aesthetic_score, sdxl_refiner_low_aesthetic_score). */
  aestheticScore: { high: number; low: number };
}

/** A request's settings for its passes, checked once per task. */
export interface RequestSettings {
  sampling: SamplingSettings;
  conditioning: ConditioningSettings;
  /** img2img_fix_steps: plain img2img runs exactly `steps` steps. */
  img2imgFixSteps: boolean;
  /** Live previews (preview_every_n_steps, live_preview_content), if asked for. */
  preview: PreviewRequest | undefined;
}

/**
 * The request's own sampling fields (eta, s_churn, …, s_min_uncond) and A1111's options in
 * override_settings, checked again here (the agent does not rely on the coordinator's checks).
 */
export function requestSettingsOf(p: GenerationParams): RequestSettings {
  // The checked options carry the sampler's names, but for these.
  const {
    betaDistAlpha,
    betaDistBeta,
    useDowncastedAlphaBar,
    img2imgFixSteps,
    emphasis,
    useOldScheduling,
    padCondUncond,
    padCondUncondV0,
    livePreviewContent,
    sdxlClipLSkip,
    sdxlCropTop,
    sdxlCropLeft,
    sdxlRefinerHighAestheticScore,
    sdxlRefinerLowAestheticScore,
    ...checked
  } = checkOverrideSettings(p);
  // Which passes switch is read off the request (refinerInPass), not a sampler setting.
  const { hiresFixRefinerPass, ...sampling } = checked;
  const settings: SamplingSettings = sampling;
  if (p.eta !== undefined) settings.eta = p.eta;
  if (p.sChurn !== undefined) settings.sChurn = p.sChurn;
  if (p.sTmin !== undefined) settings.sTmin = p.sTmin;
  if (p.sTmax !== undefined) settings.sTmax = p.sTmax;
  if (p.sNoise !== undefined) settings.sNoise = p.sNoise;
  if (betaDistAlpha !== undefined) settings.betaAlpha = betaDistAlpha;
  if (betaDistBeta !== undefined) settings.betaBeta = betaDistBeta;
  if (useDowncastedAlphaBar !== undefined) settings.downcastAlphasCumprod = useDowncastedAlphaBar;
  return {
    sampling: settings,
    conditioning: {
      emphasis: emphasis ?? "Original",
      useOldScheduling: useOldScheduling ?? false,
      padCondUncond: padCondUncond ?? false,
      padCondUncondV0: padCondUncondV0 ?? false,
      sdxlClipLSkip: sdxlClipLSkip ?? false,
      sdxlCrop: { top: sdxlCropTop ?? 0, left: sdxlCropLeft ?? 0 },
      aestheticScore: { high: sdxlRefinerHighAestheticScore ?? 6, low: sdxlRefinerLowAestheticScore ?? 2.5 },
    },
    img2imgFixSteps: img2imgFixSteps ?? false,
    preview: p.previewEveryNSteps > 0 ? { every: p.previewEveryNSteps, content: livePreviewContent ?? "Prompt" } : undefined,
  };
}

/**
 * The infotext entries A1111 writes as it encodes a pass's prompts: Old prompt editing timelines when the
 * old reading changed a schedule; then, in the order its encoder passes first write them (the negative
 * prompt's, then each subprompt's), TI hashes for the textual-inversion embeddings they used and Emphasis
 * when a mode other than Original met a bracket in a text. Recorded in the pass's infotext (and carried
 * between stages with the run's own). A Hires.fix second pass records only the first: A1111 takes its
 * encoder's entries (TI hashes, Emphasis) into the image's infotext right after it encodes the first
 * pass's prompts, and encodes the hires prompts later, inside sampling; Old prompt editing timelines it
 * writes straight into the infotext's entries.
 */
export function recordConditioningInfotext(
  sampler: PreparedSampling,
  cond: PreparedConditioning,
  negativePrompt: string,
  c: ConditioningSettings,
  steps: { steps: number; hiresSteps?: number },
  pass: "first" | "second" = "first",
): void {
  const entries: Array<[(typeof CONDITIONING_INFOTEXT_KEYS)[number], string | boolean]> = [];
  if (c.useOldScheduling) {
    const prompts = [cond.positivePrompt, negativePrompt];
    const read = (old: boolean) => JSON.stringify(getLearnedConditioningPromptSchedules(prompts, steps.steps, steps.hiresSteps, old));
    if (read(true) !== read(false)) entries.push(["Old prompt editing timelines", true]);
  }
  const distinct = [...new Map(cond.subprompts.map((s) => [s.text, s])).values()];
  const forwards = [
    { texts: cond.negative.map((e) => e.text), embeddings: cond.textualInversion.negative },
    ...distinct.map((s, i) => ({ texts: s.schedule.map((e) => e.text), embeddings: cond.textualInversion.subprompts[i] ?? [] })),
  ];
  // Each encoder pass puts its hashes before those already written.
  let hashes = "";
  const order: Array<"TI hashes" | "Emphasis"> = [];
  for (const f of forwards) {
    // Embeddings without a hash (a LoRA's bundled ones) are not listed, as in A1111.
    const hashed = f.embeddings.filter((e) => e.sha256 !== undefined && e.sha256 !== "");
    if (pass === "first" && hashed.length > 0) {
      const mine = hashed.map((e) => `${hashListName(e.name)}: ${e.sha256!.slice(0, 12)}`).join(", ");
      hashes = hashes === "" ? mine : `${mine}, ${hashes}`;
      if (!order.includes("TI hashes")) order.push("TI hashes");
    }
    if (pass === "first" && c.emphasis !== "Original" && f.texts.some((t) => t.includes("(") || t.includes("["))) {
      if (!order.includes("Emphasis")) order.push("Emphasis");
    }
  }
  for (const key of order) entries.push(key === "TI hashes" ? [key, hashes] : [key, c.emphasis]);
  putFirst(sampler.infotext, entries);
}

/**
 * A pasted infotext's "TI hashes" against the embeddings this render used: an embedding the agent lacks
 * was encoded as the words of its name, and one whose file differs gives another image.
 */
export function pastedEmbeddingWarnings(tiHashes: string | undefined, cond: PreparedConditioning): string[] {
  if (tiHashes === undefined || tiHashes.trim() === "") return [];
  const used = new Map(
    [...cond.textualInversion.negative, ...cond.textualInversion.subprompts.flat()].map((e) => [hashListName(e.name), e]),
  );
  const warnings: string[] = [];
  const seen = new Set<string>();
  for (const entry of tiHashes.split(",")) {
    const at = entry.lastIndexOf(":");
    const name = (at < 0 ? entry : entry.slice(0, at)).trim();
    const hash = at < 0 ? "" : entry.slice(at + 1).trim();
    if (name === "" || seen.has(name)) continue;
    seen.add(name);
    const e = used.get(name);
    if (e === undefined) {
      warnings.push(
        `TI hashes: no embedding ${name} was applied (none of that name in this agent's embeddings folder, or the prompt does not name it): the image differs`,
      );
    } else if (e.sha256 === undefined) {
      warnings.push(
        `TI hashes: embedding ${name} came from LoRA ${e.bundledIn ?? "?"}'s bundled embeddings here, the infotext's from a file${hash === "" ? "" : ` of hash ${hash}`}: the image may differ`,
      );
    } else if (hash !== "" && !e.sha256.startsWith(hash.toLowerCase())) {
      warnings.push(`TI hashes: embedding ${name} is ${e.sha256.slice(0, 12)} here, the infotext's is ${hash}: the image differs`);
    }
  }
  return warnings;
}

/**
 * A pasted infotext's "VAE hash" against the VAE file this pipeline decodes with: a warning when the
 * image will not be the one the infotext came from (another file of that name, or none loaded).
 */
export function pastedVaeWarning(vaeHash: string | undefined, vae: VaeIdentity | undefined): string | undefined {
  const hash = vaeHash?.trim().toLowerCase() ?? "";
  if (hash === "") return undefined;
  if (vae === undefined)
    return `VAE hash: the infotext's VAE (${hash}) is not the one decoding here (the checkpoint's own is): the image differs`;
  return vae.hash.startsWith(hash) ? undefined : `VAE hash: ${vae.name} is ${vae.hash} here, the infotext's is ${hash}: the image differs`;
}

/** A1111 encodes a pass's prompts before it sets its sampler up, so their entries precede the sampler's. */
export function putFirst(
  infotext: Record<string, string | number | boolean>,
  entries: ReadonlyArray<[string, string | number | boolean]>,
): void {
  if (entries.length === 0) return;
  const rest = Object.entries(infotext).filter(([k]) => !entries.some(([e]) => e === k));
  for (const k of Object.keys(infotext)) delete infotext[k];
  for (const [k, v] of [...entries, ...rest]) infotext[k] = v;
}

export function resourcesOf(ctx: RenderContext): RenderResources {
  return ctx.resources ?? DEFAULT_RESOURCES;
}

/** A1111's ImageRNG for one image at latent size h×w (a hires pass makes a new one at its own size). */
export function imageRngFor(b: TaskBasics, h: number, w: number): ImageRng {
  return new ImageRng({
    shape: [b.channels, h, w],
    seeds: [b.seed],
    subseeds: [b.subseed],
    subseedStrength: b.p.subseedStrength,
    seedResizeFromH: b.p.seedResizeFromH,
    seedResizeFromW: b.p.seedResizeFromW,
    source: b.rng,
    etaNoiseSeedDelta: b.ensd,
  });
}

export async function conditioningFor(
  pipe: LoadedPipeline,
  ctx: RenderContext,
  b: TaskBasics,
  prompt: string,
  negativePrompt: string,
  sampler: PreparedSampling,
  opts: {
    fields?: { prompt: string };
    /**
     * A Hires.fix second pass's first pass: A1111 builds the second pass's prompt schedules against the
     * first pass's steps with the second pass's as hires_steps ("[a:b:1.5]" switches halfway through it).
     */
    firstPass?: PreparedSampling;
  } = {},
): Promise<PreparedConditioning> {
  const fields = opts.fields ?? { prompt: "prompt" };
  const conditioner = await pipe.conditioner();
  checkAborted(ctx.signal);
  const steps = opts.firstPass
    ? { steps: opts.firstPass.promptScheduleSteps, hiresSteps: sampler.promptScheduleSteps }
    : { steps: sampler.promptScheduleSteps };
  const settings = b.conditioning;
  const cond = await conditioner.prepare({
    prompt,
    negativePrompt,
    ...steps,
    // A1111's SDXL takes CLIP-L's penultimate layer whatever CLIP skip says (hidden_states[-2], which is
    // what clip skip 2 selects), unless sdxl_clip_l_skip hands it CLIP skip.
    clipSkip: pipe.model.pooledSize !== undefined && !settings.sdxlClipLSkip ? 2 : b.clipSkip,
    emphasis: settings.emphasis,
    useOldScheduling: settings.useOldScheduling,
    padCondUncond: settings.padCondUncond,
    padCondUncondV0: settings.padCondUncondV0,
    signal: ctx.signal,
  });
  recordConditioningInfotext(sampler, cond, negativePrompt, settings, steps, opts.firstPass ? "second" : "first");
  if (opts.firstPass === undefined && b.p.infotext.trim() !== "") {
    const pasted = parseInfotext(b.p.infotext).params;
    for (const w of pastedEmbeddingWarnings(pasted.get("TI hashes"), cond)) ctx.onWarning(w);
    const vae = pastedVaeWarning(pasted.get("VAE hash"), pipe.vae);
    if (vae !== undefined) ctx.onWarning(vae);
  }
  for (const u of cond.extraNetworks.unknown) ctx.onWarning(`unknown extra network tag ${u.raw} removed from the prompt`);
  checkPassPipeline(pipe, b.p, prompt, opts.firstPass !== undefined, fields.prompt);
  return cond;
}

/**
 * A pipeline is one checkpoint with one set of LoRAs merged into its weights, and the agent picks one
 * per pass (passPipelineKey): a Hires.fix second pass whose checkpoint or LoRAs differ from the first
 * pass's runs as a stage of its own, on its own pipeline. A second pass handed a pipeline that is not
 * its own fails here rather than render with the wrong weights. (A first pass runs on whatever
 * pipeline its caller chose: a library caller may render a prompt's tags on the base model.)
 */
function checkPassPipeline(pipe: LoadedPipeline, p: GenerationParams, prompt: string, secondPass: boolean, promptField: string): void {
  if (!secondPass) return;
  if (pipelineKey("", lorasOf(prompt, p.loras)) !== pipelineKey("", pipe.loras)) {
    const merged = pipe.loras.map((l) => l.name).join(", ") || "none";
    throw FarmError.unimplemented(
      promptField,
      `the second pass's LoRAs are not the ones merged into this pipeline (${merged}): it runs as a stage of its own, on a pipeline of its LoRAs`,
    );
  }
  const checkpoint = hiresCheckpoint(p);
  // A second pass that switched to its refiner carries on on the refiner's pipeline.
  const onRefiner = refinerInPass(p, "second") && pipe.name === refinerCheckpoint(p);
  if (checkpoint !== undefined && checkpoint !== pipe.name && !onRefiner) {
    throw FarmError.unimplemented(
      "hr_checkpoint_name",
      `the second pass runs on "${checkpoint}", not on this pipeline's "${pipe.name}": it runs as a stage of its own`,
    );
  }
}

/** Bad user images become INVALID_ARGUMENT naming the request field; anything else passes through. */
export function asFarmError(err: unknown): unknown {
  if (err instanceof ImageInputError) return new FarmError(grpc.status.INVALID_ARGUMENT, err.message, { cause: err });
  return err;
}

/** VAE decode with A1111's truncation to 8-bit RGB (HWC). */
export async function decodeToRgb(
  pipe: LoadedPipeline,
  latent: Float32Array,
  h: number,
  w: number,
  signal: AbortSignal,
): Promise<Uint8Array> {
  const scaled = new Float32Array(latent.length);
  for (let i = 0; i < latent.length; i++) scaled[i] = latent[i]! / pipe.model.config.scalingFactor;
  const image = await pipe.model.vaeDecode(scaled, h, w, signal);
  return toRgb8(image, w * 8, h * 8);
}

/** 8-bit RGB (HWC) → NCHW in [-1, 1] as A1111 feeds the VAE encoder: 2·(v/255) − 1 in float32. */
export function rgbToVaeInput(rgb: Uint8Array, width: number, height: number): Float32Array {
  const plane = width * height;
  if (rgb.length !== plane * 3) throw new RangeError(`expected ${plane * 3} bytes, got ${rgb.length}`);
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) out[c * plane + i] = Math.fround(2 * Math.fround(rgb[i * 3 + c]! / 255)) - 1;
  }
  return out;
}

/** Posterior mean × scaling factor (the latent samplers work on), with its latent size. */
export async function encodeRgb(
  pipe: LoadedPipeline,
  rgb: Uint8Array,
  width: number,
  height: number,
  signal: AbortSignal,
): Promise<{ latent: Float32Array; h: number; w: number }> {
  const { latent, h, w } = await pipe.model.vaeEncode(rgbToVaeInput(rgb, width, height), height, width, signal);
  const k = pipe.model.config.scalingFactor;
  const out = new Float32Array(latent.length);
  for (let i = 0; i < latent.length; i++) out[i] = Math.fround(latent[i]! * k);
  return { latent: out, h, w };
}

/** The infotext fields of any render; A1111's key order lives in buildInfotext. */
export type A1111InfotextFields = InfotextFields;

/**
 * buildInfotext for the img2img/hires paths: "Denoising strength" has its own slot there, so a
 * sampler's entry of that name is dropped from the extras.
 */
export function a1111Infotext(f: A1111InfotextFields): string {
  return buildInfotext({ ...f, extra: (f.extra ?? []).filter(([k]) => k !== "Denoising strength") });
}

/** A model as an infotext names it: a LoadedPipeline, or the first pass's as its hand-over carries it. */
export interface ModelIdentity {
  readonly name: string;
  readonly modelHash: string | undefined;
  readonly loraHashes: readonly string[];
  /** The VAE file it decoded with in place of the checkpoint's own. */
  readonly vae: VaeIdentity | undefined;
}

/** The hand-over's record of the model a pass ran on. */
export function passModel(model: ModelIdentity): PassModel {
  return create(PassModelSchema, {
    name: model.name,
    modelHash: model.modelHash ?? "",
    loraHashes: [...model.loraHashes],
    vaeName: model.vae?.name ?? "",
    vaeHash: model.vae?.hash ?? "",
  });
}

/** The first pass's model from its hand-over; `fallback` (this stage's own) for a hand-over without one. */
export function modelIdentity(passed: PassModel | undefined, fallback: ModelIdentity): ModelIdentity {
  if (passed === undefined || passed.name === "") return fallback;
  return {
    name: passed.name,
    modelHash: passed.modelHash || undefined,
    loraHashes: passed.loraHashes,
    vae: passed.vaeName === "" ? undefined : { name: passed.vaeName, hash: passed.vaeHash },
  };
}

/** The infotext fields every pass shares, from the request, the first pass's model and its sampler. */
export function baseInfotext(
  model: ModelIdentity,
  b: TaskBasics,
  sampler: PreparedSampling,
  size: { width: number; height: number },
): A1111InfotextFields {
  return {
    prompt: b.p.prompt,
    negativePrompt: b.p.negativePrompt,
    steps: b.steps,
    sampler: sampler.choice.sampler.name,
    scheduleType: String(sampler.infotext["Schedule type"] ?? "Automatic"),
    cfgScale: b.cfgScale,
    seed: b.seed,
    width: size.width,
    height: size.height,
    model: model.name,
    modelHash: model.modelHash,
    vae: model.vae,
    subseed: b.subseed,
    subseedStrength: b.p.subseedStrength,
    seedResizeFrom: { w: b.p.seedResizeFromW, h: b.p.seedResizeFromH },
    clipSkip: b.clipSkip,
    ensd: sampler.choice.sampler.usesEnsd && b.ensd !== 0 ? b.ensd : undefined,
    rng: b.rng,
    tiling: b.p.tiling,
    extra: [loraHashesEntry(model, b), ...samplerExtras(sampler)],
  };
}

/** A "Lora hashes" entry's LoRA name ("name: hash"). */
const loraOfEntry = (entry: string): string => entry.slice(0, Math.max(0, entry.lastIndexOf(": ")));

/**
 * A pipeline's LoRA hashes in the order `prompt` (then the request's `loras`) names the LoRAs, as A1111
 * lists its loaded networks; the pipeline keeps them in its key's order (by name). A name at weight 0,
 * which the pipeline did not merge, takes its entry from `unmerged`.
 */
export function loraHashesInPromptOrder(
  hashes: readonly string[],
  prompt: string,
  explicit: readonly LoraRef[],
  unmerged: ReadonlyMap<string, string> = new Map(),
): string[] {
  const byName = new Map(hashes.map((entry) => [loraOfEntry(entry), entry]));
  const ordered = new Map<string, string>();
  for (const name of [...lorasOf(prompt, explicit).map((l) => l.name), ...byName.keys()]) {
    const entry = byName.get(name) ?? unmerged.get(name);
    if (entry !== undefined && !ordered.has(name)) ordered.set(name, entry);
  }
  return [...ordered.values()];
}

/**
 * A1111 keeps one "Lora hashes" dict per image: a later pass's LoRAs are added to the earlier one's
 * (a name already there keeps its place and takes the new hash).
 */
export function mergeLoraHashes(first: readonly string[], second: readonly string[]): string[] {
  const byName = new Map<string, string>();
  for (const entry of [...first, ...second]) byName.set(loraOfEntry(entry), entry);
  return [...byName.values()];
}

/**
 * A1111 activates extra networks before it encodes prompts or sets the sampler up: its entry comes first.
 * Its names are the prompt's, with ":" and "," removed.
 */
export function loraHashesEntry(model: ModelIdentity, b: Pick<TaskBasics, "p" | "unmergedLoraHashes">): [string, InfotextValue] {
  const entries = loraHashesInPromptOrder(model.loraHashes, b.p.prompt, b.p.loras, b.unmergedLoraHashes).map(
    (entry) => `${hashListName(loraOfEntry(entry))}${entry.slice(loraOfEntry(entry).length)}`,
  );
  return ["Lora hashes", entries.length > 0 ? entries.join(", ") : undefined];
}

export function samplerExtras(sampler: PreparedSampling): Array<[string, InfotextValue]> {
  return Object.entries(sampler.infotext).filter(([k]) => k !== "Schedule type");
}

/** PNG with the infotext, as the task's Image. */
export async function finishImage(
  req: RunTaskRequest,
  ctx: RenderContext,
  rgb: Uint8Array,
  width: number,
  height: number,
  infotext: string,
): Promise<Image> {
  const png = await encodePng(rgb, width, height, infotext);
  if (png.length === 0) throw new FarmError(grpc.status.INTERNAL, "PNG encoding produced no bytes");
  return create(ImageSchema, {
    index: req.imageIndex,
    seed: req.seed,
    subseed: req.subseed,
    png,
    infotext,
    width,
    height,
    agentId: ctx.agentId,
  });
}
