import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { ClipTokenizer, parseMerges } from "./clip-tokenizer.js";
import { cleanText, fixText } from "./text-cleanup.js";
import { CORPUS_SEED, CORPUS_SIZE, FTFY_CASES, generateTokenizerCorpus } from "./test-support/tokenizer-corpus.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const here = dirname(fileURLToPath(import.meta.url));
const TOKENIZER_DIR = kitFixture("tiny-sd15", "tokenizer");
const skip = kitSkip("tiny-sd15", "tokenizer");

interface CorpusFixture {
  reference: string;
  seed: number;
  size: number;
  cases: Array<{ text: string; ids: number[] }>;
  ftfyCases: Array<{ text: string; equivalent: string; ids: number[] }>;
}
const fixture = JSON.parse(readFileSync(join(here, "fixtures/tokenizer-corpus.json"), "utf8")) as CorpusFixture;

let loaded: Promise<ClipTokenizer> | undefined;
const tokenizer = () => (loaded ??= ClipTokenizer.fromDirectory(TOKENIZER_DIR));

test("spec §2.1 verified ids and special ids", { skip }, async () => {
  const tok = await tokenizer();
  assert.deepEqual(tok.encode("a photo of a cat"), [320, 1125, 539, 320, 2368]);
  assert.deepEqual(tok.encode("a cat, a dog"), [320, 2368, 267, 320, 1929]);
  assert.deepEqual(tok.encode("masterpiece, best quality"), [12066, 267, 949, 3027]);
  assert.deepEqual(tok.encode(""), []);
  assert.deepEqual(tok.encode("a big red fluffy cat, "), [320, 1205, 736, 17054, 2368, 267]);
  assert.equal(tok.bosId, 49406);
  assert.equal(tok.eosId, 49407);
  assert.equal(tok.padId, 49407);
  assert.equal(tok.commaId, 267);
  assert.equal(tok.tokenToId(",</w>"), 267);
  assert.equal(tok.vocabSize, 49408);
});

test("corpus fixture matches its seeded generator", () => {
  assert.equal(fixture.seed, CORPUS_SEED);
  assert.equal(fixture.size, CORPUS_SIZE);
  assert.ok(fixture.cases.length >= 100);
  assert.deepEqual(
    fixture.cases.map((c) => c.text),
    generateTokenizerCorpus(CORPUS_SEED, CORPUS_SIZE),
  );
  assert.deepEqual(
    fixture.ftfyCases.map((c) => c.text),
    FTFY_CASES.map((c) => c.text),
  );
});

test(`seeded corpus matches the reference tokenizer (${fixture.reference})`, { skip }, async () => {
  const tok = await tokenizer();
  for (const { text, ids } of fixture.cases) {
    assert.deepEqual(tok.encode(text), ids, JSON.stringify(text));
  }
});

test("ftfy rewrites: ids equal the reference ids of the fixed text", { skip }, async () => {
  const tok = await tokenizer();
  for (const { text, equivalent, ids } of fixture.ftfyCases) {
    assert.deepEqual(tok.encode(text), ids, `${JSON.stringify(text)} ≡ ${JSON.stringify(equivalent)}`);
  }
});

test("text cleanup follows ftfy + whitespace_clean + lower", () => {
  assert.equal(cleanText("  Hello \t\n  World  "), "hello world");
  assert.equal(cleanText("\u3000ＡＢＣ\u3000"), "abc");
  assert.equal(fixText("a &amp;amp; b"), "a & b");
  assert.equal(fixText("x &amp; y\n<p> &amp;\nz &amp;"), "x & y\n<p> &amp;\nz &amp;");
  assert.equal(fixText("\u00e9"), "\u00e9");
  assert.equal(fixText("e\u0301"), "\u00e9");
  assert.equal(fixText("&#0; &#128; &#x110000;"), "\ufffd \u20ac \ufffd");
});

test("decodeToken / decode round-trip text", { skip }, async () => {
  const tok = await tokenizer();
  assert.equal(tok.decodeToken(2368), "cat ");
  assert.equal(tok.decodeToken(49406), "<|startoftext|>");
  assert.equal(tok.tokenString(2368), "cat</w>");
  assert.equal(tok.decode(tok.encode("A Photo of a CAT, 😀!")), "a photo of a cat , 😀!");
  assert.throws(() => tok.decodeToken(60000), RangeError);
});

test("BPE merges by rank, not left to right", () => {
  // A toy vocabulary where greedy left-to-right merging would give "ab"+"c</w>" but rank order
  // merges "b c</w>" first (rank 0), then nothing else applies.
  const vocab: Record<string, number> = {
    "<|startoftext|>": 0,
    "<|endoftext|>": 1,
    ",</w>": 2,
    a: 3,
    b: 4,
    "c</w>": 5,
    "bc</w>": 6,
    ab: 7,
    "abc</w>": 8,
  };
  const tok = new ClipTokenizer(vocab, ["b c</w>", "a b", "a bc</w>"]);
  assert.deepEqual(tok.encode("abc"), [8]);
  const tok2 = new ClipTokenizer(vocab, ["b c</w>", "a b"]);
  assert.deepEqual(tok2.encode("abc"), [3, 6]);
  const tok3 = new ClipTokenizer(vocab, ["a b", "b c</w>"]);
  assert.deepEqual(tok3.encode("abc"), [7, 5]);
});

test("parseMerges skips the header and reads at most 48894 merges", () => {
  const lines = ["#version: 0.2", ...Array.from({ length: 49000 }, (_, i) => `x${i} y`)];
  const merges = parseMerges(lines.join("\n") + "\n");
  assert.equal(merges.length, 48894);
  assert.equal(merges[0], "x0 y");
});

test("10,000-character and adversarial inputs do not throw", { skip }, async () => {
  const tok = await tokenizer();
  const long = "a very long prompt, ".repeat(500);
  assert.equal(tok.encode(long).length, 500 * 5);
  assert.ok(tok.encode("\u{10FFFF}\u0000\ud800 ((((\\\\ ]]]").length > 0);
  assert.equal(tok.encode("x".repeat(10_000)).length > 0, true);
});
