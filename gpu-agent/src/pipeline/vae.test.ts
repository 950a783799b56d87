import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import sharp from "sharp";
import {
  FarmError,
  GenerationParamsSchema,
  RngSource,
  RunTaskRequestSchema,
  applyInfotext,
  parseInfotext,
  silentLogger,
  type Image,
} from "@latentfarm/shared";
import { makeTinyModel, readSafetensors, toFloat32, writeSafetensors, type TensorToWrite } from "../model-graph/index.js";
import { ModelCatalog } from "../models/catalog.js";
import { loadModel, parsePipelineKey, passKeysWith } from "../models/model-loader.js";
import { VaeList } from "../models/vae-files.js";
import { runTaskPasses } from "../task-passes.js";
import { encodeTorchFile, type TensorToPickle } from "../test-support/torch-writer.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import { runTask } from "./txt2img.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;

const PREFIX = "first_stage_model.";

async function tensorsOf(path: string): Promise<Map<string, TensorToPickle>> {
  const file = await readSafetensors(path);
  try {
    const out = new Map<string, TensorToPickle>();
    for (const k of file.keys()) out.set(k, { shape: file.info(k).shape, data: toFloat32(await file.tensor(k), path) });
    return out;
  } finally {
    await file.close();
  }
}

const f32 = (t: TensorToPickle): TensorToWrite => ({ dtype: "F32", shape: t.shape, data: t.data });

describe("a VAE file (A1111's sd_vae) decodes and encodes in place of the checkpoint's own", { concurrency: false }, () => {
  let dir: string;
  let catalog: ModelCatalog;
  let vaes: VaeList;
  let vaeHash: string;
  let hints: object;
  const pipes = new Map<string, Promise<LoadedPipeline>>();

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "lf-vae-"));
    const models = join(dir, "models");
    const vaeDir = join(dir, "vae");
    mkdirSync(models);
    mkdirSync(vaeDir);
    const a = await makeTinyModel({ outDir: join(dir, "gen-a"), seed: 3, config: "small" });
    const b = await makeTinyModel({ outDir: join(dir, "gen-b"), seed: 4, config: "small" });
    symlinkSync(a.tokenizerDir, join(models, "tokenizer"));
    symlinkSync(a.checkpointPath, join(models, "tiny.safetensors"));
    hints = a.hints;
    writeFileSync(join(models, "tiny.json"), JSON.stringify(hints));
    // The same checkpoint with b's VAE baked in: what tiny + b's VAE file must render.
    const ta = await tensorsOf(a.checkpointPath);
    const tb = await tensorsOf(b.checkpointPath);
    const baked: Record<string, TensorToWrite> = {};
    for (const [k, t] of ta) baked[k] = f32(k.startsWith(PREFIX) ? tb.get(k)! : t);
    await writeSafetensors(join(models, "tiny-baked.safetensors"), baked);
    writeFileSync(join(models, "tiny-baked.json"), JSON.stringify(a.hints));
    // b's VAE as A1111's models/VAE files hold it: no prefix, with the training leftovers A1111 drops.
    const vae: Record<string, TensorToPickle> = {};
    for (const [k, t] of tb) if (k.startsWith(PREFIX)) vae[k.slice(PREFIX.length)] = t;
    const leftovers = {
      "loss.logvar": { shape: [], data: Float32Array.of(0) },
      "model_ema.decay": { shape: [], data: Float32Array.of(0.999) },
    };
    const st: Record<string, TensorToWrite> = {};
    for (const [k, t] of Object.entries({ ...vae, ...leftovers })) st[k] = f32(t);
    await writeSafetensors(join(vaeDir, "b.safetensors"), st);
    // …and as a torch checkpoint (vae-ft-mse-840000-ema-pruned.ckpt's layout: a Lightning state_dict).
    writeFileSync(join(vaeDir, "b.ckpt"), encodeTorchFile({ state_dict: { ...vae, ...leftovers }, global_step: 840000 }));
    // A decoder-only VAE (no encoder.* or quant_conv.*): txt2img only.
    const decoderOnly: Record<string, TensorToWrite> = {};
    for (const [k, t] of Object.entries(vae)) if (!k.startsWith("encoder.") && !k.startsWith("quant_conv.")) decoderOnly[k] = f32(t);
    await writeSafetensors(join(vaeDir, "decoder-only.safetensors"), decoderOnly);
    vaeHash = createHash("sha256")
      .update(readFileSync(join(vaeDir, "b.safetensors")))
      .digest("hex")
      .slice(0, 10);
    catalog = new ModelCatalog(models);
    vaes = new VaeList({ modelsDir: models, vaeDir }, 0);
  });
  after(async () => {
    for (const p of pipes.values()) await (await p.catch(() => undefined))?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const pipe = (key: string): Promise<LoadedPipeline> => {
    let p = pipes.get(key);
    if (p === undefined) {
      const k = parsePipelineKey(key);
      p = loadModel(catalog, k, { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, cacheDir: join(dir, "cache") }).then(
        (loaded) => new LoadedPipeline(loaded.model, { maxBatchRows: 8, modelHash: loaded.modelHash, vae: loaded.vae }),
      );
      pipes.set(key, p);
    }
    return p;
  };

  const base: Params = {
    model: "tiny",
    prompt: "a cat",
    samplerName: "Euler",
    steps: 3,
    width: 64,
    height: 64,
    rng: RngSource.CPU,
    seed: 5n,
  };

  async function render(params: Params): Promise<{ pixels: Buffer; infotext: Map<string, string>; keys: string[]; warnings: string[] }> {
    const warnings: string[] = [];
    const ctx: RenderContext = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: (w) => warnings.push(w) };
    const keys: string[] = [];
    const req = create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed: 5n, params });
    const out = await runTaskPasses(
      req,
      ctx,
      async (key, r, c) => {
        keys.push(key);
        return runTask(await pipe(key), r, c);
      },
      passKeysWith(vaes),
    );
    assert.equal(out.case, "result");
    const image = out.value as Image;
    return { pixels: await sharp(image.png).raw().toBuffer(), infotext: parseInfotext(image.infotext).params, keys, warnings };
  }

  test("tiny + b's VAE file renders the bytes of tiny with b's VAE baked in, and the infotext names the file", async () => {
    const baked = await render({ ...base, model: "tiny-baked" });
    const own = await render(base);
    assert.notDeepEqual(own.pixels, baked.pixels, "the two VAEs must differ for this test to mean anything");
    for (const file of ["b.safetensors", "b.ckpt"]) {
      const r = await render({ ...base, overrideSettings: { sdVae: file } });
      assert.deepEqual(r.pixels, baked.pixels, file);
      assert.equal(r.infotext.get("VAE"), file);
      if (file === "b.safetensors") assert.equal(r.infotext.get("VAE hash"), vaeHash);
      assert.match(r.infotext.get("VAE hash") ?? "", /^[0-9a-f]{10}$/);
      assert.equal(parsePipelineKey(r.keys[0]!).vae?.name, file);
    }
    // A1111's order: Model hash, Model, VAE hash, VAE.
    const r = await render({ ...base, overrideSettings: { sdVae: "b.safetensors" } });
    const keys = [...r.infotext.keys()];
    assert.deepEqual(keys.slice(keys.indexOf("Model hash"), keys.indexOf("Model hash") + 4), ["Model hash", "Model", "VAE hash", "VAE"]);
  });

  test('"None" and Automatic without a VAE named after the checkpoint keep its own VAE and write no VAE entries', async () => {
    const own = await render(base);
    for (const sdVae of ["None", "Automatic", ""]) {
      const r = await render({ ...base, overrideSettings: { sdVae } });
      assert.deepEqual(r.pixels, own.pixels, sdVae);
      assert.equal(r.infotext.has("VAE"), false);
      assert.equal(r.infotext.has("VAE hash"), false);
      assert.equal(parsePipelineKey(r.keys[0]!).vae, undefined);
    }
  });

  test("a pasted infotext's VAE names the file; its VAE hash warns when the file here differs", async () => {
    const text = (hash: string) => `a cat\nSteps: 3, Sampler: Euler, Seed: 5, Size: 64x64, VAE hash: ${hash}, VAE: b.safetensors`;
    // As the coordinator reads it before placing the job.
    const pasted = (params: Params) => {
      const p = create(GenerationParamsSchema, params);
      assert.deepEqual(applyInfotext(p).notReproduced, []);
      return p;
    };
    const r = await render(pasted({ ...base, infotext: text(vaeHash) }));
    assert.equal(r.infotext.get("VAE"), "b.safetensors");
    assert.deepEqual(r.warnings, []);
    const other = await render(pasted({ ...base, infotext: text("0123456789") }));
    assert.deepEqual(other.warnings, [`VAE hash: b.safetensors is ${vaeHash} here, the infotext's is 0123456789: the image differs`]);
    const none = await render(pasted({ ...base, infotext: text(vaeHash), overrideSettings: { sdVae: "None" } }));
    assert.match(none.warnings.join("\n"), /not the one decoding here/);
  });

  test("img2img encodes its init image with the VAE file too", async () => {
    const init = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 80, b: 40 } } })
      .png()
      .toBuffer();
    const img2img = { ...base, initImages: [new Uint8Array(init)], denoisingStrength: 0.5 };
    const baked = await render({ ...img2img, model: "tiny-baked" });
    const viaFile = await render({ ...img2img, overrideSettings: { sdVae: "b.safetensors" } });
    assert.deepEqual(viaFile.pixels, baked.pixels);
  });

  test("a VAE file without an encoder decodes txt2img; img2img with it fails naming override_settings.sd_vae", async () => {
    const settings = { sdVae: "decoder-only.safetensors" };
    const baked = await render({ ...base, model: "tiny-baked" });
    assert.deepEqual((await render({ ...base, overrideSettings: settings })).pixels, baked.pixels);
    const init = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 9, g: 9, b: 9 } } })
      .png()
      .toBuffer();
    await assert.rejects(
      render({ ...base, overrideSettings: settings, initImages: [new Uint8Array(init)], denoisingStrength: 0.5 }),
      (err: unknown) =>
        err instanceof FarmError && err.code === 9 && err.field === "override_settings.sd_vae" && /no encoder/.test(err.message),
    );
  });

  test("Automatic takes a VAE whose file name starts with the checkpoint's, found when it appears", async () => {
    const near = join(catalog.root, "tiny.vae.safetensors");
    copyFileSync(join(dir, "vae", "b.safetensors"), near);
    try {
      const baked = await render({ ...base, model: "tiny-baked" });
      const r = await render(base);
      assert.deepEqual(r.pixels, baked.pixels);
      assert.equal(r.infotext.get("VAE"), "tiny.vae.safetensors");
      // A Hires.fix second pass on another checkpoint resolves Automatic for that one (A1111 reloads the VAE
      // with the checkpoint); the infotext keeps the first pass's VAE, which A1111 records before sampling.
      const hires = await render({
        ...base,
        enableHr: true,
        hrScale: 1.5,
        hrSecondPassSteps: 2,
        denoisingStrength: 0.5,
        hrCheckpointName: "tiny-baked",
      });
      assert.deepEqual(
        hires.keys.map((k) => [parsePipelineKey(k).model, parsePipelineKey(k).vae?.name]),
        [
          ["tiny", "tiny.vae.safetensors"],
          ["tiny-baked", undefined],
        ],
      );
      assert.equal(hires.infotext.get("VAE"), "tiny.vae.safetensors");
      assert.match(hires.infotext.get("Hires checkpoint") ?? "", /^tiny-baked \[[0-9a-f]{10}\]$/);
      // A named VAE wins over the one near the checkpoint; "None" keeps the checkpoint's own.
      assert.equal(parsePipelineKey((await render({ ...base, overrideSettings: { sdVae: "b.ckpt" } })).keys[0]!).vae?.name, "b.ckpt");
      assert.equal((await render({ ...base, overrideSettings: { sdVae: "None" } })).infotext.has("VAE"), false);
    } finally {
      rmSync(near);
    }
  });

  test("A1111's per-checkpoint VAE: the checkpoint's .json names one for Automatic", async () => {
    const json = join(catalog.root, "tiny.json");
    writeFileSync(json, JSON.stringify({ ...hints, vae: "b.ckpt" }));
    try {
      const baked = await render({ ...base, model: "tiny-baked" });
      const r = await render(base);
      assert.deepEqual(r.pixels, baked.pixels);
      assert.equal(r.infotext.get("VAE"), "b.ckpt");
      assert.equal(parsePipelineKey((await render({ ...base, overrideSettings: { sdVae: "None" } })).keys[0]!).vae, undefined);
    } finally {
      writeFileSync(json, JSON.stringify(hints));
    }
  });

  test("a VAE name no file has fails the task with NOT_FOUND naming override_settings.sd_vae", async () => {
    await assert.rejects(
      render({ ...base, overrideSettings: { sdVae: "missing.safetensors" } }),
      (err: unknown) =>
        err instanceof FarmError && err.code === 5 && err.field === "override_settings.sd_vae" && /b\.ckpt/.test(err.message),
    );
  });
});
