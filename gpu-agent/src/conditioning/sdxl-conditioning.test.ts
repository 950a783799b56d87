import assert from "node:assert/strict";
import { test } from "node:test";
import { CHUNK_TOKENS, tokenizeLine, type EmphasisMode } from "./chunking.js";
import { ClipTokenizer } from "./clip-tokenizer.js";
import { Conditioner, type TextEncoder, type TokenOverrides } from "./conditioner.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const skip = kitSkip("tiny-sd15", "tokenizer");
let loaded: Promise<ClipTokenizer> | undefined;
const tokenizer = () => (loaded ??= ClipTokenizer.fromDirectory(kitFixture("tiny-sd15", "tokenizer")));

const L = 3;
const G = 5;
const POOLED = 4;

/** The two encoders' values: far apart means, so one mean over both would not restore either. */
function hiddenL(token: number, position: number, h: number): number {
  return Math.sin(token * 0.37 + position * 0.11 + h * 0.07) + 0.05;
}
function hiddenG(token: number, position: number, h: number): number {
  return 3 + Math.cos(token * 0.21 + position * 0.13 + h * 0.05);
}
/** A pooled vector that depends on the whole row of ids. */
function pooledOf(ids: Int32Array, j: number): number {
  let s = 0;
  ids.forEach((t, k) => (s += Math.sin(t * 0.01 + k * 0.3 + j)));
  return s;
}

/** SDXL's text-encoder shape: [L | G] token vectors and a pooled vector per row. */
class FakeSdxlEncoder implements TextEncoder {
  readonly hiddenSize = L + G;
  readonly parts = [L, G];
  readonly pooledSize = POOLED;
  readonly maxClipSkip = 12;
  pooledCalls = 0;

  async encode(batch: Int32Array, n: number): Promise<Float32Array> {
    return (await this.run(batch, n)).hidden;
  }

  async encodePooled(batch: Int32Array, n: number, _clipSkip: number, _signal?: AbortSignal, _o?: TokenOverrides) {
    this.pooledCalls++;
    return this.run(batch, n);
  }

  private async run(batch: Int32Array, n: number): Promise<{ hidden: Float32Array; pooled: Float32Array }> {
    const positions = batch.length / n;
    const hidden = new Float32Array(batch.length * this.hiddenSize);
    const pooled = new Float32Array(n * POOLED);
    for (let r = 0; r < n; r++) {
      for (let k = 0; k < positions; k++) {
        const t = batch[r * positions + k]!;
        const at = (r * positions + k) * this.hiddenSize;
        for (let h = 0; h < L; h++) hidden[at + h] = hiddenL(t, k, h);
        for (let h = 0; h < G; h++) hidden[at + L + h] = hiddenG(t, k, h);
      }
      for (let j = 0; j < POOLED; j++) pooled[r * POOLED + j] = pooledOf(batch.subarray(r * positions, (r + 1) * positions), j);
    }
    return { hidden, pooled };
  }
}

/** One text alone, written out: each encoder's share weighted, then its own mean restored. */
function expectedAlone(tok: ClipTokenizer, text: string, mode: EmphasisMode): Float32Array {
  const chunks = tokenizeLine(tok, text, { emphasis: mode }).chunks;
  const out = new Float32Array(chunks.length * CHUNK_TOKENS * (L + G));
  chunks.forEach((chunk, ci) => {
    for (const [start, width, f] of [
      [0, L, hiddenL],
      [L, G, hiddenG],
    ] as const) {
      let before = 0;
      let after = 0;
      chunk.tokens.forEach((t, k) => {
        for (let h = 0; h < width; h++) {
          before += f(t, k, h);
          after += f(t, k, h) * Math.fround(chunk.multipliers[k]!);
        }
      });
      const scale = mode === "Original" ? before / after : 1;
      chunk.tokens.forEach((t, k) => {
        for (let h = 0; h < width; h++) {
          out[(ci * CHUNK_TOKENS + k) * (L + G) + start + h] = f(t, k, h) * Math.fround(chunk.multipliers[k]!) * scale;
        }
      });
    }
  });
  return out;
}

test("SDXL emphasis: each encoder's share restores its own mean, as A1111's two embedders do", { skip }, async () => {
  const tok = await tokenizer();
  const conditioner = new Conditioner({ tokenizer: tok, encoder: new FakeSdxlEncoder() });
  for (const mode of ["Original", "No norm"] as EmphasisMode[]) {
    const text = "a (red:1.5) [fox] BREAK (sky:0.6)";
    const [cond] = await conditioner.encodeBatch([text], { emphasis: mode });
    const expected = expectedAlone(tok, text, mode);
    assert.equal(cond!.data.length, expected.length);
    for (let i = 0; i < expected.length; i++) {
      assert.ok(Math.abs(cond!.data[i]! - expected[i]!) < 2e-5, `${mode}[${i}]: ${cond!.data[i]} vs ${expected[i]}`);
    }
  }
  // The test can fail: one mean over the concatenation gives other values.
  const [one] = await conditioner.encodeBatch(["(red:1.5) cat"], { emphasis: "Original" });
  const whole = new Conditioner({ tokenizer: tok, encoder: Object.assign(new FakeSdxlEncoder(), { parts: undefined }) });
  const [merged] = await whole.encodeBatch(["(red:1.5) cat"], { emphasis: "Original" });
  assert.notDeepEqual(one!.data, merged!.data);
});

test("SDXL pooled vector: the first chunk's, before emphasis, one per text of the batch", { skip }, async () => {
  const tok = await tokenizer();
  const enc = new FakeSdxlEncoder();
  const conditioner = new Conditioner({ tokenizer: tok, encoder: enc });
  const long = "word ".repeat(80) + "cat";
  const [a, b, plain] = await conditioner.encodeBatch(["(cat:1.4) dog", long, "cat dog"]);
  const firstChunk = (text: string) => {
    const ids = Int32Array.from(tokenizeLine(tok, text, {}).chunks[0]!.tokens);
    return Float32Array.from({ length: POOLED }, (_, j) => pooledOf(ids, j));
  };
  assert.deepEqual(a!.pooled, firstChunk("(cat:1.4) dog"));
  assert.deepEqual(b!.pooled, firstChunk(long));
  assert.equal(b!.tokens, 2 * CHUNK_TOKENS);
  // Emphasis changes the token vectors, never the pooled vector.
  assert.deepEqual(a!.pooled, plain!.pooled);
  assert.notDeepEqual(a!.data, plain!.data);
  assert.equal(enc.pooledCalls, 1, "only chunk 0 asks for the pooled output");
});

test("SDXL: an empty negative prompt conditions on zeros; any text, or a positive empty prompt, does not", { skip }, async () => {
  const tok = await tokenizer();
  const conditioner = new Conditioner({ tokenizer: tok, encoder: new FakeSdxlEncoder() });
  const zero = (a: Float32Array | undefined) => a !== undefined && a.length > 0 && a.every((v) => v === 0);

  const empty = await conditioner.prepare({ prompt: "", negativePrompt: "", steps: 10 });
  const u = empty.uncondAt(0);
  assert.ok(zero(u.tensor) && zero(u.pooled), "negative: zeros, pooled too");
  assert.equal(u.tokens, CHUNK_TOKENS);
  const c = empty.condAt(0)[0]!;
  assert.ok(!zero(c.tensor) && !zero(c.pooled), "the positive empty prompt is encoded");
  assert.equal(c.pooled!.length, POOLED);

  // The zeros are the run's own: the cached encoding of "" stays as CLIP made it.
  const again = await conditioner.prepare({ prompt: "x", negativePrompt: "", steps: 10 });
  assert.ok(zero(again.uncondAt(0).tensor));
  assert.ok(!zero((await conditioner.encodeBatch([""]))[0]!.data));

  const scheduled = await conditioner.prepare({ prompt: "x", negativePrompt: "[:blurry:5]", steps: 10 });
  assert.ok(!zero(scheduled.uncondAt(0).tensor), "a schedule with one non-empty text is encoded throughout");
  assert.ok(!zero(scheduled.uncondAt(0).pooled));
  const text = await conditioner.prepare({ prompt: "x", negativePrompt: "blurry", steps: 10 });
  assert.ok(!zero(text.uncondAt(0).tensor));
});

test("SDXL pooled vectors follow prompt editing and AND subprompts per denoiser call", { skip }, async () => {
  const tok = await tokenizer();
  const conditioner = new Conditioner({ tokenizer: tok, encoder: new FakeSdxlEncoder() });
  const p = await conditioner.prepare({ prompt: "[cat:dog:3] AND sky :0.5", negativePrompt: "ugly", steps: 10 });
  const [cat, dog] = p.subprompts[0]!.schedule;
  assert.deepEqual(p.condAt(0)[0]!.pooled, cat!.cond.pooled);
  assert.deepEqual(p.condAt(5)[0]!.pooled, dog!.cond.pooled);
  assert.notDeepEqual(cat!.cond.pooled, dog!.cond.pooled);
  assert.deepEqual(p.condAt(5)[1]!.pooled, p.subprompts[1]!.schedule[0]!.cond.pooled);
  assert.deepEqual(p.uncondAt(5).pooled, p.negative[0]!.cond.pooled);
});
