// Regenerates fixtures/tokenizer-corpus.json with an independent reference: Hugging Face's own JS port
// of `tokenizers` (@huggingface/tokenizers), loaded with the same CLIP pipeline that HF's
// tokenizer.json for openai/clip-vit-large-patch14 declares (NFC + whitespace collapse + lowercase,
// CLIP split regex, byte-level, BPE with "</w>"). It is not a dependency of this package; run with
//   HF_TOKENIZERS=/path/to/@huggingface/tokenizers node --import tsx \
//     gpu-agent/src/conditioning/test-support/generate-tokenizer-fixture.ts [tokenizer dir]
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { CORPUS_SEED, CORPUS_SIZE, FTFY_CASES, generateTokenizerCorpus } from "./tokenizer-corpus.js";
import { kitFixture } from "../../test-support/kit.js";

interface HfTokenizer {
  encode(text: string, options: { add_special_tokens: boolean }): { ids: number[] };
}
type HfTokenizerCtor = new (json: object, config: object) => HfTokenizer;

const CLIP_SPLIT = "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";

export function clipTokenizerJson(vocab: Record<string, number>, merges: string[]): object {
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: true,
    special: true,
  });
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(49406, "<|startoftext|>"), special(49407, "<|endoftext|>")],
    normalizer: {
      type: "Sequence",
      normalizers: [{ type: "NFC" }, { type: "Replace", pattern: { Regex: "\\s+" }, content: " " }, { type: "Lowercase" }],
    },
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Split", pattern: { Regex: CLIP_SPLIT }, behavior: "Removed", invert: true },
        { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    post_processor: null,
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<|endoftext|>",
      continuing_subword_prefix: "",
      end_of_word_suffix: "</w>",
      fuse_unk: false,
      byte_fallback: false,
      vocab,
      merges,
    },
  };
}

async function main(): Promise<void> {
  const tokenizerDir = process.argv[2] ?? kitFixture("tiny-sd15", "tokenizer");
  const modulePath = process.env.HF_TOKENIZERS ?? "@huggingface/tokenizers";
  const specifier = modulePath.startsWith("/") ? pathToFileURL(join(modulePath, "dist/tokenizers.mjs")).href : modulePath;
  const mod = (await import(specifier)) as { Tokenizer: HfTokenizerCtor };
  const pkg = modulePath.startsWith("/")
    ? (JSON.parse(readFileSync(join(modulePath, "package.json"), "utf8")) as { name: string; version: string })
    : { name: modulePath, version: "unknown" };

  const vocab = JSON.parse(readFileSync(join(tokenizerDir, "vocab.json"), "utf8")) as Record<string, number>;
  const merges = readFileSync(join(tokenizerDir, "merges.txt"), "utf8").trim().split("\n").slice(1);
  const reference = new mod.Tokenizer(clipTokenizerJson(vocab, merges), { model_max_length: 77 });
  const encode = (text: string) => reference.encode(text, { add_special_tokens: false }).ids;

  const fixture = {
    about:
      "Expected CLIP token ids. Produced by test-support/generate-tokenizer-fixture.ts with the reference " +
      "tokenizer named in `reference`; ftfyCases are encoded from their `equivalent` text.",
    reference: `${pkg.name}@${pkg.version}`,
    seed: CORPUS_SEED,
    size: CORPUS_SIZE,
    cases: generateTokenizerCorpus(CORPUS_SEED, CORPUS_SIZE).map((text) => ({ text, ids: encode(text) })),
    ftfyCases: FTFY_CASES.map((c) => ({ ...c, ids: encode(c.equivalent) })),
  };
  const out = fileURLToPath(new URL("../fixtures/tokenizer-corpus.json", import.meta.url));
  writeFileSync(out, JSON.stringify(fixture, null, 1) + "\n");
  process.stderr.write(`wrote ${fixture.cases.length} + ${fixture.ftfyCases.length} cases to ${out}\n`);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
