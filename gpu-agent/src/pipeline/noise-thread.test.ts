import { test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, type GenerationParamsSchema } from "@latentfarm/shared";
import { kitSkip } from "../test-support/kit.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import { renderTask } from "./txt2img.js";
import { loadTinyModel } from "../test-support/tiny-pipeline.js";

const request = (params: MessageInitShape<typeof GenerationParamsSchema>) =>
  create(RunTaskRequestSchema, {
    taskId: "t",
    jobId: "j",
    seed: 99n,
    params: {
      prompt: "a lighthouse at dusk",
      negativePrompt: "fog",
      steps: 5,
      cfgScale: 6,
      width: 64,
      height: 64,
      model: "tiny-sd15",
      ...params,
    },
  });

const ctx = () => ({ signal: new AbortController().signal, agentId: "test", onStep: () => {}, onWarning: () => {} });

test(
  "noise drawn on the pipeline's noise thread gives the same images as noise drawn in the render's thread",
  { skip: kitSkip("tiny-sd15") },
  async () => {
    const model = await loadTinyModel();
    const threaded = new LoadedPipeline(model, { maxBatchRows: 16, noiseThreadMinValues: 0 });
    const local = new LoadedPipeline(model, { maxBatchRows: 16 });
    try {
      const cases = [
        { samplerName: "Euler a", rng: RngSource.CPU },
        { samplerName: "DPM++ 2M SDE", scheduler: "Karras", rng: RngSource.NV },
        { samplerName: "DDIM", eta: 0.7, rng: RngSource.NV },
        { samplerName: "DPM2 a", rng: RngSource.CPU, subseed: 5n, subseedStrength: 0.4, etaNoiseSeedDelta: 31337n },
      ];
      for (const params of cases) {
        const req = request(params);
        const [a, b] = await Promise.all([renderTask(threaded, req, ctx()), renderTask(local, req, ctx())]);
        assert.deepEqual(Buffer.from(a.png), Buffer.from(b.png), params.samplerName);
      }
      assert.ok(threaded.noise.delivered > 0, "the noise thread made draws");
      assert.equal(local.noise.delivered, 0, "small draws stay in the render's thread by default");
    } finally {
      // The two pipelines share one model: the second close() releases it.
      await threaded.noise.close();
      await threaded.brownian.close();
      await local.close();
    }
  },
);
