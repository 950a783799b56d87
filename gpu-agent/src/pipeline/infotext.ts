// A1111's infotext ("parameters" PNG chunk): prompt, negative prompt, then "Key: value" pairs in
// A1111's key order (behaviour spec §7), so A1111's "PNG Info" and civitai parse it back.

import type { CondPadding } from "../conditioning/index.js";
import type { VaeIdentity } from "../models/vae-files.js";

export const FARM_VERSION = "latentfarm-0.1.0";

/** The infotext keys a pass's prompt encoding may add, in the order A1111 adds them. */
export const CONDITIONING_INFOTEXT_KEYS = ["Old prompt editing timelines", "TI hashes", "Emphasis"] as const;

/** The infotext keys a pass writes once its sampling is over (CondPadding: the padding options). */
export const AFTER_SAMPLING_INFOTEXT_KEYS = ["Pad conds", "Pad conds v0"] as const satisfies readonly CondPadding[];

export type InfotextValue = string | number | boolean | undefined | null;

/** Python str() of a float the way A1111 prints it: integers as "7", others shortest repr. */
export function pyNumber(v: number): string {
  if (Number.isInteger(v)) return String(v);
  return String(v);
}

/** A name in A1111's "Lora hashes" and "TI hashes" lists ("name: hash, …"): without ':' and ','. */
export function hashListName(name: string): string {
  return name.replace(/[:,]/g, "");
}

/** A1111's quote(): JSON-encode values containing ',', '\n' or ':'. */
export function quote(v: string): string {
  if (!/[,\n:]/.test(v)) return v;
  return JSON.stringify(v);
}

export function formatInfotext(prompt: string, negativePrompt: string, params: Array<[string, InfotextValue]>): string {
  const parts: string[] = [];
  for (const [k, v] of params) {
    if (v === undefined || v === null) continue;
    const s = typeof v === "number" ? pyNumber(v) : typeof v === "boolean" ? (v ? "True" : "False") : v;
    parts.push(s === k ? k : `${k}: ${quote(s)}`);
  }
  const neg = negativePrompt ? `\nNegative prompt: ${negativePrompt}` : "";
  return `${prompt}${neg}\n${parts.join(", ")}`.trim();
}

export interface InfotextFields {
  prompt: string;
  negativePrompt: string;
  steps: number;
  sampler: string;
  /** The schedule label actually used (e.g. "Karras"), or "Automatic" when the sampler's default applied. */
  scheduleType: string;
  cfgScale: number;
  seed: number;
  width: number;
  height: number;
  modelHash?: string | undefined;
  model: string;
  /** A VAE file that replaced the checkpoint's own: "VAE hash" (10 hex) and "VAE" (its file name). */
  vae?: VaeIdentity | undefined;
  subseed?: number | undefined;
  subseedStrength?: number | undefined;
  seedResizeFrom?: { w: number; h: number } | undefined;
  clipSkip?: number | undefined;
  ensd?: number | undefined;
  rng?: "CPU" | "GPU" | "NV" | undefined;
  /** A1111's Tiling (circular convolutions): "Tiling: True" after RNG. */
  tiling?: boolean | undefined;
  /** "Face restoration" slot (after Seed). */
  faceRestoration?: string | undefined;
  /** "Denoising strength" slot (after Seed resize from). */
  denoisingStrength?: number | undefined;
  /** "Conditional mask weight" slot (inpainting UNets, after Denoising strength). */
  conditionalMaskWeight?: InfotextValue;
  extra?: Array<[string, InfotextValue]>;
}

/** A1111's create_infotext key order, including the img2img and face-restoration slots. */
export function buildInfotext(f: InfotextFields): string {
  const variation = f.subseedStrength !== undefined && f.subseedStrength !== 0;
  const params: Array<[string, InfotextValue]> = [
    ["Steps", f.steps],
    ["Sampler", f.sampler],
    ["Schedule type", f.scheduleType],
    ["CFG scale", f.cfgScale],
    ["Seed", f.seed],
    ["Face restoration", f.faceRestoration],
    ["Size", `${f.width}x${f.height}`],
    ["Model hash", f.modelHash],
    ["Model", f.model],
    ["VAE hash", f.vae?.hash],
    ["VAE", f.vae?.name],
    ["Variation seed", variation ? f.subseed : undefined],
    ["Variation seed strength", variation ? f.subseedStrength : undefined],
    [
      "Seed resize from",
      f.seedResizeFrom && f.seedResizeFrom.w > 0 && f.seedResizeFrom.h > 0 ? `${f.seedResizeFrom.w}x${f.seedResizeFrom.h}` : undefined,
    ],
    ["Denoising strength", f.denoisingStrength],
    ["Conditional mask weight", f.conditionalMaskWeight],
    ["Clip skip", f.clipSkip !== undefined && f.clipSkip > 1 ? f.clipSkip : undefined],
    ["ENSD", f.ensd ? f.ensd : undefined],
    ["RNG", f.rng && f.rng !== "GPU" ? f.rng : undefined],
    ["Tiling", f.tiling ? "True" : undefined],
    ...(f.extra ?? []),
    ["Version", FARM_VERSION],
  ];
  return formatInfotext(f.prompt, f.negativePrompt, params);
}
