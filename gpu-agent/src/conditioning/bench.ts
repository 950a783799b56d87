// Cost of conditioning on the CPU with the text encoder taken out: prompt-editing schedule,
// attention parsing, tokenization, chunking, batching and emphasis for a ~300-token prompt with
// edits and an alternation, at SD1 width (768).
import { tokenizeLine } from "./chunking.js";
import type { ClipTokenizer } from "./clip-tokenizer.js";
import { Conditioner, type TextEncoder } from "./conditioner.js";
import { EmbeddingDatabase, type TextualInversionEmbedding } from "./embeddings.js";
import { getPromptSchedule } from "./schedule.js";

const PHRASES = [
  "masterpiece",
  "best quality",
  "(highly detailed:1.2)",
  "portrait of a [young:old:0.4] woman",
  "intricate",
  "red dress",
  "cinematic lighting",
  "((sharp focus))",
  "bokeh",
  "[forest:city street:0.6] background",
  "8k uhd",
  "dslr",
  "film grain",
  "by greg rutkowski and alphonse mucha",
  "trending on artstation",
  "volumetric fog",
  "(rim light:0.8)",
  "[[soft shadows]]",
  "ornate jewelry",
  "looking at viewer",
];

/** A prompt of about 300 CLIP tokens; `variant` changes one word so caches cannot answer. */
export function benchPrompt(variant: number): string {
  const parts: string[] = [];
  for (let i = 0; parts.join(", ").length < 1400; i++) parts.push(PHRASES[i % PHRASES.length]!);
  parts.push(`seed ${variant}`);
  return parts.join(", ");
}

/** An encoder that returns a preallocated output instantly, so only conditioning's own work is timed. */
class NullTextEncoder implements TextEncoder {
  readonly maxClipSkip = 12;
  readonly acceptsTokenOverrides = true;
  calls = 0;
  private readonly buffers = new Map<number, Float32Array>();
  constructor(readonly hiddenSize: number) {}
  encode(batch: Int32Array): Promise<Float32Array> {
    this.calls++;
    const size = batch.length * this.hiddenSize;
    let buffer = this.buffers.get(size);
    if (buffer === undefined) {
      buffer = new Float32Array(size);
      for (let i = 0; i < size; i++) buffer[i] = 0.5 + (i % 7) * 0.01;
      this.buffers.set(size, buffer);
    }
    return Promise.resolve(buffer);
  }
}

export interface ConditioningBench {
  /** Median ms of Conditioner.prepare (positive + negative prompt, encoder excluded), nothing cached. */
  prepareMs: number;
  /** Median ms of the same prepare again, answered by the conditioning cache (the 2nd…64th image of a batch). */
  cachedMs: number;
  /** Text-encoder calls the cached prepares made: 0 when the cache answers them. */
  cachedEncodeCalls: number;
  /** Median ms of the text side alone: schedule, attention, tokens, chunks for every variant. */
  textMs: number;
  promptTokens: number;
  scheduleEntries: number;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/**
 * A folder's worth of embeddings at SD1 width: `count` of them, two of which (`lf-detail`, 8 vectors, and
 * `lf-negative`, 16) the bench's prompts name when embeddings are on.
 */
function benchEmbeddings(tokenizer: ClipTokenizer, count: number, hidden: number): EmbeddingDatabase {
  const make = (name: string, vectors: number): TextualInversionEmbedding => ({
    name,
    vectors,
    hidden,
    data: new Float32Array(vectors * hidden).fill(0.01),
    sha256: "0".repeat(64),
  });
  const named = [make("lf-detail", 8), make("lf-negative", 16)];
  const others = Array.from({ length: Math.max(0, count - named.length) }, (_, k) => make(`style-${k}-embedding`, 1 + (k % 10)));
  return new EmbeddingDatabase(tokenizer, [...named, ...others]);
}

export async function benchConditioningDetailed(
  tokenizer: ClipTokenizer,
  opts: {
    iterations?: number;
    hidden?: number;
    steps?: number;
    /** Textual-inversion embeddings in the folder; with any, the prompt and negative prompt each name one. */
    embeddings?: number;
  } = {},
): Promise<ConditioningBench> {
  const iterations = opts.iterations ?? 50;
  const steps = opts.steps ?? 20;
  const hidden = opts.hidden ?? 768;
  const encoder = new NullTextEncoder(hidden);
  const withEmbeddings = (opts.embeddings ?? 0) > 0;
  const conditioner = new Conditioner({
    tokenizer,
    encoder,
    cacheEntries: 4,
    ...(withEmbeddings && { embeddings: benchEmbeddings(tokenizer, opts.embeddings!, hidden) }),
  });
  const named = (prompt: string, negative: string) =>
    withEmbeddings ? { prompt: `${prompt}, lf-detail`, negativePrompt: `lf-negative, ${negative}` } : { prompt, negativePrompt: negative };

  // Warm-up: JIT and the per-word BPE cache, as on an agent that has served a few prompts.
  for (let i = 0; i < 10; i++) {
    await conditioner.prepare({ prompt: benchPrompt(-i - 1), negativePrompt: "blurry", steps });
  }

  const textTimes: number[] = [];
  const prepareTimes: number[] = [];
  const cachedTimes: number[] = [];
  let cachedEncodeCalls = 0;
  let promptTokens = 0;
  let scheduleEntries = 0;
  for (let i = 0; i < iterations; i++) {
    const prompt = benchPrompt(i);
    let t0 = performance.now();
    const schedule = getPromptSchedule(prompt, steps);
    // Like A1111's process_texts, each distinct text is tokenized once.
    for (const text of new Set(schedule.map(([, t]) => t))) promptTokens = tokenizeLine(tokenizer, text).tokenCount;
    textTimes.push(performance.now() - t0);
    scheduleEntries = schedule.length;

    const request = { ...named(`${prompt} `, `blurry, lowres ${i}`), steps };
    t0 = performance.now();
    await conditioner.prepare(request);
    prepareTimes.push(performance.now() - t0);
    const calls = encoder.calls;
    t0 = performance.now();
    await conditioner.prepare(request);
    cachedTimes.push(performance.now() - t0);
    cachedEncodeCalls += encoder.calls - calls;
  }
  return {
    prepareMs: median(prepareTimes),
    cachedMs: median(cachedTimes),
    cachedEncodeCalls,
    textMs: median(textTimes),
    promptTokens,
    scheduleEntries,
  };
}

/** Median ms of one Conditioner.prepare for a ~300-token prompt with edits, text encoder excluded. */
export async function benchConditioning(tokenizer: ClipTokenizer): Promise<number> {
  return (await benchConditioningDetailed(tokenizer)).prepareMs;
}
