// Textual-inversion embeddings bundled in a LoRA file (A1111 1.7+'s bundle_emb keys), through a render on
// generated tiny checkpoints: usable while the LoRA is merged, and the embeddings folder's of a name first.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema } from "@latentfarm/shared";
import { encodeSafetensors, readSafetensors, type TensorToWrite } from "../model-graph/index.js";
import type { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { renderTask } from "../pipeline/txt2img.js";
import type { ModelCatalog } from "./catalog.js";
import type { LoraUse } from "./model-loader.js";
import { loraTensor, makeLoraCatalog, pipelineFor, type PipelineOptions } from "../test-support/lora-catalog.js";

describe("embeddings bundled in a LoRA", { concurrency: false }, () => {
  let dir: string;
  let catalog: ModelCatalog;
  let opts: PipelineOptions & { lorasDir: string };
  let width: number;
  const open: LoadedPipeline[] = [];
  const vectors = (v: number): TensorToWrite => loraTensor([2, width], v);

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "lf-bundle-"));
    ({ catalog, opts } = await makeLoraCatalog(dir));
    // ink_bundle: ink's weights and an embedding "zqxj" in the file.
    const ink = await readSafetensors(join(opts.lorasDir, "ink.safetensors"));
    const tensors: Record<string, TensorToWrite> = {};
    for (const k of ink.keys()) tensors[k] = { dtype: "F32", shape: [...ink.info(k).shape], data: await ink.float32(k) };
    await ink.close();
    width = Object.entries(tensors).find(([k]) => k.startsWith("lora_te_") && k.endsWith("lora_down.weight"))![1].shape[1]!;
    tensors["bundle_emb.zqxj.string_to_param.*"] = vectors(0.05);
    // One the folders do not have: it stays usable beside them.
    tensors["bundle_emb.qwvk.emb_params"] = vectors(0.02);
    writeFileSync(join(opts.lorasDir, "ink_bundle.safetensors"), encodeSafetensors(tensors));
    // Two embeddings folders: one with the bundle's vectors under the same name, one with other vectors.
    for (const [folder, v] of [
      ["same", 0.05],
      ["other", -0.07],
    ] as const) {
      mkdirSync(join(dir, folder));
      writeFileSync(join(dir, folder, "zqxj.safetensors"), encodeSafetensors({ emb_params: vectors(v) }));
    }
  });
  after(async () => {
    for (const p of open) await p.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const pipeline = async (lora: string, embeddings?: string): Promise<LoadedPipeline> => {
    const loras: LoraUse[] = [{ name: lora, teWeight: 1, unetWeight: 1 }];
    const p = await pipelineFor(catalog, "tiny", loras, {
      ...opts,
      ...(embeddings !== undefined && { embeddingsDir: join(dir, embeddings) }),
    });
    open.push(p);
    return p;
  };
  const render = async (pipe: LoadedPipeline, lora: string, infotext?: string) => {
    const prompt = `a zqxj on a hill <lora:${lora}:1>`;
    const params = {
      model: pipe.name,
      prompt,
      samplerName: "Euler",
      steps: 3,
      width: 64,
      height: 64,
      ...(infotext !== undefined && { infotext }),
    };
    const warnings: string[] = [];
    const img = await renderTask(
      pipe,
      create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed: 7n, params: { ...params, rng: RngSource.CPU } }),
      { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: (w) => warnings.push(w) },
    );
    return { pixels: await sharp(img.png).raw().toBuffer(), infotext: img.infotext, warnings };
  };

  test("a prompt naming the bundled embedding renders its vectors, as the same vectors from the embeddings folder do; TI hashes leave it out", async () => {
    const bundled = await render(await pipeline("ink_bundle"), "ink_bundle");
    const fromFolder = await render(await pipeline("ink", "same"), "ink");
    assert.deepEqual(bundled.pixels, fromFolder.pixels);
    // A1111 gives a bundled embedding no hash, so TI hashes does not name it; the folder's file has one.
    assert.doesNotMatch(bundled.infotext, /TI hashes/);
    assert.match(fromFolder.infotext, /TI hashes: "zqxj: [0-9a-f]{12}"/);
    // A pasted infotext whose TI hashes name it came from a file there: the bundle here may differ.
    const pasted = await render(await pipeline("ink_bundle"), "ink_bundle", `a zqxj\nSteps: 3, Seed: 7, TI hashes: "zqxj: 0123456789ab"`);
    assert.deepEqual(
      pasted.warnings.filter((w) => w.startsWith("TI hashes")),
      [
        "TI hashes: embedding zqxj came from LoRA ink_bundle's bundled embeddings here, the infotext's from a file of hash 0123456789ab: the image may differ",
      ],
    );
    // Without the bundle, "zqxj" is words: another image.
    assert.notDeepEqual((await render(await pipeline("ink"), "ink")).pixels, bundled.pixels);
  });

  test("an embeddings folder's embedding of the same name is used instead of the bundled one, as in A1111", async () => {
    const pipe = await pipeline("ink_bundle", "other");
    const both = await render(pipe, "ink_bundle");
    // The folder's zqxj, and the bundle's other embedding beside it.
    const db = (await pipe.conditioner()).embeddings!;
    assert.deepEqual([db.get("zqxj")?.bundledIn, db.get("qwvk")?.bundledIn], [undefined, "ink_bundle"]);
    const folderOnly = await render(await pipeline("ink", "other"), "ink");
    assert.deepEqual(both.pixels, folderOnly.pixels);
    // The folder's vectors are not the bundle's: the bundled ones would have given another image.
    assert.notDeepEqual(both.pixels, (await render(await pipeline("ink", "same"), "ink")).pixels);
    assert.match(both.infotext, /TI hashes: "zqxj: [0-9a-f]{12}"/);
  });
});
