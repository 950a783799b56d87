import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { ImageRng, prepareSampling, type PreparedSampling, type SamplingSettings } from "../sampling/index.js";
import { residentArraysOut } from "../sampling/kernels.js";
import type { SamplerRun } from "../sampling/samplers/types.js";
import { kitSkip } from "../test-support/kit.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { denoise } from "./denoise.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const skip = kitSkip("tiny-sd15");

interface Answered {
  offered: number;
  inSlot: number;
}

/** The same run, counting the requests that offered a slot and the answers that came back in it. */
function* counted(run: SamplerRun, tally: Answered): SamplerRun {
  let r = run.next();
  try {
    while (!r.done) {
      const request = r.value;
      const response = yield request;
      const answer = response instanceof Float32Array ? response : response.output;
      if (request.into !== undefined) tally.offered++;
      if (request.into !== undefined && answer === request.into) tally.inSlot++;
      r = run.next(response);
    }
    return r.value;
  } finally {
    if (!r.done) run.return(undefined as never);
  }
}

describe("the agent's denoise loop", { skip, concurrency: false }, () => {
  let pipe: LoadedPipeline;
  before(async () => {
    pipe = await loadTinyPipeline();
  });
  after(async () => pipe?.close());

  const render = async (
    samplerName: string,
    wrap: (s: PreparedSampling) => PreparedSampling,
    options: { settings?: SamplingSettings; cfgScale?: number; prompt?: string } = {},
  ): Promise<Float32Array> => {
    const shape = [4, 8, 8] as const;
    const rng = new ImageRng({ shape: [...shape], seeds: [7], source: "CPU" });
    const sampler = prepareSampling({
      samplerName,
      steps: 6,
      noise: () => rng.next(),
      ...(options.settings && { settings: options.settings }),
    });
    const cond = await (
      await pipe.conditioner()
    ).prepare({ prompt: options.prompt ?? "a red cube", negativePrompt: "blurry", steps: sampler.promptScheduleSteps });
    return denoise(pipe, {
      sampler: wrap(sampler),
      cond,
      cfgScale: options.cfgScale ?? 7,
      h: shape[1],
      w: shape[2],
      start: sampler.startLatent(rng.first()),
      signal: new AbortController().signal,
      onStep: () => {},
      noiseRng: rng,
    });
  };

  // One sampler per kind of answer: denoised (k-diffusion), eps, and eps with the unconditional eps.
  for (const samplerName of ["Euler a", "DDIM", "DDIM CFG++"]) {
    test(`${samplerName}: every CFG-combined answer is written into the slot the sampler offers`, async () => {
      const tally: Answered = { offered: 0, inSlot: 0 };
      const got = await render(samplerName, (s) => ({ ...s, run: (x) => counted(s.run(x), tally) }));
      // A loop that answered in arrays of its own would give the same image, only with a copy per call.
      assert.ok(tally.offered >= 6, `${tally.offered} requests offered a slot`);
      assert.equal(tally.inSlot, tally.offered, "answers written into the offered slot");
      assert.deepEqual(got, await render(samplerName, (s) => s), "the same latent as an unobserved run");
      assert.equal(residentArraysOut(), 0, "the runs gave every resident array back");
    });
  }

  /** The run's latent, how many UNet rows it evaluated, and which calls skipped the negative prompt. */
  const rendered = async (samplerName: string, options: Parameters<typeof render>[2]) => {
    const rowsBefore = pipe.batcher.rows;
    const skipped: number[] = [];
    const latent = await render(
      samplerName,
      (s) => ({
        ...s,
        skipsUncond: (r) => {
          const skips = s.skipsUncond(r);
          if (skips) skipped.push(r.call);
          return skips;
        },
      }),
      options,
    );
    return { latent, rows: pipe.batcher.rows - rowsBefore, skipped };
  };

  for (const samplerName of ["Euler", "DDIM CFG++"]) {
    test(`${samplerName}: NGMS and skip_early_cond leave the negative prompt out of the calls they skip, which take CFG scale 1`, async () => {
      const plain = await rendered(samplerName, {});
      const calls = plain.rows / 2;
      assert.deepEqual(plain.skipped, []);
      // Every call skipping: only the prompt's row is evaluated, and its output is the answer. skip_early_cond 1
      // and NGMS on every call under a huge threshold are two roads to the same run.
      const early = await rendered(samplerName, { settings: { skipEarlyCond: 1 } });
      assert.equal(early.rows, calls);
      assert.equal(early.skipped.length, calls);
      const ngmsAll = await rendered(samplerName, { settings: { sMinUncond: 1e6, sMinUncondAll: true } });
      assert.deepEqual(ngmsAll.latent, early.latent);
      assert.notDeepEqual(early.latent, plain.latent);
      if (samplerName === "Euler") {
        // CFG scale 1 with the negative prompt evaluated is uncond + (cond − uncond): the prompt's output again,
        // to rounding. (DDIM CFG++ scales its CFG scale and renoises with the negative's output, so not there.)
        const cfg1 = await rendered(samplerName, { cfgScale: 1 });
        for (let k = 0; k < cfg1.latent.length; k++) {
          assert.ok(Math.abs(early.latent[k]! - cfg1.latent[k]!) < 1e-4, `value ${k}: ${early.latent[k]} vs ${cfg1.latent[k]}`);
        }
      }
      // NGMS on every other call: those calls evaluate one row, the rest two.
      const ngms = await rendered(samplerName, { settings: { sMinUncond: 1e6 } });
      assert.deepEqual(
        ngms.skipped,
        Array.from({ length: calls }, (_, k) => k).filter((k) => k % 2 === 1),
      );
      assert.equal(ngms.rows, 2 * calls - ngms.skipped.length);
      assert.notDeepEqual(ngms.latent, plain.latent);
      assert.notDeepEqual(ngms.latent, early.latent);
      assert.equal(residentArraysOut(), 0, "the runs gave every resident array back");
    });
  }

  // One sampler per kind of answer: denoised (k-diffusion) and eps (timestep samplers).
  for (const samplerName of ["Euler", "DDIM"]) {
    test(`${samplerName}: a skipped call's stand-in is the first prompt's output; with AND, the other prompts still pull, at CFG scale 1`, async () => {
      const skip = { settings: { skipEarlyCond: 1 } };
      const single = await rendered(samplerName, { ...skip, prompt: "a red cube" });
      const composed = await rendered(samplerName, { ...skip, prompt: "a red cube AND a blue sphere" });
      // Two prompt rows per call, no negative row; the second prompt moves the image.
      assert.equal(composed.rows, 2 * single.rows);
      assert.notDeepEqual(composed.latent, single.latent);
      // At CFG scale 1 the combination is a + 1·(b − a): the second prompt's own answer, to rounding (at the
      // request's 7 it would be a + 7·(b − a)).
      const second = await rendered(samplerName, { ...skip, prompt: "a blue sphere" });
      for (let k = 0; k < second.latent.length; k++) {
        assert.ok(Math.abs(composed.latent[k]! - second.latent[k]!) < 1e-3, `value ${k}: ${composed.latent[k]} vs ${second.latent[k]}`);
      }
    });
  }
});
