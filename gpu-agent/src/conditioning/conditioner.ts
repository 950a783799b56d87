import { CHUNK_TOKENS, emptyChunk, tokenizeLine, type EmphasisMode, type PromptChunk } from "./chunking.js";
import type { EmbeddingDatabase, TextualInversionEmbedding } from "./embeddings.js";
import type { ClipTokenizer } from "./clip-tokenizer.js";
import { parseComposablePrompt } from "./composable.js";
import { applyEmphasis, type EmphasisRow, type EmphasisTarget } from "./emphasis.js";
import { ConditioningPreconditionError } from "./errors.js";
import { extractExtraNetworks, type LoraNetwork, type UnknownExtraNetwork } from "@latentfarm/shared";
import { getPromptSchedule, type ScheduleEntry } from "./schedule.js";

/** The CLIP text model, injected so conditioning stays independent of the runtime. */
export interface TextEncoder {
  /** Width of a hidden state (768 for SD1's ViT-L/14). */
  readonly hiddenSize: number;
  /** Largest CLIP skip the model can serve: its layer count with hidden_states outputs, else 1. */
  readonly maxClipSkip: number;
  /** Whether encode() takes token overrides (textual-inversion embeddings). */
  readonly acceptsTokenOverrides?: boolean;
  /**
   * The widths of the encoders whose outputs are concatenated into each token vector (SDXL: CLIP-L's
   * 768 and OpenCLIP-G's 1280). A1111's embedders each restore their own mean after emphasis.
   */
  readonly parts?: readonly number[];
  /** Width of the pooled text vector the model also conditions on (SDXL's text_embeds); absent for SD1/2. */
  readonly pooledSize?: number;
  /** encode() and the pooled vector of each row, for encoders with a pooledSize. */
  encodePooled?(
    batch: Int32Array,
    n: number,
    clipSkip: number,
    signal?: AbortSignal,
    overrides?: TokenOverrides,
  ): Promise<{ hidden: Float32Array; pooled: Float32Array }>;
  /**
   * Encodes n×77 token ids. clipSkip 1 returns last_hidden_state; N > 1 returns hidden_states[-N]
   * passed through the model's final LayerNorm (A1111's CLIP_stop_at_last_layers). Overrides replace
   * the token embeddings at their positions before the position embeddings are added.
   */
  encode(batch: Int32Array, n: number, clipSkip: number, signal?: AbortSignal, overrides?: TokenOverrides): Promise<Float32Array>;
}

/** Token embeddings given by the caller: vector i (of the encoder's width) goes to row rows[i], position positions[i]. */
export interface TokenOverrides {
  readonly rows: Int32Array;
  readonly positions: Int32Array;
  readonly vectors: Float32Array;
}

/** A text encoder with resources of its own (ONNX Runtime sessions), released by close(). */
export interface ClosableTextEncoder {
  encoder: TextEncoder;
  close(): Promise<void>;
}

/** Conditioning for one text: [tokens, hidden] with tokens = 77 × chunks. */
export interface CondTensor {
  data: Float32Array;
  tokens: number;
  hidden: number;
  /**
   * SDXL's pooled vector (the "vector" conditioning's text part): the text's first chunk's, taken before
   * emphasis, as A1111's embedder returns `zs[0].pooled`.
   */
  pooled?: Float32Array;
}

export interface ScheduledCond {
  endAtStep: number;
  text: string;
  cond: CondTensor;
}

export interface EncodeOptions {
  /** A1111's "Clip skip" (CLIP_stop_at_last_layers); default 1. */
  clipSkip?: number;
  emphasis?: EmphasisMode;
}

export interface ScheduleRequest extends EncodeOptions {
  /** Schedule length: the sampler's total steps (doubled for second-order samplers, see scheduleSteps). */
  steps: number;
  hiresSteps?: number;
  useOldScheduling?: boolean;
  signal?: AbortSignal;
}

export interface PrepareRequest extends ScheduleRequest {
  prompt: string;
  negativePrompt?: string;
  /** Remove `<lora:…>`-style tags from the positive prompt first (A1111 order); default true. */
  stripExtraNetworks?: boolean;
  /**
   * A1111's option pad_cond_uncond ("Pad conds"): when prompt and negative prompt differ in length, the
   * shorter gets copies of the empty prompt's encoding, so both run in one UNet batch (and the image changes).
   */
  padCondUncond?: boolean;
  /**
   * Option pad_cond_uncond_v0 ("Pad conds v0", A1111's DDIM/PLMS before 1.6.0): the negative prompt's
   * conditioning is extended by its last token vector, or cut, to the prompt's length. Wins over padCondUncond.
   */
  padCondUncondV0?: boolean;
}

/** The infotext entry a prompt pair earns when its conditionings were padded to each other's length. */
export type CondPadding = "Pad conds" | "Pad conds v0";

export interface WeightedCond {
  tensor: Float32Array;
  /** 77 × chunks of this subprompt's conditioning. */
  tokens: number;
  /** AND weight of the subprompt. */
  weight: number;
  /** SDXL's pooled text vector (CondTensor.pooled). */
  pooled?: Float32Array;
}

export interface PreparedSubprompt {
  text: string;
  weight: number;
  schedule: ScheduledCond[];
}

export interface PreparedConditioning {
  hidden: number;
  /** The positive prompt after extra-network tags were removed. */
  positivePrompt: string;
  /**
   * The textual-inversion embeddings each of A1111's encoder passes used: the negative prompt's, then
   * each distinct subprompt's: chunk by chunk, and within a chunk text by text, as A1111's
   * used_embeddings dict gets them.
   */
  textualInversion: { negative: TextualInversionEmbedding[]; subprompts: TextualInversionEmbedding[][] };
  subprompts: PreparedSubprompt[];
  negative: ScheduledCond[];
  extraNetworks: { networks: LoraNetwork[]; unknown: UnknownExtraNetwork[] };
  /**
   * Subprompt conds at denoiser call `step` (0-based, one per model call), all of one length: A1111
   * stacks them, the shorter extended by their last token vector (stack_conds), then pads them as
   * padCondUncond asks.
   */
  condAt(step: number): WeightedCond[];
  /** The negative prompt's cond at denoiser call `step`, padded or cut as the padding options ask. */
  uncondAt(step: number): { tensor: Float32Array; tokens: number; pooled?: Float32Array };
  /**
   * Set when the options padded one side to the other's length: A1111's CFGDenoiser then writes this
   * entry, after the pass's sampling.
   */
  padding: CondPadding | undefined;
}

export interface ConditionerOptions {
  tokenizer: ClipTokenizer;
  encoder: TextEncoder;
  /** A1111's comma_padding_backtrack; default 20. */
  commaPaddingBacktrack?: number;
  /**
   * The base model's text encoder, opened when needed, where `encoder` has LoRAs merged into it: A1111
   * encodes the empty prompt it pads with (pad_cond_uncond) once, when it loads the model, before any
   * LoRA applies.
   */
  emptyPromptEncoder?: () => Promise<ClosableTextEncoder>;
  /** Textual-inversion embeddings prompts may name; the encoder must accept token overrides. */
  embeddings?: EmbeddingDatabase;
  /** Bound of the (text, steps, clip skip, emphasis) cache: entries and bytes of tensors. */
  cacheEntries?: number;
  cacheBytes?: number;
}

/** One of A1111's forward passes: a prompt's schedule encoded, with the embeddings its chunks used. */
interface EncodedSchedule {
  conds: ScheduledCond[];
  embeddings: TextualInversionEmbedding[];
}

interface CacheEntry {
  promise: Promise<EncodedSchedule>;
  bytes: number;
}

/**
 * A1111's text-conditioning path: prompt schedules, chunking, CLIP encoding of a whole schedule as
 * one batch, emphasis, and per-step lookup. Results are cached per (text, steps, clip skip, …) so a
 * batch of images encodes its prompt once; each model has its own Conditioner (and encoder), which
 * makes the model part of the key.
 */
export class Conditioner {
  readonly tokenizer: ClipTokenizer;
  readonly encoder: TextEncoder;
  private readonly backtrack: number;
  private readonly maxEntries: number;
  private readonly maxBytes: number;
  private readonly cache = new Map<string, CacheEntry>();
  private cachedBytes = 0;
  private readonly emptyPromptEncoder: ConditionerOptions["emptyPromptEncoder"];
  /** The base model's empty prompt by clip skip (emptyPromptEncoder's; a few KB each). */
  private readonly emptyPrompts = new Map<number, Promise<Float32Array>>();
  private embeddingDb: EmbeddingDatabase | undefined;

  constructor(opts: ConditionerOptions) {
    this.tokenizer = opts.tokenizer;
    this.encoder = opts.encoder;
    this.backtrack = opts.commaPaddingBacktrack ?? 20;
    this.maxEntries = opts.cacheEntries ?? 32;
    this.emptyPromptEncoder = opts.emptyPromptEncoder;
    this.maxBytes = opts.cacheBytes ?? 256 * 1024 * 1024;
    this.setEmbeddings(opts.embeddings);
  }

  get embeddings(): EmbeddingDatabase | undefined {
    return this.embeddingDb;
  }

  /** Replaces the embeddings prompts may name (the folder changed); cached conditioning is dropped. */
  setEmbeddings(db: EmbeddingDatabase | undefined): void {
    if (db !== undefined && db.size > 0 && this.encoder.acceptsTokenOverrides !== true) {
      throw new Error("textual-inversion embeddings need a text encoder that accepts token overrides");
    }
    this.embeddingDb = db !== undefined && db.size > 0 ? db : undefined;
    this.clearCache();
  }

  /** Drops cached conditioning, e.g. after the encoder's weights changed (LoRA merged). */
  clearCache(): void {
    this.cache.clear();
    this.cachedBytes = 0;
  }

  /** Checks a CLIP skip against the encoder; throws FAILED_PRECONDITION with the reason. */
  checkClipSkip(clipSkip: number): void {
    if (!Number.isInteger(clipSkip) || clipSkip < 1) {
      throw new ConditioningPreconditionError(`clip skip must be an integer ≥ 1, got ${clipSkip}`, "clip_skip");
    }
    if (clipSkip === 1) return;
    if (this.encoder.maxClipSkip <= 1) {
      throw new ConditioningPreconditionError(
        `clip skip ${clipSkip} needs the text encoder's hidden_states outputs, and this model exports none ` +
          "(re-export the text encoder with output_hidden_states)",
        "clip_skip",
      );
    }
    if (clipSkip > this.encoder.maxClipSkip) {
      throw new ConditioningPreconditionError(
        `clip skip ${clipSkip} is deeper than the text encoder allows (at most ${this.encoder.maxClipSkip}: ` + `one per encoder layer)`,
        "clip_skip",
      );
    }
  }

  /**
   * cond_stage_model(texts): encodes texts as one batch (chunk counts padded with empty chunks,
   * emphasis mean over the batch). Repeated texts count as often as they appear.
   */
  async encodeBatch(texts: readonly string[], opts: EncodeOptions = {}, signal?: AbortSignal): Promise<CondTensor[]> {
    return (await this.encodeTexts(texts, opts, signal)).conds;
  }

  /** encodeBatch, and the textual-inversion embeddings its chunks used (embeddingsInChunks). */
  private async encodeTexts(
    texts: readonly string[],
    opts: EncodeOptions,
    signal?: AbortSignal,
  ): Promise<{ conds: CondTensor[]; embeddings: TextualInversionEmbedding[] }> {
    const clipSkip = opts.clipSkip ?? 1;
    const emphasis = opts.emphasis ?? "Original";
    this.checkClipSkip(clipSkip);
    const hidden = this.encoder.hiddenSize;

    const distinct: string[] = [];
    const counts = new Map<string, number>();
    for (const t of texts) {
      const c = counts.get(t);
      if (c === undefined) distinct.push(t);
      counts.set(t, (c ?? 0) + 1);
    }
    const lineOptions = {
      emphasis,
      commaPaddingBacktrack: this.backtrack,
      ...(this.embeddingDb !== undefined && { embeddings: this.embeddingDb }),
    };
    const chunked = distinct.map((t) => tokenizeLine(this.tokenizer, t, lineOptions).chunks);
    const chunkCount = Math.max(...chunked.map((c) => c.length));
    const filler = emptyChunk(this.tokenizer);
    const outputs = distinct.map(() => uninitializedFloat32(chunkCount * CHUNK_TOKENS * hidden));
    const pooledSize = this.encoder.pooledSize ?? 0;
    const pooled = distinct.map(() => new Float32Array(pooledSize));

    for (let ci = 0; ci < chunkCount; ci++) {
      const chunks: PromptChunk[] = chunked.map((c) => c[ci] ?? filler);
      // Rows with the same tokens give the same hidden states; encode each token row once.
      const rowOf = new Map<string, number>();
      const encoderRows: PromptChunk[] = [];
      const rows: EmphasisRow[] = chunks.map((chunk, d) => {
        const key = chunk.fixes === undefined ? chunk.tokens.join(",") : `${chunk.tokens.join(",")}|${fixKey(chunk)}`;
        let encoderRow = rowOf.get(key);
        if (encoderRow === undefined) {
          encoderRow = encoderRows.length;
          rowOf.set(key, encoderRow);
          encoderRows.push(chunk);
        }
        return { encoderRow, multipliers: chunk.multipliers, count: counts.get(distinct[d]!)! };
      });
      const batch = new Int32Array(encoderRows.length * CHUNK_TOKENS);
      encoderRows.forEach((chunk, r) => batch.set(this.withPadding(chunk.tokens), r * CHUNK_TOKENS));
      signal?.throwIfAborted();
      const overrides = tokenOverrides(encoderRows, hidden);
      let z: Float32Array;
      if (pooledSize > 0 && ci === 0) {
        const encoded = await this.encodePooled(batch, encoderRows.length, clipSkip, signal, overrides);
        z = encoded.hidden;
        rows.forEach((row, d) => pooled[d]!.set(encoded.pooled.subarray(row.encoderRow * pooledSize, (row.encoderRow + 1) * pooledSize)));
      } else {
        z = await this.encoder.encode(batch, encoderRows.length, clipSkip, signal, overrides);
      }
      if (z.length !== encoderRows.length * CHUNK_TOKENS * hidden) {
        throw new Error(`text encoder returned ${z.length} values for ${encoderRows.length}×77×${hidden}`);
      }
      const offset = ci * CHUNK_TOKENS * hidden;
      applyEmphasisInParts(
        emphasis,
        z,
        hidden,
        this.encoder.parts,
        rows,
        outputs.map((array) => ({ array, offset })),
      );
    }

    const byText = new Map(
      distinct.map((t, d): [string, CondTensor] => [
        t,
        { data: outputs[d]!, tokens: chunkCount * CHUNK_TOKENS, hidden, ...(pooledSize > 0 && { pooled: pooled[d]! }) },
      ]),
    );
    return { conds: texts.map((t) => byText.get(t)!), embeddings: embeddingsInChunks(chunked) };
  }

  private encodePooled(
    batch: Int32Array,
    n: number,
    clipSkip: number,
    signal: AbortSignal | undefined,
    overrides: TokenOverrides | undefined,
  ): Promise<{ hidden: Float32Array; pooled: Float32Array }> {
    if (this.encoder.encodePooled === undefined) throw new Error("the text encoder has a pooledSize but no encodePooled");
    return this.encoder.encodePooled(batch, n, clipSkip, signal, overrides);
  }

  /**
   * get_learned_conditioning for one prompt: its schedule's texts encoded together, one cond per
   * schedule entry. Cached.
   */
  async scheduledConditioning(text: string, req: ScheduleRequest): Promise<ScheduledCond[]> {
    return (await this.encodedSchedule(text, req)).conds;
  }

  private async encodedSchedule(text: string, req: ScheduleRequest): Promise<EncodedSchedule> {
    const clipSkip = req.clipSkip ?? 1;
    const emphasis = req.emphasis ?? "Original";
    this.checkClipSkip(clipSkip);
    if (!Number.isInteger(req.steps) || req.steps < 1) {
      throw new ConditioningPreconditionError(`steps must be an integer ≥ 1, got ${req.steps}`, "steps");
    }
    const key = JSON.stringify([text, req.steps, req.hiresSteps ?? null, !!req.useOldScheduling, clipSkip, emphasis]);
    for (;;) {
      let entry = this.cache.get(key);
      const ours = entry === undefined;
      if (entry === undefined) {
        const schedule = getPromptSchedule(text, req.steps, {
          useOldScheduling: !!req.useOldScheduling,
          ...(req.hiresSteps === undefined ? {} : { hiresSteps: req.hiresSteps }),
        });
        const promise = this.encodeSchedule(schedule, { clipSkip, emphasis }, req.signal);
        const created: CacheEntry = { promise, bytes: 0 };
        entry = created;
        this.cache.set(key, created);
        promise.then(
          ({ conds }) => {
            created.bytes = new Set(conds.map((c) => c.cond.data)).size * conds[0]!.cond.data.byteLength;
            if (this.cache.get(key) === created) {
              this.cachedBytes += created.bytes;
              this.evict();
            }
          },
          () => {
            if (this.cache.get(key) === created) this.cache.delete(key);
          },
        );
      } else {
        // Least recently used goes first: move a hit to the end.
        this.cache.delete(key);
        this.cache.set(key, entry);
      }
      try {
        return await entry.promise;
      } catch (err) {
        // Someone else's aborted request must not fail ours: encode again under our own signal.
        if (!ours && !req.signal?.aborted && isAbort(err)) continue;
        throw err;
      }
    }
  }

  /** Everything the sampler needs for one image's prompt pair. */
  async prepare(req: PrepareRequest): Promise<PreparedConditioning> {
    const extracted = req.stripExtraNetworks === false ? { text: req.prompt, networks: [], unknown: [] } : extractExtraNetworks(req.prompt);
    const parts = parseComposablePrompt(extracted.text);
    const [encodedNegative, ...encoded] = await Promise.all([
      this.encodedSchedule(req.negativePrompt ?? "", req),
      ...parts.map((p) => this.encodedSchedule(p.text, req)),
    ]);
    // SDXL: an empty negative prompt conditions on zeros, pooled vector included (A1111's
    // force_zero_negative_prompt, for a negative whose every schedule text is empty).
    const negative =
      this.encoder.pooledSize !== undefined && encodedNegative!.conds.every((c) => c.text === "")
        ? encodedNegative!.conds.map((c) => ({ ...c, cond: zeroed(c.cond) }))
        : encodedNegative!.conds;
    const schedules = encoded.map((e) => e.conds);
    const subprompts = parts.map((p, i): PreparedSubprompt => ({ text: p.text, weight: p.weight, schedule: schedules[i]! }));
    const hidden = this.encoder.hiddenSize;
    // A schedule's entries are encoded as one batch, so each prompt has one length through its run.
    const condTokens = Math.max(...schedules.map((s) => s[0]!.cond.tokens));
    const uncondTokens = negative[0]!.cond.tokens;
    const lengths = await this.paddedLengths(condTokens, uncondTokens, req);
    const at = (schedule: ScheduledCond[], step: number) => schedule[condIndexAt(schedule, step)]!.cond;
    const condTensor = memoized((c: CondTensor): Float32Array => {
      const stacked = c.tokens === condTokens ? c.data : withLastTokenRepeated(c.data, c.tokens, condTokens, hidden);
      return condTokens === lengths.cond ? stacked : withChunksAppended(stacked, condTokens, lengths.cond, lengths.empty!, hidden);
    });
    const uncondTensor = memoized((c: CondTensor): Float32Array => {
      if (c.tokens === lengths.uncond) return c.data;
      return lengths.empty === undefined
        ? withLastTokenRepeated(c.data, c.tokens, lengths.uncond, hidden)
        : withChunksAppended(c.data, c.tokens, lengths.uncond, lengths.empty, hidden);
    });
    // A repeated subprompt is one forward pass in A1111 (its get_learned_conditioning caches by text).
    const byText = new Map(parts.map((p, i) => [p.text, encoded[i]!.embeddings]));
    return {
      hidden,
      positivePrompt: extracted.text,
      textualInversion: { negative: encodedNegative!.embeddings, subprompts: [...byText.values()] },
      subprompts,
      negative,
      extraNetworks: { networks: extracted.networks, unknown: extracted.unknown },
      condAt: (step) =>
        subprompts.map((s) => {
          const c = at(s.schedule, step);
          return { tensor: condTensor(c), tokens: lengths.cond, weight: s.weight, ...(c.pooled && { pooled: c.pooled }) };
        }),
      uncondAt: (step) => {
        const c = at(negative, step);
        return { tensor: uncondTensor(c), tokens: lengths.uncond, ...(c.pooled && { pooled: c.pooled }) };
      },
      padding: lengths.padding,
    };
  }

  /**
   * The lengths CFGDenoiser gives prompt and negative prompt, and the empty prompt's 77 token vectors
   * when copies of it pad one of them. A1111 encodes that empty prompt once, when it loads the model.
   */
  private async paddedLengths(
    condTokens: number,
    uncondTokens: number,
    req: PrepareRequest,
  ): Promise<{ cond: number; uncond: number; padding: CondPadding | undefined; empty?: Float32Array }> {
    if (condTokens === uncondTokens || (!req.padCondUncondV0 && !req.padCondUncond)) {
      return { cond: condTokens, uncond: uncondTokens, padding: undefined };
    }
    if (req.padCondUncondV0) return { cond: condTokens, uncond: condTokens, padding: "Pad conds v0" };
    const longest = Math.max(condTokens, uncondTokens);
    return { cond: longest, uncond: longest, padding: "Pad conds", empty: await this.emptyPrompt(req) };
  }

  /** A1111's cond_stage_model_empty_prompt: the empty prompt's 77 token vectors, as CLIP makes them. */
  private async emptyPrompt(req: PrepareRequest): Promise<Float32Array> {
    const clipSkip = req.clipSkip ?? 1;
    const open = this.emptyPromptEncoder;
    if (open === undefined) {
      // Emphasis leaves an empty prompt as CLIP made it, whatever the mode.
      const [empty] = await this.scheduledConditioning("", { steps: 1, emphasis: "None", ...optional(req) });
      return empty!.cond.data.subarray(0, CHUNK_TOKENS * this.encoder.hiddenSize);
    }
    let encoded = this.emptyPrompts.get(clipSkip);
    if (encoded === undefined) {
      // Shared by every request that pads, so no one request's signal may cancel it.
      encoded = (async () => {
        const base = await open();
        try {
          const tokens = Int32Array.from(this.withPadding(emptyChunk(this.tokenizer).tokens));
          return await base.encoder.encode(tokens, 1, clipSkip);
        } finally {
          await base.close();
        }
      })();
      this.emptyPrompts.set(clipSkip, encoded);
      // A failed or aborted encode is not kept: the next request opens the encoder again.
      encoded.catch(() => this.emptyPrompts.delete(clipSkip));
    }
    return encoded;
  }

  private async encodeSchedule(schedule: ScheduleEntry[], opts: EncodeOptions, signal?: AbortSignal): Promise<EncodedSchedule> {
    const { conds, embeddings } = await this.encodeTexts(
      schedule.map(([, text]) => text),
      opts,
      signal,
    );
    return { conds: schedule.map(([endAtStep, text], i) => ({ endAtStep, text, cond: conds[i]! })), embeddings };
  }

  // SD1 pads with EOS already; for a tokenizer whose pad differs (SD2), A1111 rewrites every
  // position after the first EOS to pad before running CLIP.
  private withPadding(tokens: readonly number[]): readonly number[] {
    const { eosId, padId } = this.tokenizer;
    if (padId === eosId) return tokens;
    const end = tokens.indexOf(eosId);
    return tokens.map((t, i) => (i > end ? padId : t));
  }

  private evict(): void {
    for (const [key, entry] of this.cache) {
      if (this.cache.size <= this.maxEntries && this.cachedBytes <= this.maxBytes) break;
      this.cache.delete(key);
      this.cachedBytes -= entry.bytes;
    }
  }
}

/**
 * The embeddings an A1111 forward pass over these texts' chunks uses, in the order its used_embeddings
 * dict gets them: chunk by chunk, and within a chunk text by text.
 */
function embeddingsInChunks(chunked: readonly PromptChunk[][]): TextualInversionEmbedding[] {
  const used = new Map<string, TextualInversionEmbedding>();
  const count = Math.max(0, ...chunked.map((c) => c.length));
  for (let ci = 0; ci < count; ci++) {
    for (const chunks of chunked)
      for (const fix of chunks[ci]?.fixes ?? []) if (!used.has(fix.embedding.name)) used.set(fix.embedding.name, fix.embedding);
  }
  return [...used.values()];
}

function fixKey(chunk: PromptChunk): string {
  return (chunk.fixes ?? []).map((f) => `${f.position}:${f.embedding.name}`).join(",");
}

/**
 * The embeddings' vectors at their chunks' positions (A1111's EmbeddingsWithFixes). A vector that would
 * pass the chunk's last position is cut, as there.
 */
function tokenOverrides(rows: readonly PromptChunk[], hidden: number): TokenOverrides | undefined {
  // A later fix wins where two overlap, as A1111 applies them in order.
  const byPlace = new Map<number, [number, number, Float32Array]>();
  rows.forEach((chunk, row) => {
    for (const { position, embedding } of chunk.fixes ?? []) {
      if (embedding.hidden !== hidden) {
        throw new ConditioningPreconditionError(
          `embedding ${embedding.name} has vectors of ${embedding.hidden} values; this model's text encoder takes ${hidden}`,
          "prompt",
        );
      }
      for (let v = 0; v < embedding.vectors && position + v < CHUNK_TOKENS; v++) {
        byPlace.set(row * CHUNK_TOKENS + position + v, [row, position + v, embedding.data.subarray(v * hidden, (v + 1) * hidden)]);
      }
    }
  });
  const at = [...byPlace.values()];
  if (at.length === 0) return undefined;
  const vectors = new Float32Array(at.length * hidden);
  at.forEach(([, , vec], i) => vectors.set(vec, i * hidden));
  return { rows: Int32Array.from(at, (a) => a[0]), positions: Int32Array.from(at, (a) => a[1]), vectors };
}

/** The same shape, all zeros: one per run, never the cached tensor. */
function zeroed(c: CondTensor): CondTensor {
  return { ...c, data: new Float32Array(c.data.length), ...(c.pooled && { pooled: new Float32Array(c.pooled.length) }) };
}

/**
 * applyEmphasis on each encoder's share of the token vectors (TextEncoder.parts): SDXL's two embedders
 * each weight and restore the mean of their own output, so one mean over the concatenation would differ.
 */
function applyEmphasisInParts(
  mode: EmphasisMode,
  z: Float32Array,
  hidden: number,
  parts: readonly number[] | undefined,
  rows: readonly EmphasisRow[],
  targets: readonly EmphasisTarget[],
): void {
  if (parts === undefined || parts.length <= 1) {
    applyEmphasis(mode, z, CHUNK_TOKENS, hidden, rows, targets);
    return;
  }
  const vectors = z.length / hidden;
  let start = 0;
  for (const width of parts) {
    const share = new Float32Array(vectors * width);
    for (let v = 0; v < vectors; v++) share.set(z.subarray(v * hidden + start, v * hidden + start + width), v * width);
    const outs = targets.map(() => new Float32Array(CHUNK_TOKENS * width));
    applyEmphasis(
      mode,
      share,
      CHUNK_TOKENS,
      width,
      rows,
      outs.map((array) => ({ array, offset: 0 })),
    );
    targets.forEach((t, i) => {
      for (let p = 0; p < CHUNK_TOKENS; p++) t.array.set(outs[i]!.subarray(p * width, (p + 1) * width), t.offset + p * hidden + start);
    });
    start += width;
  }
}

/** Padding copies a tensor: each schedule entry is padded once for the whole run. */
function memoized(pad: (c: CondTensor) => Float32Array): (c: CondTensor) => Float32Array {
  const done = new Map<Float32Array, Float32Array>();
  return (c) => {
    let out = done.get(c.data);
    if (out === undefined) done.set(c.data, (out = pad(c)));
    return out;
  };
}

function optional(req: PrepareRequest): { clipSkip?: number; signal?: AbortSignal } {
  return { ...(req.clipSkip !== undefined && { clipSkip: req.clipSkip }), ...(req.signal !== undefined && { signal: req.signal }) };
}

/** `tensor`'s first `to` token vectors, its last one repeated past its end (stack_conds; v0 also cuts). */
function withLastTokenRepeated(tensor: Float32Array, tokens: number, to: number, hidden: number): Float32Array {
  const out = new Float32Array(to * hidden);
  out.set(tensor.subarray(0, Math.min(tokens, to) * hidden));
  const last = tensor.subarray((tokens - 1) * hidden, tokens * hidden);
  for (let t = tokens; t < to; t++) out.set(last, t * hidden);
  return out;
}

/** `tensor` followed by copies of a 77-token chunk up to `to` tokens (A1111's pad_cond). */
function withChunksAppended(tensor: Float32Array, tokens: number, to: number, chunk: Float32Array, hidden: number): Float32Array {
  const out = new Float32Array(to * hidden);
  out.set(tensor.subarray(0, tokens * hidden));
  for (let t = tokens; t < to; t += CHUNK_TOKENS) out.set(chunk, t * hidden);
  return out;
}

/** reconstruct_cond_batch's choice: first entry with step ≤ end_at_step, else entry 0. */
function condIndexAt(schedule: readonly ScheduledCond[], step: number): number {
  for (let i = 0; i < schedule.length; i++) if (step <= schedule[i]!.endAtStep) return i;
  return 0;
}

// applyEmphasis writes every value of every output (one full row per text and chunk index) before
// the tensor is returned, so the zero fill of `new Float32Array` (a memset wherever the allocator
// hands back recycled memory) would be wasted work on megabytes per prompt.
function uninitializedFloat32(length: number): Float32Array {
  const bytes = Buffer.allocUnsafeSlow(length * Float32Array.BYTES_PER_ELEMENT);
  return new Float32Array(bytes.buffer, bytes.byteOffset, length);
}

function isAbort(err: unknown): boolean {
  return err instanceof Error && (err.name === "AbortError" || (err as { code?: unknown }).code === 1);
}
