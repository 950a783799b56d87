// SDXL LoRAs as the agent loads them: a tiny SDXL checkpoint in a models folder, kohya LoRAs on each of
// its three networks, merged by the model loader and rendered.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema } from "@latentfarm/shared";
import { makeTinyModel, writeSafetensors, type TensorToWrite } from "../model-graph/index.js";
import type { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { renderTask } from "../pipeline/txt2img.js";
import { loraTensor, pipelineFor } from "../test-support/lora-catalog.js";
import { ModelCatalog } from "./catalog.js";
import type { LoraUse } from "./model-loader.js";

describe("SDXL LoRAs merge into an SDXL checkpoint's three networks", { concurrency: false }, () => {
  const dir = mkdtempSync(join(tmpdir(), "lf-sdxl-lora-"));
  let catalog: ModelCatalog;
  let opts: { cacheDir: string; lorasDir: string };
  const open: LoadedPipeline[] = [];

  before(async () => {
    const tiny = await makeTinyModel({ outDir: join(dir, "gen"), seed: 5, config: "sdxl-small", checkpointOnly: true });
    const models = join(dir, "models");
    mkdirSync(models);
    symlinkSync(tiny.checkpointPath, join(models, "xl.safetensors"));
    writeFileSync(join(models, "xl.json"), JSON.stringify(tiny.hints));
    symlinkSync(tiny.tokenizerDir, join(models, "tokenizer"));
    const loras = join(dir, "loras");
    mkdirSync(loras);
    const pair = (layer: string, out: number, inp: number, v: number): Record<string, TensorToWrite> => ({
      [`${layer}.lora_up.weight`]: loraTensor([out, 2], v),
      [`${layer}.lora_down.weight`]: loraTensor([2, inp], v),
    });
    const c = tiny.spec.unetChannels[1]!;
    const [l, g] = [tiny.spec.textHidden, tiny.spec.text2Hidden!];
    const unet = pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", c, c, 0.5);
    const te1 = pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", l, l, 0.5);
    const te2 = pair("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", g, g, 0.5);
    await writeSafetensors(join(loras, "unet-only.safetensors"), unet);
    await writeSafetensors(join(loras, "te1-only.safetensors"), te1);
    await writeSafetensors(join(loras, "te2-only.safetensors"), te2);
    catalog = new ModelCatalog(models);
    opts = { cacheDir: join(dir, "cache"), lorasDir: loras };
  });
  after(async () => {
    for (const p of open) await p.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const params = { prompt: "a cat", samplerName: "Euler", steps: 3, width: 64, height: 64, rng: RngSource.CPU };
  const pixels = async (pipe: LoadedPipeline, extra: Record<string, unknown> = {}) => {
    const img = await renderTask(
      pipe,
      create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed: 9n, params: { model: pipe.name, ...params, ...extra } }),
      { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} },
    );
    return { raw: await sharp(img.png).raw().toBuffer(), infotext: img.infotext };
  };
  const load = async (loras: LoraUse[]) => {
    const p = await pipelineFor(catalog, "xl", loras, opts);
    open.push(p);
    return p;
  };

  test("each LoRA changes the image through its own network; no key is left unmatched", async () => {
    const base = await pixels(await load([]));
    for (const name of ["unet-only", "te1-only", "te2-only"]) {
      const pipe = await load([{ name, teWeight: 1, unetWeight: 1 }]);
      assert.deepEqual(pipe.loadWarnings, [], name);
      const img = await pixels(pipe, { prompt: `a cat <lora:${name}:1>` });
      assert.notDeepEqual(img.raw, base.raw, name);
      assert.match(img.infotext, new RegExp(`Lora hashes: "${name}: [0-9a-f]{12}"`));
    }
    // A text encoder LoRA at text weight 0 leaves the image as the base model makes it.
    const zero = await load([{ name: "te2-only", teWeight: 0, unetWeight: 1 }]);
    assert.deepEqual((await pixels(zero, { prompt: "a cat <lora:te2-only:0:1>" })).raw, base.raw);
  });

  test("Pad conds with a text-encoder LoRA pads with the base SDXL model's empty prompt (both encoders)", async () => {
    const pipe = await load([{ name: "te2-only", teWeight: 1, unetWeight: 1 }]);
    const long = "word ".repeat(40);
    const prepared = await (await pipe.conditioner()).prepare({ prompt: long, negativePrompt: "x", steps: 3, padCondUncond: true });
    const padded = prepared.uncondAt(0);
    assert.ok(padded.tokens > 77);
    assert.equal(padded.tokens, prepared.condAt(0)[0]!.tokens);
    // The padding chunk is the base model's "" (no LoRA), not this pipeline's.
    const base = await load([]);
    const [empty] = await (await base.conditioner()).encodeBatch([""]);
    const own = await (await pipe.conditioner()).encodeBatch([""]);
    const tail = padded.tensor.subarray(77 * empty!.hidden, 154 * empty!.hidden);
    assert.deepEqual(tail, empty!.data.subarray(0, 77 * empty!.hidden));
    assert.notDeepEqual(tail, own[0]!.data.subarray(0, 77 * empty!.hidden));
  });
});
