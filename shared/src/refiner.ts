/**
 * A1111's refiner (refiner_checkpoint, refiner_switch_at): which passes of a request switch to it. Shared
 * because the coordinator places a pass where both its model and the refiner are, and the agent runs
 * the switch.
 */
import { FarmError } from "./errors.js";
import type { GenerationParams } from "./gen/latentfarm/v1/generation_pb.js";
import { TaskStage } from "./gen/latentfarm/v1/agent_pb.js";
import { isHiresTxt2img, secondPassModel } from "./hires-passes.js";

/** What A1111's process_images reads as "no refiner". */
const NO_REFINER: ReadonlySet<string> = new Set(["", "None", "none"]);

type RefinerParams = Pick<GenerationParams, "refinerCheckpoint">;

/** The checkpoint a request's refiner is, or undefined for none. */
export function refinerCheckpoint(p: RefinerParams): string | undefined {
  return NO_REFINER.has(p.refinerCheckpoint) ? undefined : p.refinerCheckpoint;
}

/**
 * Whether `pass` may switch to the refiner: the only pass of a plain txt2img or img2img; with Hires.fix the
 * pass(es) hires_fix_refiner_pass names (default the second), as A1111's apply_refiner decides. A pass
 * already on the refiner's checkpoint never switches (A1111 finds the refiner loaded and carries on).
 */
export function refinerInPass(
  p: RefinerParams & Pick<GenerationParams, "model" | "enableHr" | "initImages" | "hrCheckpointName" | "overrideSettings">,
  pass: "first" | "second",
): boolean {
  const refiner = refinerCheckpoint(p);
  if (refiner === undefined) return false;
  if (!isHiresTxt2img(p)) return pass === "first" && p.model !== refiner;
  const which = p.overrideSettings?.hiresFixRefinerPass || "second pass";
  if (which !== "both passes" && which !== `${pass} pass`) return false;
  return (pass === "first" ? p.model : secondPassModel(p)) !== refiner;
}

/** refiner_switch_at checked: absent (A1111's None: the first model call switches) or a fraction in [0, 1]. */
export function checkRefinerSwitchAt(p: Pick<GenerationParams, "refinerSwitchAt">): number | undefined {
  const v = p.refinerSwitchAt;
  if (v === undefined) return undefined;
  if (!Number.isFinite(v) || v < 0 || v > 1) {
    throw FarmError.invalid("refiner_switch_at", `must be a fraction of the pass in [0, 1], got ${v}`);
  }
  return v;
}

/**
 * The pass a task of `stage` samples: FULL and FIRST_PASS the first (a FULL Hires.fix task both, which
 * its runner splits into the two stages), SECOND_PASS and its tiles the second; undefined for the stages
 * that do not sample (UPSCALE, ASSEMBLE).
 */
export function samplingPass(stage: TaskStage): "first" | "second" | undefined {
  switch (stage) {
    case TaskStage.FULL:
    case TaskStage.FIRST_PASS:
      return "first";
    case TaskStage.SECOND_PASS:
    case TaskStage.SECOND_PASS_TILE:
      return "second";
    default:
      return undefined;
  }
}
