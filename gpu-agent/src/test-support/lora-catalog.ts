import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeTinyModel, writeSafetensors, type TensorToWrite } from "../model-graph/index.js";
import { ModelCatalog } from "../models/catalog.js";
import { loadModel, parsePipelineKey, pipelineKey, type LoraUse } from "../models/model-loader.js";
import { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { silentLogger } from "@latentfarm/shared";

export interface PipelineOptions {
  cacheDir: string;
  tokenizerDir?: string;
  lorasDir?: string;
  /** A textual-inversion embeddings folder (the text encoder then takes token overrides). */
  embeddingsDir?: string;
}

/** A pipeline as the agent's pipeline thread loads it, for a model and LoRAs (one ORT thread). */
export async function pipelineFor(
  catalog: ModelCatalog,
  model: string,
  loras: LoraUse[],
  opts: PipelineOptions,
  tiling = false,
): Promise<LoadedPipeline> {
  const key = parsePipelineKey(pipelineKey(model, loras, undefined, tiling));
  const { embeddingsDir, ...paths } = opts;
  const loaded = await loadModel(catalog, key, {
    ep: { name: "cpu" },
    logger: silentLogger,
    intraOpNumThreads: 1,
    ...paths,
    ...(embeddingsDir !== undefined && { tokenOverrides: true }),
  });
  return new LoadedPipeline(loaded.model, {
    maxBatchRows: 8,
    modelHash: loaded.modelHash,
    loraHashes: loaded.loraHashes,
    loras: key.loras,
    baseTextEncoder: loaded.baseTextEncoder,
    loadWarnings: loaded.warnings,
    bundledEmbeddings: loaded.bundledEmbeddings,
    ...(embeddingsDir !== undefined && { embeddingsDir, logger: silentLogger }),
  });
}

/** A LoRA factor of `shape` with values v·sin(i + 1): deterministic, and different in every position. */
export function loraTensor(shape: number[], v: number): TensorToWrite {
  return { dtype: "F32", shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => v * Math.sin(i + 1)) };
}

/** A catalog model: its seed, or its seed and UNet input channels (9 for an inpainting model). */
export type CatalogModel = number | { seed: number; inChannels: number };

/**
 * A models folder of generated tiny checkpoints (`tiny`, seed 3, and any `others` by name and seed) with
 * their tokenizer, and a LoRA folder with `style` and `ink`: each on one attention projection of the UNet
 * and one of the text encoder.
 */
export async function makeLoraCatalog(
  dir: string,
  others: Record<string, CatalogModel> = {},
): Promise<{ catalog: ModelCatalog; opts: PipelineOptions & { lorasDir: string } }> {
  const models = join(dir, "models");
  mkdirSync(models);
  let first = true;
  let spec: Awaited<ReturnType<typeof makeTinyModel>>["spec"] | undefined;
  for (const [name, model] of Object.entries({ tiny: 3, ...others })) {
    const { seed, inChannels } = typeof model === "number" ? { seed: model, inChannels: undefined } : model;
    const tiny = await makeTinyModel({
      outDir: join(dir, `gen-${name}`),
      seed,
      config: "small",
      ...(inChannels !== undefined && { overrides: { inChannels } }),
    });
    symlinkSync(tiny.checkpointPath, join(models, `${name}.safetensors`));
    writeFileSync(join(models, `${name}.json`), JSON.stringify(tiny.hints));
    if (first) symlinkSync(tiny.tokenizerDir, join(models, "tokenizer"));
    first = false;
    spec = tiny.spec;
  }
  const loras = join(dir, "loras");
  mkdirSync(loras);
  const n = loraTensor;
  const q = spec!.unetChannels[0]!;
  const te = spec!.textHidden;
  for (const [name, v] of [
    ["style", 0.5],
    ["ink", -0.3],
  ] as const) {
    await writeSafetensors(join(loras, `${name}.safetensors`), {
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": n([q, 2], v),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": n([2, q], v),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": n([te, 2], v),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": n([2, te], v),
    });
  }
  return { catalog: new ModelCatalog(models), opts: { cacheDir: join(dir, "cache"), lorasDir: loras } };
}

/**
 * A makeLoraCatalog folder (with `others`) in a temporary directory, and its pipelines by pipeline key,
 * each loaded once, as the agent's cache keeps them; close() closes them and removes the folder.
 */
export class CatalogPipelines {
  private readonly pipes = new Map<string, Promise<LoadedPipeline>>();
  private constructor(
    private readonly dir: string,
    private readonly catalog: ModelCatalog,
    private readonly opts: PipelineOptions,
  ) {}

  static async create(others: Record<string, CatalogModel> = {}): Promise<CatalogPipelines> {
    const dir = mkdtempSync(join(tmpdir(), "lf-catalog-"));
    const { catalog, opts } = await makeLoraCatalog(dir, others);
    return new CatalogPipelines(dir, catalog, opts);
  }

  get(key: string): Promise<LoadedPipeline> {
    let p = this.pipes.get(key);
    if (p === undefined) {
      const { model, loras, tiling } = parsePipelineKey(key);
      this.pipes.set(key, (p = pipelineFor(this.catalog, model, [...loras], this.opts, tiling === true)));
    }
    return p;
  }

  async close(): Promise<void> {
    for (const p of this.pipes.values()) await (await p.catch(() => undefined))?.close();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
