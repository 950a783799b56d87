// Step-level batching: images per second on one agent pipeline with 8 concurrent jobs (their
// UNet calls are packed into one per step) against the same 8 jobs run one after another.
import { existsSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, silentLogger } from "@latentfarm/shared";
import { SdModel } from "../../gpu-agent/src/models/sd-model.js";
import { LoadedPipeline } from "../../gpu-agent/src/pipeline/loaded-pipeline.js";
import { renderTask } from "../../gpu-agent/src/pipeline/txt2img.js";
import type { ExecutionProvider } from "../../gpu-agent/src/runtime/protocol.js";
import { TINY_SD15 } from "../harness/farm.js";

export async function benchStepBatching(
  opts: { jobs?: number; steps?: number; size?: number; ep?: ExecutionProvider; threads?: number; modelDir?: string } = {},
): Promise<Record<string, number> | undefined> {
  const dir = opts.modelDir ?? TINY_SD15;
  if (!existsSync(dir)) return undefined;
  const jobs = opts.jobs ?? 8;
  const steps = opts.steps ?? 10;
  const size = opts.size ?? 64;
  const model = await SdModel.load(
    { name: "m", format: "diffusers-onnx", path: dir },
    { ep: opts.ep ?? { name: "cpu" }, logger: silentLogger, ...(opts.threads ? { intraOpNumThreads: opts.threads } : {}) },
  );
  const pipe = new LoadedPipeline(model, { maxBatchRows: 2 * jobs });
  const render = (i: number) =>
    renderTask(
      pipe,
      create(RunTaskRequestSchema, {
        taskId: `b${i}`,
        jobId: `j${i}`,
        seed: BigInt(i),
        params: {
          prompt: `job ${i}: a photo of a cat`,
          samplerName: "Euler a",
          steps,
          width: size,
          height: size,
          rng: RngSource.NV,
          model: "m",
        },
      }),
      { signal: new AbortController().signal, agentId: "bench", onStep: () => {}, onWarning: () => {} },
    );
  try {
    await render(0); // warm-up: session, conditioning cache shape
    let t = performance.now();
    for (let i = 0; i < jobs; i++) await render(i);
    const sequential = jobs / ((performance.now() - t) / 1000);
    const calls0 = pipe.batcher.calls;
    t = performance.now();
    await Promise.all(Array.from({ length: jobs }, (_, i) => render(i)));
    const concurrent = jobs / ((performance.now() - t) / 1000);
    return {
      jobs,
      sequential_images_per_s: sequential,
      concurrent_images_per_s: concurrent,
      ratio: concurrent / sequential,
      unet_calls_concurrent: pipe.batcher.calls - calls0,
    };
  } finally {
    await pipe.close();
  }
}
