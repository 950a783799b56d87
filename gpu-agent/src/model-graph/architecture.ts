// Which Stable Diffusion a checkpoint is, read from its keys and shapes.

import { status } from "@grpc/grpc-js";
import { ModelFileError } from "./errors.js";
import { detectTextEncoderConfig } from "./clip.js";
import type { TextEncoderConfig } from "./clip.js";
import { REFINER_TIME_IDS, TIME_IDS, TIME_ID_EMBED_DIM, detectUNetConfig } from "./unet.js";
import type { HeadsHint, UNetConfig } from "./unet.js";
import { detectVaeConfig } from "./vae.js";
import type { VaeConfig } from "./vae.js";
import type { WeightSource } from "./weights.js";

export type ModelFamily = "sd1" | "sd2" | "sdxl" | "sdxl-refiner";
export type PredictionType = "epsilon" | "v_prediction";

/** What cannot be read off the weights: head counts of non-standard (tiny) models, v-prediction. */
export interface ArchitectureHints {
  /** UNet heads per attention (SD1 default 8). */
  readonly unetHeads?: number;
  /** UNet head width (SD2 and SDXL default 64). Takes precedence over unetHeads. */
  readonly unetHeadDim?: number;
  /** Text-encoder heads (default hidden / 64). */
  readonly textHeads?: number;
  /** Heads of SDXL's second text encoder, OpenCLIP-G (default hidden / 64). */
  readonly text2Heads?: number;
  /** Default epsilon; SD2-768 models are v_prediction (A1111 reads this from a .yaml next to the file). */
  readonly prediction?: PredictionType;
}

interface ArchitectureCommon {
  readonly prediction: PredictionType;
  /** UNet with 9 input channels (4 latent + 4 masked-image latent + 1 mask). */
  readonly inpainting: boolean;
  readonly unet: UNetConfig;
  readonly vae: VaeConfig;
}

/** SD1, SD2 and SDXL base: a first text encoder always, SDXL's second one besides it. */
export interface SdArchitecture extends ArchitectureCommon {
  readonly family: "sd1" | "sd2" | "sdxl";
  /** SDXL's CLIP-L; SD1's CLIP or SD2's OpenCLIP-H. */
  readonly textEncoder: TextEncoderConfig;
  /** SDXL's OpenCLIP-G, whose pooled projection (text_embeds) conditions the UNet besides its hidden states. */
  readonly textEncoder2?: TextEncoderConfig;
}

/**
 * SDXL refiner: OpenCLIP-G is its only text encoder. It is kept as `textEncoder2` because it plays exactly
 * the base's second encoder's part (penultimate hidden states as context, pooled projection as text_embeds)
 * and diffusers names it text_encoder_2 in the refiner too; there is no `textEncoder` (no CLIP-L), and the
 * UNet's time_ids carry an aesthetic score in place of the target size (`unet.timeIds` = 5).
 */
export interface SdxlRefinerArchitecture extends ArchitectureCommon {
  readonly family: "sdxl-refiner";
  /** Never set; declared so that `arch.textEncoder` can be read (as undefined) on any Architecture. */
  readonly textEncoder?: undefined;
  readonly textEncoder2: TextEncoderConfig;
}

export type Architecture = SdArchitecture | SdxlRefinerArchitecture;

/** SDXL base keeps CLIP-L under embedder 0 (HF layout) and OpenCLIP-G under embedder 1. */
const SDXL_TEXT_PREFIXES = ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.0.transformer."];
const SDXL_TEXT2_PREFIXES = ["conditioner.embedders.1.model."];
/** The refiner's OpenCLIP-G is embedder 0; embedders 1-3 (sizes, crop, aesthetic score) have no weights. */
const REFINER_TEXT_PREFIXES = ["conditioner.embedders.0.model."];

/** SDXL's latent scale (sgm's scale_factor); SD1/SD2 use 0.18215. */
export const SDXL_SCALING_FACTOR = 0.13025;

export function detectArchitecture(w: WeightSource, hints: ArchitectureHints = {}): Architecture {
  const keys = [...w.keys()];
  const sdxl = keys.some((k) => k.startsWith("conditioner.embedders."));
  if (!keys.some((k) => k.startsWith("model.diffusion_model."))) {
    const hint = keys.some((k) => k.startsWith("lora_") || k.includes(".lora_down.") || k.includes(".hada_w1_a"))
      ? " (this looks like a LoRA, not a checkpoint)"
      : "";
    throw ModelFileError.invalidFile(
      w.label,
      `no model.diffusion_model.* tensors: not an SD checkpoint in the original (LDM) layout${hint}`,
    );
  }
  // The refiner conditions on OpenCLIP-G alone: its embedder 0 is an OpenCLIP `model.`, not CLIP-L's `transformer.`.
  if (sdxl && !keys.some((k) => k.startsWith("conditioner.embedders.0.transformer."))) return detectSdxlRefiner(w, hints);
  if (sdxl) return detectSdxl(w, hints);
  const textEncoder = detectTextEncoderConfig(w, hints.textHeads === undefined ? {} : { heads: hints.textHeads });
  const sd2 = textEncoder.layout === "open-clip";
  const unet = detectUNetConfig(w, headsHint(hints, sd2 ? { headDim: 64 } : { heads: 8 }));
  if (unet.admInChannels !== 0) {
    // SD2 unCLIP's label_emb takes image embeddings, which nothing here supplies.
    throw new ModelFileError(status.UNIMPLEMENTED, w.label, "class-conditioned (label_emb) SD1/SD2 UNets such as unCLIP are not supported");
  }
  if (unet.contextDim !== 0 && unet.contextDim !== textEncoder.hidden) {
    throw ModelFileError.invalidFile(
      w.label,
      `UNet cross-attention expects width ${unet.contextDim} but the text encoder produces ${textEncoder.hidden}`,
    );
  }
  return {
    family: sd2 ? "sd2" : "sd1",
    prediction: hints.prediction ?? "epsilon",
    inpainting: unet.inChannels === 9,
    unet,
    textEncoder,
    vae: detectVaeConfig(w),
  };
}

function headsHint(hints: ArchitectureHints, fallback: HeadsHint): HeadsHint {
  if (hints.unetHeadDim !== undefined) return { headDim: hints.unetHeadDim };
  if (hints.unetHeads !== undefined) return { heads: hints.unetHeads };
  return fallback;
}

function detectSdxl(w: WeightSource, hints: ArchitectureHints): SdArchitecture {
  const textEncoder = detectTextEncoderConfig(w, {
    prefixes: SDXL_TEXT_PREFIXES,
    ...(hints.textHeads === undefined ? {} : { heads: hints.textHeads }),
  });
  const textEncoder2 = detectTextEncoderConfig(w, {
    prefixes: SDXL_TEXT2_PREFIXES,
    fullStack: true,
    ...(hints.text2Heads === undefined ? {} : { heads: hints.text2Heads }),
  });
  if (textEncoder.layout !== "hf-clip" || textEncoder2.layout !== "open-clip" || textEncoder2.projectionDim === undefined) {
    throw ModelFileError.invalidFile(
      w.label,
      "SDXL text encoders not found: expected CLIP-L (HF layout) under conditioner.embedders.0 and OpenCLIP-G with a text_projection under conditioner.embedders.1",
    );
  }
  const unet = detectUNetConfig(w, headsHint(hints, { headDim: 64 }));
  const context = textEncoder.hidden + textEncoder2.hidden;
  if (unet.contextDim !== context) {
    throw ModelFileError.invalidFile(
      w.label,
      `UNet cross-attention expects width ${unet.contextDim} but the two text encoders produce ${textEncoder.hidden} + ${textEncoder2.hidden}`,
    );
  }
  const adm = textEncoder2.projectionDim + TIME_IDS * TIME_ID_EMBED_DIM;
  if (unet.admInChannels !== adm) {
    throw ModelFileError.invalidFile(
      w.label,
      `SDXL UNet label_emb takes ${unet.admInChannels} features, but the text embeds and size conditioning make ${adm}`,
    );
  }
  return {
    family: "sdxl",
    prediction: hints.prediction ?? "epsilon",
    inpainting: unet.inChannels === 9,
    unet,
    textEncoder,
    textEncoder2,
    vae: detectVaeConfig(w),
  };
}

function detectSdxlRefiner(w: WeightSource, hints: ArchitectureHints): SdxlRefinerArchitecture {
  let textEncoder2: TextEncoderConfig | undefined;
  if (REFINER_TEXT_PREFIXES.some((p) => w.has(`${p}token_embedding.weight`))) {
    textEncoder2 = detectTextEncoderConfig(w, {
      prefixes: REFINER_TEXT_PREFIXES,
      fullStack: true,
      // The refiner's encoder is the base's second one, so the hint for that one applies.
      ...(hints.text2Heads === undefined ? {} : { heads: hints.text2Heads }),
    });
  }
  if (textEncoder2?.layout !== "open-clip" || textEncoder2.projectionDim === undefined) {
    throw ModelFileError.invalidFile(
      w.label,
      "SDXL refiner text encoder not found: expected OpenCLIP-G with a text_projection under conditioner.embedders.0.model",
    );
  }
  const unet = detectUNetConfig(w, headsHint(hints, { headDim: 64 }));
  if (unet.contextDim !== textEncoder2.hidden) {
    throw ModelFileError.invalidFile(
      w.label,
      `UNet cross-attention expects width ${unet.contextDim} but the refiner's text encoder produces ${textEncoder2.hidden}`,
    );
  }
  const adm = textEncoder2.projectionDim + REFINER_TIME_IDS * TIME_ID_EMBED_DIM;
  if (unet.admInChannels !== adm) {
    throw ModelFileError.invalidFile(
      w.label,
      `SDXL refiner UNet label_emb takes ${unet.admInChannels} features, but the text embeds, size, crop and aesthetic-score conditioning make ${adm}`,
    );
  }
  return {
    family: "sdxl-refiner",
    prediction: hints.prediction ?? "epsilon",
    inpainting: unet.inChannels === 9,
    unet: { ...unet, timeIds: (unet.admInChannels - textEncoder2.projectionDim) / TIME_ID_EMBED_DIM },
    textEncoder2,
    vae: detectVaeConfig(w),
  };
}
