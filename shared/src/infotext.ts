// A1111's infotext read back into a job: the "parameters" text of its PNGs (what civitai shows as
// generation data), parsed as A1111's parse_generation_parameters does and applied as its API applies a
// request's `infotext`: each value fills the field or setting it names when the request leaves that unset.
import { create, isFieldSet } from "@bufbuild/protobuf";
import { FarmError } from "./errors.js";
import { SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER } from "./hires-passes.js";
import {
  InpaintingFill,
  GenerationParamsSchema,
  OverrideSettingsSchema,
  RngSource,
  type GenerationParams,
  type OverrideSettings,
} from "./gen/latentfarm/v1/generation_pb.js";

export interface ParsedInfotext {
  prompt: string;
  negativePrompt: string;
  /** "Key: value" entries of the parameter line, unquoted; `WxH` values as `Key-1` and `Key-2`. */
  params: Map<string, string>;
}

// A1111's re_param: a key of word characters, spaces, '-' and '/', then a JSON-quoted or comma-free value.
const PARAM = /\s*([\p{L}\p{N}_][\p{L}\p{N}_ \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/gu;
const IMAGE_SIZE = /^(\d+)x(\d+)$/;

function unquote(v: string): string {
  if (v.length < 2 || !v.startsWith('"') || !v.endsWith('"')) return v;
  try {
    const parsed: unknown = JSON.parse(v);
    return typeof parsed === "string" ? parsed : v;
  } catch {
    return v;
  }
}

/** parse_generation_parameters: the last line holds the parameters when it has at least three entries. */
export function parseInfotext(text: string): ParsedInfotext {
  const lines = text.trim().split("\n");
  let last = lines.pop() ?? "";
  if ([...last.matchAll(PARAM)].length < 3) {
    lines.push(last);
    last = "";
  }
  let prompt = "";
  let negativePrompt = "";
  let negative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) {
      negative = true;
      line = line.slice("Negative prompt:".length).trim();
    }
    if (negative) negativePrompt += (negativePrompt === "" ? "" : "\n") + line;
    else prompt += (prompt === "" ? "" : "\n") + line;
  }
  const params = new Map<string, string>();
  for (const [, key, raw] of last.matchAll(PARAM)) {
    const value = unquote(raw!);
    const size = IMAGE_SIZE.exec(value);
    if (size) {
      params.set(`${key}-1`, size[1]!);
      params.set(`${key}-2`, size[2]!);
    } else {
      params.set(key!, value);
    }
  }
  return { prompt, negativePrompt, params };
}

/** An A1111 version as [major, minor, patch, commits past the tag]; undefined for other writers (latentfarm's own). */
function parseVersion(v: string | undefined): [number, number, number, number] | undefined {
  const m = v === undefined ? null : /^v?(\d+)\.(\d+)\.(\d+)(?:-(\d+)|-(?:rc|RC|pre))?/.exec(v);
  // A release candidate ("1.6.0-RC-28-g…") comes before its release.
  const after = m?.[4] !== undefined ? Number(m[4]) : m?.[0].includes("-") ? -1 : 0;
  return m ? [Number(m[1]), Number(m[2]), Number(m[3]), after] : undefined;
}

function versionBelow(v: [number, number, number, number], than: [number, number, number, number]): boolean {
  for (let i = 0; i < 4; i++) if (v[i] !== than[i]) return v[i]! < than[i]!;
  return false;
}

// Written by A1111 for information only, or handled with another key.
// "TI hashes": the prompt names its embeddings; the agent that encodes it compares the hashes with its files.
// "VAE hash": the agent that loads the VAE the "VAE" entry names compares it with its file's.
const INFORMATIONAL = new Set(["Model hash", "VAE hash", "Lora hashes", "TI hashes", "Version", "User", "Hashes"]);

/** Defaults A1111's parser fills in or writes that change nothing here. */
const NEUTRAL: Record<string, string> = {
  "VAE Encoder": "Full",
  "VAE Decoder": "Full",
  "FP8 weight": "Disable",
  "Token merging ratio": "0",
  "Token merging ratio hr": "0",
};

/** Infotext keys of A1111 options, with the OverrideSettings field each sets. */
const SETTINGS: Record<string, [keyof typeof OverrideSettingsSchema.field, Kind]> = {
  Eta: ["etaAncestral", "num"],
  "Eta DDIM": ["etaDdim", "num"],
  "Discard penultimate sigma": ["alwaysDiscardNextToLastSigma", "bool"],
  "Schedule min sigma": ["sigmaMin", "num"],
  "Schedule max sigma": ["sigmaMax", "num"],
  "Schedule rho": ["rho", "num"],
  "SGM noise multiplier": ["sgmNoiseMultiplier", "bool"],
  "Beta schedule alpha": ["betaDistAlpha", "num"],
  "Beta schedule beta": ["betaDistBeta", "num"],
  "UniPC variant": ["uniPcVariant", "str"],
  "UniPC skip type": ["uniPcSkipType", "str"],
  "UniPC order": ["uniPcOrder", "int"],
  "UniPC lower order final": ["uniPcLowerOrderFinal", "bool"],
  "Extra noise": ["img2imgExtraNoise", "num"],
  "Skip Early CFG": ["skipEarlyCond", "num"],
  "NGMS all steps": ["sMinUncondAll", "bool"],
  "Noise Schedule": ["sdNoiseSchedule", "str"],
  "Downcast alphas_cumprod": ["useDowncastedAlphaBar", "bool"],
  Emphasis: ["emphasis", "str"],
  VAE: ["sdVae", "str"],
  "Old prompt editing timelines": ["useOldScheduling", "bool"],
  "Pad conds": ["padCondUncond", "bool"],
  "Pad conds v0": ["padCondUncondV0", "bool"],
  "Hires refiner": ["hiresFixRefinerPass", "str"],
  "Refiner switch by sampling steps": ["refinerSwitchBySampleSteps", "bool"],
};

type Kind = "int" | "num" | "big" | "str" | "bool";
type ParamsField = keyof typeof GenerationParamsSchema.field;
/** Infotext keys that fill a GenerationParams field of the same meaning. */
const FIELDS: ReadonlyArray<readonly [string, ParamsField, Kind]> = [
  ["Steps", "steps", "int"],
  ["Sampler", "samplerName", "str"],
  ["Schedule type", "scheduler", "str"],
  ["CFG scale", "cfgScale", "num"],
  ["Seed", "seed", "big"],
  ["Tiling", "tiling", "bool"],
  ["Size-1", "width", "int"],
  ["Size-2", "height", "int"],
  ["Model", "model", "str"],
  ["Variation seed", "subseed", "big"],
  ["Variation seed strength", "subseedStrength", "num"],
  ["Seed resize from-1", "seedResizeFromW", "int"],
  ["Seed resize from-2", "seedResizeFromH", "int"],
  ["Denoising strength", "denoisingStrength", "num"],
  ["Clip skip", "clipSkip", "int"],
  ["ENSD", "etaNoiseSeedDelta", "big"],
  ["Sigma churn", "sChurn", "num"],
  ["Sigma tmin", "sTmin", "num"],
  ["Sigma tmax", "sTmax", "num"],
  ["Sigma noise", "sNoise", "num"],
  ["NGMS", "sMinUncond", "num"],
  ["Noise multiplier", "initialNoiseMultiplier", "num"],
  ["Conditional mask weight", "inpaintingMaskWeight", "num"],
];

const HIRES_FIELDS: ReadonlyArray<readonly [string, ParamsField, Kind]> = [
  ["Hires upscale", "hrScale", "num"],
  ["Hires upscaler", "hrUpscaler", "str"],
  ["Hires steps", "hrSecondPassSteps", "int"],
  ["Hires resize-1", "hrResizeX", "int"],
  ["Hires resize-2", "hrResizeY", "int"],
  ["Hires sampler", "hrSamplerName", "str"],
  ["Hires schedule type", "hrScheduler", "str"],
  ["Hires prompt", "hrPrompt", "str"],
  ["Hires negative prompt", "hrNegativePrompt", "str"],
  ["Hires checkpoint", "hrCheckpointName", "str"],
];

const FILLS: Record<string, InpaintingFill> = {
  fill: InpaintingFill.FILL,
  original: InpaintingFill.ORIGINAL,
  "latent noise": InpaintingFill.LATENT_NOISE,
  "latent nothing": InpaintingFill.LATENT_NOTHING,
};

export interface AppliedInfotext {
  /** What the infotext asked for that the farm does not do, or keys it does not know: for the job's warnings. */
  notReproduced: string[];
  /**
   * A1111's hashes (AutoV2, lower case) of the checkpoints the infotext named where it filled the field:
   * "Model hash" for `model`, the "[hash]" of "Hires checkpoint: name [hash]" for `hr_checkpoint_name`
   * and of "Refiner: name [hash]" for `refiner_checkpoint`. A1111 finds a pasted checkpoint by them, so
   * the farm's names of the same weights can be found too.
   */
  checkpointHashes: { model?: string; hiresCheckpoint?: string; refiner?: string };
}

const AUTO_V2 = /^[0-9a-f]{10}$/i;

/**
 * Applies `p.infotext` to the request, as A1111's API does: each entry fills the field it names when the
 * request leaves that field unset (empty, zero or absent), so the request's own values win. A value that
 * does not parse is INVALID_ARGUMENT naming `infotext` and the key.
 */
export function applyInfotext(p: GenerationParams): AppliedInfotext {
  const notReproduced: string[] = [];
  const checkpointHashes: AppliedInfotext["checkpointHashes"] = {};
  if (p.infotext.trim() === "") return { notReproduced, checkpointHashes };
  const { prompt, negativePrompt, params } = parseInfotext(p.infotext);
  const modelHash = params.get("Model hash");
  if (p.model === "" && modelHash !== undefined && AUTO_V2.test(modelHash)) checkpointHashes.model = modelHash.toLowerCase();
  const bad = (key: string, value: string, why: string): FarmError => FarmError.invalid("infotext", `"${key}: ${value}" ${why}`);
  const num = (key: string): number | undefined => {
    const v = params.get(key);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (v.trim() === "" || !Number.isFinite(n)) throw bad(key, v, "is not a number");
    return n;
  };
  const int = (key: string): number | undefined => {
    const n = num(key);
    if (n !== undefined && !Number.isInteger(n)) throw bad(key, params.get(key)!, "is not an integer");
    return n;
  };
  const big = (key: string): bigint | undefined => {
    const v = params.get(key);
    if (v === undefined) return undefined;
    if (!/^-?\d+$/.test(v.trim())) throw bad(key, v, "is not an integer");
    return BigInt(v.trim());
  };
  const bool = (key: string): boolean | undefined => {
    const v = params.get(key);
    if (v === undefined) return undefined;
    if (v === "True" || v === "true") return true;
    if (v === "False" || v === "false") return false;
    throw bad(key, v, "is not True or False");
  };
  const str = (key: string): string | undefined => params.get(key);
  const used = new Set<string>();
  const take = <T>(key: string, read: (k: string) => T | undefined): T | undefined => {
    used.add(key);
    return read(key);
  };

  if (p.prompt === "") p.prompt = prompt;
  if (p.negativePrompt === "") p.negativePrompt = negativePrompt;
  const readers: Record<Kind, (key: string) => unknown> = { int, num, big, str, bool };
  // A field counts as set as protobuf-es sees it: present for optional fields, non-zero for the others.
  const fillFields = (fields: ReadonlyArray<readonly [string, ParamsField, Kind]>): void => {
    for (const [key, field, kind] of fields) {
      const value = take(key, readers[kind]);
      if (value !== undefined && !isFieldSet(p, GenerationParamsSchema.field[field])) {
        (p as unknown as Record<string, unknown>)[field] = value;
      }
    }
  };
  // Sampler and Schedule type are independent fields, as in A1111 (an old combined name such as
  // "DPM++ 2M Karras" is split when the sampler is resolved).
  fillFields(FIELDS);
  const sampler = params.get("Sampler");
  const rng = take("RNG", str);
  if (p.rng === RngSource.UNSPECIFIED && rng !== undefined) {
    const source = ({ GPU: RngSource.GPU, CPU: RngSource.CPU, NV: RngSource.NV } as Record<string, RngSource>)[rng];
    if (source === undefined) throw bad("RNG", rng, "is not CPU, GPU or NV");
    p.rng = source;
  }
  const faces = take("Face restoration", str);
  if (faces !== undefined) {
    p.restoreFaces = true;
    // The entry is also A1111's face_restoration_model setting, unless the request's override_settings chose one.
    const chosen = (p.overrideSettings ??= create(OverrideSettingsSchema));
    if (faces === "GFPGAN" || faces === "CodeFormer") {
      if (chosen.faceRestorationModel === "") chosen.faceRestorationModel = faces;
    } else {
      notReproduced.push(`Face restoration: ${faces} (restored with ${chosen.faceRestorationModel || "CodeFormer"})`);
    }
  }

  // Hires.fix, as A1111's paste does: enable_hr when the text has a denoising strength and a hires entry.
  const hires = params.has("Denoising strength") && ["Hires upscale", "Hires upscaler", "Hires resize-1"].some((k) => params.has(k));
  const hiresApplies = hires && p.initImages.length === 0;
  if (hiresApplies) {
    p.enableHr = true;
    // "Use same sampler" / "Use same scheduler" are A1111's names for an empty field.
    for (const [key, same] of [
      ["Hires sampler", SAME_SAMPLER],
      ["Hires schedule type", SAME_SCHEDULER],
      ["Hires checkpoint", SAME_CHECKPOINT],
    ] as const) {
      if (params.get(key) === same) params.delete(key);
    }
    // A1111 writes the checkpoint's short title, "name [hash]": the name fills the field, the hash is kept.
    const checkpoint = params.get("Hires checkpoint");
    const hrAsked = p.hrCheckpointName;
    if (checkpoint !== undefined) params.set("Hires checkpoint", checkpoint.replace(/ \[[0-9a-f]{8,10}\]$/, ""));
    fillFields(HIRES_FIELDS);
    const hash = / \[([0-9a-f]{10})\]$/i.exec(checkpoint ?? "")?.[1];
    if (hrAsked === "" && p.hrCheckpointName !== "" && hash !== undefined) checkpointHashes.hiresCheckpoint = hash.toLowerCase();
  }

  // The refiner, named by its short title as "Hires checkpoint" is.
  const refiner = take("Refiner", str);
  if (refiner !== undefined && p.refinerCheckpoint === "") {
    p.refinerCheckpoint = refiner.replace(/ \[[0-9a-f]{8,10}\]$/, "");
    const hash = / \[([0-9a-f]{10})\]$/i.exec(refiner)?.[1];
    if (hash !== undefined) checkpointHashes.refiner = hash.toLowerCase();
  }
  fillFields([["Refiner switch at", "refinerSwitchAt", "num"]]);

  // Inpainting entries, for an img2img request with a mask.
  if (p.mask.length > 0) {
    const blur = take("Mask blur", int);
    if (p.maskBlur === undefined && p.maskBlurX === undefined && p.maskBlurY === undefined && blur !== undefined) p.maskBlur = blur;
    const fill = take("Masked content", str);
    if (p.inpaintingFill === InpaintingFill.FILL && fill !== undefined) {
      const f = FILLS[fill];
      if (f === undefined) throw bad("Masked content", fill, `is not one of ${Object.keys(FILLS).join(", ")}`);
      p.inpaintingFill = f;
    }
    const area = take("Inpaint area", str);
    if (p.inpaintFullRes === undefined && area !== undefined) {
      if (area !== "Only masked" && area !== "Whole picture") throw bad("Inpaint area", area, 'is not "Only masked" or "Whole picture"');
      p.inpaintFullRes = area === "Only masked";
    }
    fillFields([["Masked area padding", "inpaintFullResPadding", "int"]]);
  }

  // Behaviours of older A1111 versions that their infotexts imply (infotext_versions.backcompat).
  const version = parseVersion(params.get("Version"));
  if (version !== undefined) {
    if (versionBelow(version, [1, 6, 0, 0]) && prompt.includes("[") && !params.has("Old prompt editing timelines")) {
      params.set("Old prompt editing timelines", "True");
    }
    if (versionBelow(version, [1, 6, 0, 0]) && (sampler === "DDIM" || sampler === "PLMS") && !params.has("Pad conds v0")) {
      params.set("Pad conds v0", "True");
    }
    // A1111's own paste turns these into its options.
    if (versionBelow(version, [1, 7, 0, 225]) && !params.has("Downcast alphas_cumprod")) params.set("Downcast alphas_cumprod", "True");
    // Before 1.6 UniPC was a sampler of its own, which took log ᾱ in float32 of the float16 ᾱ; the farm runs
    // 1.6's (log ᾱ a float16 op), so such an image's UniPC steps can differ in their last bits.
    if (versionBelow(version, [1, 6, 0, 0]) && sampler === "UniPC") {
      notReproduced.push(`Version: ${params.get("Version")} (UniPC as A1111 before 1.6 ran it; rendered as 1.6 runs it)`);
    }
    // Before 1.8.0 the refiner switched by sampling steps.
    if (versionBelow(version, [1, 8, 0, 0]) && refiner !== undefined && !params.has("Refiner switch by sampling steps")) {
      params.set("Refiner switch by sampling steps", "True");
    }
  }
  // A1111's options that the text sets, unless the request's override_settings sets them.
  const settings: OverrideSettings = p.overrideSettings ?? create(OverrideSettingsSchema);
  for (const [key, [field, kind]] of Object.entries(SETTINGS)) {
    const value = take(key, readers[kind]);
    if (value !== undefined && !isFieldSet(settings, OverrideSettingsSchema.field[field])) {
      (settings as unknown as Record<string, unknown>)[field] = value;
    }
  }
  p.overrideSettings = settings;

  for (const [key, value] of params) {
    if (used.has(key) || INFORMATIONAL.has(key) || NEUTRAL[key] === value) continue;
    // Entries that do not apply to this kind of request (Mask blur without a mask, say).
    if (!hiresApplies && key.startsWith("Hires ")) continue;
    if (p.mask.length === 0 && ["Mask blur", "Masked content", "Inpaint area", "Masked area padding"].includes(key)) continue;
    notReproduced.push(`${key}: ${value}`);
  }
  return { notReproduced, checkpointHashes };
}
