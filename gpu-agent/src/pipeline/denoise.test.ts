import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { ImageRng, prepareSampling, type PreparedSampling } from "../sampling/index.js";
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

  const render = async (samplerName: string, wrap: (s: PreparedSampling) => PreparedSampling): Promise<Float32Array> => {
    const shape = [4, 8, 8] as const;
    const rng = new ImageRng({ shape: [...shape], seeds: [7], source: "CPU" });
    const sampler = prepareSampling({ samplerName, steps: 6, noise: () => rng.next() });
    const cond = await (
      await pipe.conditioner()
    ).prepare({ prompt: "a red cube", negativePrompt: "blurry", steps: sampler.promptScheduleSteps });
    return denoise(pipe, {
      sampler: wrap(sampler),
      cond,
      cfgScale: 7,
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
});
