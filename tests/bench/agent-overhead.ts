// Agent overhead per denoising step against bare ONNX Runtime run() on the same tiny UNet.
// Both run in this process, interleaved, with the same thread count, so the ratio is fair.
import * as ort from "onnxruntime-node";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, silentLogger } from "@latentfarm/shared";
import { SdModel } from "../../gpu-agent/src/models/sd-model.js";
import { LoadedPipeline } from "../../gpu-agent/src/pipeline/loaded-pipeline.js";
import { renderTask } from "../../gpu-agent/src/pipeline/txt2img.js";
import { TINY_SD15 } from "../harness/farm.js";

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

export async function benchAgentOverhead(
  opts: { steps?: number; rounds?: number; threads?: number; size?: number } = {},
): Promise<Record<string, number> | undefined> {
  if (!existsSync(TINY_SD15)) return undefined;
  const steps = opts.steps ?? 40;
  const rounds = opts.rounds ?? 9;
  const threads = opts.threads ?? 1;
  const size = opts.size ?? 64;
  const lat = size / 8;

  const bare = await ort.InferenceSession.create(join(TINY_SD15, "unet", "model.onnx"), {
    graphOptimizationLevel: "all",
    intraOpNumThreads: threads,
  });
  const model = await SdModel.load(
    { name: "tiny-sd15", format: "diffusers-onnx", path: TINY_SD15 },
    { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: threads },
  );
  const pipe = new LoadedPipeline(model, { maxBatchRows: 16 });
  const feeds = {
    sample: new ort.Tensor("float32", new Float32Array(2 * 4 * lat * lat).fill(0.1), [2, 4, lat, lat]),
    timestep: new ort.Tensor("float32", new Float32Array([500, 500]), [2]),
    encoder_hidden_states: new ort.Tensor("float32", new Float32Array(2 * 77 * 32).fill(0.05), [2, 77, 32]),
  };
  const req = create(RunTaskRequestSchema, {
    taskId: "bench",
    jobId: "bench",
    seed: 1n,
    params: {
      prompt: "a photo of a cat",
      samplerName: "Euler",
      steps,
      cfgScale: 7,
      width: size,
      height: size,
      rng: RngSource.CPU,
      model: "tiny-sd15",
    },
  });
  const bareMs: number[] = [];
  const agentMs: number[] = [];
  // In the same steps: what ONNX Runtime's run() took inside the agent's worker.
  const inSituOrtMs: number[] = [];
  for (let r = 0; r < rounds + 1; r++) {
    // Bare: one batch-2 UNet run per step, as the agent does for cond + uncond.
    let t = performance.now();
    for (let i = 0; i < steps; i++) await bare.run(feeds);
    const b = (performance.now() - t) / steps;
    // Agent: per-step time between the first and last step callbacks (excludes text encoder and VAE).
    let first = 0;
    let last = 0;
    let ortFirst = 0;
    let ortLast = 0;
    await renderTask(pipe, req, {
      signal: new AbortController().signal,
      agentId: "bench",
      onStep: (s) => {
        if (s === 1) {
          first = performance.now();
          ortFirst = model.ortRunStats("unet").ms;
        }
        if (s === steps) {
          last = performance.now();
          ortLast = model.ortRunStats("unet").ms;
        }
      },
      onWarning: () => {},
    });
    t = (last - first) / (steps - 1);
    if (r > 0) {
      bareMs.push(b);
      agentMs.push(t);
      inSituOrtMs.push((ortLast - ortFirst) / (steps - 1));
    }
  }
  await bare.release();
  await pipe.close();
  const bm = median(bareMs);
  const am = median(agentMs);
  // Each round runs bare and agent back to back, so a round's ratio sees the same machine state;
  // the median of those paired ratios is the figure least moved by other load on the machine.
  const paired = median(agentMs.map((a, i) => a / bareMs[i]!));
  // The same steps' run() time inside the worker: machine drift (which moves bare-vs-agent by more
  // than 5 % between rounds here) cancels, leaving what the agent adds around each run().
  const inSitu = median(agentMs.map((a, i) => a / inSituOrtMs[i]!));
  return {
    bare_ms_per_step: bm,
    agent_ms_per_step: am,
    run_ms_per_step_in_agent: median(inSituOrtMs),
    overhead_pct: (inSitu - 1) * 100,
    overhead_pct_vs_bare_paired: (paired - 1) * 100,
    overhead_pct_of_medians: (am / bm - 1) * 100,
    overhead_pct_best_of: (Math.min(...agentMs) / Math.min(...bareMs) - 1) * 100,
  };
}
