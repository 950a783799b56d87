// Which Stable Diffusion a checkpoint is, read from its keys and shapes.

import { status } from "@grpc/grpc-js";
import { ModelFileError } from "./errors.js";
import { detectTextEncoderConfig } from "./clip.js";
import type { TextEncoderConfig } from "./clip.js";
import { detectUNetConfig } from "./unet.js";
import type { UNetConfig } from "./unet.js";
import { detectVaeConfig } from "./vae.js";
import type { VaeConfig } from "./vae.js";
import type { WeightSource } from "./weights.js";

export type ModelFamily = "sd1" | "sd2";
export type PredictionType = "epsilon" | "v_prediction";

/** What cannot be read off the weights: head counts of non-standard (tiny) models, v-prediction. */
export interface ArchitectureHints {
  /** UNet heads per attention (SD1 default 8). */
  readonly unetHeads?: number;
  /** UNet head width (SD2 default 64). Takes precedence over unetHeads. */
  readonly unetHeadDim?: number;
  /** Text-encoder heads (default hidden / 64). */
  readonly textHeads?: number;
  /** Default epsilon; SD2-768 models are v_prediction (A1111 reads this from a .yaml next to the file). */
  readonly prediction?: PredictionType;
}

export interface Architecture {
  readonly family: ModelFamily;
  readonly prediction: PredictionType;
  /** UNet with 9 input channels (4 latent + 4 masked-image latent + 1 mask). */
  readonly inpainting: boolean;
  readonly unet: UNetConfig;
  readonly textEncoder: TextEncoderConfig;
  readonly vae: VaeConfig;
}

export function detectArchitecture(w: WeightSource, hints: ArchitectureHints = {}): Architecture {
  const keys = [...w.keys()];
  if (keys.some((k) => k.startsWith("conditioner.embedders."))) {
    throw new ModelFileError(status.UNIMPLEMENTED, w.label, "SDXL checkpoints are not supported yet");
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
  const textEncoder = detectTextEncoderConfig(w, hints.textHeads === undefined ? {} : { heads: hints.textHeads });
  const sd2 = textEncoder.layout === "open-clip";
  const headHint =
    hints.unetHeadDim !== undefined
      ? { headDim: hints.unetHeadDim }
      : hints.unetHeads !== undefined
        ? { heads: hints.unetHeads }
        : sd2
          ? { headDim: 64 }
          : { heads: 8 };
  const unet = detectUNetConfig(w, headHint);
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
