import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { FarmError, GenerationParamsSchema, RngSource, RunTaskRequestSchema } from "@latentfarm/shared";
import type { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { createHash } from "node:crypto";
import {
  MANIFEST_FILE,
  encodeSafetensors,
  loraAddnetHash,
  loraShortHash,
  readSafetensors,
  type PipelineManifest,
  type TensorToWrite,
} from "../model-graph/index.js";
import { encodeTorchFile } from "../test-support/torch-writer.js";
import { renderTask } from "../pipeline/txt2img.js";
import { ModelCatalog } from "./catalog.js";
import { pipelineKey, unmergedLoraHashes, type LoraUse } from "./model-loader.js";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";
import { makeLoraCatalog, pipelineFor } from "../test-support/lora-catalog.js";

const FIXTURES = KIT_FIXTURES;
const REF = join(FIXTURES, "reference", "txt2img");

async function render(pipe: LoadedPipeline, params: Record<string, unknown>, seed = 42n, unmergedLoraHashes?: Map<string, string>) {
  return renderTask(pipe, create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed, params: { model: pipe.name, ...params } }), {
    signal: new AbortController().signal,
    agentId: "t",
    onStep: () => {},
    onWarning: () => {},
    ...(unmergedLoraHashes && { unmergedLoraHashes }),
  });
}

test("pipeline keys ignore LoRA order and weight-0 LoRAs", () => {
  const a = pipelineKey("m", [
    { name: "b", teWeight: 1, unetWeight: 1 },
    { name: "a", teWeight: 0.5, unetWeight: 0.5 },
  ]);
  const b = pipelineKey("m", [
    { name: "a", teWeight: 0.5, unetWeight: 0.5 },
    { name: "z", teWeight: 0, unetWeight: 0 },
    { name: "b", teWeight: 1, unetWeight: 1 },
  ]);
  assert.equal(a, b);
  assert.equal(pipelineKey("m", [{ name: "x", teWeight: 0, unetWeight: 0 }]), pipelineKey("m", []));
});

describe(
  "a civitai-style .safetensors checkpoint renders A1111's reference images",
  { skip: kitSkip("tiny-sd15.safetensors"), concurrency: false },
  () => {
    let dir: string;
    let pipe: LoadedPipeline;
    before(async () => {
      dir = mkdtempSync(join(tmpdir(), "lf-ckpt-"));
      const models = join(dir, "models");
      mkdirSync(models);
      symlinkSync(join(FIXTURES, "tiny-sd15.safetensors"), join(models, "tiny-ckpt.safetensors"));
      // Head counts of a tiny model cannot be inferred from its weights: A1111-style sidecar config.
      writeFileSync(join(models, "tiny-ckpt.json"), JSON.stringify({ unetHeads: 8, textHeads: 4 }));
      pipe = await pipelineFor(new ModelCatalog(models), "tiny-ckpt", [], {
        cacheDir: join(dir, "cache"),
        tokenizerDir: join(FIXTURES, "tiny-sd15", "tokenizer"),
      });
    });
    after(async () => {
      await pipe?.close();
      rmSync(dir, { recursive: true, force: true });
    });

    const cases = existsSync(REF) ? (JSON.parse(readFileSync(join(REF, "cases.json"), "utf8")) as Array<Record<string, unknown>>) : [];
    const RNG: Record<string, RngSource> = { CPU: RngSource.CPU, NV: RngSource.NV, GPU: RngSource.GPU };
    for (const c of cases) {
      test(`${c["id"] as string} within ±2 levels, with the A1111 model hash in the infotext`, async () => {
        const expected = c["expected"] as string[];
        for (let i = 0; i < expected.length; i++) {
          const img = await render(
            pipe,
            {
              prompt: c["prompt"],
              negativePrompt: c["negative_prompt"],
              samplerName: c["sampler_name"],
              scheduler: c["scheduler"] ?? "",
              steps: c["steps"],
              cfgScale: c["cfg_scale"],
              width: c["width"],
              height: c["height"],
              clipSkip: c["clip_skip"] ?? 1,
              rng: RNG[c["rng"] as string],
            },
            BigInt((c["seed"] as number) + i),
          );
          const a = await sharp(img.png).raw().toBuffer();
          const b = await sharp(join(REF, expected[i]!)).removeAlpha().raw().toBuffer();
          let max = 0;
          for (let k = 0; k < a.length; k++) max = Math.max(max, Math.abs(a[k]! - b[k]!));
          assert.ok(max <= 2, `${expected[i]}: ${max} levels`);
          assert.match(img.infotext, /Model hash: [0-9a-f]{10}, Model: tiny-ckpt/);
        }
      });
    }
  },
);

describe("LoRAs named in a prompt merge into the checkpoint", { concurrency: false }, () => {
  let dir: string;
  let catalog: ModelCatalog;
  let opts: { cacheDir: string; lorasDir: string };
  const open: LoadedPipeline[] = [];
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "lf-lora-"));
    ({ catalog, opts } = await makeLoraCatalog(dir));
  });
  after(async () => {
    for (const p of open) await p.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const params = { prompt: "a cat <lora:style:1>", samplerName: "Euler", steps: 3, width: 64, height: 64, rng: RngSource.CPU };

  test("weight 0 equals the base model; weight 1 changes the image and names the LoRA's hash", async () => {
    const base = await pipelineFor(catalog, "tiny", [], opts);
    const zero = await pipelineFor(catalog, "tiny", [{ name: "style", teWeight: 0, unetWeight: 0 }], opts);
    const one = await pipelineFor(catalog, "tiny", [{ name: "style", teWeight: 1, unetWeight: 1 }], opts);
    open.push(base, zero, one);
    const b = await sharp((await render(base, params)).png)
      .raw()
      .toBuffer();
    assert.deepEqual(
      await sharp((await render(zero, params)).png)
        .raw()
        .toBuffer(),
      b,
    );
    const img = await render(one, params);
    assert.notDeepEqual(await sharp(img.png).raw().toBuffer(), b);
    assert.match(img.infotext, /Lora hashes: "style: [0-9a-f]{12}"/);
  });

  test("a torch .pt LoRA merges as the .safetensors of the same tensors does; its hash is the whole file's, and sshs_model_hash is used where recorded", async () => {
    // style.pt and style_sshs.safetensors: the tensors of style.safetensors, as torch.save and as kohya save them.
    const st = await readSafetensors(join(opts.lorasDir, "style.safetensors"));
    const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
    const toWrite: Record<string, TensorToWrite> = {};
    for (const k of st.keys()) {
      const data = await st.float32(k);
      tensors[k] = { shape: [...st.info(k).shape], data };
      toWrite[k] = { dtype: "F32", shape: [...st.info(k).shape], data };
    }
    await st.close();
    const pt = encodeTorchFile(tensors);
    writeFileSync(join(opts.lorasDir, "style_pt.pt"), pt);
    const recorded = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    writeFileSync(join(opts.lorasDir, "style_sshs.safetensors"), encodeSafetensors(toWrite, { sshs_model_hash: recorded }));
    const one = await pipelineFor(catalog, "tiny", [{ name: "style", teWeight: 1, unetWeight: 1 }], opts);
    const fromPt = await pipelineFor(catalog, "tiny", [{ name: "style_pt", teWeight: 1, unetWeight: 1 }], opts);
    const fromSshs = await pipelineFor(catalog, "tiny", [{ name: "style_sshs", teWeight: 1, unetWeight: 1 }], opts);
    open.push(one, fromPt, fromSshs);
    const want = await sharp((await render(one, params)).png)
      .raw()
      .toBuffer();
    const ptImage = await render(fromPt, { ...params, prompt: "a cat <lora:style_pt:1>" });
    assert.deepEqual(await sharp(ptImage.png).raw().toBuffer(), want);
    const wholeFile = createHash("sha256").update(pt).digest("hex").slice(0, 12);
    assert.match(ptImage.infotext, new RegExp(`Lora hashes: "style_pt: ${wholeFile}"`));
    const sshsImage = await render(fromSshs, { ...params, prompt: "a cat <lora:style_sshs:1>" });
    assert.deepEqual(await sharp(sshsImage.png).raw().toBuffer(), want);
    assert.match(sshsImage.infotext, /Lora hashes: "style_sshs: 0123456789ab"/);
    assert.equal(
      await loraShortHash(join(opts.lorasDir, "style.safetensors")),
      await loraAddnetHash(join(opts.lorasDir, "style.safetensors")),
    );
  });

  test("a weight-0 LoRA merges nothing and is listed in Lora hashes where its pass's prompt names it, as A1111 lists it", async () => {
    const missing: string[] = [];
    const request = create(GenerationParamsSchema, {
      prompt: "a cat <lora:style:0> <lora:gone:0:0>",
      hrPrompt: "a dog <lora:also:0>",
      enableHr: true,
      loras: [{ name: "kept", teWeight: 1, unetWeight: 1 }],
    });
    const unmerged = await unmergedLoraHashes(request, opts.lorasDir, (name) => missing.push(name));
    const hash = await loraAddnetHash(join(opts.lorasDir, "style.safetensors"));
    // "kept" is merged (its hash is the pipeline's); "also" and "gone" are not in the folder.
    assert.deepEqual([...unmerged], [["style", `style: ${hash}`]]);
    assert.deepEqual(missing, ["gone", "also"]);
    // The same file again: served from the cache by size and mtime, the same entry.
    assert.deepEqual(await unmergedLoraHashes(request, opts.lorasDir, () => {}), unmerged);
    // No folder: every weight-0 LoRA is missing, nothing throws.
    const none: string[] = [];
    assert.equal((await unmergedLoraHashes(request, undefined, (name) => none.push(name))).size, 0);
    assert.deepEqual(none, ["style", "gone", "also"]);

    const base = await pipelineFor(catalog, "tiny", [], opts);
    open.push(base);
    const zero = { ...params, prompt: "a cat <lora:style:0>" };
    const img = await render(base, zero, 42n, unmerged);
    assert.match(img.infotext, new RegExp(`Lora hashes: "style: ${hash}"`));
    // The weight changes nothing in the image.
    assert.deepEqual(
      await sharp(img.png).raw().toBuffer(),
      await sharp((await render(base, { ...params, prompt: "a cat" })).png)
        .raw()
        .toBuffer(),
    );
    // A prompt that does not name it lists nothing.
    assert.doesNotMatch((await render(base, { ...params, prompt: "a cat" }, 42n, unmerged)).infotext, /Lora hashes/);
  });

  test("a LoRA tag in the prompt works with Hires.fix and img2img too, and names its hash there", async () => {
    const one = await pipelineFor(catalog, "tiny", [{ name: "style", teWeight: 1, unetWeight: 1 }], opts);
    open.push(one);
    const hires = await render(one, {
      ...params,
      enableHr: true,
      hrScale: 1.5,
      hrUpscaler: "Latent",
      hrSecondPassSteps: 2,
      denoisingStrength: 0.5,
    });
    assert.equal(hires.width, 96);
    assert.match(hires.infotext, /Lora hashes: "style: [0-9a-f]{12}"/);
    const init = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 90, g: 120, b: 200 } } })
      .png()
      .toBuffer();
    const img2img = await render(one, { ...params, initImages: [init], denoisingStrength: 0.6 });
    assert.match(img2img.infotext, /Lora hashes: "style: [0-9a-f]{12}"/);
    // A hires prompt naming the same LoRAs (a zero-weight tag aside) runs; naming others would need a second merged model.
    const hr = { ...params, enableHr: true, hrScale: 1.5, hrUpscaler: "Latent", hrSecondPassSteps: 2, denoisingStrength: 0.5 };
    assert.equal((await render(one, { ...hr, hrPrompt: "a dog <lora:style:1> <lora:other:0>" })).width, 96);
    await assert.rejects(render(one, { ...hr, hrPrompt: "a dog <lora:style:0.5>" }), (e: unknown) => {
      const err = FarmError.from(e);
      return err.codeName === "UNIMPLEMENTED" && err.field === "hr_prompt";
    });
  });

  test("Pad conds pads with the base model's empty prompt, also where a LoRA changed the text encoder", async () => {
    // A cache of its own: the LoRA pipeline pads without importing the base model whole.
    const own = { ...opts, cacheDir: join(dir, "cache-pad") };
    const textToo = await pipelineFor(catalog, "tiny", [{ name: "style", teWeight: 1, unetWeight: 1 }], own);
    open.push(textToo);
    const long = Array.from({ length: 90 }, () => "cat").join(" ");
    await (await textToo.conditioner()).prepare({ prompt: long, negativePrompt: "", steps: 3, padCondUncond: true });
    const built = readdirSync(own.cacheDir)
      .filter((d) => existsSync(join(own.cacheDir, d, MANIFEST_FILE)))
      .map((d) =>
        Object.keys((JSON.parse(readFileSync(join(own.cacheDir, d, MANIFEST_FILE), "utf8")) as PipelineManifest).components).sort(),
      );
    assert.deepEqual(
      built.sort(),
      [["text_encoder"], ["text_encoder", "unet", "vae_decoder", "vae_encoder"]],
      "the LoRA pipeline and the base text encoder",
    );
    const base = await pipelineFor(catalog, "tiny", [], own);
    open.push(base);
    const uncond = async (pipe: LoadedPipeline) =>
      (await (await pipe.conditioner()).prepare({ prompt: long, negativePrompt: "", steps: 3, padCondUncond: true })).uncondAt(0);
    const [b, l] = [await uncond(base), await uncond(textToo)];
    assert.equal(l.tokens, 154);
    const chunk = 77 * (await textToo.conditioner()).encoder.hiddenSize;
    // The negative prompt itself is encoded with the LoRA, as A1111 encodes it; the padding is the base model's.
    assert.notDeepEqual(l.tensor.subarray(0, chunk), b.tensor.subarray(0, chunk));
    assert.deepEqual(l.tensor.subarray(chunk), b.tensor.subarray(chunk));
    const img = await render(textToo, { ...params, prompt: `${params.prompt} ${long}`, overrideSettings: { padCondUncond: true } });
    assert.match(img.infotext, /Pad conds: True/);
  });

  test("unknown, path-like and misplaced LoRAs get clear statuses", async () => {
    const fails = async (loras: LoraUse[], code: string, model = "tiny", o = opts) =>
      assert.rejects(
        pipelineFor(catalog, model, loras, o),
        (e: unknown) => FarmError.from(e).codeName === code && /lora/.test(FarmError.from(e).message),
      );
    await fails([{ name: "nope", teWeight: 1, unetWeight: 1 }], "NOT_FOUND");
    await fails([{ name: "../style", teWeight: 1, unetWeight: 1 }], "INVALID_ARGUMENT");
    await fails([{ name: "/etc/passwd", teWeight: 1, unetWeight: 1 }], "INVALID_ARGUMENT");
    await fails([{ name: "style", teWeight: 1, unetWeight: 1 }], "FAILED_PRECONDITION", "tiny", { cacheDir: opts.cacheDir } as typeof opts);
  });
});
