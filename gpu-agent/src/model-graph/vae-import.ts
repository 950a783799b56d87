// A standalone VAE file (A1111's models/VAE: `.safetensors`, `.pt`, `.ckpt`) → vae_decoder/ and
// vae_encoder/ ONNX folders that a pipeline loads in place of its checkpoint's own, cached by the file's
// sha256 like checkpoint builds.

import { createHash } from "node:crypto";
import { readFile, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { ModelFileError } from "./errors.js";
import {
  BUILDER_VERSION,
  MANIFEST_FILE,
  buildComponent,
  buildIntoCache,
  checkpointSha256,
  linksIntact,
  type ComponentName,
  type ComponentRecord,
} from "./pipeline.js";
import { readSafetensors, type SafetensorsFile } from "./safetensors.js";
import { readTorchFile, TorchTensor } from "./torch-file.js";
import { detectVaeConfig, VAE_PREFIX, type VaeConfig } from "./vae.js";
import { MemoryWeights, SafetensorsWeights, type MemoryTensor, type WeightSource } from "./weights.js";

// Training leftovers A1111 drops before loading a VAE's state dict (sd_vae.load_vae_dict).
const IGNORED_KEYS = new Set(["model_ema.decay", "model_ema.num_updates"]);
const isIgnored = (key: string): boolean => key.startsWith("loss") || IGNORED_KEYS.has(key);

export interface VaeManifest {
  readonly builderVersion: number;
  readonly kind: "vae";
  readonly vae: VaeConfig;
  /** sha256 of the whole VAE file; A1111's "VAE hash" is its first 10 hex digits. */
  readonly sha256: string;
  readonly checkpointFile: { size: number; mtimeMs: number };
  readonly components: Partial<Record<ComponentName, ComponentRecord>>;
}

export interface ImportedVae {
  /** Holds vae_decoder/ (and vae_encoder/ when the file has an encoder). */
  readonly dir: string;
  readonly sha256: string;
  /** A1111's "VAE hash": the first 10 hex digits of the file's sha256. */
  readonly vaeHash: string;
  readonly config: VaeConfig;
  readonly cached: boolean;
}

export interface VaeImportOptions {
  /** Root of the build cache (shared with checkpoint builds). */
  readonly cacheDir: string;
  /** Reference a .safetensors file's bytes through a hard link instead of copying them (default true). */
  readonly linkCheckpoint?: boolean;
}

/** The state dict's key prefix: A1111's files have none; a few carry the checkpoint's `first_stage_model.`. */
function vaePrefix(w: WeightSource): string {
  const keys = [...w.keys()];
  // A1111 loads a VAE file's state dict into the autoencoder alone, which a checkpoint's keys do not fit.
  if (keys.some((k) => k.startsWith("model.diffusion_model."))) throw ModelFileError.invalidFile(w.label, "a whole checkpoint, not a VAE");
  for (const prefix of ["", VAE_PREFIX]) if (w.has(`${prefix}decoder.conv_in.weight`)) return prefix;
  const diffusers = keys.some((k) => k.startsWith("decoder.up_blocks.") || k.startsWith("decoder.mid_block."));
  throw ModelFileError.invalidFile(
    w.label,
    diffusers
      ? "a VAE in the diffusers layout (decoder.up_blocks.*); A1111 loads VAE files in the original (LDM) layout, as models/VAE files are"
      : "not a VAE: no decoder.conv_in.weight",
  );
}

function tensorsOf(value: unknown, label: string): Map<string, MemoryTensor> {
  const entries = (v: unknown): Array<[unknown, unknown]> => (v instanceof Map ? [...(v as Map<unknown, unknown>).entries()] : []);
  let dict = entries(value);
  // Lightning checkpoints wrap the weights in "state_dict", as A1111's reader unwraps.
  const inner = dict.find(([k]) => k === "state_dict");
  if (inner) dict = entries(inner[1]);
  const out = new Map<string, MemoryTensor>();
  for (const [k, t] of dict) {
    if (typeof k !== "string" || isIgnored(k) || !(t instanceof TorchTensor)) continue;
    out.set(k, { shape: t.shape, data: t.data });
  }
  if (out.size === 0) throw ModelFileError.invalidFile(label, "no tensors: not a VAE state dict");
  return out;
}

/** A safetensors VAE without the keys A1111 drops. */
class FilteredWeights extends SafetensorsWeights {
  constructor(file: SafetensorsFile) {
    super(file);
  }
  override has(key: string): boolean {
    return !isIgnored(key) && super.has(key);
  }
  override keys(): Iterable<string> {
    return [...super.keys()].filter((k) => !isIgnored(k));
  }
}

async function readVaeWeights(path: string): Promise<{ weights: WeightSource; close(): Promise<void>; torch: boolean }> {
  if (path.toLowerCase().endsWith(".safetensors")) {
    const file = await readSafetensors(path);
    return { weights: new FilteredWeights(file), close: () => file.close(), torch: false };
  }
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    throw ModelFileError.fileNotFound(path, "cannot read the VAE file", err);
  }
  return { weights: new MemoryWeights(tensorsOf(readTorchFile(bytes, path), path), path), close: async () => undefined, torch: true };
}

async function readVaeManifest(dir: string): Promise<VaeManifest | undefined> {
  try {
    const m = JSON.parse(await readFile(join(dir, MANIFEST_FILE), "utf8")) as VaeManifest;
    return m.builderVersion === BUILDER_VERSION && m.kind === "vae" ? m : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Returns the ONNX folder of a VAE file's decoder and encoder from the cache, building it on a miss. A
 * `.safetensors` VAE's weights stay in the file (hard-linked, as checkpoint builds do); a torch file's are
 * copied out, since its storages sit inside a zip archive.
 */
export async function importVae(path: string, opts: VaeImportOptions): Promise<ImportedVae> {
  const sha256 = await checkpointSha256(path, opts.cacheDir);
  const link = opts.linkCheckpoint ?? true;
  const digest = createHash("sha256")
    .update(JSON.stringify({ v: BUILDER_VERSION, kind: "vae", link }))
    .digest("hex")
    .slice(0, 12);
  const dir = join(opts.cacheDir, `vae-${sha256}-${digest}`);
  const vaeHash = sha256.slice(0, 10);
  const existing = await readVaeManifest(dir);
  if (existing && (await linksIntact(dir, existing))) return { dir, sha256, vaeHash, config: existing.vae, cached: true };
  if (existing) await rm(dir, { recursive: true, force: true });
  const st = await stat(path);
  const read = await readVaeWeights(path);
  try {
    const config = detectVaeConfig(read.weights, vaePrefix(read.weights));
    if (config.latentChannels <= 0 || config.imageChannels !== 3) {
      throw new ModelFileError(status.INVALID_ARGUMENT, path, `a VAE must decode to 3 image channels (this one: ${config.imageChannels})`);
    }
    const built = await buildIntoCache(dir, opts.cacheDir, async (tmp) => {
      const components: Partial<Record<ComponentName, ComponentRecord>> = {};
      const wanted: ComponentName[] = config.hasEncoder ? ["vae_decoder", "vae_encoder"] : ["vae_decoder"];
      const buildOpts = { linkCheckpoint: link && !read.torch };
      for (const name of wanted)
        await buildComponent(name, read.weights, { vae: config }, { "latentfarm.vae": vaeHash }, tmp, buildOpts, components);
      const manifest: VaeManifest = {
        builderVersion: BUILDER_VERSION,
        kind: "vae",
        vae: config,
        sha256,
        checkpointFile: { size: st.size, mtimeMs: st.mtimeMs },
        components,
      };
      // Written last: a folder with a manifest is complete.
      await writeFile(join(tmp, MANIFEST_FILE), `${JSON.stringify(manifest, null, 1)}\n`);
      return manifest;
    });
    return { dir, sha256, vaeHash, config: built.vae, cached: false };
  } finally {
    await read.close();
  }
}
