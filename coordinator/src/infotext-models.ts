// Which of the farm's checkpoints a pasted infotext means: A1111 finds them by hash, not by file name.

import type { AgentState } from "./agent-registry.js";
import type { ValidatedJob } from "./validate.js";

/**
 * A pasted infotext's checkpoints, found as A1111 finds them: by "Model hash" (A1111's paste sets
 * sd_model_checkpoint to the hash), and a Hires checkpoint and a Refiner by the hash in their "name [hash]", so that a
 * checkpoint saved under another name on this farm still matches. applyInfotext reports the hashes only
 * where the infotext filled the field (the request's own model wins); without a match the infotext's
 * names stand, with a warning when this farm's checkpoint of that name is known to hold other weights.
 */
export function modelsFromInfotext(v: ValidatedJob, agents: ReadonlyArray<Pick<AgentState, "models">>): void {
  const { model, hiresCheckpoint, refiner } = v.checkpointHashes;
  if (model === undefined && hiresCheckpoint === undefined && refiner === undefined) return;
  const byHash = new Map<string, string>();
  const hashOf = new Map<string, string>();
  for (const a of agents) {
    for (const [name, m] of a.models) {
      if (m.modelHash === "") continue;
      if (!byHash.has(m.modelHash) || name < byHash.get(m.modelHash)!) byHash.set(m.modelHash, name);
      hashOf.set(name, m.modelHash);
    }
  }
  const pick = (hash: string, current: string, what: string): string => {
    const found = byHash.get(hash);
    if (found !== undefined) return found;
    const here = hashOf.get(current);
    if (here !== undefined)
      v.warnings.push(`infotext: no checkpoint here has the ${what} hash ${hash}; "${current}" (${here}) renders instead`);
    return current;
  };
  if (model !== undefined) v.params.model = pick(model, v.params.model, "Model");
  if (hiresCheckpoint !== undefined) v.params.hrCheckpointName = pick(hiresCheckpoint, v.params.hrCheckpointName, "Hires checkpoint");
  if (refiner !== undefined) v.params.refinerCheckpoint = pick(refiner, v.params.refinerCheckpoint, "Refiner");
}
