import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, type Image } from "@latentfarm/shared";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { StepBatcher, type StepBatcherOptions } from "./step-batcher.js";
import { renderTask } from "./txt2img.js";
import { TINY_SD15 } from "../test-support/kit.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const TINY = TINY_SD15;

test("requests that arrive together share one call; different shapes never mix", async () => {
  const calls: Array<{ n: number; h: number; seq: number; t: number[] }> = [];
  const b = new StepBatcher(
    async (sample, ts, _ctx, d) => {
      calls.push({ n: d.n, h: d.h, seq: d.seq, t: [...ts] });
      // "eps" = sample + timestep, so each row's result is traceable to its own input.
      const out = new Float32Array(sample.length);
      const plane = sample.length / d.n;
      for (let i = 0; i < sample.length; i++) out[i] = sample[i]! + ts[Math.floor(i / plane)]!;
      return out;
    },
    1,
    2,
  );
  const req = (v: number, t: number, h = 1, seq = 1, contexts = 2) => ({
    x: new Float32Array(h).fill(v),
    t,
    contexts: Array.from({ length: contexts }, () => new Float32Array(seq * 2)),
    h,
    w: 1,
    seq,
  });
  const [a, c, d] = await Promise.all([b.evaluate(req(1, 10)), b.evaluate(req(2, 20)), b.evaluate(req(3, 30, 2))]);
  assert.deepEqual(
    calls.map((c) => c.n),
    [4, 2],
    "two same-shape images in one call, the other shape in its own",
  );
  assert.deepEqual(calls[0]!.t, [10, 10, 20, 20]);
  assert.deepEqual([...a![0]!], [11]);
  assert.deepEqual([...c![1]!], [22]);
  assert.deepEqual([...d![0]!], [33, 33]);
});

test("a failing call rejects every request in it, and the batcher keeps serving", async () => {
  let fail = true;
  const b = new StepBatcher(
    async (s) => {
      if (fail) throw new Error("boom");
      return s;
    },
    1,
    1,
  );
  const r = () => ({ x: new Float32Array([1]), t: 1, contexts: [new Float32Array(1)], h: 1, w: 1, seq: 1 });
  const results = await Promise.allSettled([b.evaluate(r()), b.evaluate(r())]);
  assert.deepEqual(
    results.map((x) => x.status),
    ["rejected", "rejected"],
  );
  fail = false;
  assert.deepEqual([...(await b.evaluate(r()))[0]!], [1]);
});

/** A batcher over channels 1 and dim 1 whose UNet answers a copy of its sample, recording the sample arrays it got. */
function recordingBatcher(opts?: StepBatcherOptions): { batcher: StepBatcher; samples: Float32Array[] } {
  const samples: Float32Array[] = [];
  const batcher = new StepBatcher(
    async (sample) => {
      samples.push(sample);
      return new Float32Array(sample);
    },
    1,
    1,
    opts,
  );
  return { batcher, samples };
}

test("a shape's input buffers are kept between calls, and an unchanged context is not copied again", async () => {
  const seen: Array<{ sample: Float32Array; ctx: Float32Array; ctxValues: number[]; sampleValues: number[]; unchanged?: boolean }> = [];
  const b = new StepBatcher(
    async (sample, _ts, ctx, d) => {
      seen.push({ sample, ctx, ctxValues: [...ctx], sampleValues: [...sample], unchanged: d.contextUnchanged });
      return sample.map((v) => v * 10);
    },
    1,
    2,
  );
  const a = new Float32Array([1, 2]);
  const c = new Float32Array([3, 4]);
  const req = (v: number, contexts: Float32Array[]) => ({ x: new Float32Array([v]), t: v, contexts, h: 1, w: 1, seq: 1 });
  assert.deepEqual(
    (await b.evaluate(req(1, [a, c]))).map((o) => [...o]),
    [[10], [10]],
  );
  assert.deepEqual(
    (await b.evaluate(req(2, [a, c]))).map((o) => [...o]),
    [[20], [20]],
  );
  // The rows' contexts swap: both rows must be written again.
  assert.deepEqual(
    (await b.evaluate(req(3, [c, a]))).map((o) => [...o]),
    [[30], [30]],
  );
  assert.equal(seen[1]!.sample, seen[0]!.sample, "the same sample buffer for the same shape");
  assert.equal(seen[2]!.ctx, seen[0]!.ctx, "the same context buffer for the same shape");
  assert.deepEqual(
    seen.map((s) => s.ctxValues),
    [
      [1, 2, 3, 4],
      [1, 2, 3, 4],
      [3, 4, 1, 2],
    ],
  );
  assert.deepEqual(
    seen.map((s) => s.sampleValues),
    [
      [1, 1],
      [2, 2],
      [3, 3],
    ],
  );
  // A different shape (one row) gets buffers of its own and leaves the first shape's alone.
  assert.deepEqual(
    (await b.evaluate(req(4, [c]))).map((o) => [...o]),
    [[40]],
  );
  assert.notEqual(seen[3]!.sample, seen[0]!.sample);
  await b.evaluate(req(5, [a, c]));
  assert.equal(seen[4]!.sample, seen[0]!.sample);
  assert.deepEqual(seen[4]!.ctxValues, [1, 2, 3, 4], "its rows written again after the swap");
  // Only the call whose rows already held its contexts skipped the copy (and says so to the UNet call).
  assert.deepEqual(
    seen.map((s) => s.unchanged),
    [false, true, false, false, false],
  );
});

test("buffers a call took away, wrote its answer over, or failed with are not used again", async () => {
  const samples: Float32Array[] = [];
  let mode: "transfer" | "alias" | "fail" | "plain" = "transfer";
  const b = new StepBatcher(
    async (sample, _ts, ctx) => {
      samples.push(sample);
      const values = [...sample, ...ctx];
      if (mode === "transfer") {
        // As OrtWorker does: the feeds' buffers move to another thread and are detached here.
        structuredClone(sample, { transfer: [sample.buffer as ArrayBuffer, ctx.buffer as ArrayBuffer] });
        return Float32Array.from(values.slice(0, 1));
      }
      if (mode === "fail") throw new Error("boom");
      if (mode === "alias") return sample;
      return new Float32Array(sample);
    },
    1,
    1,
  );
  const req = (v: number) => ({ x: new Float32Array([v]), t: v, contexts: [new Float32Array([v + 0.5])], h: 1, w: 1, seq: 1 });
  assert.deepEqual([...(await b.evaluate(req(1)))[0]!], [1]);
  mode = "plain";
  assert.deepEqual([...(await b.evaluate(req(2)))[0]!], [2], "fresh buffers after the old ones were transferred");
  assert.equal(samples[1]!.length, 1);
  mode = "alias";
  const aliased = (await b.evaluate(req(3)))[0]!;
  mode = "plain";
  await b.evaluate(req(4));
  assert.notEqual(samples[3], samples[2], "the answer's buffer is not packed over");
  assert.deepEqual([...aliased], [3], "an earlier answer written over its input stays intact");
  mode = "fail";
  await assert.rejects(b.evaluate(req(5)), /boom/);
  mode = "plain";
  await b.evaluate(req(6));
  assert.notEqual(samples[5], samples[4], "a failed call's buffers are dropped");
  await b.evaluate(req(7));
  assert.equal(samples[6], samples[5], "and new ones kept again");
});

test("at most four shapes keep their buffers: the least recently used one goes first", async () => {
  const { batcher: b, samples } = recordingBatcher();
  const call = async (h: number) => {
    const out = await b.evaluate({ x: new Float32Array(h).fill(h), t: 1, contexts: [new Float32Array(1)], h, w: 1, seq: 1 });
    assert.deepEqual([...out[0]!], new Array<number>(h).fill(h));
    return samples.at(-1)!;
  };
  const first = new Map<number, Float32Array>();
  for (const h of [1, 2, 3, 4]) first.set(h, await call(h));
  assert.equal(await call(1), first.get(1), "shape 1 kept, and now the most recently used");
  await call(5); // a fifth shape: shape 2, the least recently used, goes
  assert.notEqual(await call(2), first.get(2));
  for (const h of [1, 4]) assert.equal(await call(h), first.get(h), `shape ${h} still kept`);
});

test("with reuseBuffers off every call gets new buffers", async () => {
  const { batcher: b, samples } = recordingBatcher({ reuseBuffers: false });
  const req = () => ({ x: new Float32Array([1]), t: 1, contexts: [new Float32Array(1)], h: 1, w: 1, seq: 1 });
  await b.evaluate(req());
  await b.evaluate(req());
  assert.notEqual(samples[0], samples[1]);
});

describe(
  "concurrent images batch into shared UNet calls with unchanged results",
  { skip: !existsSync(TINY) && "team kit fixtures absent" },
  () => {
    let pipe: LoadedPipeline;
    before(async () => {
      pipe = await loadTinyPipeline();
    });
    after(async () => pipe?.close());

    const render = (seed: number, prompt: string): Promise<Image> =>
      renderTask(
        pipe,
        create(RunTaskRequestSchema, {
          taskId: `t${seed}`,
          jobId: "j",
          seed: BigInt(seed),
          params: { prompt, samplerName: "Euler a", steps: 8, cfgScale: 7, width: 64, height: 64, rng: RngSource.NV, model: "tiny-sd15" },
        }),
        { signal: new AbortController().signal, agentId: "a", onStep: () => {}, onWarning: () => {} },
      );

    test("4 concurrent jobs (different prompts and seeds) equal 4 sequential renders within 1 level", async () => {
      const inputs = [
        [1, "a cat"],
        [2, "a dog"],
        [3, "a castle on a hill"],
        [4, "a cat"],
      ] as const;
      const seq: Image[] = [];
      for (const [s, p] of inputs) seq.push(await render(s, p));
      const callsBefore = pipe.batcher.calls;
      const conc = await Promise.all(inputs.map(([s, p]) => render(s, p)));
      const calls = pipe.batcher.calls - callsBefore;
      assert.ok(calls <= 8 + 2, `4 concurrent 8-step images took ${calls} UNet calls; batched they need about 8`);
      for (let i = 0; i < inputs.length; i++) {
        const a = await sharp(seq[i]!.png).raw().toBuffer();
        const b = await sharp(conc[i]!.png).raw().toBuffer();
        let max = 0;
        for (let k = 0; k < a.length; k++) max = Math.max(max, Math.abs(a[k]! - b[k]!));
        assert.ok(max <= 1, `image ${i}: batched differs from unbatched by ${max} levels`);
      }
    });
  },
);

test("SDXL: each row gets its own context's pooled vector and its request's size conditions", async () => {
  const seen: Array<{ textEmbeds: number[]; timeIds: number[] }> = [];
  const b = new StepBatcher(
    async (sample, _ts, _ctx, d, _signal, added) => {
      seen.push({ textEmbeds: [...added!.textEmbeds], timeIds: [...added!.timeIds] });
      return new Float32Array(sample.length).fill(d.n);
    },
    1,
    2,
    { pooledSize: 2 },
  );
  const req = (v: number, size: number) => ({
    x: new Float32Array(1).fill(v),
    t: 1,
    contexts: [new Float32Array(2), new Float32Array(2)],
    h: 1,
    w: 1,
    seq: 1,
    added: { pooled: [Float32Array.of(v, v), Float32Array.of(-v, -v)], timeIds: Float32Array.of(size, size, 0, 0, size, size) },
  });
  await Promise.all([b.evaluate(req(1, 64)), b.evaluate(req(2, 128))]);
  assert.equal(seen.length, 1, "one call for both images");
  assert.deepEqual(seen[0]!.textEmbeds, [1, 1, -1, -1, 2, 2, -2, -2]);
  assert.deepEqual(seen[0]!.timeIds, [64, 64, 0, 0, 64, 64, 64, 64, 0, 0, 64, 64, 128, 128, 0, 0, 128, 128, 128, 128, 0, 0, 128, 128]);
  // A request without them, or with one pooled vector too few, is refused before it is queued.
  const plain: Parameters<typeof b.evaluate>[0] = { ...req(3, 64), added: undefined };
  await assert.rejects(b.evaluate(plain), /added conditions/);
  const short = req(3, 64);
  await assert.rejects(b.evaluate({ ...short, added: { ...short.added, pooled: [short.added.pooled[0]!] } }), /added conditions/);
});
