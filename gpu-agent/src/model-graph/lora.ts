// LoRA / LyCORIS merging into checkpoint weights (a1111-behaviour.md §6, onnx-notes.md §D.2).
// A LoRA file is parsed into per-layer modules, each mapped onto the LDM checkpoint key it modifies;
// `loraTransform` then adds ΔW·scale·multiplier to those weights while a model is being written, so the
// base checkpoint is never modified.

import { readFile } from "node:fs/promises";
import * as ort from "onnxruntime-node";
import { basename } from "node:path";
import { detectArchitecture } from "./architecture.js";
import type { Architecture } from "./architecture.js";
import { ModelFileError, invalidArgument } from "./errors.js";
import { GraphBuilder, encodeModel } from "./onnx.js";
import { importCheckpoint, sha256File } from "./pipeline.js";
import type { ImportOptions, ImportedCheckpoint } from "./pipeline.js";
import { readSafetensors, type SafetensorsDType } from "./safetensors.js";
import { readTorchFile, TorchTensor, type TorchFloatType } from "./torch-file.js";
import { SafetensorsWeights } from "./weights.js";
import type { WeightTransform } from "./weights.js";

interface Mat {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/**
 * A1111's network module types (extensions-builtin/Lora/network_*.py): LoRA/LoCon, LoHa, LoKr, IA³,
 * "full" (a stored ΔW, `diff`), "norm" (LayerNorm/GroupNorm ΔW, `w_norm`), GLoRA, OFT (kohya's
 * `oft_blocks`, LyCORIS's `oft_diag`: block-diagonal rotations of the output rows); and "bias", the
 * ΔW of a layer's bias that full and norm modules carry (`diff_b`, `b_norm`).
 */
type ModuleKind = "lora" | "loha" | "lokr" | "ia3" | "full" | "norm" | "glora" | "oft" | "bias";

/** Kinds whose ΔW is a function of the weight it changes (A1111 passes calc_updown the current weight). */
const READS_WEIGHT: ReadonlySet<ModuleKind> = new Set(["ia3", "glora", "oft"]);

/** One layer's adapter, already mapped onto the checkpoint. */
export interface LoraModule {
  /** The layer key as written in the file, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`. */
  readonly layer: string;
  /** The checkpoint weight it changes, e.g. `model.diffusion_model.input_blocks.1.1.proj_in.weight`. */
  readonly target: string;
  /** For OpenCLIP's fused q/k/v projection: the delta goes into rows [rowOffset, rowOffset + rows). */
  readonly rowOffset: number;
  readonly isText: boolean;
  readonly kind: ModuleKind;
  readonly scale: number;
  readonly parts: Readonly<Record<string, Mat>>;
}

export interface ParsedLora {
  readonly path: string;
  readonly modules: readonly LoraModule[];
  /** Layers that match nothing in the model, or use unsupported parts; A1111 ignores these too. */
  readonly warnings: readonly string[];
  readonly metadata: Readonly<Record<string, string>>;
}

// ---- names -----------------------------------------------------------------------------------------

const RESNET_SUFFIX: Record<string, string> = {
  conv1: "in_layers_2",
  conv2: "out_layers_3",
  norm1: "in_layers_0",
  norm2: "out_layers_0",
  time_emb_proj: "emb_layers_1",
  conv_shortcut: "skip_connection",
};

function resnetSuffix(s: string): string {
  return RESNET_SUFFIX[s] ?? s;
}

/** kohya's text-encoder MLP and attention names → OpenCLIP's (`mlp.c_fc`, `mlp.c_proj`, `attn.*`). */
function openClipSuffix(s: string): string {
  return s
    .replace(/^mlp_fc1$/, "mlp_c_fc")
    .replace(/^mlp_fc2$/, "mlp_c_proj")
    .replace(/^self_attn_/, "attn_");
}

/**
 * kohya/diffusers layer name → the A1111 "compvis" module name (checkpoint module path minus `model.` or
 * `cond_stage_model.`, or with `conditioner.embedders.N.` as `N_` for SDXL; dots as underscores).
 * Candidates are tried in order, like A1111's fallbacks.
 */
export function compvisCandidates(layer: string, arch: Pick<Architecture, "unet" | "textEncoder" | "textEncoder2">): string[] {
  const out: string[] = [];
  const per = arch.unet.layersPerBlock + 1;
  const levels = arch.unet.levelChannels.length;
  let m: RegExpExecArray | null;
  if ((m = /^lora_unet_conv_in(.*)$/.exec(layer))) out.push(`diffusion_model_input_blocks_0_0${m[1]}`);
  else if ((m = /^lora_unet_conv_out(.*)$/.exec(layer))) out.push(`diffusion_model_out_2${m[1]}`);
  else if ((m = /^lora_unet_conv_norm_out(.*)$/.exec(layer))) out.push(`diffusion_model_out_0${m[1]}`);
  else if ((m = /^lora_unet_time_embedding_linear_(\d+)(.*)$/.exec(layer)))
    out.push(`diffusion_model_time_embed_${2 * Number(m[1]) - 2}${m[2]}`);
  else if ((m = /^lora_unet_add_embedding_linear_(\d+)(.*)$/.exec(layer)))
    out.push(`diffusion_model_label_emb_0_${2 * Number(m[1]) - 2}${m[2]}`);
  else if ((m = /^lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$/.exec(layer))) {
    const attn = m[2] === "attentions";
    const s = attn ? m[4]! : resnetSuffix(m[4]!);
    out.push(`diffusion_model_input_blocks_${1 + per * Number(m[1]) + Number(m[3])}_${attn ? 1 : 0}_${s}`);
  } else if ((m = /^lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)$/.exec(layer))) {
    const attn = m[1] === "attentions";
    out.push(`diffusion_model_middle_block_${attn ? 1 : 2 * Number(m[2])}_${attn ? m[3]! : resnetSuffix(m[3]!)}`);
  } else if ((m = /^lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$/.exec(layer))) {
    const attn = m[2] === "attentions";
    out.push(`diffusion_model_output_blocks_${per * Number(m[1]) + Number(m[3])}_${attn ? 1 : 0}_${attn ? m[4]! : resnetSuffix(m[4]!)}`);
  } else if ((m = /^lora_unet_down_blocks_(\d+)_downsamplers_0_conv$/.exec(layer))) {
    out.push(`diffusion_model_input_blocks_${per * (Number(m[1]) + 1)}_0_op`);
  } else if ((m = /^lora_unet_up_blocks_(\d+)_upsamplers_0_conv$/.exec(layer))) {
    const i = Number(m[1]);
    const level = levels - 1 - i;
    out.push(`diffusion_model_output_blocks_${per * i + per - 1}_${arch.unet.attentionLevels[level] ? 2 : 1}_conv`);
  }
  if ((m = /^lora_unet_(.+)$/.exec(layer))) out.push(`diffusion_model_${m[1]}`);
  if (arch.textEncoder2 !== undefined || arch.textEncoder === undefined) {
    // SDXL, as A1111 maps it: te1 is CLIP-L under embedder 0, te2 OpenCLIP-G under embedder 1 (lora_te_ matches nothing).
    // A1111 maps the refiner's text layers the same way, so they match nothing there: its embedder 0 is OpenCLIP-G.
    if ((m = /^lora_te1_text_model_(.+)$/.exec(layer))) out.push(`0_transformer_text_model_${m[1]}`);
    if ((m = /^lora_te2_text_model_encoder_layers_(\d+)_(.+)$/.exec(layer)))
      out.push(`1_model_transformer_resblocks_${m[1]}_${openClipSuffix(m[2]!)}`);
    return out;
  }
  if ((m = /^lora_te1?_text_model_(.+)$/.exec(layer))) {
    // Checkpoints from old transformers versions lack the text_model level.
    if (arch.textEncoder.layout === "hf-clip") out.push(`transformer_text_model_${m[1]}`, `transformer_${m[1]}`);
    else {
      const t = /^encoder_layers_(\d+)_(.+)$/.exec(m[1]!);
      if (t) out.push(`model_transformer_resblocks_${t[1]}_${openClipSuffix(t[2]!)}`);
    }
  }
  if ((m = /^lora_te_(.+)$/.exec(layer)) && !layer.startsWith("lora_te_text_model_")) out.push(m[1]!);
  return out;
}

/** Module paths of the checkpoint in A1111's underscore form → their weight key. */
export function moduleIndex(keys: Iterable<string>): Map<string, string> {
  const idx = new Map<string, string>();
  for (const k of keys) {
    let module: string;
    if (k.endsWith(".weight")) module = k.slice(0, -".weight".length);
    else if (k.endsWith(".in_proj_weight")) module = k.slice(0, -".in_proj_weight".length);
    else continue;
    const embedder = /^conditioner\.embedders\.(\d+)\.(.+)$/.exec(module);
    const stripped = module.startsWith("model.")
      ? module.slice(6)
      : module.startsWith("cond_stage_model.")
        ? module.slice(17)
        : embedder
          ? `${embedder[1]}.${embedder[2]}`
          : undefined;
    if (stripped !== undefined) idx.set(stripped.replaceAll(".", "_"), k);
  }
  return idx;
}

/** diffusers/PEFT key → (kohya-style layer, part), or undefined for keys that are not adapter weights. */
function splitKey(key: string): { layer: string; part: string } | undefined {
  const peft = /^(.*)\.(lora_A|lora_B)(?:\.default)?\.weight$/.exec(key);
  if (peft) {
    let layer = peft[1]!.replace(/^base_model\.model\./, "");
    layer = layer
      .replace(/^unet\./, "lora_unet_")
      .replace(/^text_encoder_2\./, "lora_te2_")
      .replace(/^text_encoder\./, "lora_te1_");
    return { layer: layer.replaceAll(".", "_"), part: peft[2] === "lora_A" ? "lora_down.weight" : "lora_up.weight" };
  }
  const dot = key.indexOf(".");
  if (dot < 0) return undefined;
  return { layer: key.slice(0, dot), part: key.slice(dot + 1) };
}

// ---- parsing ---------------------------------------------------------------------------------------

/** What loadLora reads of a LoRA file: its tensors' names, dtypes and shapes, their values, its metadata. */
interface LoraTensors {
  keys(): string[];
  info(key: string): { dtype: string; shape: readonly number[] };
  float32(key: string): Promise<Float32Array>;
  readonly metadata: Readonly<Record<string, string>>;
  close(): Promise<void>;
}

const TORCH_DTYPES: Record<TorchFloatType, SafetensorsDType> = { float32: "F32", float16: "F16", bfloat16: "BF16", float64: "F64" };

/** Whether A1111 reads a LoRA file as safetensors (by its extension); .pt and .ckpt files are torch.save archives. */
export function isSafetensorsLora(path: string): boolean {
  return path.toLowerCase().endsWith(".safetensors");
}

/**
 * A .pt or .ckpt LoRA: a torch.save'd dict of tensors, as kohya's scripts and older trainers wrote them.
 * It is read whole (LoRA files are small) and unpickled without running anything (torch-file.ts).
 */
async function readTorchLora(path: string): Promise<LoraTensors> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") throw ModelFileError.fileNotFound(path, "no such file", err);
    throw ModelFileError.invalidFile(path, `cannot read: ${(err as Error).message}`, err);
  }
  const value = readTorchFile(bytes, path);
  if (!(value instanceof Map)) throw ModelFileError.invalidFile(path, "a torch LoRA file must hold a dict of tensors");
  const tensors = new Map<string, TorchTensor>();
  for (const [k, v] of value as Map<unknown, unknown>) if (typeof k === "string" && v instanceof TorchTensor) tensors.set(k, v);
  const get = (key: string): TorchTensor => tensors.get(key)!;
  return {
    keys: () => [...tensors.keys()],
    info: (key) => ({ dtype: TORCH_DTYPES[get(key).dtype], shape: get(key).shape }),
    float32: (key) => Promise.resolve(get(key).data),
    metadata: {},
    close: () => Promise.resolve(),
  };
}

function openLora(path: string): Promise<LoraTensors> {
  return isSafetensorsLora(path) ? readSafetensors(path) : readTorchLora(path);
}

/** The prefix of the tensors in which a LoRA file carries textual-inversion embeddings (A1111 1.7's "bundle_emb"). */
export const BUNDLED_EMBEDDING_PREFIX = "bundle_emb.";

/**
 * The tensors of a LoRA file whose keys start with `bundle_emb.`, in the file's key order, as float32 with
 * their shapes. Most LoRAs have none; then only the file's header (or torch archive) is read.
 */
export async function readLoraBundleTensors(path: string): Promise<Array<[string, { shape: readonly number[]; data: Float32Array }]>> {
  const file = await openLora(path);
  try {
    const out: Array<[string, { shape: readonly number[]; data: Float32Array }]> = [];
    for (const key of file.keys()) {
      if (!key.startsWith(BUNDLED_EMBEDDING_PREFIX)) continue;
      out.push([key, { shape: file.info(key).shape, data: await file.float32(key) }]);
    }
    return out;
  } finally {
    await file.close();
  }
}

/**
 * Reads a LoRA/LoHa/LoKr file (.safetensors, or a torch .pt/.ckpt) and maps its layers onto `checkpointKeys` (the base model's tensor
 * names and shapes). Factors that do not fit each other and unreadable files throw ModelFileError; layers that
 * match no layer of the model, or whose ΔW does not fit the layer they match, are warnings (and left out).
 */
export async function loadLora(
  path: string,
  arch: Pick<Architecture, "unet" | "textEncoder" | "textEncoder2">,
  checkpointShapes: ReadonlyMap<string, readonly number[]>,
): Promise<ParsedLora> {
  const file = await openLora(path);
  const bad = (msg: string): never => {
    throw ModelFileError.invalidFile(path, msg);
  };
  try {
    const groups = new Map<string, Map<string, string>>();
    const warnings: string[] = [];
    for (const key of file.keys()) {
      const s = splitKey(key);
      if (!s) {
        warnings.push(`ignored key ${key}`);
        continue;
      }
      if (s.layer === "bundle_emb" || key.startsWith(BUNDLED_EMBEDDING_PREFIX)) continue;
      let g = groups.get(s.layer);
      if (!g) groups.set(s.layer, (g = new Map()));
      g.set(s.part, key);
    }
    const index = moduleIndex(checkpointShapes.keys());
    const modules: LoraModule[] = [];
    for (const [layer, parts] of groups) {
      const kind: ModuleKind | undefined =
        parts.has("lora_up.weight") && parts.has("lora_down.weight")
          ? "lora"
          : parts.has("hada_w1_a") && parts.has("hada_w1_b") && parts.has("hada_w2_a") && parts.has("hada_w2_b")
            ? "loha"
            : (parts.has("lokr_w1") || (parts.has("lokr_w1_a") && parts.has("lokr_w1_b"))) &&
                (parts.has("lokr_w2") || (parts.has("lokr_w2_a") && parts.has("lokr_w2_b")))
              ? "lokr"
              : parts.has("weight") && parts.has("on_input")
                ? "ia3"
                : parts.has("diff")
                  ? "full"
                  : parts.has("w_norm") && parts.has("b_norm")
                    ? "norm"
                    : ["a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight"].every((x) => parts.has(x))
                      ? "glora"
                      : parts.has("oft_blocks") || parts.has("oft_diag")
                        ? "oft"
                        : undefined;
      if (!kind) {
        warnings.push(`layer ${layer}: unsupported parts ${[...parts.keys()].join(", ")}`);
        continue;
      }
      // Resolve the target module.
      let target: string | undefined;
      let rowOffset = 0;
      for (const cand of compvisCandidates(layer, arch)) {
        target = index.get(cand);
        if (target) break;
        // OpenCLIP's MultiheadAttention: q/k/v LoRAs land in slices of the fused in_proj weight.
        const qkv = /^(.*)_(q|k|v)_proj$/.exec(cand);
        if (qkv) {
          const fused = index.get(qkv[1]!);
          if (fused?.endsWith(".in_proj_weight")) {
            target = fused;
            rowOffset = { q: 0, k: 1, v: 2 }[qkv[2] as "q" | "k" | "v"] * (checkpointShapes.get(fused)![0]! / 3);
            break;
          }
        }
      }
      if (!target) {
        warnings.push(`layer ${layer} matches no layer of the model`);
        continue;
      }
      const tensors: Record<string, Mat> = {};
      for (const [part, key] of parts) {
        const info = file.info(key);
        // IA3's on_input is a flag, often saved as a bool tensor.
        const flag = part === "on_input" && ["BOOL", "U8", "I8", "I32", "I64"].includes(info.dtype);
        if (!flag && !["F32", "F16", "BF16", "F64"].includes(info.dtype))
          bad(`${key} has dtype ${info.dtype}; LoRA tensors must be floats`);
        tensors[part] = { shape: info.shape, data: await file.float32(key) };
      }
      const alpha = tensors.alpha?.data[0];
      const explicit = tensors.scale?.data[0];
      // A1111's other module types set no dim, so their alpha is not applied (calc_scale gives 1).
      let dim: number | undefined;
      if (kind === "lora") dim = tensors["lora_down.weight"]!.shape[0];
      else if (kind === "loha") dim = tensors.hada_w1_b!.shape[0];
      else if (kind === "lokr") dim = tensors.lokr_w1_b?.shape[0] ?? tensors.lokr_w2_b?.shape[0];
      if (READS_WEIGHT.has(kind) && (rowOffset > 0 || target.endsWith(".in_proj_weight"))) {
        warnings.push(`layer ${layer}: ${kind} on a fused q/k/v projection is not supported; layer skipped`);
        continue;
      }
      // OFT applies the multiplier inside its rotation and no scale at all (A1111's finalize_updown override).
      const scale = kind === "oft" ? 1 : (explicit ?? (alpha !== undefined && dim ? alpha / dim : 1));
      if (!Number.isFinite(scale)) bad(`layer ${layer} has a non-finite scale`);
      const mod: LoraModule = {
        layer,
        target,
        rowOffset,
        isText: target.startsWith("cond_stage_model.") || target.startsWith("conditioner."),
        kind,
        scale,
        parts: tensors,
      };
      // Validate shapes now, so that a broken file fails when it is loaded, not halfway through a build.
      const targetShape = checkpointShapes.get(target)!;
      const delta = deltaShape(path, mod, targetShape);
      if (!fits(mod, delta, targetShape)) {
        // A well-formed layer made for another model (an SDXL base LoRA on the refiner, whose layers share
        // names but not widths): A1111 catches the failed add, counts it under "Networks with errors"
        // and renders with the rest, so the layer is left out here too.
        warnings.push(
          `layer ${layer}: delta of shape ${JSON.stringify(delta)} does not fit ${target} ${JSON.stringify(targetShape)}; layer skipped`,
        );
        continue;
      }
      const dora = tensors.dora_scale;
      if (dora && (rowOffset > 0 || target.endsWith(".in_proj_weight") || targetShape.length < 2 || numel(dora.shape) !== targetShape[1])) {
        bad(`layer ${layer}: dora_scale of shape ${JSON.stringify(dora.shape)} does not match ${target} ${JSON.stringify(targetShape)}`);
      }
      modules.push(mod);
      // full and norm modules may change the layer's bias too: by that ΔW times the multiplier alone.
      const biasDelta = kind === "full" ? tensors.diff_b : kind === "norm" ? tensors.b_norm : undefined;
      if (biasDelta) {
        const biasKey = target.replace(/\.weight$/, ".bias");
        const biasShape = checkpointShapes.get(biasKey);
        if (biasKey === target || biasShape === undefined || numel(biasShape) !== numel(biasDelta.shape)) {
          warnings.push(`layer ${layer}: its bias delta fits no bias of ${target}; bias left out`);
        } else {
          modules.push({ ...mod, target: biasKey, kind: "bias", scale: 1, parts: { diff: biasDelta } });
        }
      }
    }
    return { path, modules, warnings, metadata: { ...file.metadata } };
  } finally {
    await file.close();
  }
}

// ---- delta math ------------------------------------------------------------------------------------

const numel = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

/** [m, k] · [k, n] with float64 accumulation, for small products. */
function matmulJs(a: Float32Array, b: Float32Array, m: number, k: number, n: number): Float32Array {
  const out = new Float32Array(m * n);
  const row = new Float64Array(n);
  for (let i = 0; i < m; i++) {
    row.fill(0);
    for (let p = 0; p < k; p++) {
      const av = a[i * k + p]!;
      if (av === 0) continue;
      const off = p * n;
      for (let j = 0; j < n; j++) row[j]! += av * b[off + j]!;
    }
    out.set(row, i * n);
  }
  return out;
}

let matmulSession: Promise<ort.InferenceSession> | undefined;

/** A one-node MatMul model, built once: ONNX Runtime's multithreaded GEMM is ~100× faster than a JS loop. */
function ortMatmul(): Promise<ort.InferenceSession> {
  matmulSession ??= (async () => {
    const g = new GraphBuilder("matmul");
    const a = g.input("a", "float32", ["m", "k"]);
    const b = g.input("b", "float32", ["k", "n"]);
    g.output(g.op1("MatMul", [a, b]), "c", "float32", ["m", "n"]);
    return ort.InferenceSession.create(encodeModel(g.toSpec()).toBytes());
  })();
  return matmulSession;
}

/** [m, k] · [k, n]. Large products (a LoRA on a 1280-wide layer) go through ONNX Runtime. */
async function matmul(a: Float32Array, b: Float32Array, m: number, k: number, n: number): Promise<Float32Array> {
  if (m * k * n < 1 << 18) return matmulJs(a, b, m, k, n);
  const s = await ortMatmul();
  const out = await s.run({ a: new ort.Tensor("float32", a, [m, k]), b: new ort.Tensor("float32", b, [k, n]) });
  return out.c!.data as Float32Array;
}

function asMatrix(file: string, t: Mat, rows: number | undefined, what: string): { data: Float32Array; rows: number; cols: number } {
  const r = rows ?? t.shape[0] ?? 1;
  const n = t.data.length;
  if (r <= 0 || n % r !== 0)
    throw ModelFileError.invalidFile(file, `${what} of shape ${JSON.stringify(t.shape)} cannot be a matrix with ${r} rows`);
  return { data: t.data, rows: r, cols: n / r };
}

/** kron of [a, b(, ka, kb)] and [c, d(, kc, kd)] → [a·c, b·d, ka·kc, kb·kd], with 2-D operands as 1×1 kernels. */
function kron(x: Mat, y: Mat): Mat {
  const [a, b, xa = 1, xb = 1] = x.shape as number[];
  const [c, d, ya = 1, yb = 1] = y.shape as number[];
  const [o0, o1, o2, o3] = [a! * c!, b! * d!, xa * ya, xb * yb];
  const out = new Float32Array(o0 * o1 * o2 * o3);
  for (let i = 0; i < a!; i++)
    for (let j = 0; j < b!; j++)
      for (let p = 0; p < xa; p++)
        for (let q = 0; q < xb; q++) {
          const xv = x.data[((i * b! + j) * xa + p) * xb + q]!;
          if (xv === 0) continue;
          for (let k = 0; k < c!; k++)
            for (let l = 0; l < d!; l++)
              for (let r = 0; r < ya; r++)
                for (let s = 0; s < yb; s++) {
                  const oi = (((i * c! + k) * o1 + (j * d! + l)) * o2 + (p * ya + r)) * o3 + (q * yb + s);
                  out[oi] = xv * y.data[((k * d! + l) * ya + r) * yb + s]!;
                }
        }
  const shape = x.shape.length > 2 || y.shape.length > 2 ? [o0, o1, o2, o3] : [o0, o1];
  return { shape, data: out };
}

function matrixDims(file: string, t: Mat, what: string): [number, number] {
  const r = t.shape[0] ?? 1;
  const n = numel(t.shape);
  if (r <= 0 || n % r !== 0 || n === 0) throw ModelFileError.invalidFile(file, `${what} has an unusable shape ${JSON.stringify(t.shape)}`);
  return [r, n / r];
}

/** The shape of ΔW implied by a module's factors, checking that they fit together (no arithmetic on data). */
export function deltaShape(file: string, mod: LoraModule, target?: readonly number[]): readonly number[] {
  const p = mod.parts;
  if (mod.kind === "full" || mod.kind === "bias") return p.diff!.shape;
  if (mod.kind === "norm") return p.w_norm!.shape;
  if (mod.kind === "oft") {
    if (target === undefined || (target.length !== 2 && target.length !== 4)) return [0];
    const { blocks, size } = oftBlocks(file, mod, target[0]!);
    if (blocks * size !== target[0]) return [0];
    return target;
  }
  if (mod.kind === "ia3" || mod.kind === "glora") {
    if (target === undefined || target.length !== 2) return [0];
    const [out, inCh] = target as [number, number];
    if (mod.kind === "ia3") {
      const n = numel(p.weight!.shape);
      if (n !== (p.on_input!.data[0] ? inCh : out)) {
        throw ModelFileError.invalidFile(
          file,
          `${mod.layer}: IA3 weight of ${n} values scales neither the ${out} outputs nor the ${inCh} inputs`,
        );
      }
      return target;
    }
    // ΔW = b2·b1 + W·a2·a1: b2 [out, r], b1 [r, in], a2 [in, s], a1 [s, in].
    const [b2r, b2c] = matrixDims(file, p["b2.weight"]!, `${mod.layer}.b2`);
    const [b1r, b1c] = matrixDims(file, p["b1.weight"]!, `${mod.layer}.b1`);
    const [a2r, a2c] = matrixDims(file, p["a2.weight"]!, `${mod.layer}.a2`);
    const [a1r, a1c] = matrixDims(file, p["a1.weight"]!, `${mod.layer}.a1`);
    if (b2r !== out || b2c !== b1r || b1c !== inCh || a2r !== inCh || a2c !== a1r || a1c !== inCh) {
      throw ModelFileError.invalidFile(file, `${mod.layer}: GLoRA factors do not make a ${out}x${inCh} delta`);
    }
    return target;
  }
  const spatial = (t: Mat): number[] => (t.shape.length === 4 ? [t.shape[2]!, t.shape[3]!] : []);
  if (mod.kind === "lora") {
    const up = p["lora_up.weight"]!;
    const down = p["lora_down.weight"]!;
    const [out, ur] = matrixDims(file, up, `${mod.layer}.lora_up`);
    const [rank, dcols] = matrixDims(file, down, `${mod.layer}.lora_down`);
    if (ur !== rank) throw ModelFileError.invalidFile(file, `${mod.layer}: lora_up has rank ${ur} but lora_down has ${rank}`);
    const mid = p["lora_mid.weight"];
    if (mid) {
      if (mid.shape.length !== 4 || mid.shape[0] !== rank || mid.shape[1] !== rank) {
        throw ModelFileError.invalidFile(file, `${mod.layer}: lora_mid shape ${JSON.stringify(mid.shape)} does not match rank ${rank}`);
      }
      return [out, dcols, mid.shape[2]!, mid.shape[3]!];
    }
    return down.shape.length === 4 ? [out, down.shape[1]!, ...spatial(down)] : [out, dcols];
  }
  if (mod.kind === "loha") {
    const half = (n: 1 | 2): readonly number[] => productShape(file, mod, `hada_w${n}_a`, `hada_w${n}_b`, `hada_t${n}`);
    const [x, y] = [half(1), half(2)];
    if (numel(x) !== numel(y) || x[0] !== y[0])
      throw ModelFileError.invalidFile(file, `${mod.layer}: LoHa factors have inconsistent shapes`);
    return x.length >= y.length ? x : y;
  }
  const factor = (full: string, fa: string, fb: string, core?: string): readonly number[] =>
    p[full] ? p[full].shape : productShape(file, mod, fa, fb, core);
  const x = factor("lokr_w1", "lokr_w1_a", "lokr_w1_b");
  const y = factor("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2");
  if (![2, 4].includes(x.length) || ![2, 4].includes(y.length) || x.some((d) => d < 1) || y.some((d) => d < 1)) {
    throw ModelFileError.invalidFile(file, `${mod.layer}: LoKr factors must be non-empty 2-D or 4-D tensors`);
  }
  const out = [x[0]! * y[0]!, x[1]! * y[1]!];
  if (x.length === 4 || y.length === 4) out.push((x[2] ?? 1) * (y[2] ?? 1), (x[3] ?? 1) * (y[3] ?? 1));
  return out;
}

/** Whether a module's ΔW can be added to its target (a third of a fused in_proj; a zero-padded conv_in). */
function fits(mod: LoraModule, delta: readonly number[], target: readonly number[]): boolean {
  const fused = mod.target.endsWith(".in_proj_weight");
  const rows = fused ? target[0]! / 3 : target[0]!;
  return numel(delta) === rows * numel(target.slice(1)) || isPaddable(delta, target);
}

/** A1111 pads a 4-channel conv_in delta with zeros for 9-channel inpainting UNets. */
function isPaddable(delta: readonly number[], target: readonly number[]): boolean {
  return (
    target.length === 4 &&
    delta.length === 4 &&
    delta[0] === target[0] &&
    delta[1]! < target[1]! &&
    delta[2] === target[2] &&
    delta[3] === target[3]
  );
}

/** ΔW of one module before scale and multiplier, with the shape its factors imply. */
export async function computeDelta(file: string, mod: LoraModule, weight?: Mat, multiplier = 1): Promise<Mat> {
  const p = mod.parts;
  if (mod.kind === "oft") {
    if (weight === undefined) throw ModelFileError.invalidFile(file, `${mod.layer}: OFT needs the layer's weight`);
    return oftDelta(file, mod, weight, multiplier);
  }
  if (mod.kind === "full" || mod.kind === "bias") return p.diff!;
  if (mod.kind === "norm") return p.w_norm!;
  if (mod.kind === "ia3" || mod.kind === "glora") {
    if (weight === undefined || weight.shape.length !== 2)
      throw ModelFileError.invalidFile(file, `${mod.layer}: ${mod.kind} needs a 2-D weight`);
    const [out, inCh] = weight.shape as [number, number];
    if (mod.kind === "ia3") {
      // W ⊙ w: per input column with on_input, else per output row.
      const w = p.weight!.data;
      const onInput = p.on_input!.data[0] !== 0;
      const data = new Float32Array(out * inCh);
      for (let r = 0; r < out; r++) for (let c = 0; c < inCh; c++) data[r * inCh + c] = weight.data[r * inCh + c]! * w[onInput ? c : r]!;
      return { shape: weight.shape, data };
    }
    const [b2, b1, a2, a1] = ["b2.weight", "b1.weight", "a2.weight", "a1.weight"].map((k) => p[k]!) as [Mat, Mat, Mat, Mat];
    const r = b1.data.length / inCh;
    const s = a1.data.length / inCh;
    const data = Float32Array.from(await matmul(b2.data, b1.data, out, r, inCh));
    const wa = await matmul(await matmul(weight.data, a2.data, out, inCh, s), a1.data, out, s, inCh);
    for (let i = 0; i < data.length; i++) data[i]! += wa[i]!;
    return { shape: weight.shape, data };
  }
  if (mod.kind === "lora") {
    const up = p["lora_up.weight"]!;
    const down = p["lora_down.weight"]!;
    const rank = down.shape[0]!;
    const out = up.shape[0]!;
    const u = asMatrix(file, up, out, `${mod.layer}.lora_up`);
    if (u.cols !== rank) throw ModelFileError.invalidFile(file, `${mod.layer}: lora_up has rank ${u.cols} but lora_down has ${rank}`);
    const mid = p["lora_mid.weight"];
    if (mid) {
      // CP decomposition: ΔW[i,j,k,l] = Σ mid[n,m,k,l]·up[i,n]·down[m,j].
      const [r0, r1, kh = 1, kw = 1] = mid.shape as number[];
      const dn = asMatrix(file, down, rank, `${mod.layer}.lora_down`);
      if (r0 !== rank || r1 !== rank)
        throw ModelFileError.invalidFile(file, `${mod.layer}: lora_mid shape ${JSON.stringify(mid.shape)} does not match rank ${rank}`);
      const inCh = dn.cols;
      const taps = kh * kw;
      // T[n, j, t] = Σ_m mid[n, m, t]·down[m, j], one r×r by r×in product per kernel tap; then ΔW = up · T.
      const t = new Float32Array(rank * inCh * taps);
      for (let tap = 0; tap < taps; tap++) {
        const midTap = new Float32Array(rank * rank);
        for (let i = 0; i < rank * rank; i++) midTap[i] = mid.data[i * taps + tap]!;
        const prod = await matmul(midTap, dn.data, rank, rank, inCh);
        for (let n = 0; n < rank; n++) for (let j = 0; j < inCh; j++) t[(n * inCh + j) * taps + tap] = prod[n * inCh + j]!;
      }
      return { shape: [out, inCh, kh, kw], data: await matmul(u.data, t, out, rank, inCh * taps) };
    }
    const d = asMatrix(file, down, rank, `${mod.layer}.lora_down`);
    const shape = down.shape.length === 4 ? [out, down.shape[1]!, down.shape[2]!, down.shape[3]!] : [out, d.cols];
    return { shape, data: await matmul(u.data, d.data, out, rank, d.cols) };
  }
  if (mod.kind === "loha") {
    // Each half is w_a·w_b, or with its Tucker core t (LyCORIS's use_tucker) the CP product of t, w_a and w_b.
    const half = (n: 1 | 2): Promise<Mat> => productWeight(file, mod, `hada_w${n}_a`, `hada_w${n}_b`, `hada_t${n}`);
    const [w1, w2] = [await half(1), await half(2)];
    if (w1.data.length !== w2.data.length) throw ModelFileError.invalidFile(file, `${mod.layer}: LoHa factors have inconsistent shapes`);
    const x = Float32Array.from(w1.data);
    for (let i = 0; i < x.length; i++) x[i]! *= w2.data[i]!;
    return { shape: w1.shape.length >= w2.shape.length ? w1.shape : w2.shape, data: x };
  }
  const factor = async (full: string, fa: string, fb: string, core?: string): Promise<Mat> =>
    p[full] ?? productWeight(file, mod, fa, fb, core);
  const w1 = await factor("lokr_w1", "lokr_w1_a", "lokr_w1_b");
  const w2 = await factor("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2");
  if (w1.shape.length < 2 || w2.shape.length < 2 || w1.shape.length > 4 || w2.shape.length > 4) {
    throw ModelFileError.invalidFile(file, `${mod.layer}: LoKr factors must be 2-D or 4-D`);
  }
  if (numel(w1.shape) * numel(w2.shape) > 1e9) throw ModelFileError.invalidFile(file, `${mod.layer}: LoKr product is implausibly large`);
  return kron(w1, w2);
}

/**
 * The shape of a LoHa half or LoKr factor stored as parts a·b (b may be a conv kernel [r, in, kh, kw]), or
 * with its Tucker core as their CP product.
 */
function productShape(file: string, mod: LoraModule, a: string, b: string, core?: string): readonly number[] {
  const p = mod.parts;
  if (core !== undefined && p[core]) return cpShape(file, mod.layer, p[core], p[a]!, p[b]!, core);
  const [ra, ca] = matrixDims(file, p[a]!, `${mod.layer}.${a}`);
  const [rb, cb] = matrixDims(file, p[b]!, `${mod.layer}.${b}`);
  if (ca !== rb) throw ModelFileError.invalidFile(file, `${mod.layer}: ${a} and ${b} do not multiply`);
  const bs = p[b]!.shape;
  return bs.length === 4 ? [ra, bs[1]!, bs[2]!, bs[3]!] : [ra, cb];
}

/** The LoHa half or LoKr factor whose shape productShape gives. */
async function productWeight(file: string, mod: LoraModule, a: string, b: string, core?: string): Promise<Mat> {
  const p = mod.parts;
  if (core !== undefined && p[core]) return cpWeight(file, mod.layer, p[core], p[a]!, p[b]!);
  const ma = asMatrix(file, p[a]!, p[a]!.shape[0], `${mod.layer}.${a}`);
  const mb = asMatrix(file, p[b]!, p[b]!.shape[0], `${mod.layer}.${b}`);
  if (ma.cols !== mb.rows) throw ModelFileError.invalidFile(file, `${mod.layer}: ${a} and ${b} do not multiply`);
  const bs = p[b]!.shape;
  const shape = bs.length === 4 ? [ma.rows, bs[1]!, bs[2]!, bs[3]!] : [ma.rows, mb.cols];
  return { shape, data: await matmul(ma.data, mb.data, ma.rows, ma.cols, mb.cols) };
}

/**
 * The shape of a Tucker (CP) product: core t [i, j, kh, kw] with w_a [i, p] and w_b [j, r] gives [p, r, kh, kw]
 * (A1111's lyco_helpers.make_weight_cp); checks that the factors fit the core.
 */
function cpShape(file: string, layer: string, t: Mat, wa: Mat, wb: Mat, what: string): readonly number[] {
  const [i, j, kh = 1, kw = 1] = t.shape as number[];
  const [ai, p] = matrixDims(file, wa, `${layer} (${what}'s a factor)`);
  const [bj, r] = matrixDims(file, wb, `${layer} (${what}'s b factor)`);
  if (t.shape.length !== 4 || ai !== i || bj !== j) {
    throw ModelFileError.invalidFile(
      file,
      `${layer}: Tucker core ${what} ${JSON.stringify(t.shape)} does not fit its factors ${JSON.stringify(wa.shape)}, ${JSON.stringify(wb.shape)}`,
    );
  }
  return [p, r, kh, kw];
}

/**
 * make_weight_cp: out[p, r, k, l] = Σ_i Σ_j t[i, j, k, l]·w_b[j, r]·w_a[i, p], per kernel tap as two
 * matrix products (t_kl · w_b, then w_aᵀ · that).
 */
async function cpWeight(file: string, layer: string, t: Mat, wa: Mat, wb: Mat): Promise<Mat> {
  const [p, r, kh, kw] = cpShape(file, layer, t, wa, wb, "core") as [number, number, number, number];
  const [i, j] = t.shape as [number, number];
  const taps = kh * kw;
  const waT = new Float32Array(p * i);
  for (let a = 0; a < i; a++) for (let c = 0; c < p; c++) waT[c * i + a] = wa.data[a * p + c]!;
  const out = new Float32Array(p * r * taps);
  const tTap = new Float32Array(i * j);
  for (let tap = 0; tap < taps; tap++) {
    for (let a = 0; a < i * j; a++) tTap[a] = t.data[a * taps + tap]!;
    const temp = await matmul(tTap, wb.data, i, j, r);
    const prod = await matmul(waT, temp, p, i, r);
    for (let a = 0; a < p * r; a++) out[a * taps + tap] = prod[a]!;
  }
  return { shape: [p, r, kh, kw], data: out };
}

/** LyCORIS's factorization: dimension = m·n with m the divisor nearest `factor`, as (smaller, larger). */
export function factorization(dimension: number, factor = -1): [number, number] {
  if (factor > 0 && dimension % factor === 0) {
    const [m, n] = [factor, dimension / factor];
    return m > n ? [n, m] : [m, n];
  }
  const limit = factor < 0 ? dimension : factor;
  let [m, n] = [1, dimension];
  // LyCORIS compares against the first pair's sum throughout, not the last one's.
  const length = 1 + dimension;
  while (m < n) {
    let next = m + 1;
    while (dimension % next !== 0) next++;
    const other = dimension / next;
    if (next + other > length || next > limit) break;
    [m, n] = [next, other];
  }
  return m > n ? [n, m] : [m, n];
}

/**
 * OFT's block layout over `outDim` output rows (A1111's network_oft): kohya's oft_blocks [blocks, size, size]
 * name the block count (size = outDim / blocks); LyCORIS's oft_diag name the block size, the layout being
 * factorization(outDim, size) = (size, blocks). Blocks stored in another shape give 0 blocks (no fit).
 */
function oftBlocks(file: string, mod: LoraModule, outDim: number): { blocks: number; size: number; data: Float32Array } {
  const kohya = mod.parts.oft_blocks;
  const stored = kohya ?? mod.parts.oft_diag!;
  if (stored.shape.length !== 3 || stored.shape[1] !== stored.shape[2]) {
    throw ModelFileError.invalidFile(file, `${mod.layer}: OFT blocks of shape ${JSON.stringify(stored.shape)} are not square blocks`);
  }
  const [size, blocks] = kohya ? [Math.floor(outDim / stored.shape[0]!), stored.shape[0]!] : factorization(outDim, stored.shape[1]!);
  if (stored.shape[0] !== blocks || stored.shape[1] !== size) return { blocks: 0, size: 0, data: stored.data };
  return { blocks, size, data: stored.data };
}

/**
 * OFT: per block k, R = (B_k − B_kᵀ)·multiplier + I, and the block's rows become Σ_n R[n, m]·W[k·size + n];
 * ΔW is that minus W.
 */
function oftDelta(file: string, mod: LoraModule, weight: Mat, multiplier: number): Mat {
  const outDim = weight.shape[0]!;
  const { blocks, size, data: b } = oftBlocks(file, mod, outDim);
  if (blocks * size !== outDim) throw ModelFileError.invalidFile(file, `${mod.layer}: OFT blocks do not cover ${outDim} output rows`);
  const rest = weight.data.length / outDim;
  const delta = new Float32Array(weight.data.length);
  const r = new Float64Array(size * size);
  for (let k = 0; k < blocks; k++) {
    const at = k * size * size;
    for (let n = 0; n < size; n++)
      for (let m = 0; m < size; m++) r[n * size + m] = (b[at + n * size + m]! - b[at + m * size + n]!) * multiplier + (n === m ? 1 : 0);
    for (let m = 0; m < size; m++) {
      const row = (k * size + m) * rest;
      for (let c = 0; c < rest; c++) {
        let v = 0;
        for (let n = 0; n < size; n++) v += r[n * size + m]! * weight.data[(k * size + n) * rest + c]!;
        delta[row + c] = v - weight.data[row + c]!;
      }
    }
  }
  return { shape: weight.shape, data: delta };
}

/** Checks ΔW against the target and returns it laid out like the target (inpainting conv_in zero-padded). */
function fitDelta(file: string, mod: LoraModule, delta: Mat, target: readonly number[]): Float32Array {
  const rows = mod.target.endsWith(".in_proj_weight") ? target[0]! / 3 : target[0]!;
  const want = rows * numel(target.slice(1));
  if (delta.data.length === want) return delta.data;
  if (isPaddable(delta.shape, target)) {
    const [o, iw, kh, kw] = target as [number, number, number, number];
    const id = delta.shape[1]!;
    const out = new Float32Array(o * iw * kh * kw);
    for (let a = 0; a < o; a++) out.set(delta.data.subarray(a * id * kh * kw, (a + 1) * id * kh * kw), a * iw * kh * kw);
    return out;
  }
  throw ModelFileError.invalidFile(
    file,
    `${mod.layer}: delta of shape ${JSON.stringify(delta.shape)} does not fit ${mod.target} ${JSON.stringify(target)}`,
  );
}

// ---- merging ---------------------------------------------------------------------------------------

export interface LoraApplication {
  readonly lora: ParsedLora;
  /** Multiplier for UNet layers (the `w` of `<lora:name:w>`). */
  readonly unetWeight: number;
  /** Multiplier for text-encoder layers (defaults to unetWeight in A1111's tag syntax). */
  readonly textWeight: number;
}

/**
 * A weight transform adding every LoRA's ΔW·scale·multiplier. Deltas of plain LoRAs commute, so the order
 * of `apps` does not matter. Returns the input array untouched for weights no LoRA targets.
 */
export function loraTransform(apps: readonly LoraApplication[]): WeightTransform {
  const byTarget = new Map<string, { mod: LoraModule; mult: number; file: string }[]>();
  for (const app of apps) {
    for (const mod of app.lora.modules) {
      const mult = mod.isText ? app.textWeight : app.unetWeight;
      if (mult === 0) continue;
      let list = byTarget.get(mod.target);
      if (!list) byTarget.set(mod.target, (list = []));
      list.push({ mod, mult, file: app.lora.path });
    }
  }
  const apply = async (key: string, values: Float32Array, shape: readonly number[]): Promise<Float32Array> => {
    const list = byTarget.get(key);
    if (!list) return values;
    const out = Float32Array.from(values);
    // In order: like A1111, each module sees the weight as the modules before it left it (matters for DoRA).
    for (const { mod, mult, file } of list) {
      const delta = fitDelta(
        file,
        mod,
        await computeDelta(file, mod, READS_WEIGHT.has(mod.kind) ? { shape, data: out } : undefined, mult),
        shape,
      );
      const base = mod.rowOffset * numel(shape.slice(1));
      const dora = mod.parts.dora_scale;
      if (dora) {
        applyDora(out, delta, mod.scale, mult, dora.data, shape);
        continue;
      }
      const k = mod.kind === "oft" ? 1 : mod.scale * mult;
      for (let i = 0; i < delta.length; i++) out[base + i]! += delta[i]! * k;
    }
    return out;
  };
  return Object.assign(apply, { targets: new Set(byTarget.keys()) as ReadonlySet<string> });
}

/**
 * DoRA (a1111-behaviour.md §6.3): W' = W + ΔW·scale, rescaled per input column j to the norm dora_scale[j]
 * (the norm taken over outputs and kernel taps); the change W'' − W is then multiplied by `mult`.
 */
function applyDora(
  weight: Float32Array,
  delta: Float32Array,
  scale: number,
  mult: number,
  doraScale: Float32Array,
  shape: readonly number[],
): void {
  const rows = shape[0]!;
  const cols = shape[1]!;
  const taps = numel(shape.slice(2));
  const merged = new Float64Array(weight.length);
  for (let i = 0; i < weight.length; i++) merged[i] = weight[i]! + delta[i]! * scale;
  const norm = new Float64Array(cols);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) for (let t = 0; t < taps; t++) norm[c]! += merged[(r * cols + c) * taps + t]! ** 2;
  for (let c = 0; c < cols; c++) norm[c] = Math.sqrt(norm[c]!);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++)
      for (let t = 0; t < taps; t++) {
        const i = (r * cols + c) * taps + t;
        const rescaled = merged[i]! * (doraScale[c]! / norm[c]!);
        weight[i] = weight[i]! + (rescaled - weight[i]!) * mult;
      }
}

/** Targets changed by a set of LoRAs (for reporting and tests). */
export function loraTargets(apps: readonly LoraApplication[]): Set<string> {
  return new Set(apps.flatMap((a) => a.lora.modules.filter((m) => (m.isText ? a.textWeight : a.unetWeight) !== 0).map((m) => m.target)));
}

// ---- import with LoRAs -----------------------------------------------------------------------------

export interface LoraRequest {
  /** Path of the LoRA file, already resolved inside the LoRA folder (see resolveNamedFile). */
  readonly path: string;
  readonly unetWeight: number;
  /** Defaults to unetWeight. */
  readonly textWeight?: number;
}

export interface ImportedWithLoras extends ImportedCheckpoint {
  /** Per LoRA file: keys that were ignored (matching no layer, unsupported parts). */
  readonly loraWarnings: readonly { readonly path: string; readonly warnings: readonly string[] }[];
}

/**
 * The checkpoint with LoRAs merged, from the build cache keyed by (checkpoint sha256, sorted LoRA set).
 * LoRAs whose weights are all zero are left out, so they share the base entry.
 */
export async function importCheckpointWithLoras(
  checkpointPath: string,
  loras: readonly LoraRequest[],
  opts: ImportOptions,
): Promise<ImportedWithLoras> {
  const active = loras.filter((l) => l.unetWeight !== 0 || (l.textWeight ?? l.unetWeight) !== 0);
  if (active.length === 0) return { ...(await importCheckpoint(checkpointPath, opts)), loraWarnings: [] };
  for (const l of active) {
    if (!Number.isFinite(l.unetWeight) || !Number.isFinite(l.textWeight ?? 0))
      throw invalidArgument("lora", `weights of ${l.path} must be finite`);
  }
  const file = await readSafetensors(checkpointPath);
  let arch: Architecture;
  const shapes = new Map<string, readonly number[]>();
  try {
    arch = detectArchitecture(new SafetensorsWeights(file), opts);
    for (const k of file.keys()) shapes.set(k, file.info(k).shape);
  } finally {
    await file.close();
  }
  const apps: LoraApplication[] = [];
  const keyParts: string[] = [];
  for (const l of active) {
    const lora = await loadLora(l.path, arch, shapes);
    const textWeight = l.textWeight ?? l.unetWeight;
    apps.push({ lora, unetWeight: l.unetWeight, textWeight });
    keyParts.push(`${await sha256File(l.path)}:${l.unetWeight}:${textWeight}`);
  }
  keyParts.sort();
  const variantKey = `lora:${keyParts.join(",")}${opts.variantKey ? `|${opts.variantKey}` : ""}`;
  const imported = await importCheckpoint(checkpointPath, {
    ...opts,
    transform: loraTransform(apps),
    variantKey,
    manifestExtra: {
      ...opts.manifestExtra,
      loras: active.map((l) => ({ file: basename(l.path), unetWeight: l.unetWeight, textWeight: l.textWeight ?? l.unetWeight })),
    },
  });
  return { ...imported, loraWarnings: apps.map((a) => ({ path: a.lora.path, warnings: a.lora.warnings })) };
}
