// One script for a GPU device run (see scripts/device-pack.sh): checks the WebGPU EP renders the
// reference images, then measures step-level batching on WebGPU and on the device's CPU.
// Usage: node --import tsx tests/bench/device-run.ts MODEL_DIR REF_DIR OUT_DIR
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { availableParallelism, cpus } from "node:os";
import * as ort from "onnxruntime-node";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, silentLogger } from "@latentfarm/shared";
import { SdModel } from "../../gpu-agent/src/models/sd-model.js";
import { LoadedPipeline } from "../../gpu-agent/src/pipeline/loaded-pipeline.js";
import { renderTask } from "../../gpu-agent/src/pipeline/txt2img.js";
import type { ExecutionProvider } from "../../gpu-agent/src/runtime/protocol.js";
import { benchStepBatching } from "./step-batching.js";

const [modelDir = ".device-carry/tiny-sd15", refDir = ".device-carry/ref", outDir = process.env["OUT"] ?? "/tmp/out"] =
  process.argv.slice(2);
mkdirSync(outDir, { recursive: true });
const results: Record<string, unknown> = { machine: `${cpus()[0]?.model ?? "?"} × ${availableParallelism()}`, node: process.version };
const save = (): void => writeFileSync(join(outDir, "device.json"), JSON.stringify(results, null, 2));
const log = (k: string, v: unknown): void => {
  results[k] = v;
  process.stdout.write(`${k}: ${JSON.stringify(v)}\n`);
  save();
};

log("backends", ort.listSupportedBackends?.() ?? "n/a");

async function reference(ep: ExecutionProvider, id: string, seed: bigint, params: Record<string, unknown>, file: string): Promise<void> {
  const t0 = performance.now();
  const model = await SdModel.load({ name: "m", format: "diffusers-onnx", path: modelDir }, { ep, logger: silentLogger });
  const load = performance.now() - t0;
  const pipe = new LoadedPipeline(model, { maxBatchRows: 16 });
  try {
    const t1 = performance.now();
    const img = await renderTask(pipe, create(RunTaskRequestSchema, { taskId: id, jobId: id, seed, params: { model: "m", ...params } }), {
      signal: new AbortController().signal,
      agentId: "device",
      onStep: () => {},
      onWarning: () => {},
    });
    const render = performance.now() - t1;
    const a = await sharp(img.png).raw().toBuffer();
    const b = await sharp(join(refDir, file)).removeAlpha().raw().toBuffer();
    let max = 0;
    let sum = 0;
    for (let i = 0; i < a.length; i++) {
      const d = Math.abs(a[i]! - b[i]!);
      max = Math.max(max, d);
      sum += d;
    }
    log(`${id}-${ep.name}`, { load_ms: load, render_ms: render, max_level_diff: max, mean_level_diff: sum / a.length });
  } finally {
    await pipe.close();
  }
}

const p1 = { prompt: "a photo of a cat", samplerName: "Euler a", steps: 20, cfgScale: 7, width: 64, height: 64, rng: RngSource.CPU };
const p3 = {
  prompt: "(masterpiece:1.2), best quality, a [red] fox BREAK deep forest, ((sunset))",
  negativePrompt: "lowres, (bad anatomy:1.3)",
  samplerName: "DPM++ 2M",
  scheduler: "Karras",
  steps: 15,
  cfgScale: 6.5,
  width: 64,
  height: 96,
  rng: RngSource.NV,
};
const eps: ExecutionProvider[] = process.env["DEVICE_EPS"] === "webgpu" ? [{ name: "webgpu" }] : [{ name: "webgpu" }, { name: "cpu" }];
for (const ep of eps) {
  try {
    await reference(ep, "p1", 42n, p1, "p1-euler-a-cpu-0.png");
    if (ep.name === "cpu") await reference(ep, "p3", 1432216924n, p3, "p3-dpmpp2m-karras-weighted-0.png");
  } catch (err) {
    log(`reference-${ep.name}-error`, String(err));
  }
}
for (const ep of eps) {
  const steps = ep.name === "webgpu" ? 4 : 10;
  try {
    log(`step-batching-${ep.name}`, await benchStepBatching({ ep, jobs: 8, steps, modelDir }));
  } catch (err) {
    log(`step-batching-${ep.name}-error`, String(err));
  }
}
process.stdout.write("done\n");
