import assert from "node:assert/strict";
import { test } from "node:test";
import { ClipTokenizer } from "./clip-tokenizer.js";
import { CHUNK_TOKENS, emptyChunk, targetPromptTokenCount, tokenizeLine } from "./chunking.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const TOKENIZER_DIR = kitFixture("tiny-sd15", "tokenizer");
const skip = kitSkip("tiny-sd15", "tokenizer");
let loaded: Promise<ClipTokenizer> | undefined;
const tokenizer = () => (loaded ??= ClipTokenizer.fromDirectory(TOKENIZER_DIR));

const BOS = 49406;
const EOS = 49407;
const PHRASE = [320, 1205, 736, 17054, 2368, 267]; // "a big red fluffy cat,"
const LONG = Array.from({ length: 15 }, () => "a big red fluffy cat").join(", ");

function realTokens(tokens: number[]): number[] {
  const inner = tokens.slice(1, -1);
  const end = inner.indexOf(EOS);
  return end === -1 ? inner : inner.slice(0, end);
}

test("empty prompt is one chunk [BOS, EOS×76]", { skip }, async () => {
  const { chunks, tokenCount } = tokenizeLine(await tokenizer(), "");
  assert.equal(chunks.length, 1);
  assert.deepEqual(chunks[0]!.tokens, [BOS, ...new Array<number>(76).fill(EOS)]);
  assert.deepEqual(chunks[0]!.multipliers, new Array<number>(77).fill(1));
  assert.equal(tokenCount, 0);
  assert.deepEqual(emptyChunk(await tokenizer()), chunks[0]);
});

test("spec §2.2: 15 phrases, comma backtrack 20 → 72 + 17 real tokens", { skip }, async () => {
  const tok = await tokenizer();
  const all = tok.encode(LONG);
  assert.equal(all.length, 89);
  assert.deepEqual(all.slice(0, 6), PHRASE);
  const { chunks, tokenCount } = tokenizeLine(tok, LONG);
  assert.equal(chunks.length, 2);
  assert.equal(realTokens(chunks[0]!.tokens).length, 72);
  assert.equal(realTokens(chunks[1]!.tokens).length, 17);
  assert.deepEqual(chunks[1]!.tokens.slice(0, 5), [BOS, 320, 1205, 736, 17054]);
  assert.deepEqual([...realTokens(chunks[0]!.tokens), ...realTokens(chunks[1]!.tokens)], all);
  for (const c of chunks) {
    assert.equal(c.tokens.length, CHUNK_TOKENS);
    assert.equal(c.multipliers.length, CHUNK_TOKENS);
    assert.equal(c.tokens[76], EOS);
  }
  assert.equal(tokenCount, 75 + 17);
  assert.equal(targetPromptTokenCount(tokenCount), 150);
});

test("spec §2.2: backtrack 0 → 75 + 14 real tokens", { skip }, async () => {
  const { chunks, tokenCount } = tokenizeLine(await tokenizer(), LONG, { commaPaddingBacktrack: 0 });
  assert.equal(realTokens(chunks[0]!.tokens).length, 75);
  assert.equal(realTokens(chunks[1]!.tokens).length, 14);
  assert.deepEqual(chunks[1]!.tokens.slice(0, 5), [BOS, 17054, 2368, 267, 320]);
  assert.equal(tokenCount, 89);
});

test("backtrack window: a comma further than 20 tokens back is not used", { skip }, async () => {
  const tok = await tokenizer();
  // 50 words, a comma, then 30 words: at the 75-token boundary the comma is 24 positions back.
  const text = "cat ".repeat(50) + ", " + "dog ".repeat(30);
  const { chunks } = tokenizeLine(tok, text);
  assert.equal(realTokens(chunks[0]!.tokens).length, 75);
  const near = "cat ".repeat(60) + ", " + "dog ".repeat(30);
  assert.equal(realTokens(tokenizeLine(tok, near).chunks[0]!.tokens).length, 61);
});

test("BREAK closes the chunk; multipliers follow fragment weights", { skip }, async () => {
  const tok = await tokenizer();
  const { chunks, tokenCount } = tokenizeLine(tok, "a BREAK b");
  assert.equal(chunks.length, 2);
  assert.deepEqual(chunks[0]!.tokens, [BOS, 320, ...new Array<number>(75).fill(EOS)]);
  assert.deepEqual(chunks[1]!.tokens, [BOS, 321, ...new Array<number>(75).fill(EOS)]);
  assert.equal(tokenCount, 76);

  const weighted = tokenizeLine(tok, "(cat:1.5) [dog]").chunks[0]!;
  assert.deepEqual(weighted.tokens.slice(0, 4), [BOS, 2368, 1929, EOS]);
  assert.deepEqual(weighted.multipliers.slice(0, 4), [1, 1.5, 1 / 1.1, 1]);

  assert.equal(tokenizeLine(tok, "BREAK a").chunks.length, 2);
  assert.deepEqual(tokenizeLine(tok, "BREAK a").chunks[0], emptyChunk(tok));
  assert.equal(tokenizeLine(tok, "a BREAK BREAK b").chunks.length, 3);
  // Inside brackets BREAK is an ordinary word with a negative weight.
  const inBrackets = tokenizeLine(tok, "(a BREAK b)");
  assert.equal(inBrackets.chunks.length, 1);
  assert.deepEqual(realTokens(inBrackets.chunks[0]!.tokens), [320, tok.encode("BREAK")[0]!, 321]);
  assert.deepEqual(inBrackets.chunks[0]!.multipliers.slice(1, 4), [1.1, -1.1, 1.1]);
});

test("fragment edges are word boundaries", { skip }, async () => {
  const tok = await tokenizer();
  const { chunks } = tokenizeLine(tok, "(hello)world");
  assert.deepEqual(realTokens(chunks[0]!.tokens), [...tok.encode("hello"), ...tok.encode("world")]);
  assert.notDeepEqual(realTokens(chunks[0]!.tokens), tok.encode("helloworld"));
});

test("emphasis None keeps brackets and BREAK literal", { skip }, async () => {
  const tok = await tokenizer();
  const { chunks } = tokenizeLine(tok, "(a BREAK b)", { emphasis: "None" });
  assert.equal(chunks.length, 1);
  assert.deepEqual(realTokens(chunks[0]!.tokens), tok.encode("(a BREAK b)"));
  assert.ok(chunks[0]!.multipliers.every((m) => m === 1));
});

test("exactly 75 tokens is one chunk; 76 is two", { skip }, async () => {
  const tok = await tokenizer();
  assert.equal(tokenizeLine(tok, "cat ".repeat(75)).chunks.length, 1);
  assert.equal(tokenizeLine(tok, "cat ".repeat(75)).tokenCount, 75);
  const two = tokenizeLine(tok, "cat ".repeat(76));
  assert.equal(two.chunks.length, 2);
  assert.equal(two.tokenCount, 76);
});
