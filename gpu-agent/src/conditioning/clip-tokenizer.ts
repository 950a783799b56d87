import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { cleanText } from "./text-cleanup.js";

export const BOS_TOKEN = "<|startoftext|>";
export const EOS_TOKEN = "<|endoftext|>";
const END_OF_WORD = "</w>";

// CLIP's pre-tokenizer pattern. It runs on cleaned, lower-cased text in which every whitespace run is
// one " ", so JS's and Python's different notions of `\s` cannot disagree here.
const WORD_RE = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/gu;

// Both caches are bounded so a stream of random prompts cannot grow memory without limit; clearing
// them only costs recomputation.
const WORD_CACHE_LIMIT = 100_000;
const TEXT_CACHE_LIMIT = 20_000;

/** GPT-2's reversible byte → printable-character table, which CLIP's vocabulary is written in. */
function byteToUnicodeTable(): string[] {
  const table: string[] = new Array<string>(256);
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCodePoint(printable(b) ? b : 256 + extra++);
  }
  return table;
}

const BYTE_TO_CHAR = byteToUnicodeTable();
const CHAR_TO_BYTE = new Map<string, number>(BYTE_TO_CHAR.map((ch, b) => [ch, b]));
const utf8 = new TextEncoder();

export interface ClipTokenizerConfig {
  /** Token the pad positions use; SD1 pads with EOS, SD2/SDXL's OpenCLIP tokenizer with "!". */
  padToken?: string;
}

/**
 * Byte-level BPE tokenizer identical to HF's (slow) CLIPTokenizer as A1111 calls it:
 * `tokenizer(text, truncation=False, add_special_tokens=False)`.
 */
export class ClipTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  /** Id of ",</w>", which A1111's chunker uses to find a place to break a chunk. */
  readonly commaId: number;
  readonly vocabSize: number;

  private readonly vocab: Map<string, number>;
  private readonly idToToken: string[];
  private readonly ranks: Map<string, number>;
  private readonly wordCache = new Map<string, readonly number[]>();
  private readonly textCache = new Map<string, readonly number[]>();

  constructor(vocab: Record<string, number>, merges: readonly string[], config: ClipTokenizerConfig = {}) {
    this.vocab = new Map(Object.entries(vocab));
    this.idToToken = [];
    for (const [token, id] of this.vocab) this.idToToken[id] = token;
    this.vocabSize = this.idToToken.length;
    this.ranks = new Map();
    // Symbols never contain a space (byte 0x20 is written as "Ġ"), so "a b" is an unambiguous key.
    // A repeated merge keeps its last rank, as the dict built by CLIPTokenizer does.
    merges.forEach((merge, rank) => this.ranks.set(merge, rank));
    this.bosId = this.requireId(BOS_TOKEN);
    this.eosId = this.requireId(EOS_TOKEN);
    this.padId = this.requireId(config.padToken ?? EOS_TOKEN);
    this.commaId = this.requireId("," + END_OF_WORD);
  }

  /** Loads vocab.json + merges.txt (+ tokenizer_config.json for the pad token) from a tokenizer folder. */
  static async fromDirectory(dir: string): Promise<ClipTokenizer> {
    const [vocabText, mergesText, configText] = await Promise.all([
      readFile(join(dir, "vocab.json"), "utf8"),
      readFile(join(dir, "merges.txt"), "utf8"),
      readFile(join(dir, "tokenizer_config.json"), "utf8").catch(() => undefined),
    ]);
    const vocab = JSON.parse(vocabText) as Record<string, number>;
    const config: ClipTokenizerConfig = {};
    if (configText !== undefined) {
      const pad = (JSON.parse(configText) as { pad_token?: unknown }).pad_token;
      const padContent = typeof pad === "string" ? pad : (pad as { content?: unknown } | null)?.content;
      if (typeof padContent === "string" && padContent in vocab) config.padToken = padContent;
    }
    return new ClipTokenizer(vocab, parseMerges(mergesText), config);
  }

  /** Token ids of `text`, without BOS/EOS. */
  encode(text: string): number[] {
    const cached = this.textCache.get(text);
    if (cached !== undefined) return cached.slice();
    const ids: number[] = [];
    // The slow tokenizer splits the raw text on its special tokens before any cleanup.
    for (const piece of splitOnSpecialTokens(text)) {
      if (piece === BOS_TOKEN) ids.push(this.bosId);
      else if (piece === EOS_TOKEN) ids.push(this.eosId);
      else this.encodeCleaned(cleanText(piece), ids);
    }
    if (this.textCache.size >= TEXT_CACHE_LIMIT) this.textCache.clear();
    this.textCache.set(text, ids);
    return ids.slice();
  }

  /** The vocabulary entry of `id`, e.g. "cat</w>". */
  tokenString(id: number): string | undefined {
    return this.idToToken[id];
  }

  /** Vocabulary lookup: id of a raw vocabulary entry such as ",</w>". */
  tokenToId(token: string): number | undefined {
    return this.vocab.get(token);
  }

  /** Text of one token; an end-of-word marker becomes a trailing space. Partial UTF-8 shows as U+FFFD. */
  decodeToken(id: number): string {
    const token = this.idToToken[id];
    if (token === undefined) throw new RangeError(`token id ${id} is not in the vocabulary`);
    if (token === BOS_TOKEN || token === EOS_TOKEN) return token;
    return decodeSymbols(token).replaceAll(END_OF_WORD, " ");
  }

  /** Text of a token sequence, the way HF's CLIPTokenizer.decode joins it. */
  decode(ids: readonly number[]): string {
    let joined = "";
    for (const id of ids) joined += this.idToToken[id] ?? "";
    return decodeSymbols(joined).replaceAll(END_OF_WORD, " ").trim();
  }

  private requireId(token: string): number {
    const id = this.vocab.get(token);
    if (id === undefined) throw new Error(`tokenizer vocabulary has no "${token}" entry`);
    return id;
  }

  private encodeCleaned(text: string, out: number[]): void {
    for (const match of text.matchAll(WORD_RE)) {
      const word = match[0];
      let ids = this.wordCache.get(word);
      if (ids === undefined) {
        ids = this.bpeWord(word);
        if (this.wordCache.size >= WORD_CACHE_LIMIT) this.wordCache.clear();
        this.wordCache.set(word, ids);
      }
      for (const id of ids) out.push(id);
    }
  }

  private bpeWord(word: string): number[] {
    if (word === BOS_TOKEN) return [this.bosId];
    if (word === EOS_TOKEN) return [this.eosId];
    const symbols: string[] = [];
    for (const byte of utf8.encode(word)) symbols.push(BYTE_TO_CHAR[byte]!);
    symbols[symbols.length - 1] += END_OF_WORD;

    // Repeatedly merge the lowest-ranked adjacent pair, every occurrence left to right.
    while (symbols.length > 1) {
      let bestRank = Infinity;
      let bestFirst = "";
      let bestSecond = "";
      for (let i = 0; i + 1 < symbols.length; i++) {
        const rank = this.ranks.get(symbols[i]! + " " + symbols[i + 1]!);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          bestFirst = symbols[i]!;
          bestSecond = symbols[i + 1]!;
        }
      }
      if (bestRank === Infinity) break;
      let w = 0;
      for (let r = 0; r < symbols.length; r++) {
        if (r + 1 < symbols.length && symbols[r] === bestFirst && symbols[r + 1] === bestSecond) {
          symbols[w++] = bestFirst + bestSecond;
          r++;
        } else {
          symbols[w++] = symbols[r]!;
        }
      }
      symbols.length = w;
    }
    // The slow tokenizer maps a symbol missing from the vocabulary to unk (= EOS for CLIP).
    return symbols.map((s) => this.vocab.get(s) ?? this.eosId);
  }
}

export function parseMerges(text: string): string[] {
  const lines = text.split("\n");
  const merges: string[] = [];
  // Line 0 is the "#version" header; CLIPTokenizer reads at most 49152 - 256 - 2 merges.
  const last = Math.min(lines.length, 49152 - 256 - 2 + 1);
  for (let i = 1; i < last; i++) {
    const line = lines[i]!.replace(/\r$/, "");
    if (line.length > 0) merges.push(line);
  }
  return merges;
}

function splitOnSpecialTokens(text: string): string[] {
  if (!text.includes("<|")) return [text];
  return text.split(/(<\|startoftext\|>|<\|endoftext\|>)/).filter((p) => p.length > 0);
}

function decodeSymbols(symbols: string): string {
  const bytes: number[] = [];
  for (const ch of symbols) {
    const b = CHAR_TO_BYTE.get(ch);
    if (b !== undefined) bytes.push(b);
    else for (const x of utf8.encode(ch)) bytes.push(x);
  }
  return new TextDecoder("utf-8").decode(new Uint8Array(bytes));
}
