import { existsSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import {
  EXTRAS_MODEL,
  FarmError,
  isHiresTxt2img,
  refinerCheckpoint,
  secondPassModel,
  secondPassPrompt,
  type GenerationParams,
  type Logger,
  type LoraRef,
} from "@latentfarm/shared";
import { importVae, importCheckpoint, importCheckpointWithLoras, loraShortHash, type ArchitectureHints } from "../model-graph/index.js";
import type { ExecutionProvider } from "../runtime/protocol.js";
import { modelJsonPath, type ModelCatalog, type ModelEntry } from "./catalog.js";
import { SdModel, loadTextEncoder } from "./sd-model.js";
import type { VaeFile, VaeIdentity, VaeList } from "./vae-files.js";
import { resolveLoraFile } from "./lora-files.js";
import { extractExtraNetworks, type ClosableTextEncoder, type TextualInversionEmbedding } from "../conditioning/index.js";
import { bundledEmbeddingsOf } from "./embedding-files.js";

/** A LoRA as a task asks for it: from a `<lora:name:te:unet>` tag or the request's loras field. */
export interface LoraUse {
  readonly name: string;
  readonly teWeight: number;
  readonly unetWeight: number;
}

/** What a pipeline is keyed by: the model, the exact set of merged LoRAs, and the VAE file it decodes with. */
export interface PipelineKey {
  readonly model: string;
  readonly loras: readonly LoraUse[];
  /** A VAE file in place of the checkpoint's own (A1111's sd_vae, resolved); absent: the checkpoint's. */
  readonly vae?: VaeFile;
  /** A1111's Tiling: the UNet's and VAE's convolutions pad circularly; absent: zeros. */
  readonly tiling?: true;
}

/** A stable cache key: LoRAs sorted by name, weight-0 LoRAs dropped (they equal the base). */
export function pipelineKey(model: string, loras: readonly LoraUse[], vae?: VaeFile, tiling = false): string {
  const active = loras
    .filter((l) => l.teWeight !== 0 || l.unetWeight !== 0)
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return JSON.stringify({
    model,
    loras: active,
    ...(vae && { vae: { name: vae.name, path: vae.path } }),
    ...(tiling && { tiling: true as const }),
  } satisfies PipelineKey);
}

/** The pipeline an Extras task runs on: no model, only auxiliary sessions (see the host thread). */
export const EXTRAS_PIPELINE_KEY = pipelineKey(EXTRAS_MODEL, []);

/** The LoRAs a prompt's `<lora:…>` tags and the request's `loras` field name, in that order. */
export function lorasOf(prompt: string, explicit: readonly LoraRef[]): LoraUse[] {
  const loras: LoraUse[] = extractExtraNetworks(prompt).networks.map((n) => ({
    name: n.name,
    teWeight: n.teWeight,
    unetWeight: n.unetWeight,
  }));
  for (const l of explicit) loras.push({ name: l.name, teWeight: l.teWeight, unetWeight: l.unetWeight });
  return loras;
}

/** LoRA files' infotext hashes (loraShortHash), by path, while size and mtime stay: a weight-0 LoRA is hashed once, not per task. */
const loraHashCache = new Map<string, { size: number; mtimeMs: number; hash: string }>();
const MAX_CACHED_HASHES = 1024;

async function cachedLoraHash(path: string): Promise<string> {
  const st = await stat(path);
  let cached = loraHashCache.get(path);
  if (cached === undefined || cached.size !== st.size || cached.mtimeMs !== st.mtimeMs) {
    cached = { size: st.size, mtimeMs: st.mtimeMs, hash: await loraShortHash(path) };
    if (loraHashCache.size >= MAX_CACHED_HASHES) loraHashCache.clear();
    loraHashCache.set(path, cached);
  }
  return cached.hash;
}

/**
 * A1111's "Lora hashes" entries ("name: hash") of the request's LoRAs named only at weight 0, by name.
 * A1111 loads and lists a `<lora:name:0>` like any other; the farm merges nothing for it (pipelineKey
 * drops it), so no pipeline carries its hash. A file the agent lacks is reported to `onMissing` and left
 * out, as A1111 leaves out a network it cannot find.
 */
export async function unmergedLoraHashes(
  p: GenerationParams,
  lorasDir: string | undefined,
  onMissing: (name: string) => void,
): Promise<Map<string, string>> {
  const uses = [...lorasOf(p.prompt, p.loras), ...(isHiresTxt2img(p) ? lorasOf(secondPassPrompt(p), p.loras) : [])];
  const merged = new Set(uses.filter((l) => l.teWeight !== 0 || l.unetWeight !== 0).map((l) => l.name));
  const out = new Map<string, string>();
  for (const name of new Set(uses.map((l) => l.name))) {
    if (merged.has(name)) continue;
    const path = lorasDir === undefined ? undefined : await resolveLoraFile(lorasDir, name).catch(() => undefined);
    // Only a file gone between the lookup and the hash counts as missing; an unreadable one fails the task.
    const hash =
      path === undefined
        ? undefined
        : await cachedLoraHash(path).catch((e: unknown) => {
            if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
            throw e;
          });
    if (hash === undefined) {
      onMissing(name);
      continue;
    }
    out.set(name, `${name}: ${hash}`);
  }
  return out;
}

/**
 * The pipeline a pass of a task runs on. The first pass: `model` with the LoRAs of `prompt`. A Hires.fix
 * second pass: the hires checkpoint (else `model`) with the LoRAs of the hires prompt (else `prompt`),
 * as A1111 switches checkpoints and activates the hires prompt's extra networks for it. The request's
 * `loras` apply to both.
 */
export function passPipelineKey(p: GenerationParams, pass: "first" | "second", vae?: VaeFile, refiner = false): string {
  return pipelineKey(passModelName(p, pass, refiner), lorasOf(pass === "first" ? p.prompt : secondPassPrompt(p), p.loras), vae, p.tiling);
}

/**
 * The checkpoint a pass runs on; with `refiner`, the one it switches to. The pass's LoRAs stay: A1111's
 * extra networks stay active across the reload and apply to the refiner's layers of the same names.
 */
function passModelName(p: GenerationParams, pass: "first" | "second", refiner = false): string {
  if (refiner) {
    const name = refinerCheckpoint(p);
    if (name === undefined) throw FarmError.invalid("refiner_checkpoint", "the task names no refiner");
    return name;
  }
  return pass === "first" ? p.model : secondPassModel(p);
}

/**
 * A pass's pipeline key with its VAE resolved (a VAE setting resolves per checkpoint, as A1111 reloads it
 * with each); with `refiner`, the key of the refiner the pass switches to.
 */
export type PassKeyOf = (p: GenerationParams, pass: "first" | "second", refiner?: boolean) => Promise<string>;

/** Pass keys whose VAE comes from A1111's `sd_vae` setting resolved against `vaes`. */
export function passKeysWith(vaes: VaeList): PassKeyOf {
  return async (p, pass, refiner = false) => {
    const resolved = await vaes.resolve(p.overrideSettings?.sdVae ?? "", passModelName(p, pass, refiner));
    return passPipelineKey(p, pass, resolved.file, refiner);
  };
}

export function parsePipelineKey(key: string): PipelineKey {
  return JSON.parse(key) as PipelineKey;
}

export interface LoadedModelInfo {
  model: SdModel;
  /** A1111's "Model hash" (AutoV2, 10 hex) for checkpoints; undefined for ONNX folders. */
  modelHash: string | undefined;
  /** A1111's "Lora hashes" entries ("name: hash"), in request order. */
  loraHashes: string[];
  /** A1111's "VAE" (the file name) and "VAE hash" (10 hex) when a VAE file replaces the checkpoint's own. */
  vae: VaeIdentity | undefined;
  /**
   * Where a LoRA changed the text encoder's weights (a text-encoder weight other than 0): opens the base
   * model's text encoder, whose empty prompt A1111 pads with.
   */
  baseTextEncoder: (() => Promise<ClosableTextEncoder>) | undefined;
  /** Textual-inversion embeddings bundled in the merged LoRAs' files (bundledEmbeddingsOf); the model then takes token overrides. */
  bundledEmbeddings: TextualInversionEmbedding[];
  warnings: string[];
}

export interface ModelLoaderOptions {
  ep: ExecutionProvider;
  intraOpNumThreads?: number;
  logger: Logger;
  /** Where checkpoints are built into ONNX folders (cached by sha256). */
  cacheDir: string;
  /** CLIP tokenizer for checkpoints, which carry none; defaults to the first ONNX model's tokenizer. */
  tokenizerDir?: string;
  lorasDir?: string;
  /** Where the ONNX Runtime sessions run (SdModel.load's `sessions`). */
  sessions?: "worker" | "this-thread";
  /** Load the text encoder with token overrides, for textual-inversion embeddings (SdModel.load's). */
  tokenOverrides?: boolean;
}

async function defaultTokenizer(catalog: ModelCatalog): Promise<string | undefined> {
  if (existsSync(join(catalog.root, "tokenizer", "vocab.json"))) return join(catalog.root, "tokenizer");
  for (const e of await catalog.list()) {
    if (e.format === "diffusers-onnx" && existsSync(join(e.path, "tokenizer", "vocab.json"))) return join(e.path, "tokenizer");
  }
  return undefined;
}

/**
 * Architecture hints a checkpoint cannot carry (head counts of unusual models, v-prediction), from an
 * optional `<stem>.json` next to it, the way A1111 reads a `<stem>.yaml`.
 */
async function hintsFor(catalog: ModelCatalog, entry: ModelEntry): Promise<ArchitectureHints> {
  const side = modelJsonPath(catalog.root, entry.name);
  if (!existsSync(side)) return {};
  try {
    return JSON.parse(await readFile(side, "utf8")) as ArchitectureHints;
  } catch (err) {
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `${side} is not valid JSON`, { field: "model", cause: err });
  }
}

/** Loads a model (and merges LoRAs into it) as an ONNX Runtime pipeline. */
export async function loadModel(
  catalog: ModelCatalog,
  key: PipelineKey,
  opts: ModelLoaderOptions,
  signal?: AbortSignal,
): Promise<LoadedModelInfo> {
  const entry = await catalog.get(key.model);
  const sessions = {
    ep: opts.ep,
    ...(opts.intraOpNumThreads ? { intraOpNumThreads: opts.intraOpNumThreads } : {}),
    ...(opts.sessions ? { sessions: opts.sessions } : {}),
  };
  const vae = key.vae === undefined ? undefined : await importVae(key.vae.path, { cacheDir: opts.cacheDir });
  const vaeInfo = vae && key.vae ? { name: key.vae.name, hash: vae.vaeHash } : undefined;
  let tokenOverrides = opts.tokenOverrides === true;
  const load = async (path: string): Promise<SdModel> => {
    const model = await SdModel.load(
      { ...entry, path, format: "diffusers-onnx" },
      {
        ...sessions,
        logger: opts.logger,
        ...(signal ? { signal } : {}),
        ...(tokenOverrides ? { tokenOverrides: true } : {}),
        ...(vae ? { vaeDir: vae.dir } : {}),
        ...(key.tiling ? { circular: true, scratchDir: join(opts.cacheDir, "circular") } : {}),
      },
    );
    if (vae && vae.config.latentChannels !== model.config.latentChannels) {
      await model.close();
      throw new FarmError(
        grpc.status.FAILED_PRECONDITION,
        `VAE "${key.vae?.name}" takes ${vae.config.latentChannels}-channel latents; model "${entry.name}" makes ${model.config.latentChannels}`,
        { field: "override_settings.sd_vae" },
      );
    }
    return model;
  };
  if (entry.format === "diffusers-onnx") {
    if (key.loras.length > 0) {
      throw new FarmError(
        grpc.status.FAILED_PRECONDITION,
        `LoRAs merge into .safetensors checkpoints; "${entry.name}" is an ONNX folder whose weights lost their checkpoint names`,
        { field: "loras" },
      );
    }
    return {
      model: await load(entry.path),
      modelHash: undefined,
      loraHashes: [],
      vae: vaeInfo,
      baseTextEncoder: undefined,
      bundledEmbeddings: [],
      warnings: [],
    };
  }
  const tokenizerDir = opts.tokenizerDir ?? (await defaultTokenizer(catalog));
  if (!tokenizerDir) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      "checkpoint models need a CLIP tokenizer: give the agent --tokenizer DIR (vocab.json + merges.txt)",
      {
        field: "model",
      },
    );
  }
  const importOpts = { cacheDir: opts.cacheDir, tokenizerDir, ...(await hintsFor(catalog, entry)) };
  const warnings: string[] = [];
  const loraHashes: string[] = [];
  let dir: string;
  let modelHash: string;
  let bundledEmbeddings: TextualInversionEmbedding[] = [];
  if (key.loras.length === 0) {
    const imported = await importCheckpoint(entry.path, importOpts);
    dir = imported.dir;
    modelHash = imported.modelHash;
  } else {
    if (!opts.lorasDir)
      throw new FarmError(grpc.status.FAILED_PRECONDITION, "this agent has no LoRA folder (--loras DIR)", { field: "loras" });
    const requests = [];
    const files: Array<{ name: string; path: string }> = [];
    for (const l of key.loras) {
      const path = await resolveLoraFile(opts.lorasDir, l.name);
      requests.push({ path, unetWeight: l.unetWeight, textWeight: l.teWeight });
      files.push({ name: l.name, path });
      loraHashes.push(`${l.name}: ${await cachedLoraHash(path)}`);
    }
    bundledEmbeddings = await bundledEmbeddingsOf(files);
    // A prompt may name them whether or not the agent has an embeddings folder.
    if (bundledEmbeddings.length > 0) tokenOverrides = true;
    const imported = await importCheckpointWithLoras(entry.path, requests, importOpts);
    dir = imported.dir;
    modelHash = imported.modelHash;
    for (const w of imported.loraWarnings) for (const m of w.warnings) warnings.push(`${w.path}: ${m}`);
  }
  // Only the text encoders of the base checkpoint are built for it (a small build next to the UNet's;
  // text_encoder_2 only where the checkpoint has one, SDXL's):
  // a farm that renders only this LoRA's pipeline never imports the base model whole.
  const baseTextEncoder = key.loras.some((l) => l.teWeight !== 0)
    ? async (): Promise<ClosableTextEncoder> =>
        loadTextEncoder(
          (await importCheckpoint(entry.path, { ...importOpts, components: ["text_encoder", "text_encoder_2"] })).dir,
          sessions,
        )
    : undefined;
  return { model: await load(dir), modelHash, loraHashes, vae: vaeInfo, baseTextEncoder, bundledEmbeddings, warnings };
}
