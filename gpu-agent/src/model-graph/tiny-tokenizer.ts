// A small CLIP-format BPE vocabulary (vocab.json + merges.txt) learned from a built-in corpus, so tests
// can tokenize without OpenAI's 49k-token files. Layout follows CLIP's: the 256 byte symbols, the same
// with "</w>", one token per merge in merge order, then <|startoftext|> and <|endoftext|> as the last ids.

/** GPT-2/CLIP's reversible byte → printable-character table. */
export function bytesToUnicode(): Map<number, string> {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const map = new Map<number, string>();
  for (const b of printable) map.set(b, String.fromCodePoint(b));
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    if (!map.has(b)) map.set(b, String.fromCodePoint(256 + extra++));
  }
  // Insertion order matters: CLIP's vocabulary lists printable bytes first, then the remapped ones.
  const ordered = new Map<number, string>();
  for (const b of printable) ordered.set(b, map.get(b)!);
  for (let b = 0; b < 256; b++) if (!ordered.has(b)) ordered.set(b, map.get(b)!);
  return ordered;
}

const CORPUS = `a photo of a cat sitting on a chair, masterpiece, best quality, highly detailed
a portrait of a woman with red hair, digital painting, trending on artstation, sharp focus
a landscape with mountains and a lake at sunset, oil painting, beautiful lighting
a cute dog in the park, photograph, 8k, bokeh, depth of field
an astronaut riding a horse on the moon, cinematic, dramatic light
a castle in the forest, fantasy art, concept art, matte painting, illustration
low quality, worst quality, blurry, ugly, deformed, bad anatomy, watermark, text
a bowl of fruit on a wooden table, still life, soft light, studio photo
a city street at night with neon signs, rain, reflections, cyberpunk
a small house by the sea, watercolor, pastel colors, peaceful morning`;

export interface TinyVocab {
  /** vocab.json content: token → id. */
  readonly vocab: Record<string, number>;
  /** merges.txt lines after the "#version" header, in rank order. */
  readonly merges: readonly string[];
  readonly bosId: number;
  readonly eosId: number;
  readonly size: number;
}

/** Deterministic BPE training: most frequent pair first, ties broken by the pair's text. */
export function makeTinyVocab(mergeCount = 300): TinyVocab {
  const byteChars = bytesToUnicode();
  const base = [...byteChars.values()];
  const words = new Map<string, number>();
  for (const w of CORPUS.toLowerCase().match(/[a-z]+|[0-9]|[^\sa-z0-9]+/g) ?? []) words.set(w, (words.get(w) ?? 0) + 1);
  // Each word as a symbol list; the last symbol carries the end-of-word marker, as in CLIP.
  let split = [...words].map(([w, n]) => {
    const syms = [...Buffer.from(w, "utf8")].map((b) => byteChars.get(b)!);
    syms[syms.length - 1] += "</w>";
    return { syms, n };
  });
  const merges: string[] = [];
  for (let m = 0; m < mergeCount; m++) {
    const counts = new Map<string, number>();
    for (const { syms, n } of split) {
      for (let i = 0; i + 1 < syms.length; i++) {
        const key = `${syms[i]} ${syms[i + 1]}`;
        counts.set(key, (counts.get(key) ?? 0) + n);
      }
    }
    let best: string | undefined;
    let bestN = 0;
    for (const [k, n] of counts) if (n > bestN || (n === bestN && best !== undefined && k < best)) [best, bestN] = [k, n];
    if (!best) break;
    merges.push(best);
    const [a, b] = best.split(" ") as [string, string];
    split = split.map(({ syms, n }) => {
      const out: string[] = [];
      for (let i = 0; i < syms.length; i++) {
        if (i + 1 < syms.length && syms[i] === a && syms[i + 1] === b) {
          out.push(a + b);
          i++;
        } else out.push(syms[i]!);
      }
      return { syms: out, n };
    });
  }
  const tokens = [...base, ...base.map((c) => `${c}</w>`), ...merges.map((m) => m.replace(" ", ""))];
  const vocab: Record<string, number> = Object.create(null) as Record<string, number>;
  for (const t of tokens) if (!(t in vocab)) vocab[t] = Object.keys(vocab).length;
  const bosId = Object.keys(vocab).length;
  vocab["<|startoftext|>"] = bosId;
  vocab["<|endoftext|>"] = bosId + 1;
  return { vocab, merges, bosId, eosId: bosId + 1, size: bosId + 2 };
}

/** Files of a CLIPTokenizer folder (names → contents). */
export function tinyTokenizerFiles(v: TinyVocab): Record<string, string> {
  const special = {
    bos_token: "<|startoftext|>",
    eos_token: "<|endoftext|>",
    pad_token: "<|endoftext|>",
    unk_token: "<|endoftext|>",
  };
  return {
    "vocab.json": JSON.stringify(v.vocab),
    "merges.txt": `#version: 0.2\n${v.merges.join("\n")}\n`,
    "tokenizer_config.json": `${JSON.stringify({ model_max_length: 77, do_lower_case: true, tokenizer_class: "CLIPTokenizer", ...special }, null, 1)}\n`,
    "special_tokens_map.json": `${JSON.stringify(special, null, 1)}\n`,
  };
}
