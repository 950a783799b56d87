import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, type Image } from "@latentfarm/shared";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { StepBatcher } from "./step-batcher.js";
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
