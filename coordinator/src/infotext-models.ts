// Which of the farm's checkpoints a pasted infotext means: A1111 finds them by hash, not by file name.

import { parseInfotext, type GenerationParams } from "@latentfarm/shared";
import type { AgentState } from "./agent-registry.js";
import type { ValidatedJob } from "./validate.js";

/**
 * A pasted infotext's checkpoints, found as A1111 finds them: by "Model hash" (A1111's paste sets
 * sd_model_checkpoint to the hash), and a Hires checkpoint by the hash in its "name [hash]", so that a
 * checkpoint saved under another name on this farm still matches. Only where the request names no model
 * itself; without a match the infotext's names stand (applyInfotext), with a warning when this farm's
 * checkpoint of that name is known to hold other weights.
 */
export function modelsFromInfotext(
  v: ValidatedJob,
  request: Pick<GenerationParams, "model" | "hrCheckpointName" | "infotext">,
  agents: ReadonlyArray<Pick<AgentState, "models">>,
): void {
  const byHash = new Map<string, string>();
  const hashOf = new Map<string, string>();
  for (const a of agents) {
    for (const [name, m] of a.models) {
      if (m.modelHash === "") continue;
      if (!byHash.has(m.modelHash) || name < byHash.get(m.modelHash)!) byHash.set(m.modelHash, name);
      hashOf.set(name, m.modelHash);
    }
  }
  const pasted = parseInfotext(request.infotext).params;
  const pick = (hash: string | undefined, current: string, what: string): string => {
    if (hash === undefined || !/^[0-9a-f]{10}$/i.test(hash)) return current;
    const found = byHash.get(hash.toLowerCase());
    if (found !== undefined) return found;
    const here = hashOf.get(current);
    if (here !== undefined)
      v.warnings.push(`infotext: no checkpoint here has the ${what} hash ${hash}; "${current}" (${here}) renders instead`);
    return current;
  };
  if (request.model === "") v.params.model = pick(pasted.get("Model hash"), v.params.model, "Model");
  const hires = /^(.*) \[([0-9a-f]{10})\]$/i.exec(pasted.get("Hires checkpoint") ?? "");
  if (request.hrCheckpointName === "" && hires && v.params.hrCheckpointName !== "") {
    v.params.hrCheckpointName = pick(hires[2], v.params.hrCheckpointName, "Hires checkpoint");
  }
}
