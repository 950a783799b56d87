// The model files a task needs on its agent besides its checkpoint (upscalers, face restorers, LoRAs), by
// the names agents advertise them under (Heartbeat.upscalers, face_restorers, loras), so the coordinator
// refuses a job no agent can finish and places each task where its files are.
import { extractExtraNetworks } from "./extra-networks.js";
import { checkExtras } from "./extras.js";
import { TaskStage } from "./gen/latentfarm/v1/agent_pb.js";
import type { GenerationParams } from "./gen/latentfarm/v1/generation_pb.js";
import { isHiresTxt2img, secondPassPrompt } from "./hires-passes.js";
import { samplingPass } from "./refiner.js";

/** A1111's latent upscale modes (shared.latent_upscale_modes), by the names hr_upscaler takes. */
export const LATENT_UPSCALERS = [
  "Latent",
  "Latent (antialiased)",
  "Latent (bicubic)",
  "Latent (bicubic antialiased)",
  "Latent (nearest)",
  "Latent (nearest-exact)",
] as const;

export type LatentUpscaler = (typeof LATENT_UPSCALERS)[number];

/** Upscaler names every agent can run without a file: A1111's latent modes and its resize upscalers. */
export const BUILTIN_UPSCALERS: ReadonlySet<string> = new Set(["None", "Lanczos", "Nearest", ...LATENT_UPSCALERS]);

/** A named model a task needs, and the request field that names it. */
export interface NeededModel {
  name: string;
  field: string;
}

export interface AuxiliaryNeeds {
  upscalers: NeededModel[];
  faceRestorers: NeededModel[];
  /** The LoRAs its passes merge (weight ≠ 0), as named; compare them by loraKey. */
  loras: NeededModel[];
}

/**
 * A LoRA name as agents match it to a file: without its extension (.safetensors, .pt, .ckpt), without
 * regard to case (the agent looks for the exact name first, then any that differs in case only).
 */
export function loraKey(name: string): string {
  return (loraStem(name) ?? name).toLowerCase();
}

/** The files A1111 lists as LoRAs (any case here); .pt and .ckpt ones are torch.save archives. */
export const LORA_EXTENSIONS = [".safetensors", ".pt", ".ckpt"] as const;

/** A file name without its LoRA extension, or undefined when it has none (or nothing before it). */
export function loraStem(file: string): string | undefined {
  const lower = file.toLowerCase();
  const ext = LORA_EXTENSIONS.find((e) => lower.endsWith(e));
  return ext === undefined || file.length === ext.length ? undefined : file.slice(0, -ext.length);
}

/**
 * The LoRAs a sampling pass merges: its prompt's <lora:…> tags and the request's `loras`, at a weight
 * other than 0 (the agent merges nothing for weight 0, and only lists such a LoRA's hash when it has the
 * file). A tag the agent would refuse to parse names nothing here; Submit refuses the prompt itself.
 */
function passLoras(p: GenerationParams, pass: "first" | "second", out: NeededModel[]): void {
  const promptField = pass === "second" && p.hrPrompt !== "" ? "hr_prompt" : "prompt";
  let tags: { name: string; teWeight: number; unetWeight: number }[] = [];
  try {
    tags = extractExtraNetworks(pass === "first" ? p.prompt : secondPassPrompt(p)).networks;
  } catch {
    // Left to the agent's own error.
  }
  const add = (name: string, teWeight: number, unetWeight: number, field: string): void => {
    if ((teWeight !== 0 || unetWeight !== 0) && !out.some((l) => loraKey(l.name) === loraKey(name))) out.push({ name, field });
  };
  for (const t of tags) add(t.name, t.teWeight, t.unetWeight, promptField);
  for (const [i, l] of p.loras.entries()) add(l.name, l.teWeight, l.unetWeight, `loras[${i}].name`);
}

const UPSCALING_STAGES: ReadonlySet<TaskStage> = new Set([TaskStage.FULL, TaskStage.SECOND_PASS, TaskStage.UPSCALE]);
const FACE_STAGES: ReadonlySet<TaskStage> = new Set([TaskStage.FULL, TaskStage.SECOND_PASS, TaskStage.ASSEMBLE]);

/**
 * The upscalers and face restorers a task of job `p` runs at `stage` (the whole job's when absent): a
 * Hires.fix image's pixel upscaler where it upscales, its face restorer where it finishes the image; an
 * Extras image's upscalers and restorers.
 */
export function auxiliaryNeeds(p: GenerationParams, stage?: TaskStage): AuxiliaryNeeds {
  const needs: AuxiliaryNeeds = { upscalers: [], faceRestorers: [], loras: [] };
  const upscaler = (name: string, field: string): void => {
    if (!BUILTIN_UPSCALERS.has(name)) needs.upscalers.push({ name, field });
  };
  if (p.extras !== undefined) {
    const x = checkExtras(p);
    upscaler(x.upscaler1, "extras.upscaler_1");
    if (x.upscaler1 !== "None" && x.upscaler2Visibility > 0) upscaler(x.upscaler2, "extras.upscaler_2");
    if (x.gfpganVisibility > 0) needs.faceRestorers.push({ name: "GFPGAN", field: "extras.gfpgan_visibility" });
    if (x.codeformerVisibility > 0) needs.faceRestorers.push({ name: "CodeFormer", field: "extras.codeformer_visibility" });
    return needs;
  }
  const pass = stage === undefined ? "first" : samplingPass(stage);
  if (pass !== undefined) passLoras(p, pass, needs.loras);
  // A whole image (one task, or the job as a whole) samples both passes.
  if ((stage === undefined || stage === TaskStage.FULL) && isHiresTxt2img(p)) passLoras(p, "second", needs.loras);
  if (isHiresTxt2img(p) && p.hrUpscaler !== "" && (stage === undefined || UPSCALING_STAGES.has(stage)))
    upscaler(p.hrUpscaler, "hr_upscaler");
  if (p.restoreFaces && (stage === undefined || FACE_STAGES.has(stage))) {
    const name = p.overrideSettings?.faceRestorationModel || "CodeFormer";
    needs.faceRestorers.push({ name, field: name === "CodeFormer" ? "restore_faces" : "override_settings.face_restoration_model" });
  }
  return needs;
}
