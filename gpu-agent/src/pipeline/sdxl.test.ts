import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, silentLogger, type Image } from "@latentfarm/shared";
import { CHUNK_TOKENS, tokenizeLine } from "../conditioning/chunking.js";
import { encodeSafetensors, makeTinyModel, readSafetensors, toFloat32, type TinyModel } from "../model-graph/index.js";
import { SdModel, type AddedConditions } from "../models/sd-model.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import { renderTask } from "./txt2img.js";

/**
 * SDXL on a tiny SDXL-layout checkpoint built by the farm's own importer: conditioning from both text
 * encoders, the pooled vector and size conditions reaching the UNet, and renders through the pipeline.
 */
describe("SDXL pipeline on a tiny SDXL checkpoint", { concurrency: false }, () => {
  const dir = mkdtempSync(join(tmpdir(), "sdxl-"));
  let tiny: TinyModel;
  let pipe: LoadedPipeline;
  const unetCalls: Array<{ n: number; h: number; w: number; added: AddedConditions | undefined }> = [];
  before(async () => {
    tiny = await makeTinyModel({ outDir: dir, config: "sdxl-small", seed: 3 });
    const model = await SdModel.load(
      { name: "tiny-sdxl", format: "diffusers-onnx", path: tiny.onnxDir! },
      { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1 },
    );
    const unet = model.unet.bind(model);
    model.unet = (sample, ts, ctx, dims, signal, added) => {
      unetCalls.push({
        n: dims.n,
        h: dims.h,
        w: dims.w,
        added: added && { textEmbeds: added.textEmbeds.slice(), timeIds: added.timeIds.slice() },
      });
      return unet(sample, ts, ctx, dims, signal, added);
    };
    pipe = new LoadedPipeline(model, { maxBatchRows: 16 });
  });
  after(async () => {
    await pipe?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const ctx: RenderContext = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} };
  const request = (params: Record<string, unknown>, seed = 11n) =>
    create(RunTaskRequestSchema, {
      taskId: "x",
      jobId: "x",
      seed,
      subseed: 0n,
      params: {
        prompt: "a red castle",
        negativePrompt: "",
        samplerName: "Euler a",
        steps: 4,
        cfgScale: 6,
        width: 64,
        height: 48,
        rng: RngSource.NV,
        model: "tiny-sdxl",
        ...params,
      },
    });
  const pixels = async (img: Image) => sharp(img.png).removeAlpha().raw().toBuffer();

  test("conditioning: CLIP-L's and G's penultimate states side by side, G's ids padded with 0, G's text_embeds pooled", async () => {
    const conditioner = await pipe.conditioner();
    const text = "a red castle";
    // Clip skip 2 selects CLIP-L's penultimate layer: what SDXL renders with unless sdxl_clip_l_skip.
    const [cond] = await conditioner.encodeBatch([text], { emphasis: "None", clipSkip: 2 });
    // The same computation straight through ONNX Runtime, from the folder's two graphs.
    const ids = Int32Array.from(tokenizeLine(conditioner.tokenizer, text, { emphasis: "None" }).chunks[0]!.tokens);
    const end = ids.indexOf(conditioner.tokenizer.eosId);
    const gIds = ids.map((t, i) => (i > end ? 0 : t));
    const run = async (component: string, input: Int32Array, outputs: string[]) => {
      const session = await ort.InferenceSession.create(join(tiny.onnxDir!, component, "model.onnx"));
      try {
        const res = await session.run({ input_ids: new ort.Tensor("int32", input, [1, CHUNK_TOKENS]) }, outputs);
        return outputs.map((o) => res[o]!.data as Float32Array);
      } finally {
        await session.release();
      }
    };
    const [l] = await run("text_encoder", ids, [`hidden_states.${tiny.spec.textLayers - 1}`]);
    const [g, pooled] = await run("text_encoder_2", gIds, [`hidden_states.${tiny.spec.text2Layers! - 1}`, "text_embeds"]);
    const dl = tiny.spec.textHidden;
    const dg = tiny.spec.text2Hidden!;
    assert.equal(cond!.hidden, dl + dg);
    for (let k = 0; k < CHUNK_TOKENS; k++) {
      for (let h = 0; h < dl; h++) assert.equal(cond!.data[k * (dl + dg) + h], l![k * dl + h], `L ${k}:${h}`);
      for (let h = 0; h < dg; h++) assert.equal(cond!.data[k * (dl + dg) + dl + h], g![k * dg + h], `G ${k}:${h}`);
    }
    assert.deepEqual(cond!.pooled, pooled);
    // G really sees the 0-padded ids: with CLIP-L's padding its states after the end differ.
    const [gUnpadded] = await run("text_encoder_2", ids, [`hidden_states.${tiny.spec.text2Layers! - 1}`]);
    assert.notDeepEqual(gUnpadded, g);
  });

  test("txt2img renders deterministically; each row gets its own pooled vector and the image's size conditions", async () => {
    unetCalls.length = 0;
    const a = await renderTask(pipe, request({}), ctx);
    assert.ok(unetCalls.length > 0 && unetCalls.every((c) => c.added !== undefined));
    const first = unetCalls[0]!.added!;
    assert.deepEqual([...first.timeIds], [48, 64, 0, 0, 48, 64, 48, 64, 0, 0, 48, 64]);
    // Row 0 is the empty negative prompt (zeros, A1111's force_zero_negative_prompt), row 1 the prompt.
    const pooled = first.textEmbeds.length / 2;
    assert.ok(first.textEmbeds.subarray(0, pooled).every((v) => v === 0));
    assert.ok(first.textEmbeds.subarray(pooled).some((v) => v !== 0));
    const again = await renderTask(pipe, request({}), ctx);
    assert.deepEqual(await pixels(again), await pixels(a));
    assert.equal(a.width, 64);
    assert.equal(a.height, 48);
    assert.match(a.infotext, /Model: tiny-sdxl/);

    const negative = await renderTask(pipe, request({ negativePrompt: "blurry" }), ctx);
    assert.notDeepEqual(await pixels(negative), await pixels(a));
  });

  test("a batch renders as single images with seeds s, s+1 (one UNet batch for both)", async () => {
    unetCalls.length = 0;
    const single = await Promise.all([renderTask(pipe, request({}, 20n), ctx), renderTask(pipe, request({}, 21n), ctx)]);
    assert.notDeepEqual(await pixels(single[0]!), await pixels(single[1]!));
    const alone = await renderTask(pipe, request({}, 21n), ctx);
    assert.deepEqual(await pixels(alone), await pixels(single[1]!));
    assert.ok(
      unetCalls.some((c) => c.n === 4),
      "the two images' rows shared UNet calls",
    );
  });

  test("an SDXL embedding (clip_l + clip_g) of a prompt's words renders as the words do", async () => {
    const weights = await readSafetensors(tiny.checkpointPath);
    const conditioner = await pipe.conditioner();
    const ids = conditioner.tokenizer.encode("red castle");
    const rows = async (key: string, width: number) => {
      const table = toFloat32(await weights.tensor(key));
      const out = new Float32Array(ids.length * width);
      ids.forEach((id, i) => out.set(table.subarray(id * width, (id + 1) * width), i * width));
      return { dtype: "F32" as const, shape: [ids.length, width], data: out };
    };
    const embeddingsDir = join(dir, "embeddings");
    mkdirSync(embeddingsDir);
    writeFileSync(
      join(embeddingsDir, "zqxj.safetensors"),
      encodeSafetensors({
        clip_g: await rows("conditioner.embedders.1.model.token_embedding.weight", tiny.spec.text2Hidden!),
        clip_l: await rows("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", tiny.spec.textHidden),
      }),
    );
    await weights.close();
    const model = await SdModel.load(
      { name: "tiny-sdxl", format: "diffusers-onnx", path: tiny.onnxDir! },
      { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, tokenOverrides: true },
    );
    const withEmbeddings = new LoadedPipeline(model, { maxBatchRows: 16, embeddingsDir, logger: silentLogger });
    try {
      const named = await renderTask(withEmbeddings, request({ prompt: "a zqxj" }), ctx);
      const words = await renderTask(withEmbeddings, request({ prompt: "a red castle" }), ctx);
      const other = await renderTask(withEmbeddings, request({ prompt: "a red tower" }), ctx);
      assert.match(named.infotext, /TI hashes: "zqxj: [0-9a-f]{12}"/);
      assert.deepEqual(await pixels(named), await pixels(words));
      assert.notDeepEqual(await pixels(other), await pixels(words));
    } finally {
      await withEmbeddings.close();
    }
  });

  test("CLIP skip: ignored for SDXL, as A1111 ignores it, unless sdxl_clip_l_skip hands it to CLIP-L", async () => {
    const render = async (params: Record<string, unknown>) => pixels(await renderTask(pipe, request(params), ctx));
    const plain = await render({ clipSkip: 1 });
    assert.deepEqual(await render({ clipSkip: 2 }), plain);
    assert.deepEqual(await render({ clipSkip: 3 }), plain);
    const lSkip = (clipSkip: number) => render({ clipSkip, overrideSettings: { sdxlClipLSkip: true } });
    // hidden_states[-2] is the penultimate layer: the default.
    assert.deepEqual(await lSkip(2), plain);
    assert.notDeepEqual(await lSkip(1), plain);
    assert.notDeepEqual(await lSkip(3), plain);
    await assert.rejects(lSkip(tiny.spec.textLayers + 2), /clip skip/);
  });

  test("sdxl_crop_top and sdxl_crop_left reach the UNet's time_ids and change the image", async () => {
    unetCalls.length = 0;
    const cropped = await renderTask(pipe, request({ overrideSettings: { sdxlCropTop: 16, sdxlCropLeft: 8 } }), ctx);
    assert.deepEqual([...unetCalls[0]!.added!.timeIds.subarray(0, 6)], [48, 64, 16, 8, 48, 64]);
    assert.notDeepEqual(await pixels(cropped), await pixels(await renderTask(pipe, request({}), ctx)));
  });

  test("Hires.fix: the second pass is conditioned on the upscale target's size", async () => {
    unetCalls.length = 0;
    const img = await renderTask(
      pipe,
      // 64×48 × 1.3 = 83×62, off the latent grid: A1111 conditions on that size, not on the latent's 80×56.
      request({ enableHr: true, hrScale: 1.3, hrUpscaler: "Latent", hrSecondPassSteps: 2, denoisingStrength: 0.5 }),
      ctx,
    );
    assert.deepEqual([img.width, img.height], [80, 56]);
    assert.ok(unetCalls.some((c) => c.h === 7 && c.w === 10));
    const sizes = new Set(unetCalls.map((c) => [...c.added!.timeIds.subarray(0, 6)].join(",")));
    assert.deepEqual([...sizes], ["48,64,0,0,48,64", "62,83,0,0,62,83"]);
  });
});
