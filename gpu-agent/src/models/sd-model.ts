import { createHash, randomUUID } from "node:crypto";
import { copyFile, link, mkdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { FarmError, type Logger } from "@latentfarm/shared";
import { OrtWorker } from "../runtime/ort-runtime.js";
import { InThreadOrtSessions, type OrtSessions } from "../runtime/ort-sessions.js";
import { AuxiliarySessions } from "./auxiliary-sessions.js";
import type { ExecutionProvider, SessionInfo, TensorType, ValueMeta, WireTensor } from "../runtime/protocol.js";
import {
  f16ToF32,
  f32ToF16,
  ModelFileError,
  TOKEN_OVERRIDE_POSITIONS,
  TOKEN_OVERRIDE_VECTORS,
  withCircularPadding,
  withTokenOverrides,
} from "../model-graph/index.js";
import type { ModelEntry } from "./catalog.js";
import type { ClosableTextEncoder, TextEncoder, TokenOverrides } from "../conditioning/index.js";

const CLIP_LAYER_NORM_EPS = 1e-5;

function own<T extends Float32Array | Int32Array | BigInt64Array | Uint16Array>(a: T): T {
  // Feeds are transferred to the worker, so each must own its whole buffer.
  return a.byteOffset === 0 && a.byteLength === a.buffer.byteLength ? a : (a.slice() as T);
}

function inputOf(info: SessionInfo, names: string[], session: string): ValueMeta {
  for (const n of names) {
    const m = info.inputs.find((i) => i.name === n);
    if (m) return m;
  }
  const first = info.inputs[0];
  if (!first) throw new FarmError(grpc.status.FAILED_PRECONDITION, `${session} has no inputs`);
  return first;
}

/** `data` as the input's float type; an fp16 input converts into `into` (as long as `data`) when given. */
function floatTensor(meta: ValueMeta, data: Float32Array, dims: number[], into?: Uint16Array): WireTensor {
  if (meta.type === "float16") return { type: "float16", dims, data: f32ToF16(data, into) };
  return { type: "float32", dims, data: own(data) };
}

function readFloats(t: WireTensor): Float32Array {
  if (t.type === "float16") return f16ToF32(t.data as Uint16Array);
  if (t.type === "float32") return t.data as Float32Array;
  throw new FarmError(grpc.status.INTERNAL, `unexpected output type ${t.type}`);
}

/** A UNet call's batch: n rows of [C,h,w] latents against [seq,dim] contexts. */
export interface UnetDims {
  n: number;
  h: number;
  w: number;
  seq: number;
  dim: number;
  /**
   * The context array is the one the previous call got and holds the same values, so whatever was made
   * from it then (an fp16 export's converted context) still holds.
   */
  contextUnchanged?: boolean;
}

/** SDXL's "vector" conditioning per row: the pooled text vector, and the six size conditions. */
export interface AddedConditions {
  /** [n, pooledSize]. */
  readonly textEmbeds: Float32Array;
  /**
   * [n, timeIdsSize]: SDXL base's original height and width, crop top and left, target height and width,
   * in pixels; the SDXL refiner's original height and width, crop top and left, and aesthetic score.
   */
  readonly timeIds: Float32Array;
}

export interface SdModelConfig {
  readonly scalingFactor: number;
  readonly predictionType: "epsilon" | "v_prediction";
  readonly latentChannels: number;
}

export interface SdModelLoadOptions {
  ep: ExecutionProvider;
  intraOpNumThreads?: number;
  logger: Logger;
  signal?: AbortSignal;
  /**
   * Where the sessions run: "worker" (default) puts them in a worker thread of their own, for callers on
   * an event loop that must not block; "this-thread" runs them on the calling thread, for a thread that
   * hosts the whole render (PipelineHost), where a hop to yet another thread per model call is pure cost.
   */
  sessions?: "worker" | "this-thread";
  /**
   * Load the text encoder with token-override inputs (withTokenOverrides), so that prompts can use
   * textual-inversion embeddings. The graph is patched in memory; the model folder is not touched.
   */
  tokenOverrides?: boolean;
  /**
   * A folder whose vae_decoder/ (and vae_encoder/) replace the model's own: a VAE file built by importVae,
   * as A1111's sd_vae loads a VAE over the checkpoint's.
   */
  vaeDir?: string;
  /**
   * A1111's Tiling: the UNet and the VAE pad every convolution circularly (withCircularPadding), so the
   * picture wraps around at its edges.
   */
  circular?: boolean;
  /** Where circularly padded graphs with external data go: a folder each, with the data hard-linked (or copied). */
  scratchDir?: string;
}

/** The file name of a circularly padded graph whose weights are external data (in its scratch folder). */
export const CIRCULAR_MODEL = "model.circular.onnx";

/** Written whole, then renamed: a pipeline loading meanwhile never reads half a file. */
async function writeWhole(target: string, bytes: Uint8Array): Promise<void> {
  const partial = `${target}.${process.pid}.${randomUUID()}.partial`;
  await writeFile(partial, bytes);
  await rename(partial, target);
}

/**
 * A UNet or VAE graph to load: the folder's own, or with circular padding (A1111's Tiling). A patched
 * graph with external data goes to a folder of its own under `scratchDir`, beside the data (ONNX Runtime
 * finds external data relative to the graph file); the model's folder is never written.
 */
async function convGraph(dir: string, component: string, circular: boolean | undefined, scratchDir?: string): Promise<string | Uint8Array> {
  const path = join(dir, component, "model.onnx");
  if (circular !== true) return path;
  const patched = withCircularPadding(await readFile(path), path);
  if (!patched.externalData) return patched.model;
  if (scratchDir === undefined) {
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `tiling needs a scratch folder for a circularly padded ${component} of ${dir}`, {
      field: "tiling",
    });
  }
  const folder = join(scratchDir, createHash("sha256").update(resolve(path)).digest("hex").slice(0, 16), component);
  await mkdir(folder, { recursive: true });
  for (const file of patched.externalFiles) {
    const target = join(folder, file);
    const source = resolve(dir, component, file);
    // ONNX Runtime refuses external data reached through a link out of the graph's folder, so the data
    // is hard-linked (no copy; the farm's builds and their cache share a filesystem), or else copied once:
    // kept while it is the source's own inode, or a copy made since the source last changed.
    if (existsSync(target)) {
      const [t, src] = [await stat(target), await stat(source)];
      if (t.ino === src.ino || (t.size === src.size && t.mtimeMs >= src.mtimeMs)) continue;
    }
    await mkdir(dirname(target), { recursive: true });
    await rm(target, { force: true });
    await link(source, target).catch(async (e: NodeJS.ErrnoException) => {
      if (e.code === "EEXIST") return;
      if (e.code !== "EXDEV" && e.code !== "EPERM") throw e;
      const partial = `${target}.${process.pid}.${randomUUID()}.partial`;
      await copyFile(source, partial);
      await rename(partial, target);
    });
  }
  const moved = join(folder, CIRCULAR_MODEL);
  await writeWhole(moved, patched.model);
  return moved;
}

/** Where a patched text encoder whose weights are external data is saved: beside them, as they are named relative to it. */
export const TOKEN_OVERRIDES_MODEL = "model.token-overrides.onnx";

/**
 * The text encoder's model, patched for token overrides when asked: as bytes, or saved beside the
 * original when its weights are external data files (the farm's checkpoint builds). A graph that cannot
 * take overrides, or a folder that cannot be written, loads the original, without embeddings: the model
 * still renders every prompt that names none.
 */
async function textEncoderModel(
  dir: string,
  component: "text_encoder" | "text_encoder_2",
  tokenOverrides: boolean | undefined,
  logger?: Logger,
): Promise<string | Uint8Array> {
  const path = join(dir, component, "model.onnx");
  if (tokenOverrides !== true) return path;
  try {
    const patched = withTokenOverrides(await readFile(path), path);
    if (!patched.externalData) return patched.model;
    const target = join(dir, component, TOKEN_OVERRIDES_MODEL);
    // Written whole, then renamed: a pipeline loading meanwhile never reads half a file.
    const partial = `${target}.${process.pid}.${randomUUID()}.partial`;
    await writeFile(partial, patched.model);
    await rename(partial, target);
    return target;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (!(err instanceof ModelFileError) && code !== "EACCES" && code !== "EROFS" && code !== "EPERM") throw err;
    logger?.warn("textual-inversion embeddings are off for this model", { model: dir, reason: (err as Error).message });
    return path;
  }
}

function sessionsFor(opts: Omit<SdModelLoadOptions, "logger">): OrtSessions {
  const threads = opts.intraOpNumThreads === undefined ? {} : { intraOpNumThreads: opts.intraOpNumThreads };
  return opts.sessions === "this-thread" ? new InThreadOrtSessions({ ep: opts.ep, ...threads }) : new OrtWorker(opts.ep, threads);
}

/** The text encoder of a diffusers ONNX folder alone, e.g. a base model's beside a LoRA-merged pipeline. */
export async function loadTextEncoder(dir: string, opts: Omit<SdModelLoadOptions, "logger">): Promise<ClosableTextEncoder> {
  const sessions = sessionsFor(opts);
  try {
    const encoder = await loadTextEncoders(sessions, dir, opts);
    return { encoder, close: () => sessions.close() };
  } catch (err) {
    await sessions.close();
    throw err;
  }
}

/** Whether a diffusers ONNX folder is an SDXL pipeline: it has the second text encoder. */
function isSdxlFolder(dir: string): boolean {
  return existsSync(join(dir, "text_encoder_2", "model.onnx"));
}

/** Whether the folder has SDXL's first text encoder (CLIP-L); an SDXL refiner's has only the second. */
function hasFirstTextEncoder(dir: string): boolean {
  return existsSync(join(dir, "text_encoder", "model.onnx"));
}

/** The folder's text encoder: CLIP, SDXL's two encoders as one, or the SDXL refiner's OpenCLIP-G alone. */
async function loadTextEncoders(
  sessions: OrtSessions,
  dir: string,
  opts: Pick<SdModelLoadOptions, "tokenOverrides" | "signal"> & { logger?: Logger },
): Promise<TextEncoder> {
  const sdxl = isSdxlFolder(dir);
  let first: OnnxTextEncoder | undefined;
  if (!sdxl || hasFirstTextEncoder(dir)) {
    const te = await sessions.load(
      "text_encoder",
      await textEncoderModel(dir, "text_encoder", opts.tokenOverrides, opts.logger),
      opts.signal,
    );
    first = await OnnxTextEncoder.create(sessions, "text_encoder", te, opts.signal, !sdxl);
    if (!sdxl) return first;
  }
  const te2 = await sessions.load(
    "text_encoder_2",
    await textEncoderModel(dir, "text_encoder_2", opts.tokenOverrides, opts.logger),
    opts.signal,
  );
  const second = await OnnxTextEncoder.create(sessions, "text_encoder_2", te2, opts.signal, false);
  return SdxlTextEncoder.create(first, second);
}

/**
 * A loaded Stable Diffusion pipeline in the diffusers ONNX layout, its sessions held by one
 * worker thread. Input names and dtypes come from the sessions' metadata, since exporters differ
 * (timestep float or int64, input_ids int32 or int64, fp16 or fp32).
 */
export class SdModel {
  private constructor(
    readonly entry: ModelEntry,
    readonly config: SdModelConfig,
    readonly tokenizerDir: string,
    private readonly worker: OrtSessions,
    private readonly sessions: Record<"unet" | "vae_decoder", SessionInfo>,
    private readonly unetInputs: {
      sample: ValueMeta;
      timestep: ValueMeta;
      context: ValueMeta;
      /** SDXL's added conditions (absent for SD1/2 UNets). */
      textEmbeds?: ValueMeta | undefined;
      timeIds?: ValueMeta | undefined;
      output: string;
    },
    readonly textEncoder: TextEncoder,
    /** The folder whose vae_decoder/ and vae_encoder/ this model decodes and encodes with. */
    private readonly vaeDir: string,
    /** A1111's Tiling: its convolutions pad circularly (the encoder's too, when it loads); with its scratchDir. */
    private readonly circular: { scratchDir: string | undefined } | undefined,
  ) {
    this.auxiliary = new AuxiliarySessions(worker);
  }

  /**
   * An fp16 UNet's converted inputs, kept per input between calls: a fresh 0.5 MB array per call faults
   * its pages in on the render's critical path. Sessions that take their feeds to another thread
   * (OrtWorker) leave them detached, of length 0, and the next call converts into a new one.
   */
  private readonly halfFeeds = new Map<string, Uint16Array>();

  /** The context the last fp16 context feed was converted from (see UnetDims.contextUnchanged). */
  private halfContextSource: Float32Array | undefined;

  /**
   * A UNet call is between converting its feeds and the end of its run(): one that starts meanwhile (two
   * callers of one model; run() itself waits a turn of the event loop) converts into new arrays.
   */
  private unetInFlight = false;

  private halfFeed(meta: ValueMeta, length: number): Uint16Array | undefined {
    if (meta.type !== "float16" || this.unetInFlight) return undefined;
    let kept = this.halfFeeds.get(meta.name);
    if (kept?.length !== length) this.halfFeeds.set(meta.name, (kept = new Uint16Array(length)));
    return kept;
  }

  get name(): string {
    return this.entry.name;
  }

  static async load(entry: ModelEntry, opts: SdModelLoadOptions): Promise<SdModel> {
    if (entry.format !== "diffusers-onnx") {
      throw new FarmError(
        grpc.status.UNIMPLEMENTED,
        `model "${entry.name}" is a ${entry.format} checkpoint; only diffusers ONNX folders load today`,
        { field: "model" },
      );
    }
    const dir = entry.path;
    // An SDXL refiner's folder has the second text encoder and its tokenizer only.
    const refiner = !hasFirstTextEncoder(dir) && isSdxlFolder(dir);
    const tokenizer = refiner && !existsSync(join(dir, "tokenizer")) ? "tokenizer_2" : "tokenizer";
    for (const part of [refiner ? "text_encoder_2" : "text_encoder", "unet", "vae_decoder", tokenizer]) {
      if (!existsSync(join(dir, part))) {
        throw new FarmError(grpc.status.FAILED_PRECONDITION, `model "${entry.name}" lacks ${part}/`, { field: "model" });
      }
    }
    const config = await readConfig(dir);
    const worker = sessionsFor(opts);
    try {
      const textEncoder = await loadTextEncoders(worker, dir, opts);
      const unet = await worker.load("unet", await convGraph(dir, "unet", opts.circular, opts.scratchDir), opts.signal);
      const vaeDir = opts.vaeDir ?? dir;
      const vae = await worker.load("vae_decoder", await convGraph(vaeDir, "vae_decoder", opts.circular, opts.scratchDir), opts.signal);
      const unetInputs = {
        sample: inputOf(unet, ["sample"], "unet"),
        timestep: inputOf(unet, ["timestep", "timesteps", "t"], "unet"),
        context: inputOf(unet, ["encoder_hidden_states", "context"], "unet"),
        textEmbeds: unet.inputs.find((i) => i.name === "text_embeds"),
        timeIds: unet.inputs.find((i) => i.name === "time_ids"),
        output: unet.outputs[0]?.name ?? "out_sample",
      };
      if (
        (unetInputs.textEmbeds !== undefined) !== (textEncoder.pooledSize !== undefined) ||
        (unetInputs.textEmbeds === undefined) !== (unetInputs.timeIds === undefined)
      ) {
        throw new FarmError(
          grpc.status.FAILED_PRECONDITION,
          `model "${entry.name}": the UNet's added conditions (text_embeds, time_ids) do not match its text encoders`,
          { field: "model" },
        );
      }
      return new SdModel(
        entry,
        config,
        join(dir, tokenizer),
        worker,
        { unet, vae_decoder: vae },
        unetInputs,
        textEncoder,
        vaeDir,
        opts.circular === true ? { scratchDir: opts.scratchDir } : undefined,
      );
    } catch (err) {
      await worker.close();
      throw err;
    }
  }

  /** Channels the UNet's `sample` takes: the latent's, or 9 for inpainting UNets (latent, mask, masked-picture latent). */
  get unetInChannels(): number {
    const c = this.unetInputs.sample.shape[1];
    return typeof c === "number" && c > 0 ? c : this.config.latentChannels;
  }

  /** Calls and milliseconds inside ONNX Runtime's run() for one of this model's sessions. */
  ortRunStats(session: "unet" | "text_encoder" | "vae_decoder"): { runs: number; ms: number } {
    const st = this.worker.runStats.get(session);
    return { runs: st?.runs ?? 0, ms: st?.ms ?? 0 };
  }

  /** Width of the pooled text vector an SDXL UNet takes (text_embeds); undefined for SD1/2. */
  get pooledSize(): number | undefined {
    return this.textEncoder.pooledSize;
  }

  /**
   * Values per row of an SDXL UNet's time_ids: 6 for SDXL base (sizes and crop), 5 for the SDXL refiner
   * (original size, crop and an aesthetic score); undefined for SD1/2.
   */
  get timeIdsSize(): number | undefined {
    const ids = this.unetInputs.timeIds;
    if (ids === undefined) return undefined;
    const declared = ids.shape[1];
    return typeof declared === "number" && declared > 0 ? declared : 6;
  }

  /**
   * eps (or v) prediction for a batch: sample [n,Cin,h,w], timesteps [n] (fractional), context
   * [n,seq,dim], and for SDXL the added conditions.
   */
  async unet(
    sample: Float32Array,
    timesteps: Float32Array,
    context: Float32Array,
    dims: UnetDims,
    signal?: AbortSignal,
    added?: AddedConditions,
  ): Promise<Float32Array> {
    const u = this.unetInputs;
    const c = sample.length / (dims.n * dims.h * dims.w);
    let t: WireTensor;
    if (u.timestep.type === "int64") {
      // An integer-timestep export cannot express A1111's fractional t; round as such exports expect.
      t = { type: "int64", dims: [dims.n], data: BigInt64Array.from(timesteps, (v) => BigInt(Math.round(v))) };
    } else {
      t = floatTensor(u.timestep, timesteps, u.timestep.shape.length === 0 ? [] : [dims.n], this.halfFeed(u.timestep, timesteps.length));
    }
    const feeds = {
      [u.sample.name]: floatTensor(u.sample, sample, [dims.n, c, dims.h, dims.w], this.halfFeed(u.sample, sample.length)),
      [u.timestep.name]: t,
      [u.context.name]: this.contextFeed(context, dims),
    };
    if (u.textEmbeds !== undefined && u.timeIds !== undefined) {
      if (added === undefined) throw new FarmError(grpc.status.INTERNAL, "an SDXL UNet call without its added conditions");
      const pooled = added.textEmbeds.length / dims.n;
      // Small (a few KB per row): converted afresh, never kept, so a transferred feed costs nothing later.
      feeds[u.textEmbeds.name] = floatTensor(u.textEmbeds, added.textEmbeds, [dims.n, pooled]);
      feeds[u.timeIds.name] = floatTensor(u.timeIds, added.timeIds, [dims.n, added.timeIds.length / dims.n]);
    }
    const owner = !this.unetInFlight;
    this.unetInFlight = true;
    try {
      const out = await this.worker.run("unet", feeds, [u.output], signal);
      return readFloats(out[u.output]!);
    } finally {
      if (owner) this.unetInFlight = false;
    }
  }

  private contextFeed(context: Float32Array, dims: UnetDims): WireTensor {
    const meta = this.unetInputs.context;
    const shape = [dims.n, dims.seq, dims.dim];
    const kept = this.halfFeeds.get(meta.name);
    // An unchanged prompt's context was converted by an earlier call: 0.7 ms per call at SD1.5 with CFG.
    if (
      meta.type === "float16" &&
      !this.unetInFlight &&
      dims.contextUnchanged === true &&
      this.halfContextSource === context &&
      kept?.length === context.length
    ) {
      return { type: "float16", dims: shape, data: kept };
    }
    if (!this.unetInFlight) this.halfContextSource = meta.type === "float16" ? context : undefined;
    return floatTensor(meta, context, shape, this.halfFeed(meta, context.length));
  }

  /** latent [1,C,h,w] (already divided by the scaling factor) → image [1,3,8h,8w] in [-1,1]. */
  async vaeDecode(latent: Float32Array, h: number, w: number, signal?: AbortSignal): Promise<Float32Array> {
    const info = this.sessions.vae_decoder;
    const input = inputOf(info, ["latent_sample"], "vae_decoder");
    const outName = info.outputs[0]?.name ?? "sample";
    const out = await this.worker.run(
      "vae_decoder",
      { [input.name]: floatTensor(input, latent, [1, this.config.latentChannels, h, w]) },
      [outName],
      signal,
    );
    return readFloats(out[outName]!);
  }

  private vaeEncoderInfo: Promise<SessionInfo> | undefined;
  private readonly auxiliary: AuxiliarySessions;

  /**
   * image [1,3,height,width] in [-1,1] → the posterior mean [1,C,h,w] (h, w from the encoder's output,
   * ⌊size/8⌋ for any size), not yet multiplied by the scaling factor. The encoder loads on first use,
   * so txt2img-only agents never pay for it.
   */
  async vaeEncode(
    image: Float32Array,
    height: number,
    width: number,
    signal?: AbortSignal,
  ): Promise<{ latent: Float32Array; h: number; w: number }> {
    const path = join(this.vaeDir, "vae_encoder", "model.onnx");
    if (this.vaeEncoderInfo === undefined) {
      if (!existsSync(path)) {
        // A VAE file without an encoder (sd_vae) is the VAE's fault, not the model's.
        const ownVae = this.vaeDir === this.entry.path;
        throw new FarmError(
          grpc.status.FAILED_PRECONDITION,
          ownVae
            ? `model "${this.entry.name}" lacks vae_encoder/ (needed for img2img and hires upscalers)`
            : "the VAE file this job decodes with has no encoder (needed for img2img and hires upscalers): pick another VAE",
          { field: ownVae ? "model" : "override_settings.sd_vae" },
        );
      }
      this.vaeEncoderInfo = convGraph(this.vaeDir, "vae_encoder", this.circular !== undefined, this.circular?.scratchDir).then((graph) =>
        this.worker.load("vae_encoder", graph, signal),
      );
      this.vaeEncoderInfo.catch(() => (this.vaeEncoderInfo = undefined));
    }
    const info = await this.vaeEncoderInfo;
    const input = inputOf(info, ["sample"], "vae_encoder");
    const outName = info.outputs.find((o) => o.name === "latent_sample")?.name ?? info.outputs[0]?.name ?? "latent_sample";
    const out = await this.worker.run("vae_encoder", { [input.name]: floatTensor(input, image, [1, 3, height, width]) }, [outName], signal);
    const t = out[outName]!;
    return { latent: readFloats(t), h: t.dims[2] ?? 0, w: t.dims[3] ?? 0 };
  }

  /**
   * Loads an auxiliary ONNX model (upscaler, face detector, face restorer) into this pipeline's worker,
   * once per path, so it runs on the same execution provider without blocking the event loop.
   */
  loadAuxiliary(path: string, signal?: AbortSignal): Promise<SessionInfo> {
    return this.auxiliary.loadAuxiliary(path, signal);
  }

  /** Runs a session loaded with loadAuxiliary; feeds are transferred like unet()'s. */
  runAuxiliary(
    path: string,
    feeds: Record<string, WireTensor>,
    outputs: string[],
    signal?: AbortSignal,
  ): Promise<Record<string, WireTensor>> {
    return this.auxiliary.runAuxiliary(path, feeds, outputs, signal);
  }

  close(): Promise<void> {
    return this.worker.close();
  }
}

async function readConfig(dir: string): Promise<SdModelConfig> {
  const json = async (p: string): Promise<Record<string, unknown>> => {
    try {
      return JSON.parse(await readFile(join(dir, p), "utf8")) as Record<string, unknown>;
    } catch {
      return {};
    }
  };
  const vae = await json("vae_decoder/config.json");
  const tiny = await json("tiny_config.json");
  const sched = await json("scheduler/scheduler_config.json");
  const scaling = Number(vae["scaling_factor"] ?? tiny["scaling_factor"] ?? 0.18215);
  return {
    scalingFactor: scaling,
    predictionType: sched["prediction_type"] === "v_prediction" ? "v_prediction" : "epsilon",
    latentChannels: Number(tiny["latent_channels"] ?? vae["latent_channels"] ?? 4),
  };
}

/**
 * CLIP text encoder over ONNX Runtime. CLIP skip takes hidden_states.(L+1-skip) through the final
 * LayerNorm, as A1111 does. Exported graphs keep that LayerNorm inside, so its affine parameters are
 * recovered once at load time: last_hidden_state = norm(hidden_states.L)·γ + β is linear per channel,
 * and a least-squares fit over one encoded batch gives γ and β to float precision.
 */
class OnnxTextEncoder implements TextEncoder {
  private constructor(
    private readonly worker: OrtSessions,
    private readonly session: string,
    private readonly idsType: TensorType,
    private readonly idsName: string,
    readonly hiddenSize: number,
    private readonly layers: number,
    private readonly lastName: string,
    private readonly gamma: Float32Array | undefined,
    private readonly beta: Float32Array | undefined,
    /** The token-embedding table's type when the graph takes token overrides. */
    private readonly overrideType: "float32" | "float16" | undefined,
    /** SDXL's second encoder: its pooled and projected output (text_embeds) and that output's width. */
    readonly pooledOutput: { name: string; size: number } | undefined,
  ) {}

  /** Transformer layers: the largest hidden_states.N output (0 without them). */
  get layerCount(): number {
    return this.layers;
  }

  get acceptsTokenOverrides(): boolean {
    return this.overrideType !== undefined;
  }

  get maxClipSkip(): number {
    return this.gamma ? this.layers : 1;
  }

  /**
   * `calibrate` false skips fitting the final LayerNorm (one encoder run at load): SDXL's encoders take
   * hidden states without it, so only SD1/SD2's CLIP skip needs the fit.
   */
  static async create(
    worker: OrtSessions,
    session: string,
    info: SessionInfo,
    signal?: AbortSignal,
    calibrate = true,
  ): Promise<OnnxTextEncoder> {
    const ids = inputOf(info, ["input_ids"], session);
    const idsType: TensorType = ids.type === "int64" ? "int64" : "int32";
    const last = info.outputs.find((o) => o.name === "last_hidden_state") ?? info.outputs[0];
    if (!last) throw new FarmError(grpc.status.FAILED_PRECONDITION, `${session} has no outputs`);
    const embeds = info.outputs.find((o) => o.name === "text_embeds");
    const pooledOutput = embeds === undefined ? undefined : { name: embeds.name, size: Number(embeds.shape[embeds.shape.length - 1]) };
    const hiddenSize = Number(last.shape[last.shape.length - 1]);
    const hs = info.outputs
      .map((o) => /^hidden_states\.(\d+)$/.exec(o.name))
      .filter((m) => m !== null)
      .map((m) => Number(m[1]));
    const layers = hs.length > 0 ? Math.max(...hs) : 0;
    const vectors = info.inputs.find((i) => i.name === TOKEN_OVERRIDE_VECTORS);
    const overrideType = vectors === undefined ? undefined : vectors.type === "float16" ? "float16" : "float32";
    const make = (gamma?: Float32Array, beta?: Float32Array) =>
      new OnnxTextEncoder(worker, session, idsType, ids.name, hiddenSize, layers, last.name, gamma, beta, overrideType, pooledOutput);
    const base = make();
    if (!calibrate || layers < 2 || !Number.isFinite(hiddenSize)) return base;
    // Calibrate the final LayerNorm on a batch of varied ids. Any byte-level BPE vocabulary has the
    // 256 byte tokens, so ids below 256 exist in every CLIP model, tiny test models included.
    const calib = new Int32Array(77);
    for (let i = 0; i < 77; i++) calib[i] = (i * 37 + 11) % 256;
    const out = await base.runRaw(calib, 1, [last.name, `hidden_states.${layers}`], signal);
    const { gamma, beta } = fitLayerNormAffine(out[`hidden_states.${layers}`]!, out[last.name]!, hiddenSize);
    return make(gamma, beta);
  }

  async runRaw(
    batch: Int32Array,
    n: number,
    outputs: string[],
    signal?: AbortSignal,
    overrides?: TokenOverrides,
  ): Promise<Record<string, Float32Array>> {
    const data = this.idsType === "int64" ? BigInt64Array.from(batch, (v) => BigInt(v)) : own(batch.slice());
    const feeds: Record<string, WireTensor> = { [this.idsName]: { type: this.idsType, dims: [n, batch.length / n], data } };
    if (this.overrideType !== undefined) {
      const count = overrides?.rows.length ?? 0;
      const at = new BigInt64Array(count * 2);
      for (let i = 0; i < count; i++) {
        at[2 * i] = BigInt(overrides!.rows[i]!);
        at[2 * i + 1] = BigInt(overrides!.positions[i]!);
      }
      const vectors = overrides?.vectors ?? new Float32Array(0);
      feeds[TOKEN_OVERRIDE_POSITIONS] = { type: "int64", dims: [count, 2], data: at };
      feeds[TOKEN_OVERRIDE_VECTORS] =
        this.overrideType === "float16"
          ? { type: "float16", dims: [count, this.hiddenSize], data: f32ToF16(vectors) }
          : { type: "float32", dims: [count, this.hiddenSize], data: own(vectors.slice()) };
    } else if (overrides !== undefined && overrides.rows.length > 0) {
      throw new FarmError(
        grpc.status.FAILED_PRECONDITION,
        "this text encoder was loaded without token overrides (textual-inversion embeddings)",
      );
    }
    const res = await this.worker.run(this.session, feeds, outputs, signal);
    const out: Record<string, Float32Array> = {};
    for (const o of outputs) out[o] = readFloats(res[o]!);
    return out;
  }

  async encode(batch: Int32Array, n: number, clipSkip: number, signal?: AbortSignal, overrides?: TokenOverrides): Promise<Float32Array> {
    if (clipSkip <= 1) return (await this.runRaw(batch, n, [this.lastName], signal, overrides))[this.lastName]!;
    if (!this.gamma || !this.beta || clipSkip > this.layers) {
      throw new FarmError(
        grpc.status.FAILED_PRECONDITION,
        this.gamma
          ? `clip_skip ${clipSkip} exceeds the text encoder's ${this.layers} layers`
          : "clip_skip > 1 needs a text encoder that exports hidden_states.N outputs, and this model's does not",
        { field: "clip_skip" },
      );
    }
    const name = `hidden_states.${this.layers + 1 - clipSkip}`;
    const h = (await this.runRaw(batch, n, [name], signal, overrides))[name]!;
    return layerNorm(h, this.hiddenSize, this.gamma, this.beta);
  }
}

/**
 * SDXL's two text encoders as one: each token vector is CLIP-L's hidden_states[-clipSkip] followed by
 * OpenCLIP-G's penultimate hidden state (no final LayerNorm on either), and the pooled vector is G's
 * text_embeds. A1111's SDXL takes CLIP-L's penultimate layer unless sdxl_clip_l_skip is on, so callers
 * pass 2 then (see conditioningFor). G's ids have every position after the first end-of-text set to 0,
 * A1111's id_pad for OpenCLIP.
 */
/**
 * SDXL's conditioning text encoder: CLIP-L's hidden states beside OpenCLIP-G's, and G's pooled vector;
 * or, for the SDXL refiner (no `l`), G's alone. CLIP skip selects CLIP-L's layer; G always gives its
 * penultimate layer, as A1111's FrozenOpenCLIPEmbedder2 does, so the refiner takes no CLIP skip.
 */
class SdxlTextEncoder implements TextEncoder {
  readonly hiddenSize: number;
  readonly parts: readonly number[];
  readonly pooledSize: number;

  private constructor(
    private readonly l: OnnxTextEncoder | undefined,
    private readonly g: OnnxTextEncoder,
    private readonly pooledName: string,
    pooledSize: number,
  ) {
    this.hiddenSize = (l?.hiddenSize ?? 0) + g.hiddenSize;
    this.parts = l === undefined ? [g.hiddenSize] : [l.hiddenSize, g.hiddenSize];
    this.pooledSize = pooledSize;
  }

  static create(l: OnnxTextEncoder | undefined, g: OnnxTextEncoder): SdxlTextEncoder {
    const pooled = g.pooledOutput;
    if ((l !== undefined && l.layerCount < 2) || g.layerCount < 2 || pooled === undefined || !(pooled.size > 0)) {
      throw new FarmError(
        grpc.status.FAILED_PRECONDITION,
        "an SDXL pipeline needs text encoders with hidden_states.N outputs and a text_embeds output on text_encoder_2",
        { field: "model" },
      );
    }
    return new SdxlTextEncoder(l, g, pooled.name, pooled.size);
  }

  /** hidden_states[-N] exists for N up to CLIP-L's layers + 1 (the embeddings); the refiner ignores it. */
  get maxClipSkip(): number {
    return this.l === undefined ? Number.MAX_SAFE_INTEGER : this.l.layerCount + 1;
  }

  get acceptsTokenOverrides(): boolean {
    return (this.l?.acceptsTokenOverrides ?? true) && this.g.acceptsTokenOverrides;
  }

  async encode(batch: Int32Array, n: number, clipSkip: number, signal?: AbortSignal, overrides?: TokenOverrides): Promise<Float32Array> {
    return (await this.run(batch, n, clipSkip, false, signal, overrides)).hidden;
  }

  encodePooled(
    batch: Int32Array,
    n: number,
    clipSkip: number,
    signal?: AbortSignal,
    overrides?: TokenOverrides,
  ): Promise<{ hidden: Float32Array; pooled: Float32Array }> {
    return this.run(batch, n, clipSkip, true, signal, overrides);
  }

  private async run(
    batch: Int32Array,
    n: number,
    clipSkip: number,
    withPooled: boolean,
    signal?: AbortSignal,
    overrides?: TokenOverrides,
  ): Promise<{ hidden: Float32Array; pooled: Float32Array }> {
    if (!Number.isInteger(clipSkip) || clipSkip < 1 || clipSkip > this.maxClipSkip) {
      throw new FarmError(grpc.status.FAILED_PRECONDITION, `clip skip ${clipSkip} is outside CLIP-L's 1..${this.maxClipSkip}`, {
        field: "clip_skip",
      });
    }
    const gName = `hidden_states.${this.g.layerCount - 1}`;
    const gIds = paddedAfterEnd(batch, n);
    const gOutputs = withPooled ? [gName, this.pooledName] : [gName];
    if (this.l === undefined) {
      const out = await this.g.runRaw(gIds, n, gOutputs, signal, overrides);
      return { hidden: out[gName]!, pooled: withPooled ? out[this.pooledName]! : new Float32Array(0) };
    }
    const [dl, dg] = this.parts as [number, number];
    const split = overrides === undefined ? undefined : splitOverrides(overrides, dl, dg);
    const lName = `hidden_states.${this.l.layerCount + 1 - clipSkip}`;
    const [lOut, gOut] = await Promise.all([
      this.l.runRaw(batch, n, [lName], signal, split?.[0]),
      this.g.runRaw(gIds, n, gOutputs, signal, split?.[1]),
    ]);
    const zl = lOut[lName]!;
    const zg = gOut[gName]!;
    const vectors = batch.length;
    const hidden = new Float32Array(vectors * this.hiddenSize);
    for (let v = 0; v < vectors; v++) {
      hidden.set(zl.subarray(v * dl, (v + 1) * dl), v * this.hiddenSize);
      hidden.set(zg.subarray(v * dg, (v + 1) * dg), v * this.hiddenSize + dl);
    }
    return { hidden, pooled: withPooled ? gOut[this.pooledName]! : new Float32Array(0) };
  }
}

/**
 * Each row's ids with every position after its first end-of-text token set to 0. End-of-text is CLIP's
 * largest id, and A1111's prompts have one in every row, so the row's first maximum is it.
 */
function paddedAfterEnd(batch: Int32Array, n: number): Int32Array {
  const out = batch.slice();
  const len = batch.length / n;
  for (let r = 0; r < n; r++) {
    const row = out.subarray(r * len, (r + 1) * len);
    let end = 0;
    for (let i = 1; i < len; i++) if (row[i]! > row[end]!) end = i;
    row.fill(0, end + 1);
  }
  return out;
}

/** An SDXL embedding's vectors are CLIP-L's followed by G's: each encoder gets its own share. */
function splitOverrides(o: TokenOverrides, dl: number, dg: number): [TokenOverrides, TokenOverrides] {
  const count = o.rows.length;
  const l = new Float32Array(count * dl);
  const g = new Float32Array(count * dg);
  for (let i = 0; i < count; i++) {
    l.set(o.vectors.subarray(i * (dl + dg), i * (dl + dg) + dl), i * dl);
    g.set(o.vectors.subarray(i * (dl + dg) + dl, (i + 1) * (dl + dg)), i * dg);
  }
  return [
    { rows: o.rows, positions: o.positions, vectors: l },
    { rows: o.rows, positions: o.positions, vectors: g },
  ];
}

function normalizeRows(x: Float32Array, d: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < x.length / d; r++) {
    let mean = 0;
    for (let j = 0; j < d; j++) mean += x[r * d + j]!;
    mean /= d;
    let v = 0;
    for (let j = 0; j < d; j++) v += (x[r * d + j]! - mean) ** 2;
    const inv = 1 / Math.sqrt(v / d + CLIP_LAYER_NORM_EPS);
    for (let j = 0; j < d; j++) out[r * d + j] = (x[r * d + j]! - mean) * inv;
  }
  return out;
}

export function layerNorm(x: Float32Array, d: number, gamma: Float32Array, beta: Float32Array): Float32Array {
  const n = normalizeRows(x, d);
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = n[i]! * gamma[i % d]! + beta[i % d]!;
  return out;
}

export function fitLayerNormAffine(h: Float32Array, y: Float32Array, d: number): { gamma: Float32Array; beta: Float32Array } {
  const n = normalizeRows(h, d);
  const rows = h.length / d;
  const gamma = new Float32Array(d);
  const beta = new Float32Array(d);
  for (let j = 0; j < d; j++) {
    let sx = 0,
      sy = 0,
      sxx = 0,
      sxy = 0;
    for (let r = 0; r < rows; r++) {
      const xv = n[r * d + j]!;
      const yv = y[r * d + j]!;
      sx += xv;
      sy += yv;
      sxx += xv * xv;
      sxy += xv * yv;
    }
    const g = (rows * sxy - sx * sy) / (rows * sxx - sx * sx);
    gamma[j] = g;
    beta[j] = (sy - g * sx) / rows;
  }
  return { gamma, beta };
}
