/**
 * Sampler overhead benchmark (not a test): time per sampling step spent in the sampler itself, its
 * schedule and the RNG, for a 4×128×128 latent (1024×1024 px) with a trivial model, so that the
 * numbers show what the sampling core adds to each UNet step.
 */
import type { RngSource } from "./generator.js";
import { ImageRng, type LatentShape } from "./image-rng.js";
import { listSamplers, prepareSampling } from "./plan.js";
import type { ModelRequest, ModelResponse } from "./samplers/types.js";

export interface BenchSamplersOptions {
  /** Sampler names to measure (default: all 20). */
  samplers?: readonly string[];
  steps?: number;
  shape?: LatentShape;
  source?: RngSource;
  /** Use the Brownian tree for the SDE samplers, as A1111 does (default true). */
  brownian?: boolean;
  /** Clock in milliseconds (injectable for tests). */
  now?: () => number;
  /** Run each sampler once for 3 steps first, so JIT compilation is not timed (default true). */
  warmup?: boolean;
}

export interface SamplerBenchResult {
  sampler: string;
  /** Sampler steps A1111 would report. */
  steps: number;
  modelCalls: number;
  totalMs: number;
  msPerStep: number;
}

/** Identity denoiser (D(x, σ) = x); zero eps for timestep samplers. */
function trivialModel(request: ModelRequest): ModelResponse {
  if (request.kind === "denoise") return Float32Array.from(request.x);
  const zeros = new Float32Array(request.x.length);
  return request.needUncond ? { output: zeros, uncond: zeros } : zeros;
}

export function benchSamplers(options: BenchSamplersOptions = {}): SamplerBenchResult[] {
  const shape = options.shape ?? [4, 128, 128];
  const steps = options.steps ?? 10;
  const source = options.source ?? "NV";
  const now = options.now ?? (() => performance.now());
  const names = options.samplers ?? listSamplers().map((s) => s.name);
  const results: SamplerBenchResult[] = [];
  for (const name of names) {
    if (options.warmup ?? true) runOnce(name, 3, shape, source, options.brownian ?? true);
    const started = now();
    const { steps: reported, modelCalls } = runOnce(name, steps, shape, source, options.brownian ?? true);
    const totalMs = now() - started;
    results.push({ sampler: name, steps: reported, modelCalls, totalMs, msPerStep: totalMs / reported });
  }
  return results;
}

function runOnce(name: string, steps: number, shape: LatentShape, source: RngSource, brownian: boolean): { steps: number; modelCalls: number } {
  const rng = new ImageRng({ shape, seeds: [0], source });
  const prepared = prepareSampling({
    samplerName: name,
    steps,
    noise: () => rng.next(),
    ...(brownian && { brownian: { seeds: [0], shape, source } }),
  });
  const run = prepared.run(prepared.startLatent(rng.first()));
  let modelCalls = 0;
  let r = run.next();
  while (!r.done) {
    modelCalls++;
    r = run.next(trivialModel(r.value));
  }
  return { steps: prepared.steps, modelCalls };
}
