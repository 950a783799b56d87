import assert from "node:assert/strict";
import { test } from "node:test";
import { ClipTokenizer } from "./clip-tokenizer.js";
import { describePrompt } from "./describe.js";
import { EmbeddingDatabase } from "./embeddings.js";
import { getPromptSchedule } from "./schedule.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const TOKENIZER_DIR = kitFixture("tiny-sd15", "tokenizer");
const skip = kitSkip("tiny-sd15", "tokenizer");
let loaded: Promise<ClipTokenizer> | undefined;
const tokenizer = () => (loaded ??= ClipTokenizer.fromDirectory(TOKENIZER_DIR));

test("describePrompt: attention, schedule, chunks, counter", { skip }, async () => {
  const d = describePrompt(await tokenizer(), "<lora:x:0.5>a (cat:1.2) [on:in:2] the mat", 10);
  assert.deepEqual(d.schedule, [
    [2, "a (cat:1.2) on the mat"],
    [10, "a (cat:1.2) in the mat"],
  ]);
  assert.deepEqual(d.attention, [
    ["a ", 1],
    ["cat", 1.2],
    [" on the mat", 1],
  ]);
  assert.equal(d.chunks.length, 1);
  assert.deepEqual(d.chunks[0]!.tokens.slice(0, 7), [49406, 320, 2368, 525, 518, 9063, 49407]);
  assert.deepEqual(d.chunks[0]!.multipliers.slice(0, 4), [1, 1, 1.2, 1]);
  assert.equal(d.token_count, 5);
  assert.equal(d.max_length, 75);
  assert.deepEqual(
    d.networks.map((n) => n.name),
    ["x"],
  );
});

test("the counter takes the longest AND part and schedule text", { skip }, async () => {
  const tok = await tokenizer();
  const long = "word ".repeat(80);
  const d = describePrompt(tok, `short [x:${long}:3] AND tiny`, 10);
  assert.equal(d.token_count, 75 + 6);
  assert.equal(d.max_length, 150);
  assert.equal(describePrompt(tok, "a BREAK b", 10).token_count, 76);
  assert.equal(describePrompt(tok, "", 10).token_count, 0);
  assert.equal(describePrompt(tok, "", 10).max_length, 75);
});

test("bad input: 10,000 characters, unbalanced brackets, [a:b:NaN], unknown and malformed tags", { skip }, async () => {
  const tok = await tokenizer();
  const huge = "masterpiece, (best:1.2) [quality|detail] [a:b:0.5] ((".repeat(200).slice(0, 10_000);
  const t0 = performance.now();
  const d = describePrompt(tok, huge, 20);
  assert.ok(performance.now() - t0 < 3000);
  assert.ok(d.chunks.length > 10);
  assert.ok(d.chunks.every((c) => c.tokens.length === 77 && c.multipliers.length === 77));
  assert.deepEqual(describePrompt(tok, "a ((b [c", 10).attention, [
    ["a ", 1],
    ["b ", 1.2100000000000002],
    ["c", 1.2100000000000002 / 1.1],
  ]);
  assert.deepEqual(getPromptSchedule("[a:b:NaN]", 10), [[10, "[a:b:NaN]"]]);
  assert.deepEqual(describePrompt(tok, "[a:b:NaN]", 10).attention, [["a:b:NaN", 1 / 1.1]]);
  const unknownTag = describePrompt(tok, "x <hypernet:y:1> <lora:te=1>", 10);
  assert.equal(unknownTag.schedule[0]![1], "x <hypernet:y:1> <lora:te=1>");
  assert.deepEqual(describePrompt(tok, "x <hypernet:y:1>", 10).schedule, [[10, "x "]]);
});

test("the counter counts an embedding's vectors, as A1111's does", { skip }, async () => {
  const tok = await tokenizer();
  const embedding = { name: "zqxj", vectors: 8, hidden: 4, data: new Float32Array(32), sha256: "0".repeat(64) };
  const plain = describePrompt(tok, "a zqxj cube", 10);
  const d = describePrompt(tok, "a zqxj cube", 10, { embeddings: new EmbeddingDatabase(tok, [embedding]) });
  assert.equal(d.token_count, 1 + 8 + 1);
  assert.notEqual(plain.token_count, d.token_count);
  assert.deepEqual(
    d.chunks[0]!.fixes?.map((f) => [f.embedding.name, f.position]),
    [["zqxj", 2]],
  );
});
