import { readdir, stat } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join, resolve, sep } from "node:path";
import { FarmError } from "@latentfarm/shared";

export type ModelFormat = "diffusers-onnx" | "safetensors";

export interface ModelEntry {
  readonly name: string;
  readonly format: ModelFormat;
  /** The model folder (diffusers-onnx) or checkpoint file (safetensors). */
  readonly path: string;
  /** Its mtime and size when list() saw it: what was read off the files holds while this stays the same. */
  readonly version?: string;
}

/**
 * A model name resolves only inside the models folder: no separators, no "..", no absolute paths.
 * Names are folder names or checkpoint stems, so they can be checked before touching the disk.
 */
export function validateModelName(name: string, field = "model"): void {
  if (
    name === "" ||
    name.length > 200 ||
    name.includes("/") ||
    name.includes("\\") ||
    name.includes("\0") ||
    name === "." ||
    name === ".." ||
    name.startsWith(".")
  ) {
    throw FarmError.invalid(field, `"${name}" is not a model name (names may not contain path separators or start with a dot)`);
  }
}

/**
 * The JSON file beside a model (`<name>.json`, what A1111's splitext(checkpoint) + ".json" names): A1111's
 * user metadata (its "vae"), which the farm also reads architecture hints from.
 */
export function modelJsonPath(modelsDir: string, name: string): string {
  return join(modelsDir, `${name}.json`);
}

/** The models folder: each diffusers-ONNX subfolder is a model named after the folder. */
export class ModelCatalog {
  constructor(readonly root: string) {}

  async list(): Promise<ModelEntry[]> {
    let names: string[];
    try {
      names = await readdir(this.root);
    } catch (err) {
      throw new FarmError(5 /* NOT_FOUND */, `models folder ${this.root} cannot be read`, { cause: err });
    }
    const out: ModelEntry[] = [];
    for (const n of names.sort()) {
      if (n.startsWith(".")) continue;
      const p = join(this.root, n);
      const s = await stat(p).catch(() => undefined);
      if (!s) continue;
      if (s.isDirectory() && existsSync(join(p, "unet", "model.onnx"))) {
        out.push({ name: n, format: "diffusers-onnx", path: p, version: `${s.mtimeMs}:${s.size}` });
      } else if (s.isFile() && n.endsWith(".safetensors")) {
        out.push({ name: n.slice(0, -".safetensors".length), format: "safetensors", path: p, version: `${s.mtimeMs}:${s.size}` });
      }
    }
    return out;
  }

  async get(name: string): Promise<ModelEntry> {
    validateModelName(name);
    const entry = (await this.list()).find((e) => e.name === name);
    if (!entry) throw FarmError.notFound(`model "${name}" is not in this agent's models folder`, "model");
    // Defence in depth: the resolved path must stay inside the root.
    if (!resolve(entry.path).startsWith(resolve(this.root) + sep)) throw FarmError.invalid("model", `"${name}" escapes the models folder`);
    return entry;
  }
}
