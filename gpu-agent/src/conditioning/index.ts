// Text conditioning, A1111 v1.10-exact: prompt syntax (editing, alternation, AND, extra-network
// tags, emphasis), the CLIP tokenizer, 75-token chunking, batch encoding with emphasis and CLIP
// skip, and CFG combination.
export { ClipTokenizer, BOS_TOKEN, EOS_TOKEN, parseMerges, type ClipTokenizerConfig } from "./clip-tokenizer.js";
export { cleanText, fixText } from "./text-cleanup.js";
export { parsePromptAttention, type AttentionFragment } from "./attention.js";
export {
  tokenizeLine,
  emptyChunk,
  targetPromptTokenCount,
  CHUNK_LENGTH,
  CHUNK_TOKENS,
  DEFAULT_COMMA_PADDING_BACKTRACK,
  EMPHASIS_MODES,
  type EmphasisMode,
  type ChunkTokenizer,
  type PromptChunk,
  type ChunkFix,
  type TokenizeLineOptions,
  type TokenizedLine,
} from "./chunking.js";
export {
  getLearnedConditioningPromptSchedules,
  getPromptSchedule,
  scheduledTextAt,
  scheduleIndexAt,
  scheduleSteps,
  type ScheduleEntry,
  type ScheduleOptions,
} from "./schedule.js";
export { parseComposablePrompt, getMulticondPromptList, type Subprompt, type MulticondPromptList } from "./composable.js";
export {
  extractExtraNetworks,
  extractExtraNetworksBatch,
  type ExtractedExtraNetworks,
  type LoraNetwork,
  type UnknownExtraNetwork,
} from "@latentfarm/shared";
export { applyEmphasis, type EmphasisRow, type EmphasisTarget } from "./emphasis.js";
export {
  Conditioner,
  type TextEncoder,
  type ClosableTextEncoder,
  type CondTensor,
  type ScheduledCond,
  type EncodeOptions,
  type ScheduleRequest,
  type PrepareRequest,
  type PreparedConditioning,
  type CondPadding,
  type PreparedSubprompt,
  type WeightedCond,
  type ConditionerOptions,
  type TokenOverrides,
} from "./conditioner.js";
export { EmbeddingDatabase, type TextualInversionEmbedding, type EmbeddingLookup, type EmbeddingTokenizer } from "./embeddings.js";
export { combineDenoised } from "./cfg.js";
export { describePrompt, type PromptDescription } from "./describe.js";
export { benchConditioning, benchConditioningDetailed, type ConditioningBench } from "./bench.js";
export { PromptSyntaxError, ConditioningPreconditionError } from "./errors.js";
