import { parsePromptAttention, type AttentionFragment } from "./attention.js";
import type { EmbeddingLookup, TextualInversionEmbedding } from "./embeddings.js";

/** Real tokens per chunk; each chunk is framed by BOS and EOS to CLIP's 77 positions. */
export const CHUNK_LENGTH = 75;
export const CHUNK_TOKENS = CHUNK_LENGTH + 2;
/** A1111's default for `comma_padding_backtrack`. */
export const DEFAULT_COMMA_PADDING_BACKTRACK = 20;

/** A1111's emphasis option (modules/sd_emphasis.py). "None" also turns off the bracket parser. */
export type EmphasisMode = "Original" | "No norm" | "Ignore" | "None";
export const EMPHASIS_MODES: readonly EmphasisMode[] = ["Original", "No norm", "Ignore", "None"];

/** What the chunker needs from a tokenizer. */
export interface ChunkTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly commaId: number;
  encode(text: string): number[];
}

/** A textual-inversion embedding whose vectors replace the token embeddings from `position` (of 77) on. */
export interface ChunkFix {
  position: number;
  embedding: TextualInversionEmbedding;
}

/** One 77-position CLIP input: BOS, 75 tokens (EOS-padded), EOS, and a weight per position. */
export interface PromptChunk {
  tokens: number[];
  multipliers: number[];
  /** Embeddings placed in this chunk (A1111's PromptChunk.fixes); absent when none. */
  fixes?: ChunkFix[];
}

export interface TokenizeLineOptions {
  emphasis?: EmphasisMode;
  /** 0 disables moving the text after the last comma into the next chunk. */
  commaPaddingBacktrack?: number;
  /** Textual-inversion embeddings the prompt may name. */
  embeddings?: EmbeddingLookup;
}

export interface TokenizedLine {
  chunks: PromptChunk[];
  /** A1111's token count: 75 for every chunk before the last, plus the last chunk's real tokens. */
  tokenCount: number;
  fragments: AttentionFragment[];
}

export function emptyChunk(tokenizer: Pick<ChunkTokenizer, "bosId" | "eosId">): PromptChunk {
  const tokens = new Array<number>(CHUNK_TOKENS).fill(tokenizer.eosId);
  tokens[0] = tokenizer.bosId;
  return { tokens, multipliers: new Array<number>(CHUNK_TOKENS).fill(1.0) };
}

/** The "N/75", "N/150"… denominator A1111's token counter shows for a count. */
export function targetPromptTokenCount(tokenCount: number): number {
  return Math.ceil(Math.max(tokenCount, 1) / CHUNK_LENGTH) * CHUNK_LENGTH;
}

/**
 * A1111's FrozenCLIPEmbedderWithCustomWords.tokenize_line. An embedding's name becomes one placeholder
 * (token 0) per vector with the fragment's weight, never split across chunks; its vectors are recorded as
 * a fix of the chunk it was placed in.
 */
export function tokenizeLine(tokenizer: ChunkTokenizer, line: string, opts: TokenizeLineOptions = {}): TokenizedLine {
  const backtrack = opts.commaPaddingBacktrack ?? DEFAULT_COMMA_PADDING_BACKTRACK;
  const fragments: AttentionFragment[] = opts.emphasis === "None" ? [[line, 1.0]] : parsePromptAttention(line);

  const chunks: PromptChunk[] = [];
  let tokens: number[] = [];
  let multipliers: number[] = [];
  let fixes: ChunkFix[] = [];
  let tokenCount = 0;
  let lastComma = -1;

  const nextChunk = (isLast: boolean) => {
    tokenCount += isLast ? tokens.length : CHUNK_LENGTH;
    while (tokens.length < CHUNK_LENGTH) {
      tokens.push(tokenizer.eosId);
      multipliers.push(1.0);
    }
    const chunk: PromptChunk = { tokens: [tokenizer.bosId, ...tokens, tokenizer.eosId], multipliers: [1.0, ...multipliers, 1.0] };
    if (fixes.length > 0) chunk.fixes = fixes;
    chunks.push(chunk);
    tokens = [];
    multipliers = [];
    fixes = [];
    lastComma = -1;
  };

  for (const [text, weight] of fragments) {
    if (text === "BREAK" && weight === -1) {
      nextChunk(false);
      continue;
    }
    const ids = tokenizer.encode(text);
    let position = 0;
    while (position < ids.length) {
      const token = ids[position]!;
      if (token === tokenizer.commaId) {
        lastComma = tokens.length;
      } else if (backtrack !== 0 && tokens.length === CHUNK_LENGTH && lastComma !== -1 && tokens.length - lastComma <= backtrack) {
        // As in A1111, an embedding's fix stays with the chunk it was placed in: placeholders moved on
        // to the next chunk encode as token 0 there, and the vectors land on the old chunk's padding.
        const breakAt = lastComma + 1;
        const movedTokens = tokens.slice(breakAt);
        const movedMultipliers = multipliers.slice(breakAt);
        tokens.length = breakAt;
        multipliers.length = breakAt;
        nextChunk(false);
        tokens = movedTokens;
        multipliers = movedMultipliers;
      }
      if (tokens.length === CHUNK_LENGTH) nextChunk(false);

      const found = opts.embeddings?.findAt(ids, position);
      if (found === undefined) {
        tokens.push(token);
        multipliers.push(weight);
        position++;
        continue;
      }
      const vectors = found.embedding.vectors;
      if (tokens.length + vectors > CHUNK_LENGTH) nextChunk(false);
      fixes.push({ position: tokens.length + 1, embedding: found.embedding });
      for (let v = 0; v < vectors; v++) {
        tokens.push(0);
        multipliers.push(weight);
      }
      position += found.length;
    }
  }
  if (tokens.length > 0 || chunks.length === 0) nextChunk(true);
  return { chunks, tokenCount, fragments };
}
