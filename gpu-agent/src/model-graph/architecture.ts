// Which Stable Diffusion a checkpoint is, read from its keys and shapes.

import { status } from "@grpc/grpc-js";
import { ModelFileError } from "./errors.js";
import { detectTextEncoderConfig } from "./clip.js";
import type { TextEncoderConfig } from "./clip.js";
import { TIME_IDS, TIME_ID_EMBED_DIM, detectUNetConfig } from "./unet.js";
import type { HeadsHint, UNetConfig } from "./unet.js";
import { detectVaeConfig } from "./vae.js";
import type { VaeConfig } from "./vae.js";
import type { WeightSource } from "./weights.js";

export type ModelFamily = "sd1" | "sd2" | "sdxl";
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

export interface Architecture {
  readonly family: ModelFamily;
  readonly prediction: PredictionType;
  /** UNet with 9 input channels (4 latent + 4 masked-image latent + 1 mask). */
  readonly inpainting: boolean;
  readonly unet: UNetConfig;
  /** SDXL's CLIP-L; SD1's CLIP or SD2's OpenCLIP-H. */
  readonly textEncoder: TextEncoderConfig;
  /** SDXL's OpenCLIP-G, whose pooled projection (text_embeds) conditions the UNet besides its hidden states. */
  readonly textEncoder2?: TextEncoderConfig;
  readonly vae: VaeConfig;
}

/** SDXL base keeps CLIP-L under embedder 0 (HF layout) and OpenCLIP-G under embedder 1. */
const SDXL_TEXT_PREFIXES = ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.0.transformer."];
const SDXL_TEXT2_PREFIXES = ["conditioner.embedders.1.model."];

/** SDXL's latent scale (sgm's scale_factor); SD1/SD2 use 0.18215. */
export const SDXL_SCALING_FACTOR = 0.13025;

export function detectArchitecture(w: WeightSource, hints: ArchitectureHints = {}): Architecture {
  const keys = [...w.keys()];
  const sdxl = keys.some((k) => k.startsWith("conditioner.embedders."));
  // The refiner conditions on OpenCLIP-G alone (embedder 0 is an OpenCLIP `model.`) and on an aesthetic score.
  if (sdxl && !keys.some((k) => k.startsWith("conditioner.embedders.0.transformer."))) {
    throw new ModelFileError(status.UNIMPLEMENTED, w.label, "SDXL refiner checkpoints are not supported");
  }
  if (!keys.some((k) => k.startsWith("model.diffusion_model."))) {
    const hint = keys.some((k) => k.startsWith("lora_") || k.includes(".lora_down.") || k.includes(".hada_w1_a"))
      ? " (this looks like a LoRA, not a checkpoint)"
      : "";
    throw ModelFileError.invalidFile(
      w.label,
      `no model.diffusion_model.* tensors: not an SD checkpoint in the original (LDM) layout${hint}`,
    );
  }
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

function detectSdxl(w: WeightSource, hints: ArchitectureHints): Architecture {
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
