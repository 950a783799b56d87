// Which VAE file a pass decodes with, by A1111's rules (modules/sd_vae.py): the VAE list, and the
// `sd_vae` setting ("Automatic", "None" or a file name) resolved against a checkpoint.

import { readFile, stat } from "node:fs/promises";
import { basename } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { FarmError, namedVae } from "@latentfarm/shared";
import { modelJsonPath } from "./catalog.js";
import { filesUnder, treeMtime, type TreeFile } from "./folder-tree.js";

/** A VAE file as A1111 lists it: named by its file name, extension included. */
export interface VaeFile {
  readonly name: string;
  readonly path: string;
  /** Bytes, when listed (heartbeats carry it instead of a hash, which would read the whole file). */
  readonly sizeBytes?: number;
}

/** A VAE file as an infotext names it: A1111's "VAE" (the file name) and "VAE hash" (10 hex digits). */
export interface VaeIdentity {
  readonly name: string;
  readonly hash: string;
}

/** The `sd_vae` value that keeps the checkpoint's own VAE. */
export const VAE_NONE = "None";

export interface VaeFolders {
  /** The models folder: `*.vae.pt`, `*.vae.ckpt` and `*.vae.safetensors` files in it (at any depth) are VAEs. */
  readonly modelsDir: string;
  /** A1111's models/VAE (`--vae-dir`): every `.pt`, `.ckpt` and `.safetensors` file in it is a VAE. */
  readonly vaeDir?: string;
  /**
   * A1111's `--vae-path`: this file decodes for every checkpoint, whatever a job's sd_vae says. It is
   * listed as well (A1111 adds it to its list when it loads it).
   */
  readonly forced?: string;
}

/**
 * The VAE list, in A1111's pattern order: `*.vae.ckpt`, `*.vae.pt`, `*.vae.safetensors` under the models
 * folder, then `*.ckpt`, `*.pt`, `*.safetensors` under the VAE folder, each pattern's files by path
 * (A1111 takes them in the file system's order). A name found twice keeps its first place and the later
 * file, as A1111's dict does.
 */
export async function listVaes(folders: VaeFolders): Promise<VaeFile[]> {
  const byName = new Map<string, VaeFile>();
  const take = (files: readonly TreeFile[], suffixes: readonly string[]): void => {
    for (const suffix of suffixes) {
      for (const f of files) {
        const name = basename(f.path);
        if (name.toLowerCase().endsWith(suffix)) byName.set(name, { name, path: f.path, sizeBytes: f.size });
      }
    }
  };
  // A folder that cannot be read lists no VAEs; the other one still does. Empty files are skipped.
  const walk = async (dir: string): Promise<TreeFile[]> =>
    (await filesUnder(dir, () => true, { skipHidden: true }).catch(() => []))
      .filter((f) => f.size > 0)
      .sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  take(await walk(folders.modelsDir), [".vae.ckpt", ".vae.pt", ".vae.safetensors"]);
  if (folders.vaeDir !== undefined) take(await walk(folders.vaeDir), [".ckpt", ".pt", ".safetensors"]);
  if (folders.forced !== undefined && !byName.has(basename(folders.forced))) {
    const st = await stat(folders.forced).catch(() => undefined);
    if (st?.isFile()) byName.set(basename(folders.forced), { name: basename(folders.forced), path: folders.forced, sizeBytes: st.size });
  }
  return [...byName.values()];
}

/** How a pass's VAE was chosen, for logs and listings. */
export type VaeSource = "checkpoint" | "near checkpoint" | "setting" | "user metadata" | "forced";

export interface ResolvedVae {
  /** The file; undefined when the checkpoint's own (baked-in) VAE decodes. */
  readonly file: VaeFile | undefined;
  readonly source: VaeSource;
}

/**
 * A1111's resolve_vae with its default `sd_vae_overrides_per_model_preferences` (on): a named VAE wins;
 * "None" keeps the checkpoint's own; Automatic takes the checkpoint's user metadata's "vae" (a file of the
 * list, or "None"; a name the list lacks is passed over), then the first listed VAE whose file name starts
 * with the checkpoint's file name without its extension ("near the checkpoint"), else the checkpoint's
 * own. A setting naming a file none has is a NOT_FOUND error here, where A1111 logs it and renders with
 * the checkpoint's VAE: a farm job should not silently come out with other colours.
 */
export function resolveVae(setting: string, checkpoint: string, vaes: readonly VaeFile[], metadataVae?: string): ResolvedVae {
  if (setting === VAE_NONE) return { file: undefined, source: "checkpoint" };
  const named = namedVae(setting);
  if (named !== undefined) {
    const file = vaes.find((v) => v.name === named);
    if (file === undefined) {
      const known = vaes.map((v) => v.name);
      throw new FarmError(
        grpc.status.NOT_FOUND,
        `VAE "${named}" is not in this agent's VAE list (known: ${known.join(", ") || "none"}; or "Automatic", "None")`,
        { field: "override_settings.sd_vae" },
      );
    }
    return { file, source: "setting" };
  }
  if (metadataVae === VAE_NONE) return { file: undefined, source: "user metadata" };
  const preferred = namedVae(metadataVae);
  const fromMetadata = preferred === undefined ? undefined : vaes.find((v) => v.name === preferred);
  if (fromMetadata !== undefined) return { file: fromMetadata, source: "user metadata" };
  const file = vaes.find((v) => v.name.startsWith(checkpoint));
  return file === undefined ? { file: undefined, source: "checkpoint" } : { file, source: "near checkpoint" };
}

/**
 * A checkpoint's VAE preference from A1111's user metadata: `"vae"` in the JSON file beside it
 * (`<models>/<name>.json`, the file that also carries the farm's architecture hints).
 */
export async function metadataVaeOf(modelsDir: string, checkpoint: string): Promise<string | undefined> {
  let text: string;
  try {
    text = await readFile(modelJsonPath(modelsDir, checkpoint), "utf8");
  } catch {
    return undefined;
  }
  try {
    const vae = (JSON.parse(text) as { vae?: unknown }).vae;
    return typeof vae === "string" ? vae : undefined;
  } catch {
    // A broken file fails the model's own load with its reason; it names no VAE.
    return undefined;
  }
}

/**
 * The agent's VAE list, read again at most every `maxAgeMs` (and on demand when a name is missing), so
 * that a file dropped into the folder is used without a restart and a task does not walk the folders.
 */
export class VaeList {
  private cached: { at: number; stamp: Promise<string>; files: Promise<VaeFile[]> } | undefined;

  constructor(
    readonly folders: VaeFolders,
    private readonly maxAgeMs = 5_000,
  ) {}

  current(fresh = false): Promise<VaeFile[]> {
    const now = Date.now();
    const previous = this.cached;
    if (!fresh && previous !== undefined && now - previous.at <= this.maxAgeMs) return previous.files;
    // Past its age the list is walked again only if a folder's tree changed: a models folder holds many
    // files (LoRAs, embeddings), and a walk stats each of them.
    const stamp = this.stamp();
    const files =
      fresh || previous === undefined
        ? listVaes(this.folders)
        : Promise.all([stamp, previous.stamp]).then(([latest, before]) => (latest === before ? previous.files : listVaes(this.folders)));
    this.cached = { at: now, stamp, files };
    return files;
  }

  /** The folders' tree mtimes (a file added, removed or renamed anywhere changes them). */
  private async stamp(): Promise<string> {
    const dirs = [this.folders.modelsDir, ...(this.folders.vaeDir !== undefined ? [this.folders.vaeDir] : [])];
    return (await Promise.all(dirs.map((d) => treeMtime(d).catch(() => -1)))).join("|");
  }

  /**
   * resolveVae against the list (read again first when the setting names a file it lacks) and, for
   * Automatic, the checkpoint's user metadata.
   */
  async resolve(setting: string, checkpoint: string): Promise<ResolvedVae> {
    const forced = this.folders.forced;
    // A1111's resolve_vae returns --vae-path before it looks at anything else.
    if (forced !== undefined) return { file: { name: basename(forced), path: forced }, source: "forced" };
    let files = await this.current();
    const named = namedVae(setting);
    if (named !== undefined && !files.some((f) => f.name === named)) files = await this.current(true);
    const metadata = named === undefined && setting !== VAE_NONE ? await metadataVaeOf(this.folders.modelsDir, checkpoint) : undefined;
    return resolveVae(setting, checkpoint, files, metadata);
  }
}
