// Which Stable Diffusion each model is, for listings: SDXL renders at other sizes and takes other LoRAs
// and embeddings than SD 1.x, so a farm user picking a model wants to see it. A1111 lists no such thing.

import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { MANIFEST_FILE, readSafetensors } from "../model-graph/index.js";
import type { ModelEntry } from "./catalog.js";

/** "sd1", "sd2", "sdxl", "sdxl-refiner", or "" where the files do not say. */
export type ModelFamilyName = "sd1" | "sd2" | "sdxl" | "sdxl-refiner" | "";

/** A checkpoint's family from its tensor names (the LDM/sgm text-encoder prefixes). */
export function familyOfKeys(keys: Iterable<string>): ModelFamilyName {
  let sd1 = false;
  let sd2 = false;
  let xlBase = false;
  let xlRefiner = false;
  for (const k of keys) {
    if (k.startsWith("conditioner.embedders.1.model.")) xlBase = true;
    else if (k.startsWith("conditioner.embedders.0.model.")) xlRefiner = true;
    else if (k.startsWith("cond_stage_model.model.")) sd2 = true;
    else if (k.startsWith("cond_stage_model.transformer.")) sd1 = true;
  }
  return xlBase ? "sdxl" : xlRefiner ? "sdxl-refiner" : sd2 ? "sd2" : sd1 ? "sd1" : "";
}

/**
 * A diffusers ONNX folder's family: SDXL has text_encoder_2, and its refiner no text_encoder (no CLIP-L); a
 * folder the farm built says in its manifest; an exporter's text_encoder/config.json gives CLIP's width (768
 * for SD 1.x, 1024 for SD 2.x).
 */
async function familyOfFolder(dir: string): Promise<ModelFamilyName> {
  if (existsSync(join(dir, "text_encoder_2"))) return existsSync(join(dir, "text_encoder")) ? "sdxl" : "sdxl-refiner";
  const json = async (path: string): Promise<Record<string, unknown> | undefined> => {
    try {
      return JSON.parse(await readFile(join(dir, path), "utf8")) as Record<string, unknown>;
    } catch {
      return undefined;
    }
  };
  const family = (await json(MANIFEST_FILE))?.["family"];
  if (family === "sd1" || family === "sd2" || family === "sdxl" || family === "sdxl-refiner") return family;
  const width = (await json(join("text_encoder", "config.json")))?.["hidden_size"];
  return width === 768 ? "sd1" : width === 1024 ? "sd2" : "";
}

export async function modelFamily(entry: ModelEntry): Promise<ModelFamilyName> {
  if (entry.format === "diffusers-onnx") return familyOfFolder(entry.path);
  const file = await readSafetensors(entry.path);
  try {
    return familyOfKeys(file.keys());
  } finally {
    await file.close();
  }
}

/**
 * Model families for the heartbeat, read again only when a catalog entry's version (the mtime and size
 * the catalog's listing saw) changes: a checkpoint's header is read once per file version, not once per
 * heartbeat. An entry without a version is read every time.
 */
export class ModelFamilies {
  private readonly known = new Map<string, { version: string; family: ModelFamilyName }>();

  async of(entries: readonly ModelEntry[]): Promise<Map<string, ModelFamilyName>> {
    const out = new Map<string, ModelFamilyName>();
    for (const e of entries) {
      let k = this.known.get(e.path);
      if (e.version === undefined || k?.version !== e.version) {
        k = { version: e.version ?? "", family: await modelFamily(e).catch((): ModelFamilyName => "") };
        if (e.version !== undefined) this.known.set(e.path, k);
      }
      out.set(e.name, k.family);
    }
    return out;
  }
}
