import assert from "node:assert/strict";
import { test } from "node:test";
import { ClipTokenizer } from "./clip-tokenizer.js";
import { CHUNK_LENGTH, tokenizeLine } from "./chunking.js";
import { EmbeddingDatabase, type TextualInversionEmbedding } from "./embeddings.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const skip = kitSkip("tiny-sd15", "tokenizer");
let loaded: Promise<ClipTokenizer> | undefined;
const tokenizer = () => (loaded ??= ClipTokenizer.fromDirectory(kitFixture("tiny-sd15", "tokenizer")));

const EOS = 49407;

function embedding(name: string, vectors: number, hidden = 4): TextualInversionEmbedding {
  return {
    name,
    vectors,
    hidden,
    data: new Float32Array(vectors * hidden).fill(vectors),
    sha256: `${name.length}`.repeat(64).slice(0, 64),
  };
}

test("an embedding's name becomes one placeholder (token 0) per vector, with its fragment's weight", { skip }, async () => {
  const tok = await tokenizer();
  const db = new EmbeddingDatabase(tok, [embedding("zqxj", 3)]);
  const { chunks, tokenCount } = tokenizeLine(tok, "a (zqxj:1.5) cube", { embeddings: db });
  assert.equal(chunks.length, 1);
  const [a, cube] = [tok.encode("a")[0]!, tok.encode("cube")[0]!];
  assert.deepEqual(chunks[0]!.tokens.slice(0, 7), [49406, a, 0, 0, 0, cube, EOS]);
  assert.deepEqual(chunks[0]!.multipliers.slice(0, 7), [1, 1, 1.5, 1.5, 1.5, 1, 1]);
  assert.deepEqual(
    chunks[0]!.fixes?.map((f) => [f.position, f.embedding.name]),
    [[2, "zqxj"]],
  );
  // A1111 counts the placeholders as tokens.
  assert.equal(tokenCount, 5);
  // Without the database the name is words.
  assert.equal(tokenizeLine(tok, "a (zqxj:1.5) cube").chunks[0]!.fixes, undefined);
});

test("a name is matched within one prompt fragment only, as A1111 tokenizes fragment by fragment", { skip }, async () => {
  const tok = await tokenizer();
  const db = new EmbeddingDatabase(tok, [embedding("red car", 2)]);
  assert.equal(tokenizeLine(tok, "a red car", { embeddings: db }).chunks[0]!.fixes?.length, 1);
  assert.equal(tokenizeLine(tok, "a (red) car", { embeddings: db }).chunks[0]!.fixes, undefined);
  assert.equal(tokenizeLine(tok, "a red car", { embeddings: db, emphasis: "None" }).chunks[0]!.fixes?.length, 1);
});

test("where names overlap, the one of most tokens wins", { skip }, async () => {
  const tok = await tokenizer();
  const db = new EmbeddingDatabase(tok, [embedding("red", 1), embedding("red car", 2)]);
  const fixes = tokenizeLine(tok, "red car, red boat", { embeddings: db }).chunks[0]!.fixes!;
  assert.deepEqual(
    fixes.map((f) => [f.position, f.embedding.name]),
    [
      [1, "red car"],
      [4, "red"],
    ],
  );
  assert.equal(db.findAt(tok.encode("red"), 0)?.embedding.name, "red");
  assert.equal(db.findAt(tok.encode("boat"), 0), undefined);
});

test("an embedding never straddles two chunks: one that does not fit starts the next", { skip }, async () => {
  const tok = await tokenizer();
  const db = new EmbeddingDatabase(tok, [embedding("zqxj", 3)]);
  // 73 one-token words leave 2 places: a 3-vector embedding moves on, and the first chunk is padded.
  const words = Array.from({ length: 73 }, () => "cat").join(" ");
  const { chunks, tokenCount } = tokenizeLine(tok, `${words} zqxj`, { embeddings: db, commaPaddingBacktrack: 0 });
  assert.equal(chunks.length, 2);
  assert.deepEqual(chunks[0]!.tokens.slice(74, 77), [EOS, EOS, EOS]);
  assert.equal(chunks[0]!.fixes, undefined);
  assert.deepEqual(
    chunks[1]!.fixes?.map((f) => f.position),
    [1],
  );
  assert.deepEqual(chunks[1]!.tokens.slice(0, 5), [49406, 0, 0, 0, EOS]);
  assert.equal(tokenCount, CHUNK_LENGTH + 3);
  // Two places are enough for a 2-vector one.
  const two = new EmbeddingDatabase(tok, [embedding("zqxj", 2)]);
  const fit = tokenizeLine(tok, `${words} zqxj`, { embeddings: two, commaPaddingBacktrack: 0 });
  assert.equal(fit.chunks.length, 1);
  assert.deepEqual(
    fit.chunks[0]!.fixes?.map((f) => f.position),
    [74],
  );
});

test("comma backtrack moves placeholders on but leaves their fix with the chunk they were placed in, as A1111", { skip }, async () => {
  const tok = await tokenizer();
  const db = new EmbeddingDatabase(tok, [embedding("zqxj", 2)]);
  // 70 words, a comma, the embedding, 2 words: the chunk is full at 75 and the next word backtracks to the comma.
  const words = Array.from({ length: 70 }, () => "cat").join(" ");
  const { chunks } = tokenizeLine(tok, `${words}, zqxj dog dog dog`, { embeddings: db });
  assert.equal(chunks.length, 2);
  // The first chunk ends after the comma (71 tokens), and keeps the fix at the placeholders' old place.
  assert.equal(chunks[0]!.tokens[72], EOS);
  assert.deepEqual(
    chunks[0]!.fixes?.map((f) => f.position),
    [72],
  );
  // The placeholders moved on as plain token 0, without vectors.
  assert.deepEqual(chunks[1]!.tokens.slice(1, 3), [0, 0]);
  assert.equal(chunks[1]!.fixes, undefined);
});
