// A job's A1111 sampler settings (GenerationParams.override_settings and s_min_uncond), checked the same
// way by the coordinator, at admission, and by the agent, which runs them.
import { FarmError } from "./errors.js";
import type { GenerationParams, OverrideSettings } from "./gen/latentfarm/v1/generation_pb.js";

export const UNI_PC_VARIANTS = ["bh1", "bh2", "vary_coeff"] as const;
export const UNI_PC_SKIP_TYPES = ["time_uniform", "time_quadratic", "logSNR"] as const;
export const NOISE_SCHEDULES = ["Default", "Zero Terminal SNR"] as const;
export const EMPHASIS_NAMES = ["Original", "No norm", "Ignore", "None"] as const;
export const LIVE_PREVIEW_CONTENTS = ["Prompt", "Negative prompt", "Combined"] as const;
export const HIRES_REFINER_PASSES = ["first pass", "second pass", "both passes"] as const;
export const FACE_RESTORATION_MODELS = ["CodeFormer", "GFPGAN"] as const;
/** A1111's slider maximum for uni_pc_order. */
export const MAX_UNI_PC_ORDER = 50;

export type UniPcVariantName = (typeof UNI_PC_VARIANTS)[number];
export type UniPcSkipTypeName = (typeof UNI_PC_SKIP_TYPES)[number];
export type NoiseScheduleName = (typeof NOISE_SCHEDULES)[number];
export type EmphasisName = (typeof EMPHASIS_NAMES)[number];
export type LivePreviewContent = (typeof LIVE_PREVIEW_CONTENTS)[number];
export type HiresRefinerPass = (typeof HIRES_REFINER_PASSES)[number];
export type FaceRestorationModel = (typeof FACE_RESTORATION_MODELS)[number];

/** The settings with their values checked: names known, numbers finite and in range. Absent stays absent. */
export interface CheckedOverrideSettings {
  etaAncestral?: number;
  etaDdim?: number;
  alwaysDiscardNextToLastSigma?: boolean;
  sigmaMin?: number;
  sigmaMax?: number;
  rho?: number;
  sgmNoiseMultiplier?: boolean;
  useOldKarrasSchedulerSigmas?: boolean;
  betaDistAlpha?: number;
  betaDistBeta?: number;
  uniPcVariant?: UniPcVariantName;
  uniPcSkipType?: UniPcSkipTypeName;
  uniPcOrder?: number;
  uniPcLowerOrderFinal?: boolean;
  img2imgExtraNoise?: number;
  img2imgFixSteps?: boolean;
  sMinUncond?: number;
  sMinUncondAll?: boolean;
  skipEarlyCond?: number;
  noiseSchedule?: NoiseScheduleName;
  useDowncastedAlphaBar?: boolean;
  emphasis?: EmphasisName;
  useOldScheduling?: boolean;
  padCondUncond?: boolean;
  padCondUncondV0?: boolean;
  livePreviewContent?: LivePreviewContent;
  sdxlClipLSkip?: boolean;
  sdxlCropTop?: number;
  sdxlCropLeft?: number;
  hiresFixRefinerPass?: HiresRefinerPass;
  refinerSwitchBySampleSteps?: boolean;
  sdxlRefinerLowAestheticScore?: number;
  sdxlRefinerHighAestheticScore?: number;
  faceRestorationModel?: FaceRestorationModel;
}

const FIELD = "override_settings";

function nonNegative(name: string, v: number | undefined, options: { positive?: boolean; max?: number } = {}): number | undefined {
  if (v === undefined) return undefined;
  const field = name === "s_min_uncond" ? name : `${FIELD}.${name}`;
  if (!Number.isFinite(v)) throw FarmError.invalid(field, `must be a finite number, got ${v}`);
  if (options.positive ? !(v > 0) : v < 0) throw FarmError.invalid(field, `must be ${options.positive ? "> 0" : "≥ 0"}, got ${v}`);
  if (options.max !== undefined && v > options.max) throw FarmError.invalid(field, `must be ≤ ${options.max}, got ${v}`);
  return v;
}

function oneOf<T extends string>(name: string, v: string, allowed: readonly T[]): T | undefined {
  if (v === "") return undefined;
  const found = allowed.find((a) => a === v);
  if (found === undefined) {
    throw FarmError.invalid(`${FIELD}.${name}`, `must be one of ${allowed.map((a) => `"${a}"`).join(", ")}, got "${v}"`);
  }
  return found;
}

/** sd_vae values that name no file: A1111's Automatic ('' in a request; "auto" from old configs) and None. */
const VAE_CHOICES = new Set(["", "Automatic", "auto", "None"]);

/** The VAE file a job's sd_vae names, or undefined for Automatic and None (which any agent can honour). */
export function namedVae(sdVae: string | undefined): string | undefined {
  return sdVae === undefined || VAE_CHOICES.has(sdVae) ? undefined : sdVae;
}

/**
 * sd_vae names a file of an agent's VAE list by its file name alone ("Automatic" and "None" aside): a path
 * would reach outside the folders the agents list.
 */
function checkVaeName(v: string): void {
  const field = `${FIELD}.sd_vae`;
  if (v.length > 255) throw FarmError.invalid(field, `must be a VAE file name of at most 255 characters, got ${v.length}`);
  if (/[/\\\0]/.test(v) || v === "." || v === "..") {
    throw FarmError.invalid(field, `"${v}" is not a VAE name: give the file's name as ListVaes lists it, without a folder`);
  }
}

/** Checks the job's sampler settings, naming the first bad field (INVALID_ARGUMENT). */
export function checkOverrideSettings(p: Pick<GenerationParams, "sMinUncond" | "overrideSettings">): CheckedOverrideSettings {
  const s: Partial<OverrideSettings> = p.overrideSettings ?? {};
  const out: CheckedOverrideSettings = {};
  const put = <K extends keyof CheckedOverrideSettings>(k: K, v: CheckedOverrideSettings[K] | undefined): void => {
    if (v !== undefined) out[k] = v;
  };
  put("etaAncestral", nonNegative("eta_ancestral", s.etaAncestral));
  put("etaDdim", nonNegative("eta_ddim", s.etaDdim));
  put("alwaysDiscardNextToLastSigma", s.alwaysDiscardNextToLastSigma);
  put("sigmaMin", nonNegative("sigma_min", s.sigmaMin));
  put("sigmaMax", nonNegative("sigma_max", s.sigmaMax));
  if (out.sigmaMin && out.sigmaMax && out.sigmaMin >= out.sigmaMax) {
    throw FarmError.invalid(`${FIELD}.sigma_min`, `must be below sigma_max (${out.sigmaMax}), got ${out.sigmaMin}`);
  }
  put("rho", nonNegative("rho", s.rho));
  put("sgmNoiseMultiplier", s.sgmNoiseMultiplier);
  put("useOldKarrasSchedulerSigmas", s.useOldKarrasSchedulerSigmas);
  put("betaDistAlpha", nonNegative("beta_dist_alpha", s.betaDistAlpha, { positive: true }));
  put("betaDistBeta", nonNegative("beta_dist_beta", s.betaDistBeta, { positive: true }));
  put("uniPcVariant", oneOf("uni_pc_variant", s.uniPcVariant ?? "", UNI_PC_VARIANTS));
  put("uniPcSkipType", oneOf("uni_pc_skip_type", s.uniPcSkipType ?? "", UNI_PC_SKIP_TYPES));
  if (s.uniPcOrder !== undefined && !(Number.isInteger(s.uniPcOrder) && s.uniPcOrder >= 1 && s.uniPcOrder <= MAX_UNI_PC_ORDER)) {
    throw FarmError.invalid(`${FIELD}.uni_pc_order`, `must be an integer in [1, ${MAX_UNI_PC_ORDER}], got ${s.uniPcOrder}`);
  }
  put("uniPcOrder", s.uniPcOrder);
  put("uniPcLowerOrderFinal", s.uniPcLowerOrderFinal);
  put("img2imgExtraNoise", nonNegative("img2img_extra_noise", s.img2imgExtraNoise));
  put("img2imgFixSteps", s.img2imgFixSteps);
  put("sMinUncond", nonNegative("s_min_uncond", p.sMinUncond));
  put("sMinUncondAll", s.sMinUncondAll);
  put("skipEarlyCond", nonNegative("skip_early_cond", s.skipEarlyCond, { max: 1 }));
  put("noiseSchedule", oneOf("sd_noise_schedule", s.sdNoiseSchedule ?? "", NOISE_SCHEDULES));
  put("useDowncastedAlphaBar", s.useDowncastedAlphaBar);
  put("emphasis", oneOf("emphasis", s.emphasis ?? "", EMPHASIS_NAMES));
  put("useOldScheduling", s.useOldScheduling);
  put("padCondUncond", s.padCondUncond);
  put("padCondUncondV0", s.padCondUncondV0);
  put("livePreviewContent", oneOf("live_preview_content", s.livePreviewContent ?? "", LIVE_PREVIEW_CONTENTS));
  put("sdxlClipLSkip", s.sdxlClipLSkip);
  for (const [key, name] of [
    ["sdxlCropTop", "sdxl_crop_top"],
    ["sdxlCropLeft", "sdxl_crop_left"],
  ] as const) {
    const v = s[key];
    if (v !== undefined && !(Number.isInteger(v) && v >= 0)) {
      throw FarmError.invalid(`${FIELD}.${name}`, `must be a whole number of pixels ≥ 0, got ${v}`);
    }
    put(key, v);
  }
  put("hiresFixRefinerPass", oneOf("hires_fix_refiner_pass", s.hiresFixRefinerPass ?? "", HIRES_REFINER_PASSES));
  put("refinerSwitchBySampleSteps", s.refinerSwitchBySampleSteps);
  for (const [key, name] of [
    ["sdxlRefinerLowAestheticScore", "sdxl_refiner_low_aesthetic_score"],
    ["sdxlRefinerHighAestheticScore", "sdxl_refiner_high_aesthetic_score"],
  ] as const) {
    const v = s[key];
    // A1111 takes any number here; only one the UNet's sinusoidal embedding cannot take is refused.
    if (v !== undefined && !Number.isFinite(v)) throw FarmError.invalid(`${FIELD}.${name}`, `must be a finite number, got ${v}`);
    put(key, v);
  }
  put("faceRestorationModel", oneOf("face_restoration_model", s.faceRestorationModel ?? "", FACE_RESTORATION_MODELS));
  checkVaeName(s.sdVae ?? "");
  if (out.useDowncastedAlphaBar && out.noiseSchedule === "Zero Terminal SNR") {
    // ᾱ's last value, 4.9e-8, is 6e-8 in float16, and its σ overflows float16: A1111 renders NaN.
    throw FarmError.invalid(
      `${FIELD}.use_downcasted_alpha_bar`,
      'cannot be combined with sd_noise_schedule "Zero Terminal SNR" (its last σ overflows float16)',
    );
  }
  return out;
}
