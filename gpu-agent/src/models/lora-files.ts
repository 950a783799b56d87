// The agent's LoRA folder as A1111's Lora extension sees it: every .safetensors, .pt and .ckpt file under it, subfolders
// included (users sort their LoRAs into folders), named by its file name without the extension and by its
// alias, the name it was trained under (metadata ss_output_name), which A1111's UI writes into prompts and
// so prompts shared with images (civitai's) carry, whatever the file was renamed to on download.

import { dirname, join, relative, sep } from "node:path";
import { FarmError, isLoraName, loraStem } from "@latentfarm/shared";
import { isSafetensorsLora, ModelFileError, readSafetensors } from "../model-graph/index.js";
import { filesUnder, type TreeFile } from "./folder-tree.js";

/** A LoRA file as tags name it (the file name without its extension), its alias and its size. */
export interface LoraFile {
  name: string;
  /** The name it was trained under (ss_output_name), where that differs from `name` and A1111 lets tags use it. */
  alias?: string;
  sizeBytes: number;
}

/** ss_output_name by file, while its size and mtime stay: heartbeats list the folder every few seconds. */
const aliasCache = new Map<string, { size: number; mtimeMs: number; alias: string | undefined }>();
const MAX_CACHED_ALIASES = 4096;

/**
 * A LoRA file's header metadata (`__metadata__`, strings as written): only .safetensors files carry any (A1111
 * reads none from .pt and .ckpt files); undefined for those, and for a header that cannot be read (loading
 * the file reports why).
 */
async function headerMetadata(path: string): Promise<Readonly<Record<string, string>> | undefined> {
  if (!isSafetensorsLora(path)) return undefined;
  try {
    const file = await readSafetensors(path);
    await file.close();
    return file.metadata;
  } catch {
    return undefined;
  }
}

async function aliasOf(f: TreeFile): Promise<string | undefined> {
  if (!isSafetensorsLora(f.path)) return undefined;
  const cached = aliasCache.get(f.path);
  if (cached !== undefined && cached.size === f.size && cached.mtimeMs === f.mtimeMs) return cached.alias;
  // Without metadata, named by its file name only.
  const v = (await headerMetadata(f.path))?.["ss_output_name"];
  const alias = v !== undefined && v !== "" ? v : undefined;
  if (aliasCache.size >= MAX_CACHED_ALIASES) aliasCache.clear();
  aliasCache.set(f.path, { size: f.size, mtimeMs: f.mtimeMs, alias });
  return alias;
}

/** Python's natural_sort_key as A1111 sorts folders and files: digit runs by value, the rest without case. */
function naturalKey(s: string): (string | number)[] {
  return s.split(/([0-9]+)/).map((part, i) => (i % 2 === 1 ? Number(part) : part.toLowerCase()));
}

function compareNatural(a: string, b: string): number {
  const x = naturalKey(a);
  const y = naturalKey(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const u = x[i]!;
    const v = y[i]!;
    if (u !== v) return u < v ? -1 : 1;
  }
  return x.length - y.length;
}

/** A LoRA folder as A1111's Lora extension holds it (loraFolder). */
export interface LoraFolder {
  /** By name (available_networks), in walk order, each name at its last file. */
  byName: Map<string, TreeFile>;
  /** By name and alias (available_network_aliases). */
  byAlias: Map<string, TreeFile>;
  /** Aliases tags may not use, in lower case (forbidden_network_aliases; A1111 seeds it with "none" and "Addams"). */
  forbidden: Set<string>;
  /** Each file's alias, where it has one. */
  aliases: Map<TreeFile, string>;
}

/**
 * The folder's LoRAs as A1111's list_available_networks makes them. Its walk goes through the folders in
 * natural order of their paths and each folder's files in natural order; a later file of a name replaces an
 * earlier one, both by name and by alias; an alias already taken (by an earlier file's name or alias) is
 * forbidden: tags naming it find files by name only. Folders whose name starts with "." are left out
 * (list_hidden_files off); links are followed. A missing or unreadable folder has no LoRAs.
 */
export async function loraFolder(dir: string): Promise<LoraFolder> {
  const files = await filesUnder(dir, (name) => loraStem(name) !== undefined).catch(() => [] as TreeFile[]);
  const visible = files.filter(
    (f) =>
      !relative(dir, dirname(f.path))
        .split(sep)
        .some((part) => part.startsWith(".")),
  );
  visible.sort((a, b) => compareNatural(dirname(a.path), dirname(b.path)) || compareNatural(a.path, b.path));
  const aliasList = await Promise.all(visible.map(aliasOf));
  // A1111 checks lower-cased names against these, so its "Addams" never matches: kept as it is.
  const folder: LoraFolder = { byName: new Map(), byAlias: new Map(), forbidden: new Set(["none", "Addams"]), aliases: new Map() };
  for (const [i, f] of visible.entries()) {
    const file = f.path.slice(dirname(f.path).length + 1);
    const name = loraStem(file)!;
    const alias = aliasList[i] ?? name;
    // A later file moves to the end, so that "the last of a name" is the last in the map's order too.
    folder.byName.delete(name);
    folder.byName.set(name, f);
    if (folder.byAlias.has(alias)) folder.forbidden.add(alias.toLowerCase());
    folder.byAlias.set(name, f);
    folder.byAlias.set(alias, f);
    if (alias !== name) folder.aliases.set(f, alias);
  }
  return folder;
}

/**
 * The file a `<lora:name:…>` tag (or a request's `loras` entry) names. Names are plain names: path
 * separators, `..` and control characters are INVALID_ARGUMENT. A1111's lookup first (by name where the
 * name is a forbidden alias, else by name or alias), then without regard to case, as users type names
 * they have seen; NOT_FOUND when none.
 */
export async function resolveLoraFile(dir: string, name: string): Promise<string> {
  if (!isLoraName(name)) throw FarmError.invalid("lora", `${JSON.stringify(name)} is not a plain name`);
  const stem = loraStem(name) ?? name;
  // A walk stats every file of the tree: a recent one serves, and a name it lacks is looked for afresh.
  const path = lookUp(await recentFolder(dir), stem) ?? lookUp(await recentFolder(dir, 0), stem);
  if (path !== undefined) return path;
  throw ModelFileError.fileNotFound(join(dir, name), `no lora named ${JSON.stringify(name)}`);
}

function lookUp(folder: LoraFolder, stem: string): string | undefined {
  const lower = stem.toLowerCase();
  const found = folder.forbidden.has(lower) ? folder.byName.get(stem) : folder.byAlias.get(stem);
  if (found !== undefined) return found.path;
  // Without regard to case: file names first, then aliases tags may use (placement matches both that way).
  let hit: TreeFile | undefined;
  for (const [n, f] of folder.byName) if (n.toLowerCase() === lower) hit = f;
  if (hit === undefined && !folder.forbidden.has(lower)) for (const [n, f] of folder.byAlias) if (n.toLowerCase() === lower) hit = f;
  return hit?.path;
}

/** The last walk of each folder, and when it began. */
const walks = new Map<string, { at: number; folder: Promise<LoraFolder> }>();
/** How old a walk may be to serve a lookup, or a heartbeat's listing (they go out every second). */
const RECENT_MS = 5_000;

function recentFolder(dir: string, maxAgeMs = RECENT_MS): Promise<LoraFolder> {
  const now = Date.now();
  const last = walks.get(dir);
  if (last !== undefined && now - last.at <= maxAgeMs) return last.folder;
  const folder = loraFolder(dir);
  walks.set(dir, { at: now, folder });
  return folder;
}

/**
 * The folder's LoRAs by name, with their usable aliases and sizes (the files resolveLoraFile picks), from
 * a walk at most `maxAgeMs` old (0: a new one): heartbeats take one lookups made, and the other way round.
 */
export async function listLoras(dir: string | undefined, maxAgeMs = 0): Promise<LoraFile[]> {
  if (!dir) return [];
  const folder = await recentFolder(dir, maxAgeMs);
  return [...folder.byName]
    .map(([name, f]): LoraFile => {
      const alias = folder.aliases.get(f);
      // An alias that does not find this file (forbidden, or taken by a later one) is not offered.
      const usable = alias !== undefined && !folder.forbidden.has(alias.toLowerCase()) && folder.byAlias.get(alias) === f;
      return { name, ...(usable && { alias }), sizeBytes: f.size };
    })
    .sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
}

/** listLoras as heartbeats take it: from a walk of the last few seconds. */
export function recentLoras(dir: string | undefined): Promise<LoraFile[]> {
  return listLoras(dir, RECENT_MS);
}

/** A1111's order for metadata keys (the Lora extension's metadata_tags_order); other keys follow, in the file's order. */
const METADATA_KEY_ORDER: Readonly<Record<string, number>> = {
  ss_sd_model_name: 1,
  ss_resolution: 2,
  ss_clip_skip: 3,
  ss_num_train_images: 10,
  ss_tag_frequency: 20,
};

/**
 * A LoRA file's training metadata as A1111's /sdapi/v1/loras gives it (read_metadata_from_safetensors): a
 * .safetensors file's `__metadata__`, each value that starts with "{" parsed as JSON where it parses, keys in
 * A1111's order. A .pt or .ckpt file has none ({}), and neither has a header that cannot be read.
 */
export async function loraMetadata(path: string): Promise<Record<string, unknown>> {
  const entries = Object.entries((await headerMetadata(path)) ?? {}).map(([k, v]): [string, unknown] => {
    if (!v.startsWith("{")) return [k, v];
    try {
      return [k, JSON.parse(v) as unknown];
    } catch {
      return [k, v];
    }
  });
  // A stable sort: keys A1111 does not order keep the file's order.
  entries.sort(([a], [b]) => (METADATA_KEY_ORDER[a] ?? 999) - (METADATA_KEY_ORDER[b] ?? 999));
  return Object.fromEntries(entries);
}

/** loraMetadata of the folder's files by the names listLoras gives them; names it does not list are left out. */
export async function loraMetadataByName(dir: string | undefined, names: readonly string[]): Promise<Map<string, Record<string, unknown>>> {
  const out = new Map<string, Record<string, unknown>>();
  if (!dir) return out;
  const recent = await recentFolder(dir);
  // A name the recent walk lacks is looked for in one fresh walk, as resolveLoraFile does.
  let fresh: LoraFolder | undefined;
  for (const name of new Set(names)) {
    let f = recent.byName.get(name);
    if (f === undefined) f = (fresh ??= await recentFolder(dir, 0)).byName.get(name);
    if (f !== undefined) out.set(name, await loraMetadata(f.path));
  }
  return out;
}
