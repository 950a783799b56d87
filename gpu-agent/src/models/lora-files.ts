// The agent's LoRA folder as A1111's Lora extension sees it: every .safetensors file under it, subfolders
// included (users sort their LoRAs into folders), named by its file name without the extension.

import { dirname, join, relative, sep } from "node:path";
import { FarmError } from "@latentfarm/shared";
import { ModelFileError } from "../model-graph/index.js";
import { filesUnder, type TreeFile } from "./folder-tree.js";

const EXTENSION = ".safetensors";

/** A LoRA file as tags name it (the file name without ".safetensors") and its size. */
export interface LoraFile {
  name: string;
  sizeBytes: number;
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

/**
 * The folder's LoRAs by name, as A1111's list_available_networks makes them: its walk goes through the
 * folders in natural order of their paths and each folder's files in natural order, and a later file of
 * the same name replaces an earlier one. Folders whose name starts with "." are left out (A1111's
 * list_hidden_files off); links are followed. A missing or unreadable folder has no LoRAs.
 */
export async function loraFiles(dir: string): Promise<Map<string, TreeFile>> {
  const files = await filesUnder(dir, (name) => name.length > EXTENSION.length && name.toLowerCase().endsWith(EXTENSION)).catch(
    () => [] as TreeFile[],
  );
  const visible = files.filter(
    (f) =>
      !relative(dir, dirname(f.path))
        .split(sep)
        .some((part) => part.startsWith(".")),
  );
  visible.sort((a, b) => compareNatural(dirname(a.path), dirname(b.path)) || compareNatural(a.path, b.path));
  const byName = new Map<string, TreeFile>();
  for (const f of visible) {
    const file = f.path.slice(dirname(f.path).length + 1);
    const name = file.slice(0, -EXTENSION.length);
    // A later file replaces the earlier one at the end of the order, as a dict assignment does.
    byName.delete(name);
    byName.set(name, f);
  }
  return byName;
}

/**
 * The file a `<lora:name:…>` tag (or a request's `loras` entry) names. Names are plain file names: path
 * separators, `..`, absolute paths and control characters are INVALID_ARGUMENT. The name as A1111 looks it
 * up first, then without regard to case, as users type names they have seen; NOT_FOUND when neither.
 */
export async function resolveLoraFile(dir: string, name: string): Promise<string> {
  // eslint-disable-next-line no-control-regex
  if (!name || name.includes("/") || name.includes("\\") || name.includes("..") || /[\u0000-\u001f]/.test(name)) {
    throw FarmError.invalid("lora", `${JSON.stringify(name)} is not a plain name`);
  }
  const stem = name.toLowerCase().endsWith(EXTENSION) ? name.slice(0, -EXTENSION.length) : name;
  const files = await loraFiles(dir);
  const exact = files.get(stem);
  if (exact !== undefined) return exact.path;
  const lower = stem.toLowerCase();
  let hit: TreeFile | undefined;
  for (const [n, f] of files) if (n.toLowerCase() === lower) hit = f;
  if (hit !== undefined) return hit.path;
  throw ModelFileError.fileNotFound(join(dir, name), `no lora named ${JSON.stringify(name)}`);
}

/** The folder's LoRAs by name, with their sizes (those resolveLoraFile picks). */
export async function listLoras(dir: string | undefined): Promise<LoraFile[]> {
  if (!dir) return [];
  const files = await loraFiles(dir);
  return [...files].map(([name, f]) => ({ name, sizeBytes: f.size })).sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
}

/** listLoras for heartbeats, which go out every second: the folder is read again at most every `maxAgeMs`. */
export class LoraList {
  private last: { at: number; files: Promise<LoraFile[]> } | undefined;

  constructor(
    private readonly dir: string | undefined,
    private readonly maxAgeMs = 5_000,
  ) {}

  current(): Promise<LoraFile[]> {
    const now = Date.now();
    if (this.last === undefined || now - this.last.at > this.maxAgeMs) this.last = { at: now, files: listLoras(this.dir) };
    return this.last.files;
  }
}
