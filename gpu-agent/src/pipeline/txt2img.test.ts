import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, silentLogger } from "@latentfarm/shared";
import { SdModel } from "../models/sd-model.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import { renderTask } from "./txt2img.js";

const FIXTURES = fileURLToPath(new URL("../../../../shared/fixtures/", import.meta.url));
const REF = join(FIXTURES, "reference", "txt2img");
const skip = !existsSync(join(FIXTURES, "tiny-sd15")) && "team kit fixtures (../shared/fixtures) absent";

interface Case {
  id: string;
  prompt: string;
  negative_prompt: string;
  seed: number;
  sampler_name: string;
  scheduler?: string;
  steps: number;
  cfg_scale: number;
  width: number;
  height: number;
  batch_size?: number;
  clip_skip?: number;
  rng: "CPU" | "GPU" | "NV";
  expected: string[];
  latents: Array<{ file: string; shape: number[] }>;
}

const RNG = { CPU: RngSource.CPU, GPU: RngSource.GPU, NV: RngSource.NV };

describe("txt2img pipeline against A1111 reference renders", { skip, concurrency: false }, () => {
  let pipe: LoadedPipeline;
  before(async () => {
    const model = await SdModel.load({ name: "tiny-sd15", format: "diffusers-onnx", path: join(FIXTURES, "tiny-sd15") }, { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1 });
    pipe = new LoadedPipeline(model, { maxBatchRows: 16 });
  });
  after(async () => pipe?.close());

  const cases = skip ? [] : (JSON.parse(readFileSync(join(REF, "cases.json"), "utf8")) as Case[]);
  for (const c of cases) {
    test(`${c.id}: every image within ±2 levels of A1111's PNG`, async () => {
      for (let i = 0; i < (c.batch_size ?? 1); i++) {
        const req = create(RunTaskRequestSchema, {
          taskId: `${c.id}-${i}`,
          jobId: c.id,
          imageIndex: i,
          seed: BigInt(c.seed + i),
          subseed: 0n,
          params: {
            prompt: c.prompt, negativePrompt: c.negative_prompt, samplerName: c.sampler_name, scheduler: c.scheduler ?? "",
            steps: c.steps, cfgScale: c.cfg_scale, width: c.width, height: c.height, clipSkip: c.clip_skip ?? 1, rng: RNG[c.rng], model: "tiny-sd15",
          },
        });
        const steps: number[] = [];
        const img = await renderTask(pipe, req, { signal: new AbortController().signal, agentId: "test", onStep: (s) => steps.push(s), onWarning: () => {} });
        const a = await sharp(img.png).removeAlpha().raw().toBuffer();
        const b = await sharp(join(REF, c.expected[i]!)).removeAlpha().raw().toBuffer();
        let max = 0;
        for (let k = 0; k < a.length; k++) max = Math.max(max, Math.abs(a[k]! - b[k]!));
        assert.ok(max <= 2, `${c.expected[i]}: max difference ${max} levels`);
        assert.deepEqual(steps, Array.from({ length: c.steps }, (_, k) => k + 1), "one progress event per sampling step");
        assert.match(img.infotext, new RegExp(`Seed: ${c.seed + i}, Size: ${c.width}x${c.height}`));
      }
    });
  }
});
