// Benchmark: build + load of an SD1.5-size (or SDXL-size) UNet from a generated random checkpoint, against
// ONNX Runtime loading the same graph from disk. Not a test (it writes gigabytes); run by hand:
//   node --import tsx gpu-agent/src/model-graph/bench-unet.ts --dir /tmp/sd15-bench [--dtype F16|F32] [--mode link|copy]
//     [--model sd15|sdxl]
// Each phase runs in a fresh child process so that its peak RSS is its own.

import { execFileSync } from "node:child_process";
import { existsSync, rmSync, statSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import * as ort from "onnxruntime-node";
import { f32ToF16 } from "./half.js";
import { importCheckpoint } from "./pipeline.js";
import { SeededRandom } from "./random.js";
import { writeSafetensorsStreaming } from "./safetensors.js";
import type { LazyTensorToWrite } from "./safetensors.js";
import { FULL_SIZE_SPECS, ldmTensorShapes, randomTensor } from "./tiny-model.js";

const MODELS = {
  sd15: { spec: FULL_SIZE_SPECS.sd15, hints: { unetHeads: 8, textHeads: 12 } },
  // SDXL's UNet heads are 64 wide, which the importer assumes for SDXL.
  sdxl: { spec: FULL_SIZE_SPECS.sdxl, hints: { textHeads: 12 } },
};
type ModelName = keyof typeof MODELS;

async function make(path: string, dtype: "F16" | "F32", model: ModelName): Promise<void> {
  const shapes = ldmTensorShapes(MODELS[model].spec, 49408);
  // Values only need plausible scales; a cycled random block keeps generation fast.
  const rng = new SeededRandom(1);
  const block = rng.normalArray(1 << 20);
  const tensors = new Map<string, LazyTensorToWrite>();
  for (const [key, shape] of shapes) {
    tensors.set(key, {
      dtype,
      shape,
      load: () => {
        const n = shape.reduce((a, b) => a * b, 1);
        let v: Float32Array;
        if (n <= 4096) v = randomTensor(rng, key, shape);
        else {
          v = new Float32Array(n);
          const s = 1 / Math.sqrt(shape.slice(1).reduce((a, b) => a * b, 1));
          for (let i = 0; i < n; i += block.length) v.set(block.subarray(0, Math.min(block.length, n - i)), i);
          for (let i = 0; i < n; i++) v[i]! *= s;
        }
        return dtype === "F32" ? v : f32ToF16(v);
      },
    });
  }
  await writeSafetensorsStreaming(path, tensors, { format: "pt" });
}

function maxRssMiB(): number {
  return Math.round(process.resourceUsage().maxRSS / 1024);
}

async function child(phase: string, ckpt: string, cacheDir: string, mode: string, model: ModelName): Promise<void> {
  const t0 = performance.now();
  if (phase === "ort-load") {
    const s = await ort.InferenceSession.create(join(cacheDir, "unet", "model.onnx"));
    const ms = performance.now() - t0;
    await s.release();
    process.stdout.write(JSON.stringify({ phase, loadMs: Math.round(ms), maxRssMiB: maxRssMiB() }));
    return;
  }
  const imported = await importCheckpoint(ckpt, {
    cacheDir,
    ...MODELS[model].hints,
    components: ["unet"],
    linkCheckpoint: mode === "link",
  });
  const importMs = performance.now() - t0;
  const importRss = maxRssMiB();
  const s = await ort.InferenceSession.create(join(imported.dir, "unet", "model.onnx"));
  const totalMs = performance.now() - t0;
  await s.release();
  process.stdout.write(
    JSON.stringify({
      phase,
      cached: imported.cached,
      importMs: Math.round(importMs),
      totalMs: Math.round(totalMs),
      importMaxRssMiB: importRss,
      dir: imported.dir,
    }),
  );
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const get = (name: string, dflt?: string): string => {
    const i = args.indexOf(name);
    const v = i >= 0 ? args[i + 1] : dflt;
    if (v === undefined) throw new Error(`${name} is required`);
    return v;
  };
  if (args[0] === "--child") {
    await child(args[1]!, args[2]!, args[3]!, args[4]!, args[5] as ModelName);
    return;
  }
  const dir = get("--dir");
  const dtype = get("--dtype", "F16") as "F16" | "F32";
  const mode = get("--mode", "link");
  const model = get("--model", "sd15") as ModelName;
  if (!(model in MODELS)) throw new Error(`--model ${model}: use sd15 or sdxl`);
  const ckpt = join(dir, `${model}-random-${dtype}.safetensors`);
  if (!existsSync(ckpt)) {
    const t = performance.now();
    await make(ckpt, dtype, model);
    process.stderr.write(`made ${ckpt} (${(statSync(ckpt).size / 2 ** 30).toFixed(2)} GiB) in ${Math.round(performance.now() - t)} ms\n`);
  }
  const cacheDir = join(dir, `cache-${model}-${dtype}-${mode}`);
  rmSync(cacheDir, { recursive: true, force: true });
  const script = fileURLToPath(import.meta.url);
  const run = (phase: string, target: string): Record<string, unknown> =>
    JSON.parse(
      execFileSync(process.execPath, [...process.execArgv, script, "--child", phase, ckpt, target, mode, model], {
        encoding: "utf8",
        maxBuffer: 1 << 20,
      }),
    ) as Record<string, unknown>;
  const first = run("import", cacheDir);
  const built = String(first.dir);
  const ortRuns = [run("ort-load", built), run("ort-load", built)];
  const cached = run("import", cacheDir);
  const ortMs = Math.min(...ortRuns.map((r) => Number(r.loadMs)));
  const sizeGiB = statSync(ckpt).size / 2 ** 30;
  const report = {
    checkpoint: { path: ckpt, model, dtype, GiB: Number(sizeGiB.toFixed(2)) },
    mode,
    cpus: availableParallelism(),
    ortLoadMs: ortRuns.map((r) => r.loadMs),
    firstLoad: first,
    cachedLoad: cached,
    firstOverOrt: Number((Number(first.totalMs) / ortMs).toFixed(2)),
    cachedOverOrt: Number((Number(cached.totalMs) / ortMs).toFixed(2)),
    importPeakRssOverCheckpoint: Number((Number(first.importMaxRssMiB) / 1024 / sizeGiB).toFixed(2)),
  };
  process.stdout.write(`${JSON.stringify(report, null, 1)}\n`);
}

await main();
