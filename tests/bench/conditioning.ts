// Conditioning cost on the CPU with the text encoder taken out (an encoder that answers at once):
// a ~300-token prompt with prompt edits, cold (a new variant each time, so no cache answers) and
// again through the conditioning cache, against the target of 2 ms per cold prompt; and side
// by side, the same with a folder of 100 textual-inversion embeddings, two of them named by the prompts.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { ClipTokenizer } from "../../gpu-agent/src/conditioning/clip-tokenizer.js";
import { benchConditioningDetailed } from "../../gpu-agent/src/conditioning/bench.js";
import { TINY_SD15 } from "../harness/farm.js";

const TARGET_MS = 2;

export async function benchConditioningCost(
  opts: { iterations?: number; tokenizerDir?: string } = {},
): Promise<Record<string, number> | undefined> {
  const dir = opts.tokenizerDir ?? join(TINY_SD15, "tokenizer");
  if (!existsSync(dir)) return undefined;
  const tokenizer = await ClipTokenizer.fromDirectory(dir);
  const r = await benchConditioningDetailed(tokenizer, { iterations: opts.iterations ?? 200 });
  // Side by side: the same prompts naming two embeddings of a 100-file folder (8 and 16 vectors).
  const e = await benchConditioningDetailed(tokenizer, { iterations: opts.iterations ?? 200, embeddings: 100 });
  return {
    cold_ms_per_prompt: r.prepareMs,
    cached_ms: r.cachedMs,
    ratio_to_target: r.prepareMs / TARGET_MS,
    cold_over_cached: r.prepareMs / r.cachedMs,
    text_side_ms: r.textMs,
    prompt_tokens: r.promptTokens,
    cold_ms_with_100_embeddings: e.prepareMs,
    cached_ms_with_100_embeddings: e.cachedMs,
    embeddings_over_none_cold: e.prepareMs / r.prepareMs,
    schedule_entries: r.scheduleEntries,
    cached_encode_calls: r.cachedEncodeCalls,
  };
}
