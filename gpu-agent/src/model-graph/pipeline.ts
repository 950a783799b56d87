// Checkpoint → diffusers-ONNX folder (text_encoder/, SDXL's text_encoder_2/, unet/, vae_decoder/, vae_encoder/,
// tokenizer/, scheduler/, model_index.json), plus an on-disk cache keyed by the checkpoint's sha256. An SDXL
// refiner's folder has text_encoder_2/ and tokenizer_2/ only, as Optimum exports the refiner.

import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { copyFile, mkdir, open, readFile, readdir, realpath, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { SDXL_SCALING_FACTOR, detectArchitecture } from "./architecture.js";
import type { Architecture, ArchitectureHints } from "./architecture.js";
import { buildTextEncoder } from "./clip.js";
import { ModelFileError } from "./errors.js";
import { Net } from "./nn.js";
import { GraphBuilder, saveModel } from "./onnx.js";
import type { SavedModel } from "./onnx.js";
import { readSafetensors } from "./safetensors.js";
import { buildUNet } from "./unet.js";
import { buildVaeDecoder, buildVaeEncoder } from "./vae.js";
import { SafetensorsWeights } from "./weights.js";
import type { WeightSource, WeightTransform, WeightType } from "./weights.js";

/** Bumped whenever the emitted graphs change, so that stale cache entries are not reused. */
export const BUILDER_VERSION = 1;

export const MANIFEST_FILE = "latentfarm.json";

/** Name of the checkpoint hard link inside each component folder of a linked build. */
export const LINK_NAME = "checkpoint.safetensors";

export type ComponentName = "text_encoder" | "text_encoder_2" | "unet" | "vae_decoder" | "vae_encoder";
/**
 * Every component a build can have; text_encoder_2 only SDXL's (base and refiner), text_encoder all but the
 * refiner's, vae_encoder only where the checkpoint has one.
 */
export const COMPONENTS: readonly ComponentName[] = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"];

export interface PipelineBuildOptions extends ArchitectureHints {
  /** Folder with vocab.json, merges.txt, … copied to `tokenizer/`. Without it no tokenizer is written. */
  readonly tokenizerDir?: string;
  /** Float type of UNet and text encoder. The VAE stays float32 (fp16 VAEs overflow to NaN/black). */
  readonly weightType?: WeightType;
  /** Applied to every weight as it is written (LoRA merging). */
  readonly transform?: WeightTransform;
  /** Only these components (default: all that the checkpoint has). */
  readonly components?: readonly ComponentName[];
  /** Initializers above this many bytes go to an external `weights.pb` (the UNet always does, as diffusers does). */
  readonly embedLimitBytes?: number;
  /**
   * Use com.microsoft MultiHeadAttention in the UNet instead of MatMul/Softmax/MatMul. The plain graph is
   * the reference; fused graphs need an execution provider with that contrib op (CPU, CUDA).
   */
  readonly fusedAttention?: boolean;
  /**
   * Reference the checkpoint's bytes instead of copying them: each component folder gets a hard link of the
   * checkpoint ("checkpoint.safetensors") that its external data points into, and fp16 weights are cast to
   * float32 by a Cast node that ONNX Runtime folds at load. Default true. Copies when linking is impossible.
   */
  readonly linkCheckpoint?: boolean;
  /** Extra fields recorded in the manifest (hashes, LoRA list). */
  readonly manifestExtra?: Readonly<Record<string, unknown>>;
}

export interface PipelineManifest {
  readonly builderVersion: number;
  readonly family: Architecture["family"];
  readonly prediction: Architecture["prediction"];
  readonly inpainting: boolean;
  readonly weightType: WeightType;
  readonly fusedAttention: boolean;
  readonly architecture: Architecture;
  /** Per component: bytes of the .onnx file, of its weights.pb, and read from the checkpoint link. */
  readonly components: Partial<
    Record<ComponentName, { modelBytes: number; externalBytes: number; linkedBytes: number; initializers: number }>
  >;
  /** Checkpoint tensors that no graph uses (EMA copies, position_ids, OpenCLIP's unused last layer…). */
  readonly unusedKeys: number;
  readonly [extra: string]: unknown;
}

export interface BuiltPipeline {
  readonly dir: string;
  readonly architecture: Architecture;
  readonly manifest: PipelineManifest;
  readonly unusedKeys: readonly string[];
}

/** The training noise schedule SD1, SD2 and SDXL share. */
const TRAINING_BETAS = { beta_end: 0.012, beta_schedule: "scaled_linear", beta_start: 0.00085, num_train_timesteps: 1000 };

const SCHEDULER_BASE = {
  _class_name: "PNDMScheduler",
  ...TRAINING_BETAS,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  clip_sample: false,
  trained_betas: null,
};

/** SDXL's scheduler as its diffusers repository configures it (same betas as SD1, leading timestep spacing). */
const SDXL_SCHEDULER = {
  _class_name: "EulerDiscreteScheduler",
  ...TRAINING_BETAS,
  interpolation_type: "linear",
  steps_offset: 1,
  timestep_spacing: "leading",
  use_karras_sigmas: false,
  clip_sample: false,
  trained_betas: null,
};

/** The refiner's model_index as diffusers saves StableDiffusionXLImg2ImgPipeline: no CLIP-L, aesthetic-score time ids. */
const REFINER_INDEX = {
  _class_name: "ORTStableDiffusionXLImg2ImgPipeline",
  force_zeros_for_empty_prompt: false,
  requires_aesthetics_score: true,
  scheduler: ["diffusers", "EulerDiscreteScheduler"],
  tokenizer: [null, null],
};

function isSdxlFamily(arch: Pick<Architecture, "family">): boolean {
  return arch.family === "sdxl" || arch.family === "sdxl-refiner";
}

function modelIndex(components: readonly ComponentName[], withTokenizer: boolean, arch: Architecture): Record<string, unknown> {
  const sdxl = isSdxlFamily(arch);
  const tokenizer = withTokenizer ? ["transformers", "CLIPTokenizer"] : [null, null];
  let idx: Record<string, unknown>;
  if (arch.family === "sdxl-refiner") {
    idx = { ...REFINER_INDEX, tokenizer_2: tokenizer };
  } else if (sdxl) {
    idx = {
      _class_name: "ORTStableDiffusionXLPipeline",
      force_zeros_for_empty_prompt: true,
      scheduler: ["diffusers", "EulerDiscreteScheduler"],
      tokenizer,
      tokenizer_2: tokenizer,
    };
  } else {
    idx = {
      _class_name: "OnnxStableDiffusionPipeline",
      feature_extractor: [null, null],
      safety_checker: [null, null],
      requires_safety_checker: false,
      scheduler: ["diffusers", "PNDMScheduler"],
      tokenizer,
    };
  }
  for (const c of COMPONENTS) {
    if (c === "text_encoder_2" && !sdxl) continue;
    idx[c] = components.includes(c) ? ["diffusers", "OnnxRuntimeModel"] : [null, null];
  }
  return idx;
}

/** Builds every component of `weights` into `outDir` (created if needed). Writes the manifest last. */
export async function buildPipeline(weights: WeightSource, outDir: string, opts: PipelineBuildOptions = {}): Promise<BuiltPipeline> {
  const arch = detectArchitecture(weights, opts);
  const weightType = opts.weightType ?? "float32";
  const wanted = (opts.components ?? COMPONENTS).filter(
    (c) =>
      (c !== "vae_encoder" || arch.vae.hasEncoder) &&
      (c !== "text_encoder" || arch.textEncoder !== undefined) &&
      (c !== "text_encoder_2" || arch.textEncoder2 !== undefined),
  );
  await mkdir(outDir, { recursive: true });
  // A half-written folder must never look complete.
  await rm(join(outDir, MANIFEST_FILE), { force: true });

  const used = new Set<string>();
  const components: Record<string, ComponentRecord> = {};
  for (const name of wanted) {
    const metadata = { "latentfarm.family": arch.family, "latentfarm.prediction": arch.prediction };
    const net = await buildComponent(name, weights, arch, metadata, outDir, opts, components);
    for (const k of net.used) used.add(k);
  }

  const sdxl = isSdxlFamily(arch);
  if (sdxl && wanted.includes("vae_decoder")) {
    // The runtime reads the latent scale here; without the file it assumes SD1's 0.18215.
    await writeJson(join(outDir, "vae_decoder", "config.json"), {
      scaling_factor: SDXL_SCALING_FACTOR,
      latent_channels: arch.vae.latentChannels,
    });
  }
  await mkdir(join(outDir, "scheduler"), { recursive: true });
  await writeJson(join(outDir, "scheduler", "scheduler_config.json"), {
    ...(sdxl ? SDXL_SCHEDULER : SCHEDULER_BASE),
    prediction_type: arch.prediction,
  });
  let withTokenizer = false;
  if (opts.tokenizerDir) {
    if (arch.textEncoder !== undefined) await copyDir(opts.tokenizerDir, join(outDir, "tokenizer"));
    // OpenCLIP's tokenizer is CLIP's vocabulary; only its padding differs (diffusers' tokenizer_2 pads with "!").
    if (sdxl) await copyDir(opts.tokenizerDir, join(outDir, "tokenizer_2"), padWithExclamation);
    withTokenizer = true;
  }
  await writeJson(join(outDir, "model_index.json"), modelIndex(wanted, withTokenizer, arch));

  const unusedKeys = [...weights.keys()].filter((k) => !used.has(k) && isModelKey(k));
  const manifest: PipelineManifest = {
    builderVersion: BUILDER_VERSION,
    family: arch.family,
    prediction: arch.prediction,
    inpainting: arch.inpainting,
    weightType,
    fusedAttention: opts.fusedAttention ?? false,
    architecture: arch,
    components,
    unusedKeys: unusedKeys.length,
    ...opts.manifestExtra,
  };
  await writeJson(join(outDir, MANIFEST_FILE), manifest);
  return { dir: outDir, architecture: arch, manifest, unusedKeys };
}

export type ComponentRecord = { modelBytes: number; externalBytes: number; linkedBytes: number; initializers: number };

/** Builds one component's graph from `weights` and saves it as `<outDir>/<name>/model.onnx`, recording its sizes. */
export async function buildComponent(
  name: ComponentName,
  weights: WeightSource,
  arch: Partial<Pick<Architecture, "textEncoder" | "textEncoder2" | "unet" | "vae">>,
  metadata: Readonly<Record<string, string>>,
  outDir: string,
  opts: PipelineBuildOptions,
  records: Record<string, ComponentRecord>,
): Promise<Net> {
  const floatType: WeightType = name.startsWith("vae") ? "float32" : (opts.weightType ?? "float32");
  const g = new GraphBuilder(name);
  const link = opts.linkCheckpoint ?? true;
  const net = new Net(g, weights, floatType, name === "unet" && opts.fusedAttention === true, link);
  const part = <T>(config: T | undefined): T => {
    if (config === undefined) throw new Error(`no configuration for ${name}`);
    return config;
  };
  if (name === "text_encoder") buildTextEncoder(net, part(arch.textEncoder));
  else if (name === "text_encoder_2") buildTextEncoder(net, part(arch.textEncoder2));
  else if (name === "unet") buildUNet(net, part(arch.unet));
  else if (name === "vae_decoder") buildVaeDecoder(net, part(arch.vae));
  else buildVaeEncoder(net, part(arch.vae));
  const dir = join(outDir, name);
  await mkdir(dir, { recursive: true });
  await rm(join(dir, "weights.pb"), { force: true });
  await rm(join(dir, LINK_NAME), { force: true });
  const saved: SavedModel = await saveModel(
    g.toSpec({ metadata: { ...metadata, "latentfarm.builder": String(BUILDER_VERSION) } }),
    join(dir, "model.onnx"),
    {
      weights: name === "unet" || link ? "external" : "auto",
      externalFile: "weights.pb",
      ...(link ? { linkName: LINK_NAME } : {}),
      ...(opts.embedLimitBytes === undefined ? {} : { embedLimitBytes: opts.embedLimitBytes }),
    },
  );
  const linkedBytes = [...saved.layout.values()].filter((l) => l.location === LINK_NAME).reduce((a, l) => a + l.length, 0);
  records[name] = { modelBytes: saved.modelBytes, externalBytes: saved.externalBytes, linkedBytes, initializers: g.initializers.length };
  return net;
}

function isModelKey(k: string): boolean {
  return (
    k.startsWith("model.diffusion_model.") ||
    k.startsWith("first_stage_model.") ||
    k.startsWith("cond_stage_model.") ||
    k.startsWith("conditioner.")
  );
}

/** Builds the ONNX folder for a single-file (LDM layout) .safetensors checkpoint. */
export async function buildPipelineFromCheckpoint(path: string, outDir: string, opts: PipelineBuildOptions = {}): Promise<BuiltPipeline> {
  const file = await readSafetensors(path);
  try {
    return await buildPipeline(new SafetensorsWeights(file, opts.transform), outDir, opts);
  } finally {
    await file.close();
  }
}

async function writeJson(path: string, value: unknown): Promise<void> {
  await writeFile(path, `${JSON.stringify(value, null, 1)}\n`);
}

/** tokenizer_2's JSON files: CLIP's, with OpenCLIP's padding token. */
function padWithExclamation(name: string, content: Buffer): Buffer {
  if (name !== "tokenizer_config.json" && name !== "special_tokens_map.json") return content;
  try {
    const json = JSON.parse(content.toString("utf8")) as Record<string, unknown>;
    if (!("pad_token" in json)) return content;
    return Buffer.from(`${JSON.stringify({ ...json, pad_token: "!" }, null, 1)}\n`);
  } catch {
    return content;
  }
}

async function copyDir(from: string, to: string, rewrite?: (name: string, content: Buffer) => Buffer): Promise<void> {
  let entries;
  try {
    entries = await readdir(from, { withFileTypes: true });
  } catch (err) {
    throw ModelFileError.fileNotFound(from, "tokenizer folder not readable", err);
  }
  await mkdir(to, { recursive: true });
  for (const e of entries) {
    if (!e.isFile()) continue;
    if (rewrite) await writeFile(join(to, e.name), rewrite(e.name, await readFile(join(from, e.name))));
    else await copyFile(join(from, e.name), join(to, e.name));
  }
}

// ---- hashes --------------------------------------------------------------------------------------

/** sha256 of a whole file, streamed. An abort stops the read and rejects with the signal's reason. */
export async function sha256File(path: string, start = 0, signal?: AbortSignal): Promise<string> {
  const hash = createHash("sha256");
  await new Promise<void>((resolve, reject) => {
    const s = createReadStream(path, { start, highWaterMark: 4 << 20, ...(signal && { signal }) });
    s.on("data", (chunk) => hash.update(chunk));
    s.on("error", (err) =>
      reject(signal?.aborted ? (signal.reason as unknown) : ModelFileError.invalidFile(path, `cannot read: ${err.message}`, err)),
    );
    s.on("end", () => resolve());
  });
  return hash.digest("hex");
}

/** A1111's "Model hash" (AutoV2): the first 10 hex digits of the file's sha256. */
export function a1111ModelHash(sha256: string): string {
  if (!/^[0-9a-f]{64}$/i.test(sha256)) throw new RangeError("expected a 64-digit hex sha256");
  return sha256.slice(0, 10).toLowerCase();
}

/** A1111's legacy AutoV1 hash: sha256 of the 64 KiB at offset 0x100000, first 8 hex digits. */
export async function a1111LegacyModelHash(path: string): Promise<string> {
  const h = await open(path, "r");
  try {
    const buf = Buffer.alloc(0x10000);
    const { bytesRead } = await h.read(buf, 0, buf.length, 0x100000);
    return createHash("sha256").update(buf.subarray(0, bytesRead)).digest("hex").slice(0, 8);
  } finally {
    await h.close();
  }
}

/**
 * The hash A1111's infotext gives a LoRA ("Lora hashes"): its metadata's sshs_model_hash where it has one
 * (kohya's scripts write it when they save), else the addnet hash of a .safetensors file, else the sha256
 * of the whole file (.pt, .ckpt); 12 hex digits.
 */
export async function loraShortHash(path: string): Promise<string> {
  if (!path.toLowerCase().endsWith(".safetensors")) return (await sha256File(path)).slice(0, 12);
  const file = await readSafetensors(path);
  await file.close();
  const recorded = file.metadata["sshs_model_hash"];
  // The addnet hash covers the bytes after the header, which the open file has found already.
  return recorded ? recorded.slice(0, 12) : (await sha256File(path, file.dataOffset)).slice(0, 12);
}

/** kohya "addnet" hash A1111 shows for LoRAs: sha256 of a safetensors file's bytes after the header, 12 hex digits. */
export async function loraAddnetHash(path: string): Promise<string> {
  const h = await open(path, "r");
  let n: bigint;
  try {
    const len = Buffer.alloc(8);
    await h.read(len, 0, 8, 0);
    n = len.readBigUInt64LE(0);
  } finally {
    await h.close();
  }
  return (await sha256File(path, 8 + Number(n))).slice(0, 12);
}

// ---- cache ---------------------------------------------------------------------------------------

export interface ImportOptions extends PipelineBuildOptions {
  /** Root of the build cache; entries live in `<cacheDir>/<sha256>-<options digest>/`. */
  readonly cacheDir: string;
  /** Part of the cache key besides the checkpoint hash and build options (e.g. the merged LoRA set). */
  readonly variantKey?: string;
}

export interface ImportedCheckpoint extends BuiltPipeline {
  readonly sha256: string;
  /** A1111 AutoV2 hash for the infotext. */
  readonly modelHash: string;
  /** True when the folder came from the cache. */
  readonly cached: boolean;
}

interface HashRecord {
  path: string;
  size: number;
  mtimeMs: number;
  sha256: string;
}

/**
 * The checkpoint's sha256, remembered per (real path, size, mtime) so that a cached load does not rehash
 * gigabytes (A1111 keeps a similar cache.json).
 */
export async function checkpointSha256(path: string, cacheDir: string, signal?: AbortSignal): Promise<string> {
  const real = await realpath(path).catch((err: unknown) => {
    throw ModelFileError.fileNotFound(path, "no such checkpoint", err);
  });
  const st = await stat(real);
  const recordPath = hashRecordPath(cacheDir, real);
  const known = await recordedSha256(recordPath, real, st);
  if (known !== undefined) return known;
  const sha256 = await sha256File(real, 0, signal);
  const indexDir = join(cacheDir, "hashes");
  await mkdir(indexDir, { recursive: true });
  const rec: HashRecord = { path: real, size: st.size, mtimeMs: st.mtimeMs, sha256 };
  const tmp = `${recordPath}.${randomBytes(4).toString("hex")}.tmp`;
  await writeFile(tmp, JSON.stringify(rec));
  await rename(tmp, recordPath);
  return sha256;
}

function hashRecordPath(cacheDir: string, realPath: string): string {
  return join(cacheDir, "hashes", `${createHash("sha1").update(realPath).digest("hex")}.json`);
}

async function recordedSha256(recordPath: string, real: string, st: { size: number; mtimeMs: number }): Promise<string | undefined> {
  try {
    const rec = JSON.parse(await readFile(recordPath, "utf8")) as HashRecord;
    if (rec.path === real && rec.size === st.size && rec.mtimeMs === st.mtimeMs && /^[0-9a-f]{64}$/.test(rec.sha256)) return rec.sha256;
  } catch {
    // No record yet, or a damaged one.
  }
  return undefined;
}

/** The checkpoint's sha256 if checkpointSha256 has recorded it for the file as it is now; never reads the file. */
export async function knownSha256(path: string, cacheDir: string): Promise<string | undefined> {
  const real = await realpath(path).catch(() => undefined);
  const st = real === undefined ? undefined : await stat(real).catch(() => undefined);
  return real === undefined || st === undefined ? undefined : recordedSha256(hashRecordPath(cacheDir, real), real, st);
}

function optionsDigest(opts: ImportOptions): string {
  const key = {
    v: BUILDER_VERSION,
    weightType: opts.weightType ?? "float32",
    fusedAttention: opts.fusedAttention ?? false,
    link: opts.linkCheckpoint ?? true,
    unetHeads: opts.unetHeads ?? null,
    unetHeadDim: opts.unetHeadDim ?? null,
    textHeads: opts.textHeads ?? null,
    // Only when given, so that the keys of existing SD1/SD2 cache entries stay what they were.
    ...(opts.text2Heads === undefined ? {} : { text2Heads: opts.text2Heads }),
    prediction: opts.prediction ?? null,
    components: opts.components ? [...opts.components].sort() : null,
    variant: opts.variantKey ?? null,
    tokenizer: opts.tokenizerDir ?? null,
  };
  return createHash("sha256").update(JSON.stringify(key)).digest("hex").slice(0, 12);
}

/**
 * Returns the ONNX folder for a checkpoint from the cache, building it on a miss. Builds go to a private
 * temporary folder that is renamed into place, so concurrent imports and crashes never expose a partial folder.
 */
export async function importCheckpoint(path: string, opts: ImportOptions): Promise<ImportedCheckpoint> {
  const sha256 = await checkpointSha256(path, opts.cacheDir);
  const modelHash = a1111ModelHash(sha256);
  const dir = join(opts.cacheDir, `${sha256}-${optionsDigest(opts)}`);
  const existing = await readManifest(dir);
  if (existing && (await linksIntact(dir, existing))) {
    return { dir, architecture: existing.architecture, manifest: existing, unusedKeys: [], sha256, modelHash, cached: true };
  }
  if (existing) await rm(dir, { recursive: true, force: true });
  const st = await stat(path);
  const checkpointFile = { size: st.size, mtimeMs: st.mtimeMs };
  const built = await buildIntoCache(dir, opts.cacheDir, (tmp) =>
    buildPipelineFromCheckpoint(path, tmp, {
      ...opts,
      manifestExtra: { ...opts.manifestExtra, sha256, modelHash, checkpointFile },
    }),
  );
  return { ...built, dir, sha256, modelHash, cached: false };
}

/**
 * Builds into a private temporary folder under `cacheDir` that is then renamed to `dir`, so concurrent
 * imports and crashes never expose a partial folder. A folder another import finished first is kept.
 */
export async function buildIntoCache<T>(dir: string, cacheDir: string, build: (tmp: string) => Promise<T>): Promise<T> {
  const tmp = join(cacheDir, `.build-${randomBytes(6).toString("hex")}`);
  try {
    const built = await build(tmp);
    try {
      await rename(tmp, dir);
    } catch (err) {
      if (await readManifest(dir)) {
        // Another import finished first; its folder is equivalent.
        await rm(tmp, { recursive: true, force: true });
      } else {
        // A leftover without a manifest is a broken entry: replace it.
        await rm(dir, { recursive: true, force: true });
        await rename(tmp, dir).catch((again: unknown) => {
          throw new ModelFileError(status.INTERNAL, dir, `cannot move the built model into the cache: ${(again as Error).message}`, {
            cause: err,
          });
        });
      }
    }
    return built;
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/**
 * A linked cache entry shares the checkpoint's inode; if that file was rewritten in place since the build,
 * the entry no longer matches its hash and must be rebuilt.
 */
export async function linksIntact(
  dir: string,
  manifest: Pick<PipelineManifest, "components"> & { readonly checkpointFile?: unknown },
): Promise<boolean> {
  const recorded = manifest.checkpointFile as { size: number; mtimeMs: number } | undefined;
  for (const c of COMPONENTS) {
    if (!manifest.components[c]?.linkedBytes) continue;
    const st = await stat(join(dir, c, LINK_NAME)).catch(() => undefined);
    if (!st || !recorded || st.size !== recorded.size || st.mtimeMs !== recorded.mtimeMs) return false;
  }
  return true;
}

export async function readManifest(dir: string): Promise<PipelineManifest | undefined> {
  try {
    const m = JSON.parse(await readFile(join(dir, MANIFEST_FILE), "utf8")) as PipelineManifest;
    return m.builderVersion === BUILDER_VERSION ? m : undefined;
  } catch {
    return undefined;
  }
}
