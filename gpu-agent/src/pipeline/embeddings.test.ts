// Textual-inversion embeddings through a whole render: the kit's tiny SD1.5 with its text encoder
// patched for token overrides, and an embeddings folder of real files.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, TaskStage, silentLogger, type Handover, type Image } from "@latentfarm/shared";
import { ClipTokenizer } from "../conditioning/index.js";
import { decodeModel, encodeSafetensors, initializerFloat32 } from "../model-graph/index.js";
import { SdModel } from "../models/sd-model.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import { renderTask, runTask } from "./txt2img.js";
import { kitFixture, kitSkip, TINY_SD15 } from "../test-support/kit.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const skip = kitSkip("tiny-sd15");
const FIXTURES = join(import.meta.dirname, "..", "test-support", "embeddings");
const sha12 = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex").slice(0, 12);

describe("textual-inversion embeddings in a render", { skip, concurrency: false }, () => {
  const dir = mkdtempSync(join(tmpdir(), "lf-ti-render-"));
  let withEmbeddings: LoadedPipeline;
  let plain: LoadedPipeline;
  let tokenizer: ClipTokenizer;

  /** The model's own token-embedding rows for `words`: an embedding of them encodes as the words do. */
  const rowsOf = async (words: string): Promise<Float32Array> => {
    const path = kitFixture("tiny-sd15", "text_encoder", "model.onnx");
    const table = decodeModel(readFileSync(path)).graph.initializers.find((t) => t.dims[0] === 49408 && t.dims.length === 2)!;
    const data = await initializerFloat32(table, path);
    const ids = tokenizer.encode(words);
    const out = new Float32Array(ids.length * 32);
    ids.forEach((id, i) => out.set(data.subarray(id * 32, (id + 1) * 32), i * 32));
    return out;
  };
  const writeEmbedding = async (name: string, words: string) => {
    const data = await rowsOf(words);
    writeFileSync(
      join(dir, `${name}.safetensors`),
      encodeSafetensors({ emb_params: { dtype: "F32", shape: [data.length / 32, 32], data } }),
    );
  };
  /** Directory mtimes can be coarse: move the folder's forward so that a change shows. */
  let touched = Date.now();
  const touch = () => {
    touched += 10_000;
    utimesSync(dir, new Date(touched), new Date(touched));
  };

  before(async () => {
    tokenizer = await ClipTokenizer.fromDirectory(kitFixture("tiny-sd15", "tokenizer"));
    await writeEmbedding("zqxj", "red car");
    copyFileSync(join(FIXTURES, "concept.bin"), join(dir, "concept.bin"));
    const model = await SdModel.load(
      { name: "tiny-sd15", format: "diffusers-onnx", path: TINY_SD15 },
      { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, tokenOverrides: true },
    );
    withEmbeddings = new LoadedPipeline(model, { maxBatchRows: 16, embeddingsDir: dir, logger: silentLogger });
    plain = await loadTinyPipeline();
  });
  after(async () => {
    await withEmbeddings?.close();
    await plain?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const render = async (pipe: LoadedPipeline, params: Record<string, unknown>) => {
    const warnings: string[] = [];
    const img = await renderTask(
      pipe,
      create(RunTaskRequestSchema, {
        taskId: "ti",
        jobId: "ti",
        seed: 5n,
        params: { samplerName: "Euler", steps: 4, cfgScale: 7, width: 64, height: 64, rng: RngSource.CPU, model: "tiny-sd15", ...params },
      }),
      { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: (w) => warnings.push(w) },
    );
    return { png: img.png, pixels: await sharp(img.png).raw().toBuffer(), infotext: img.infotext, warnings };
  };

  test("a prompt naming an embedding renders its vectors: an embedding of a model's own word rows gives the words' image", async () => {
    const named = await render(withEmbeddings, { prompt: "a (zqxj:1.2) on a hill", negativePrompt: "blurry" });
    const words = await render(plain, { prompt: "a (red car:1.2) on a hill", negativePrompt: "blurry" });
    assert.deepEqual(named.pixels, words.pixels);
    assert.match(named.infotext, new RegExp(`TI hashes: "zqxj: ${sha12(join(dir, "zqxj.safetensors"))}"`));
    assert.doesNotMatch(words.infotext, /TI hashes/);
    // The same prompt without embeddings encodes the name as words: another image.
    assert.notDeepEqual((await render(plain, { prompt: "a (zqxj:1.2) on a hill", negativePrompt: "blurry" })).pixels, named.pixels);
    // A prompt that names none renders as on a model without token overrides.
    const none = { prompt: "a castle", negativePrompt: "fog" };
    assert.deepEqual((await render(withEmbeddings, none)).png, (await render(plain, none)).png);
  });

  test("TI hashes as A1111 writes them: the prompt's encoder pass puts its hashes before the negative prompt's", async () => {
    const both = await render(withEmbeddings, {
      prompt: "a zqxj",
      negativePrompt: "(concept), ugly",
      overrideSettings: { emphasis: "No norm" },
    });
    const h = { zqxj: sha12(join(dir, "zqxj.safetensors")), concept: sha12(join(dir, "concept.bin")) };
    // The negative prompt is encoded first: it writes TI hashes, then Emphasis (its bracket); the prompt's hashes go first.
    assert.match(both.infotext, new RegExp(`TI hashes: "zqxj: ${h.zqxj}, concept: ${h.concept}", Emphasis: No norm`));
    // Only the prompt has an embedding, only the negative prompt a bracket: Emphasis is written first.
    const order = await render(withEmbeddings, { prompt: "a zqxj", negativePrompt: "(ugly)", overrideSettings: { emphasis: "No norm" } });
    assert.match(order.infotext, new RegExp(`Emphasis: No norm, TI hashes: "zqxj: ${h.zqxj}"`));
  });

  test("a Hires.fix job's TI hashes are its first pass's, also when its passes run as separate tasks", async () => {
    const params = {
      prompt: "a zqxj",
      negativePrompt: "concept",
      hrPrompt: "a newer zqxj",
      enableHr: true,
      hrScale: 1.5,
      hrUpscaler: "Latent",
      denoisingStrength: 0.5,
      samplerName: "Euler",
      steps: 3,
      cfgScale: 7,
      width: 64,
      height: 64,
      model: "tiny-sd15",
    };
    const ctx = { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} };
    const request = (stage: TaskStage, inputs: Handover[] = []) =>
      create(RunTaskRequestSchema, { taskId: "h", jobId: "h", seed: 3n, stage, inputs, params });
    const full = (await runTask(withEmbeddings, request(TaskStage.FULL), ctx)).value as Image;
    const h = { zqxj: sha12(join(dir, "zqxj.safetensors")), concept: sha12(join(dir, "concept.bin")) };
    assert.match(full.infotext, new RegExp(`TI hashes: "zqxj: ${h.zqxj}, concept: ${h.concept}"`));
    const first = (await runTask(withEmbeddings, request(TaskStage.FIRST_PASS), ctx)).value as Handover;
    const second = (await runTask(withEmbeddings, request(TaskStage.SECOND_PASS, [first]), ctx)).value as Image;
    assert.equal(second.infotext, full.infotext);
    assert.deepEqual(second.png, full.png);
  });

  test("a file added to the folder is used by the next render, and a pasted infotext's TI hashes are checked", async () => {
    const before = await render(withEmbeddings, { prompt: "a newcomer" });
    assert.doesNotMatch(before.infotext, /TI hashes/);
    await writeEmbedding("newcomer", "blue boat");
    touch();
    const after = await render(withEmbeddings, { prompt: "a newcomer" });
    assert.match(after.infotext, /TI hashes: "newcomer: [0-9a-f]{12}"/);
    assert.deepEqual(after.pixels, (await render(plain, { prompt: "a blue boat" })).pixels);

    const pasted = await render(withEmbeddings, {
      prompt: "a zqxj",
      infotext: `a zqxj\nSteps: 4, Sampler: Euler, Seed: 5, Size: 64x64, TI hashes: "zqxj: 000000000000, EasyNegative: c74b4e810b03"`,
    });
    assert.deepEqual(pasted.warnings, [
      `TI hashes: embedding zqxj is ${sha12(join(dir, "zqxj.safetensors"))} here, the infotext's is 000000000000: the image differs`,
      "TI hashes: no embedding EasyNegative was applied (none of that name in this agent's embeddings folder, or the prompt does not name it): the image differs",
    ]);
  });
});
