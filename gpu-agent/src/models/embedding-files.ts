// Textual-inversion embedding files, read the way A1111's EmbeddingDatabase reads its embeddings
// folder (modules/textual_inversion/textual_inversion.py): every .pt, .bin and .safetensors file under
// it, named by its stem, in any of the layouts A1111 accepts. A file that cannot be read is reported
// and left out; the folder is read again when it changes.

import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { basename, extname } from "node:path";
import type { Logger } from "@latentfarm/shared";
import { CHUNK_LENGTH, EmbeddingDatabase, type EmbeddingTokenizer, type TextualInversionEmbedding } from "../conditioning/index.js";
import {
  BUNDLED_EMBEDDING_PREFIX,
  ModelFileError,
  readLoraBundleTensors,
  readSafetensors,
  readTorchFile,
  toFloat32,
  TorchTensor,
} from "../model-graph/index.js";
import { filesUnder, treeMtime } from "./folder-tree.js";

/** A tensor of an embedding file: its shape and values as float32. */
interface FileTensor {
  shape: readonly number[];
  data: Float32Array;
}

async function safetensorsTensors(path: string): Promise<Map<string, FileTensor>> {
  const file = await readSafetensors(path);
  try {
    const out = new Map<string, FileTensor>();
    for (const key of file.keys()) {
      const t = await file.tensor(key);
      out.set(key, { shape: t.shape, data: Float32Array.from(toFloat32(t, path)) });
    }
    return out;
  } finally {
    await file.close();
  }
}

function entriesOf(value: unknown): Array<[unknown, unknown]> | undefined {
  if (value instanceof Map) return [...(value as Map<unknown, unknown>).entries()];
  if (value !== null && typeof value === "object") {
    // An nn.ParameterDict (the original textual_inversion repository's files) keeps its tensors in _parameters.
    const params = (value as { _parameters?: unknown })._parameters;
    if (params !== undefined) return entriesOf(params);
    return Object.entries(value);
  }
  return undefined;
}

/**
 * The vectors of one embedding file, by A1111's rules: `string_to_param` with one entry (A1111's and
 * the textual_inversion repository's .pt), else a file of exactly one tensor (diffusers' learned_embeds.bin,
 * `emb_params` safetensors); a 1-D tensor is one vector. An SDXL file (clip_l and clip_g) becomes vectors
 * of both widths together, for SDXL models.
 */
export async function readEmbeddingFile(path: string, bytes?: Uint8Array): Promise<TextualInversionEmbedding> {
  const ext = extname(path).toLowerCase();
  const content = bytes ?? (await readFile(path));
  let tensors: Array<[unknown, unknown]>;
  if (ext === ".safetensors") {
    tensors = [...(await safetensorsTensors(path)).entries()];
  } else if (ext === ".pt" || ext === ".bin") {
    const data = entriesOf(readTorchFile(content, path));
    if (data === undefined) throw ModelFileError.invalidFile(path, "holds no dict of tensors");
    const params = data.find(([k]) => k === "string_to_param");
    tensors = params === undefined ? data : (entriesOf(params[1]) ?? []);
  } else {
    throw ModelFileError.invalidFile(path, "is not a .pt, .bin or .safetensors file");
  }
  return embeddingFromTensors(path, basename(path, extname(path)), tensors, createHash("sha256").update(content).digest("hex"));
}

/**
 * One embedding from its tensors (key, tensor), by A1111's create_embedding_from_data: clip_l with clip_g
 * is SDXL's, else the one tensor there is. `source` names it in errors.
 */
function embeddingFromTensors(
  source: string,
  name: string,
  tensors: ReadonlyArray<readonly [unknown, unknown]>,
  sha256: string | undefined,
  bundledIn?: string,
): TextualInversionEmbedding {
  const keys = tensors.map(([k]) => String(k));
  let tensor: FileTensor;
  if (keys.includes("clip_l") && keys.includes("clip_g")) {
    tensor = sdxlVectors(
      source,
      tensorOf(source, tensors.find(([k]) => k === "clip_l")![1]),
      tensorOf(source, tensors.find(([k]) => k === "clip_g")![1]),
    );
  } else {
    if (tensors.length !== 1) {
      throw ModelFileError.invalidFile(source, `holds ${tensors.length} tensors where an embedding has one (keys: ${keys.join(", ")})`);
    }
    tensor = tensorOf(source, tensors[0]![1]);
  }
  const vectors = tensor.shape.length === 1 ? 1 : tensor.shape[0]!;
  const hidden = tensor.shape[tensor.shape.length - 1]!;
  if (vectors < 1 || hidden < 1) throw ModelFileError.invalidFile(source, "has no vectors");
  if (vectors > CHUNK_LENGTH) {
    // A1111 loads it, and then fails on the first prompt that names it: it cannot fit one 75-token chunk.
    throw ModelFileError.invalidFile(source, `has ${vectors} vectors; a prompt chunk holds at most ${CHUNK_LENGTH}`);
  }
  if (tensor.data.some((v) => !Number.isFinite(v))) throw ModelFileError.invalidFile(source, "holds NaN or infinite values");
  return {
    name,
    vectors,
    hidden,
    data: tensor.data,
    ...(sha256 !== undefined && { sha256 }),
    ...(bundledIn !== undefined && { bundledIn }),
  };
}

/**
 * The textual-inversion embeddings a LoRA file carries (`bundle_emb.<name>.<tensor>`), as A1111 1.7+ reads
 * them when the LoRA is loaded: by name, in the order their first tensor comes in the file. Under a name,
 * `string_to_param.<k>` tensors make a string_to_param entry of their own, the last one replacing the
 * others, which A1111 then prefers to every other tensor; else clip_l with clip_g, or the one tensor there
 * is. They have no hash (A1111 writes none into TI hashes for them). A bundle A1111 cannot read fails its
 * LoRA there; here it throws ModelFileError.
 */
export async function readBundledEmbeddings(loraPath: string, loraName: string): Promise<TextualInversionEmbedding[]> {
  const byName = new Map<string, { params?: readonly [string, FileTensor]; tensors: Array<[string, FileTensor]> }>();
  for (const [key, tensor] of await readLoraBundleTensors(loraPath)) {
    const rest = key.slice(BUNDLED_EMBEDDING_PREFIX.length);
    const dot = rest.indexOf(".");
    if (dot <= 0 || dot === rest.length - 1) throw ModelFileError.invalidFile(loraPath, `${key} names no embedding and tensor`);
    const [name, vec] = [rest.slice(0, dot), rest.slice(dot + 1)];
    let entry = byName.get(name);
    if (entry === undefined) byName.set(name, (entry = { tensors: [] }));
    if (vec.split(".")[0] === "string_to_param") {
      if (!vec.includes(".")) throw ModelFileError.invalidFile(loraPath, `${key} has no parameter name after string_to_param`);
      entry.params = [vec, tensor];
    } else {
      entry.tensors.push([vec, tensor]);
    }
  }
  return [...byName].map(([name, e]) =>
    embeddingFromTensors(`${loraPath} (bundle_emb.${name})`, name, e.params !== undefined ? [e.params] : e.tensors, undefined, loraName),
  );
}

function tensorOf(path: string, t: unknown): FileTensor {
  const tensor: FileTensor | undefined =
    t instanceof TorchTensor ? t : t !== null && typeof t === "object" && "shape" in t && "data" in t ? (t as FileTensor) : undefined;
  if (tensor === undefined || (tensor.shape.length !== 1 && tensor.shape.length !== 2)) {
    throw ModelFileError.invalidFile(path, "its tensor is not a vector or a matrix of vectors");
  }
  return tensor;
}

/**
 * An SDXL embedding as one matrix: each vector is its CLIP-L part followed by its OpenCLIP-G part, the
 * order of the SDXL text encoder's token vectors (A1111 gives each embedder its own part).
 */
function sdxlVectors(path: string, l: FileTensor, g: FileTensor): FileTensor {
  const rows = (t: FileTensor) => (t.shape.length === 1 ? 1 : t.shape[0]!);
  const width = (t: FileTensor) => t.shape[t.shape.length - 1]!;
  const n = rows(g);
  if (rows(l) !== n) throw ModelFileError.invalidFile(path, `has ${rows(l)} clip_l vectors and ${n} clip_g vectors`);
  const [wl, wg] = [width(l), width(g)];
  const data = new Float32Array(n * (wl + wg));
  for (let v = 0; v < n; v++) {
    data.set(l.data.subarray(v * wl, (v + 1) * wl), v * (wl + wg));
    data.set(g.data.subarray(v * wg, (v + 1) * wg), v * (wl + wg) + wl);
  }
  return { shape: [n, wl + wg], data };
}

const EMBEDDING_EXTENSIONS = new Set([".pt", ".bin", ".safetensors"]);

export interface EmbeddingsRead {
  embeddings: TextualInversionEmbedding[];
  /** Files left out, with the reason: unreadable, the wrong width for the model, a name used twice. */
  skipped: Array<{ file: string; reason: string }>;
}

/**
 * Reads every embedding under `dir`, in path order; with `hidden`, only those whose vectors are that wide
 * (a model's text encoder width). A name is one file's per width: a later file of the same name is left out.
 */
export async function readEmbeddingsFolder(dir: string, hidden?: number, signal?: AbortSignal): Promise<EmbeddingsRead> {
  const embeddings: TextualInversionEmbedding[] = [];
  const skipped: EmbeddingsRead["skipped"] = [];
  const byName = new Map<string, string>();
  const files = await filesUnder(dir, (name) => EMBEDDING_EXTENSIONS.has(extname(name).toLowerCase())).catch(
    (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return [];
      throw err;
    },
  );
  for (const file of files.map((f) => f.path).sort()) {
    signal?.throwIfAborted();
    try {
      const content = await readFile(file);
      if (content.byteLength === 0) continue;
      const e = await readEmbeddingFile(file, content);
      if (hidden !== undefined && e.hidden !== hidden) {
        skipped.push({ file, reason: `vectors of ${e.hidden} values; this model's text encoder takes ${hidden}` });
        continue;
      }
      const key = `${e.hidden}:${e.name}`;
      const other = byName.get(key);
      if (other !== undefined) {
        skipped.push({ file, reason: `the name ${e.name} is already ${other}'s` });
        continue;
      }
      byName.set(key, file);
      embeddings.push(e);
    } catch (err) {
      skipped.push({ file, reason: err instanceof Error ? err.message : String(err) });
    }
  }
  return { embeddings, skipped };
}

/**
 * An embeddings folder, read on first use and again whenever a directory in it changed (A1111 checks
 * its folder's mtime before each generation, too). Each read is a new object; an unchanged folder
 * gives the same one back.
 */
export class EmbeddingsFolder {
  private read: { mtime: number; result: EmbeddingsRead } | undefined;
  private pending: Promise<EmbeddingsRead> | undefined;

  constructor(
    readonly dir: string,
    private readonly logger: Logger,
  ) {}

  /** Every readable embedding in the folder, of any width. */
  async current(): Promise<EmbeddingsRead> {
    const mtime = await treeMtime(this.dir).catch(() => -1);
    if (this.read !== undefined && this.read.mtime === mtime) return this.read.result;
    this.pending ??= (async () => {
      try {
        // Shared by every caller meanwhile, so no one caller's signal may stop it.
        const result = await readEmbeddingsFolder(this.dir);
        for (const s of result.skipped) this.logger.warn("textual-inversion embedding left out", { file: s.file, reason: s.reason });
        this.logger.info("textual-inversion embeddings read", {
          dir: this.dir,
          count: result.embeddings.length,
          skipped: result.skipped.length,
        });
        this.read = { mtime, result };
        return result;
      } finally {
        this.pending = undefined;
      }
    })();
    return this.pending;
  }
}

/**
 * The embeddings a model of text encoder width `hidden` can use, looked up by `tokenizer`'s ids: the
 * folder's (`read`, if any), then those bundled in the pipeline's LoRAs (`bundled`). A bundled embedding
 * whose name a folder embedding of this width already has is left out: A1111 keeps the folder's.
 */
export function embeddingDatabase(
  read: EmbeddingsRead | undefined,
  tokenizer: EmbeddingTokenizer,
  hidden: number,
  bundled: readonly TextualInversionEmbedding[] = [],
): EmbeddingDatabase {
  const fromFolder = (read?.embeddings ?? []).filter((e) => e.hidden === hidden);
  const names = new Set(fromFolder.map((e) => e.name));
  return new EmbeddingDatabase(tokenizer, [...fromFolder, ...bundled.filter((e) => e.hidden === hidden && !names.has(e.name))]);
}

/**
 * The embeddings bundled in a pipeline's LoRAs, in the order the LoRAs are loaded: a later LoRA's
 * embedding replaces an earlier one's of the same name, as A1111 registers them one after another.
 */
export async function bundledEmbeddingsOf(loras: ReadonlyArray<{ name: string; path: string }>): Promise<TextualInversionEmbedding[]> {
  const byName = new Map<string, TextualInversionEmbedding>();
  for (const l of loras) for (const e of await readBundledEmbeddings(l.path, l.name)) byName.set(e.name, e);
  return [...byName.values()];
}
