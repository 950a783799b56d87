import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { CHUNK_TOKENS, emptyChunk, tokenizeLine, type EmphasisMode, type PromptChunk } from "./chunking.js";
import { ClipTokenizer, parseMerges } from "./clip-tokenizer.js";
import { Conditioner, type PrepareRequest } from "./conditioner.js";
import { ConditioningPreconditionError } from "./errors.js";
import { getPromptSchedule } from "./schedule.js";
import { FakeTextEncoder, fakeHidden } from "./test-support/fake-text-encoder.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const TOKENIZER_DIR = kitFixture("tiny-sd15", "tokenizer");
const skip = kitSkip("tiny-sd15", "tokenizer");
let loaded: Promise<ClipTokenizer> | undefined;
const tokenizer = () => (loaded ??= ClipTokenizer.fromDirectory(TOKENIZER_DIR));
const H = 8;

/**
 * The spec's §2.3–2.4 written out literally: every schedule text is a row of the batch (repeats
 * included), short texts get empty chunks, and for each chunk index the mean is taken over the
 * whole [B, 77, H] tensor. No deduplication, float64 except the final float32 store.
 */
function naiveBatch(tok: ClipTokenizer, texts: string[], mode: EmphasisMode, clipSkip = 1): Float32Array[] {
  const chunked = texts.map((t) => tokenizeLine(tok, t, { emphasis: mode }).chunks);
  const chunkCount = Math.max(...chunked.map((c) => c.length));
  const out = texts.map(() => new Float32Array(chunkCount * CHUNK_TOKENS * H));
  for (let ci = 0; ci < chunkCount; ci++) {
    const rows: PromptChunk[] = chunked.map((c) => c[ci] ?? emptyChunk(tok));
    const z = rows.map((r) => r.tokens.map((t, k) => Array.from({ length: H }, (_, h) => fakeHidden(t, k, h, clipSkip))));
    let mean0 = 0;
    let mean1 = 0;
    rows.forEach((r, b) =>
      r.tokens.forEach((_, k) =>
        z[b]![k]!.forEach((v) => {
          mean0 += v;
          mean1 += v * r.multipliers[k]!;
        }),
      ),
    );
    const scale = mode === "Original" ? mean0 / mean1 : 1;
    rows.forEach((r, b) =>
      r.tokens.forEach((_, k) =>
        z[b]![k]!.forEach((v, h) => {
          const m = mode === "Ignore" || mode === "None" ? 1 : r.multipliers[k]!;
          out[b]![(ci * CHUNK_TOKENS + k) * H + h] = v * m * scale;
        }),
      ),
    );
  }
  return out;
}

function assertClose(actual: Float32Array, expected: Float32Array, tol: number, label: string): void {
  assert.equal(actual.length, expected.length, label);
  for (let i = 0; i < actual.length; i++) {
    assert.ok(Math.abs(actual[i]! - expected[i]!) <= tol, `${label}[${i}]: ${actual[i]} vs ${expected[i]}`);
  }
}

test("emphasis mean is taken over the whole schedule batch, repeats and filler chunks included", { skip }, async () => {
  const tok = await tokenizer();
  const prompts: Array<[string, number]> = [
    ["[(cat:1.3):dog BREAK (bird:0.7):0.5]", 10], // two variants, 1 and 2 chunks → a filler chunk
    ["[(a:1.2)|b|b]", 4], // alternation: texts a, b, b, a → repeats weigh in the mean
    ["a (red:1.4) [fox] " + "word ".repeat(80), 6], // 2 chunks, no schedule
  ];
  for (const mode of ["Original", "No norm", "Ignore"] as EmphasisMode[]) {
    for (const [prompt, steps] of prompts) {
      const enc = new FakeTextEncoder(H);
      const conditioner = new Conditioner({ tokenizer: tok, encoder: enc });
      const schedule = getPromptSchedule(prompt, steps);
      const expected = naiveBatch(
        tok,
        schedule.map(([, t]) => t),
        mode,
      );
      const got = await conditioner.scheduledConditioning(prompt, { steps, emphasis: mode });
      assert.equal(got.length, schedule.length);
      got.forEach((entry, i) => {
        assert.equal(entry.endAtStep, schedule[i]![0]);
        assert.equal(entry.text, schedule[i]![1]);
        assertClose(entry.cond.data, expected[i]!, 2e-6, `${mode} ${prompt} entry ${i}`);
      });
    }
  }
});

test("the mean really depends on the batch: a variant alone differs from it within its schedule", { skip }, async () => {
  const tok = await tokenizer();
  const conditioner = new Conditioner({ tokenizer: tok, encoder: new FakeTextEncoder(H) });
  const [alone] = await conditioner.encodeBatch(["(cat:1.3)"]);
  const inSchedule = await conditioner.scheduledConditioning("[(cat:1.3):dog:0.5]", { steps: 10 });
  assert.equal(inSchedule[0]!.text, "(cat:1.3)");
  assert.notDeepEqual(alone!.data, inSchedule[0]!.cond.data);
});

test("prepare: AND subprompts, negative prompt, condAt/uncondAt by denoiser call", { skip }, async () => {
  const tok = await tokenizer();
  const enc = new FakeTextEncoder(H);
  const conditioner = new Conditioner({ tokenizer: tok, encoder: enc });
  const prepared = await conditioner.prepare({
    prompt: "<lora:detail:0.8:0.5> a [cat:dog:3] :1.2 AND sky BREAK sea:0.5",
    negativePrompt: "blurry AND <lora:x:1>",
    steps: 10,
  });
  assert.equal(prepared.positivePrompt, " a [cat:dog:3] :1.2 AND sky BREAK sea:0.5");
  assert.deepEqual(prepared.extraNetworks.networks, [{ kind: "lora", name: "detail", teWeight: 0.8, unetWeight: 0.5 }]);
  assert.deepEqual(
    prepared.subprompts.map((s) => [s.text, s.weight]),
    [
      [" a [cat:dog:3]", 1.2],
      [" sky BREAK sea", 0.5],
    ],
  );
  const [catSchedule] = [prepared.subprompts[0]!.schedule];
  assert.deepEqual(
    catSchedule.map((s) => [s.endAtStep, s.text]),
    [
      [3, " a cat"],
      [10, " a dog"],
    ],
  );
  for (const [step, entry] of [
    [0, 0],
    [3, 0],
    [4, 1],
    [9, 1],
    [11, 0],
  ] as const) {
    const conds = prepared.condAt(step);
    assert.equal(conds.length, 2);
    // The one-chunk subprompt is stacked with the two-chunk one: its last token vector repeats.
    const own = catSchedule[entry]!.cond.data;
    assert.deepEqual(conds[0]!.tensor.subarray(0, own.length), own, `step ${step}`);
    assert.equal(conds[0]!.tokens, 154);
    assert.equal(conds[0]!.weight, 1.2);
    assert.equal(conds[1]!.tokens, 154);
    assert.equal(conds[1]!.tensor, prepared.subprompts[1]!.schedule[0]!.cond.data);
    assert.equal(conds[1]!.weight, 0.5);
  }
  // The negative prompt is neither AND-split nor stripped of tags.
  assert.equal(prepared.negative[0]!.text, "blurry AND <lora:x:1>");
  const [expectedUncond] = naiveBatch(tok, ["blurry AND <lora:x:1>"], "Original");
  assertClose(prepared.uncondAt(5).tensor, expectedUncond!, 2e-6, "uncond");
  assert.equal(prepared.uncondAt(5).tokens, 77);
  assert.equal(prepared.padding, undefined);
});

test("cache: a batch encodes its prompt once; clip skip and steps are part of the key; LRU bound", { skip }, async () => {
  const tok = await tokenizer();
  const enc = new FakeTextEncoder(H, 3, 5);
  const conditioner = new Conditioner({ tokenizer: tok, encoder: enc, cacheEntries: 3 });
  const req = { prompt: "a cat", negativePrompt: "", steps: 20 };
  const batch = await Promise.all([1, 2, 3, 4].map(() => conditioner.prepare(req)));
  assert.equal(enc.calls.length, 2); // "a cat" and ""
  assert.equal(batch[0]!.condAt(0)[0]!.tensor, batch[3]!.condAt(0)[0]!.tensor);
  await conditioner.prepare(req);
  assert.equal(enc.calls.length, 2);
  await conditioner.prepare({ ...req, clipSkip: 2 });
  assert.equal(enc.calls.length, 4);
  assert.equal(enc.calls[3]!.clipSkip, 2);
  await conditioner.prepare({ ...req, steps: 30 });
  assert.equal(enc.calls.length, 6);
  // Capacity 3: ("a cat",20,skip1) was evicted by now.
  await conditioner.prepare(req);
  assert.equal(enc.calls.length, 8);
  conditioner.clearCache();
  await conditioner.prepare(req);
  assert.equal(enc.calls.length, 10);
});

test("a batch of 64 images encodes its prompt once per (model, prompt, clip skip)", { skip }, async () => {
  const tok = await tokenizer();
  // A slow encoder, so all 64 requests are in flight before the first encode finishes.
  const enc = new FakeTextEncoder(H, 3, 10);
  const conditioner = new Conditioner({ tokenizer: tok, encoder: enc });
  const req = { prompt: "a [cat:dog:0.5] on a sofa", negativePrompt: "blurry", steps: 20 };
  const images = await Promise.all(Array.from({ length: 64 }, () => conditioner.prepare(req)));
  // One call for the positive prompt's whole schedule (both texts, one row each), one for the negative.
  assert.equal(enc.calls.length, 2);
  assert.deepEqual(enc.calls.map((c) => c.n).sort(), [1, 2]);
  for (const step of [0, 15]) {
    for (const image of images) {
      assert.equal(image.condAt(step)[0]!.tensor, images[0]!.condAt(step)[0]!.tensor);
      assert.equal(image.uncondAt(step).tensor, images[0]!.uncondAt(step).tensor);
    }
  }
  // A second batch of 64 after the first finished: answered from the cache.
  for (let i = 0; i < 64; i++) await conditioner.prepare(req);
  assert.equal(enc.calls.length, 2);

  // Another clip skip is another key: the prompt is encoded again, once, for all 64.
  await Promise.all(Array.from({ length: 64 }, () => conditioner.prepare({ ...req, clipSkip: 2 })));
  assert.equal(enc.calls.length, 4);
  assert.deepEqual(
    enc.calls.slice(2).map((c) => c.clipSkip),
    [2, 2],
  );

  // Each model has its own Conditioner (LoadedPipeline.conditioner()), so another model's
  // encoder is asked once too, and never answered from this model's cache.
  const otherEnc = new FakeTextEncoder(H, 3, 10);
  const other = new Conditioner({ tokenizer: tok, encoder: otherEnc });
  await Promise.all(Array.from({ length: 64 }, () => other.prepare(req)));
  assert.equal(otherEnc.calls.length, 2);
  assert.equal(enc.calls.length, 4);
});

test("an aborted encode rejects, is not cached, and does not fail another caller", { skip }, async () => {
  const tok = await tokenizer();
  const enc = new FakeTextEncoder(H, 3, 20);
  const conditioner = new Conditioner({ tokenizer: tok, encoder: enc });
  const controller = new AbortController();
  const first = conditioner.prepare({ prompt: "a cat", steps: 10, signal: controller.signal });
  const second = conditioner.prepare({ prompt: "a cat", steps: 10 });
  controller.abort();
  await assert.rejects(first, (err: unknown) => err instanceof Error && err.name === "AbortError");
  const result = await second;
  assert.equal(result.condAt(0)[0]!.tokens, 77);
});

test("clip skip checks: FAILED_PRECONDITION with the reason", { skip }, async () => {
  const tok = await tokenizer();
  const noHidden = new Conditioner({ tokenizer: tok, encoder: new FakeTextEncoder(H, 1) });
  await assert.rejects(noHidden.prepare({ prompt: "x", steps: 5, clipSkip: 2 }), (err: unknown) => {
    assert.ok(err instanceof ConditioningPreconditionError);
    assert.equal(err.codeName, "FAILED_PRECONDITION");
    assert.match(err.message, /hidden_states/);
    return true;
  });
  const twelve = new Conditioner({ tokenizer: tok, encoder: new FakeTextEncoder(H, 12) });
  await assert.rejects(twelve.prepare({ prompt: "x", steps: 5, clipSkip: 13 }), /at most 12/);
  await assert.rejects(twelve.prepare({ prompt: "x", steps: 5, clipSkip: 0 }), ConditioningPreconditionError);
  await assert.rejects(twelve.prepare({ prompt: "x", steps: 0 }), /steps/);
});

test("a tokenizer whose pad differs from EOS (SD2) pads after the first EOS", { skip }, async () => {
  const vocab = JSON.parse(readFileSync(join(TOKENIZER_DIR, "vocab.json"), "utf8")) as Record<string, number>;
  const merges = parseMerges(readFileSync(join(TOKENIZER_DIR, "merges.txt"), "utf8"));
  const tok = new ClipTokenizer(vocab, merges, { padToken: "!" });
  assert.equal(tok.padId, 0);
  const enc = new FakeTextEncoder(H);
  await new Conditioner({ tokenizer: tok, encoder: enc }).encodeBatch(["a cat"]);
  assert.deepEqual([...enc.calls[0]!.batch.slice(0, 5)], [49406, 320, 2368, 49407, 0]);
  assert.equal(enc.calls[0]!.batch[76], 0);
});

/** Token vector `t` of a [tokens, H] tensor. */
const tokenAt = (tensor: Float32Array, t: number): number[] => [...tensor.subarray(t * H, (t + 1) * H)];

const LONG = Array.from({ length: 90 }, () => "sea").join(" ");

async function padded(req: Omit<PrepareRequest, "steps">) {
  const tok = await tokenizer();
  const conditioner = new Conditioner({ tokenizer: tok, encoder: new FakeTextEncoder(H) });
  const prepared = await conditioner.prepare({ steps: 4, ...req });
  const alone = async (text: string, emphasis: EmphasisMode = "Original") =>
    (await conditioner.scheduledConditioning(text, { steps: 4, emphasis }))[0]!.cond.data;
  return { prepared, alone };
}

test("AND subprompts of different lengths are stacked: the shorter repeats its last token vector", { skip }, async () => {
  const { prepared, alone } = await padded({ prompt: `cat AND ${LONG}`, negativePrompt: "" });
  const [short, long] = prepared.condAt(0);
  const cat = await alone("cat");
  assert.equal(short!.tokens, 154);
  assert.deepEqual(short!.tensor.subarray(0, 77 * H), cat);
  for (const t of [77, 100, 153]) assert.deepEqual(tokenAt(short!.tensor, t), tokenAt(cat, 76), `token ${t}`);
  assert.equal(long!.tensor, await alone(` ${LONG}`));
  // Without a padding option the negative prompt keeps its own length, and the pair runs as two batches.
  assert.equal(prepared.uncondAt(0).tokens, 77);
  assert.equal(prepared.padding, undefined);
  // The same padded tensor serves every call of the run.
  assert.equal(prepared.condAt(3)[0]!.tensor, short!.tensor);
});

test("Pad conds: the shorter side gets copies of the empty prompt's 77 vectors", { skip }, async () => {
  const negShort = await padded({ prompt: LONG, negativePrompt: "blurry", padCondUncond: true });
  const empty = await negShort.alone("", "None");
  const blurry = await negShort.alone("blurry");
  const uncond = negShort.prepared.uncondAt(0);
  assert.equal(uncond.tokens, 154);
  assert.deepEqual(uncond.tensor.subarray(0, 77 * H), blurry);
  assert.deepEqual(uncond.tensor.subarray(77 * H), empty);
  assert.equal(negShort.prepared.condAt(0)[0]!.tokens, 154);
  assert.equal(negShort.prepared.padding, "Pad conds");

  // A longer negative prompt pads the prompt instead, after AND's stacking.
  const negLong = await padded({ prompt: "cat AND dog", negativePrompt: LONG, padCondUncond: true });
  const [cat] = negLong.prepared.condAt(0);
  assert.equal(cat!.tokens, 154);
  assert.deepEqual(cat!.tensor.subarray(0, 77 * H), await negLong.alone("cat"));
  assert.deepEqual(cat!.tensor.subarray(77 * H), empty);
  assert.equal(negLong.prepared.uncondAt(0).tensor, await negLong.alone(LONG));

  // Equal lengths: nothing is padded and no entry is written.
  const equal = await padded({ prompt: "cat", negativePrompt: "dog", padCondUncond: true });
  assert.equal(equal.prepared.padding, undefined);
  assert.equal(equal.prepared.uncondAt(0).tensor, await equal.alone("dog"));
});

test(
  "Pad conds with a base text encoder (a LoRA merged into this one): its empty prompt, opened once per clip skip",
  { skip },
  async () => {
    const tok = await tokenizer();
    const base = new FakeTextEncoder(H, 3);
    let opened = 0;
    let closed = 0;
    const conditioner = new Conditioner({
      tokenizer: tok,
      // The merged encoder: any values but the base's.
      encoder: { hiddenSize: H, maxClipSkip: 3, encode: async (b, n, c) => (await base.encode(b, n, c)).map((v) => v + 1) },
      emptyPromptEncoder: async () => {
        opened++;
        return { encoder: base, close: async () => void closed++ };
      },
    });
    const prepare = (clipSkip: number) =>
      conditioner.prepare({ prompt: LONG, negativePrompt: "blurry", steps: 4, clipSkip, padCondUncond: true });
    const empty = (clipSkip: number) => base.encode(Int32Array.from(emptyChunk(tok).tokens), 1, clipSkip);
    assert.deepEqual((await prepare(1)).uncondAt(0).tensor.subarray(77 * H), await empty(1));
    await prepare(1);
    assert.deepEqual([opened, closed], [1, 1]);
    assert.deepEqual((await prepare(2)).uncondAt(0).tensor.subarray(77 * H), await empty(2));
    assert.deepEqual([opened, closed], [2, 2]);
  },
);

test("Pad conds v0: the negative prompt repeats its last vector, or is cut, to the prompt's length", { skip }, async () => {
  const longer = await padded({ prompt: LONG, negativePrompt: "blurry", padCondUncondV0: true, padCondUncond: true });
  const blurry = await longer.alone("blurry");
  const uncond = longer.prepared.uncondAt(0);
  assert.equal(uncond.tokens, 154);
  assert.deepEqual(uncond.tensor.subarray(0, 77 * H), blurry);
  for (const t of [77, 153]) assert.deepEqual(tokenAt(uncond.tensor, t), tokenAt(blurry, 76));
  assert.equal(longer.prepared.padding, "Pad conds v0");

  const shorter = await padded({ prompt: "cat", negativePrompt: LONG, padCondUncondV0: true });
  const cut = shorter.prepared.uncondAt(0);
  assert.equal(cut.tokens, 77);
  assert.deepEqual(cut.tensor, (await shorter.alone(LONG)).subarray(0, 77 * H));
  assert.equal(shorter.prepared.condAt(0)[0]!.tokens, 77);
});

test("a text that is both a subprompt and the negative prompt is padded for each role apart", { skip }, async () => {
  const { prepared, alone } = await padded({ prompt: `cat AND ${LONG}`, negativePrompt: "cat" });
  const cat = await alone("cat");
  assert.equal(prepared.condAt(0)[0]!.tokens, 154);
  assert.equal(prepared.uncondAt(0).tensor, cat);
});
