import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import sharp from "sharp";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, parseInfotext, silentLogger, type GenerationParamsSchema, type Image } from "@latentfarm/shared";
import { CHUNK_TOKENS, tokenizeLine } from "../conditioning/chunking.js";
import { makeTinyModel } from "../model-graph/index.js";
import { SdModel, type AddedConditions } from "../models/sd-model.js";
import { parsePipelineKey } from "../models/model-loader.js";
import { runTaskPasses } from "../task-passes.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import { runTask } from "./txt2img.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;

/**
 * The SDXL refiner on tiny checkpoints built by the farm's importer: OpenCLIP-G alone conditions it, its
 * time ids carry an aesthetic score per row, and an SDXL base render hands over to it part way.
 */
describe("SDXL refiner", { concurrency: false }, () => {
  const dir = mkdtempSync(join(tmpdir(), "sdxl-refiner-"));
  const pipes = new Map<string, LoadedPipeline>();
  const calls: Array<{ n: number; added: AddedConditions | undefined }> = [];
  const load = async (name: string, config: "sdxl-small" | "sdxl-refiner-small", seed: number): Promise<LoadedPipeline> => {
    const tiny = await makeTinyModel({ outDir: join(dir, name), config, seed });
    const model = await SdModel.load(
      { name, format: "diffusers-onnx", path: tiny.onnxDir! },
      { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1 },
    );
    const unet = model.unet.bind(model);
    model.unet = (sample, ts, ctx, dims, signal, added) => {
      if (name === "xl-refiner")
        calls.push({ n: dims.n, added: added && { textEmbeds: added.textEmbeds.slice(), timeIds: added.timeIds.slice() } });
      return unet(sample, ts, ctx, dims, signal, added);
    };
    return new LoadedPipeline(model, { maxBatchRows: 16 });
  };
  before(async () => {
    pipes.set("xl-base", await load("xl-base", "sdxl-small", 3));
    pipes.set("xl-refiner", await load("xl-refiner", "sdxl-refiner-small", 5));
  });
  after(async () => {
    for (const p of pipes.values()) await p.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const ctx: RenderContext = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} };
  const base: Params = {
    prompt: "a red castle",
    negativePrompt: "fog",
    samplerName: "DPM++ 2M",
    steps: 5,
    cfgScale: 6,
    width: 64,
    height: 48,
    rng: RngSource.NV,
    model: "xl-base",
  };
  async function render(params: Params) {
    const keys: string[] = [];
    const out = await runTaskPasses(create(RunTaskRequestSchema, { taskId: "x", jobId: "x", seed: 9n, params }), ctx, (key, req, c) => {
      const model = parsePipelineKey(key).model;
      keys.push(model);
      return runTask(pipes.get(model)!, req, c);
    });
    assert.equal(out.case, "result");
    const image = out.value as Image;
    return { image, keys, pixels: await sharp(image.png).removeAlpha().raw().toBuffer(), info: parseInfotext(image.infotext).params };
  }

  test("conditioning: OpenCLIP-G's penultimate state of ids padded with 0 after the end, and its pooled text_embeds", async () => {
    const refiner = pipes.get("xl-refiner")!;
    const conditioner = await refiner.conditioner();
    const text = "a red castle";
    const [cond] = await conditioner.encodeBatch([text], { emphasis: "None", clipSkip: 1 });
    const ids = Int32Array.from(tokenizeLine(conditioner.tokenizer, text, { emphasis: "None" }).chunks[0]!.tokens);
    const end = ids.indexOf(conditioner.tokenizer.eosId);
    const gIds = ids.map((t, i) => (i > end ? 0 : t));
    const layers = 3; // sdxl-refiner-small's OpenCLIP-G
    const session = await ort.InferenceSession.create(join(dir, "xl-refiner", "onnx", "text_encoder_2", "model.onnx"));
    const outputs = [`hidden_states.${layers - 1}`, "text_embeds"];
    const out = await session.run({ input_ids: new ort.Tensor("int32", gIds, [1, CHUNK_TOKENS]) }, outputs);
    await session.release();
    const hidden = out[outputs[0]!]!.data as Float32Array;
    assert.equal(refiner.model.textEncoder.hiddenSize, cond!.hidden);
    assert.equal(cond!.hidden * CHUNK_TOKENS, hidden.length);
    assert.deepEqual(cond!.data, hidden);
    assert.deepEqual(cond!.pooled, out["text_embeds"]!.data as Float32Array);
    // With CLIP-L's padding (end-of-text repeated) G's states after the end would differ.
    assert.ok(ids.slice(end + 1).some((t) => t !== 0));
    // CLIP skip reaches no layer of G: every value renders the same conditioning.
    const [skipped] = await conditioner.encodeBatch([text], { emphasis: "None", clipSkip: 3 });
    assert.deepEqual(skipped!.data, cond!.data);
  });

  test("time ids: original size, crop and the aesthetic score, 6 for the prompt's rows and 2.5 for the negative's", async () => {
    calls.length = 0;
    const plain = await render({ ...base, model: "xl-refiner", overrideSettings: { sdxlCropTop: 8 } });
    assert.equal(plain.keys.length, 1);
    const first = calls[0]!;
    assert.equal(first.n, 2);
    // Negative prompt first, then the prompt (the batch's row order).
    assert.deepEqual([...first.added!.timeIds], [48, 64, 8, 0, 2.5, 48, 64, 8, 0, 6]);
    calls.length = 0;
    const scored = await render({
      ...base,
      model: "xl-refiner",
      overrideSettings: { sdxlCropTop: 8, sdxlRefinerHighAestheticScore: 7.5, sdxlRefinerLowAestheticScore: 1 },
    });
    assert.deepEqual([...calls[0]!.added!.timeIds], [48, 64, 8, 0, 1, 48, 64, 8, 0, 7.5]);
    assert.notDeepEqual(scored.pixels, plain.pixels, "the aesthetic score conditions the UNet");
  });

  test("SDXL base refined by the SDXL refiner: the switch hands over and the infotext names both models", async () => {
    const alone = await render(base);
    const refined = await render({ ...base, refinerCheckpoint: "xl-refiner", refinerSwitchAt: 0.6 });
    assert.deepEqual(refined.keys, ["xl-base", "xl-refiner"]);
    assert.notDeepEqual(refined.pixels, alone.pixels);
    assert.equal(refined.info.get("Model"), "xl-base");
    assert.equal(refined.info.get("Refiner"), "xl-refiner");
    assert.equal(refined.info.get("Refiner switch at"), "0.6");
    const again = await render({ ...base, refinerCheckpoint: "xl-refiner", refinerSwitchAt: 0.6 });
    assert.deepEqual(again.pixels, refined.pixels);
  });
});
