import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import sharp from "sharp";
import {
  FarmError,
  RngSource,
  RunTaskRequestSchema,
  parseInfotext,
  silentLogger,
  type GenerationParamsSchema,
  type Image,
} from "@latentfarm/shared";
import { SeededRandom } from "../model-graph/random.js";
import { SdModel, CIRCULAR_MODEL } from "../models/sd-model.js";
import { parsePipelineKey } from "../models/model-loader.js";
import { CatalogPipelines } from "../test-support/lora-catalog.js";
import { TINY_SD15, kitSkip } from "../test-support/kit.js";
import { maxAbsDiff } from "../test-support/graphs.js";
import { runTaskPasses } from "../task-passes.js";
import type { RenderContext } from "./render-common.js";
import { runTask } from "./txt2img.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;
const ctx: RenderContext = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} };

/** x rolled by `dy`, `dx` along its last two axes (NCHW with n = 1). */
function roll(x: Float32Array, c: number, h: number, w: number, dy: number, dx: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let p = 0; p < c; p++) {
    for (let y = 0; y < h; y++)
      for (let i = 0; i < w; i++) out[p * h * w + ((y + dy) % h) * w + ((i + dx) % w)] = x[p * h * w + y * w + i]!;
  }
  return out;
}

describe("Tiling (A1111's circular convolutions)", { concurrency: false }, () => {
  let pipelines: CatalogPipelines;
  before(async () => {
    pipelines = await CatalogPipelines.create();
  });
  after(() => pipelines.close());

  const base: Params = { model: "tiny", prompt: "a brick wall", samplerName: "Euler", steps: 4, width: 64, height: 64, rng: RngSource.CPU };
  async function render(params: Params) {
    const keys: string[] = [];
    const out = await runTaskPasses(
      create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed: 3n, params }),
      ctx,
      async (key, req, c) => {
        keys.push(key);
        return runTask(await pipelines.get(key), req, c);
      },
    );
    assert.equal(out.case, "result");
    const image = out.value as Image;
    return { image, keys, pixels: await sharp(image.png).raw().toBuffer() };
  }

  test("a tiled job runs on a pipeline of its own, renders another image and writes Tiling: True after RNG", async () => {
    const plain = await render(base);
    const tiled = await render({ ...base, tiling: true });
    assert.equal(parsePipelineKey(tiled.keys[0]!).tiling, true);
    assert.equal(parsePipelineKey(plain.keys[0]!).tiling, undefined);
    assert.notDeepEqual(tiled.pixels, plain.pixels);
    assert.match(tiled.image.infotext, /RNG: CPU, Tiling: True, Version/);
    assert.doesNotMatch(plain.image.infotext, /Tiling/);
    assert.equal(parseInfotext(tiled.image.infotext).params.get("Tiling"), "True");
    // Hires.fix (both passes) and img2img (the encoder) run tiled too.
    const hires = await render({ ...base, tiling: true, enableHr: true, hrScale: 1.5, denoisingStrength: 0.5, hrUpscaler: "Lanczos" });
    assert.match(hires.image.infotext, /Tiling: True/);
    assert.ok(hires.keys.every((k) => parsePipelineKey(k).tiling === true));
  });
});

describe("Tiling on a read-only ONNX export with external data (the kit's)", { skip: kitSkip("tiny-sd15") }, () => {
  const scratch = mkdtempSync(join(tmpdir(), "lf-circular-"));
  after(() => rmSync(scratch, { recursive: true, force: true }));

  test("the patched graphs go to the scratch folder beside the weights, the export untouched; the VAE decodes a rolled latent to the rolled image", async () => {
    const entry = { name: "tiny-sd15", format: "diffusers-onnx" as const, path: TINY_SD15 };
    const opts = { ep: { name: "cpu" as const }, logger: silentLogger, intraOpNumThreads: 1 };
    await assert.rejects(SdModel.load(entry, { ...opts, circular: true }), (e: unknown) => {
      const err = FarmError.from(e);
      return err.codeName === "FAILED_PRECONDITION" && err.field === "tiling";
    });
    const model = await SdModel.load(entry, { ...opts, circular: true, scratchDir: scratch });
    try {
      const [folder] = readdirSync(scratch);
      // The kit's UNet keeps its weights in weights.pb; its VAE decoder inline (patched in memory, no file).
      assert.ok(existsSync(join(scratch, folder!, "unet", CIRCULAR_MODEL)));
      assert.ok(existsSync(join(scratch, folder!, "unet", "weights.pb")));
      assert.equal(existsSync(join(scratch, folder!, "vae_decoder")), false);
      for (const component of ["unet", "vae_decoder"])
        assert.deepEqual(
          readdirSync(join(TINY_SD15, component)).filter((f) => f.includes("circular")),
          [],
        );
      const [h, w] = [4, 5];
      const z = new SeededRandom(4).normalArray(4 * h * w);
      // vaeDecode hands its input to the sessions' thread: each call gets an array of its own.
      const rolled = roll(z, 4, h, w, 1, 2);
      const image = await model.vaeDecode(z.slice(), h, w);
      const shifted = await model.vaeDecode(rolled, h, w);
      const d = maxAbsDiff(shifted, roll(image, 3, 8 * h, 8 * w, 8, 16));
      assert.ok(d <= 1e-4, `rolled: ${d}`);
    } finally {
      await model.close();
    }
  });
});
