import type { AttentionFragment } from "./attention.js";
import { targetPromptTokenCount, tokenizeLine, type ChunkTokenizer, type PromptChunk, type TokenizeLineOptions } from "./chunking.js";
import { parseComposablePrompt } from "./composable.js";
import { extractExtraNetworks, type LoraNetwork } from "@latentfarm/shared";
import { getPromptSchedule, type ScheduleEntry } from "./schedule.js";

export interface PromptDescription {
  /** Attention fragments of the text in force at the first step. */
  attention: AttentionFragment[];
  /** `[end_at_step, text]` of the whole prompt (extra-network tags removed). */
  schedule: ScheduleEntry[];
  /** CLIP chunks of the text in force at the first step. */
  chunks: PromptChunk[];
  /** What A1111's token counter shows: the largest count over all AND parts and schedule texts… */
  token_count: number;
  /** …over this denominator (75, 150, …). */
  max_length: number;
  networks: LoraNetwork[];
}

/** The prompt as A1111 would see it, for `latentfarm prompt`. */
export function describePrompt(
  tokenizer: ChunkTokenizer,
  prompt: string,
  steps: number,
  opts: TokenizeLineOptions = {},
): PromptDescription {
  let text = prompt;
  let networks: LoraNetwork[] = [];
  try {
    const extracted = extractExtraNetworks(prompt);
    text = extracted.text;
    networks = extracted.networks;
  } catch {
    // A malformed tag is reported when generating; describe the text as written.
  }
  const schedule = getPromptSchedule(text, steps);
  const first = tokenizeLine(tokenizer, schedule[0]![1], opts);

  // A1111's update_token_counter: every schedule text of every AND part, the longest wins.
  let tokenCount = 0;
  for (const part of parseComposablePrompt(text)) {
    for (const [, variant] of getPromptSchedule(part.text, steps)) {
      tokenCount = Math.max(tokenCount, tokenizeLine(tokenizer, variant, opts).tokenCount);
    }
  }
  return {
    attention: first.fragments,
    schedule,
    chunks: first.chunks,
    token_count: tokenCount,
    max_length: targetPromptTokenCount(tokenCount),
    networks,
  };
}
