// Minimal ONNX schema (field numbers from onnx/onnx.proto, which is proto2: repeated scalars unpacked
// unless marked packed) and a small graph builder on top of it.

import { link, open, rm, realpath } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { ProtoMessage, isLazy, writeFully, writeMessage } from "./protobuf.js";
import type { LazyBytes } from "./protobuf.js";

export const DataType = {
  float32: 1,
  uint8: 2,
  int8: 3,
  uint16: 4,
  int16: 5,
  int32: 6,
  int64: 7,
  bool: 9,
  float16: 10,
  float64: 11,
  uint32: 12,
  uint64: 13,
  bfloat16: 16,
} as const;
export type ElemType = keyof typeof DataType;

export const ELEM_BYTES: Record<ElemType, number> = {
  float32: 4,
  uint8: 1,
  int8: 1,
  uint16: 2,
  int16: 2,
  int32: 4,
  int64: 8,
  bool: 1,
  float16: 2,
  float64: 8,
  uint32: 4,
  uint64: 8,
  bfloat16: 2,
};

/** A dimension: a fixed size or a symbolic name such as "batch". */
export type Dim = number | string;

export type Attr =
  number | readonly number[] | string | { readonly f: number } | { readonly floats: readonly number[] } | { readonly t: InitializerSpec };

/** Float attributes must be marked, since 1.0 and 1 are the same JS number but different ONNX types. */
export function f(value: number): { f: number } {
  return { f: value };
}

export interface NodeSpec {
  readonly opType: string;
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  readonly name: string;
  readonly domain: string;
  readonly attrs: Readonly<Record<string, Attr>>;
}

export interface InitializerSpec {
  readonly name: string;
  readonly elemType: ElemType;
  readonly dims: readonly number[];
  readonly data: Uint8Array | LazyBytes;
}

export interface ValueInfoSpec {
  readonly name: string;
  readonly elemType: ElemType;
  readonly dims: readonly Dim[];
}

export interface ModelSpec {
  readonly graphName: string;
  readonly nodes: readonly NodeSpec[];
  readonly initializers: readonly InitializerSpec[];
  readonly inputs: readonly ValueInfoSpec[];
  readonly outputs: readonly ValueInfoSpec[];
  readonly opsets: Readonly<Record<string, number>>;
  readonly irVersion: number;
  readonly producer: string;
  readonly metadata: Readonly<Record<string, string>>;
}

export interface ExternalLocation {
  readonly location: string;
  readonly offset: number;
  readonly length: number;
}

// ---- encoding ------------------------------------------------------------------------------------

function encodeTensor(t: InitializerSpec, external?: ExternalLocation): ProtoMessage {
  const m = new ProtoMessage();
  for (const d of t.dims) m.int(1, d);
  m.varint(2, DataType[t.elemType]);
  m.string(8, t.name);
  if (external) {
    for (const [k, v] of [
      ["location", external.location],
      ["offset", String(external.offset)],
      ["length", String(external.length)],
    ] as const) {
      m.message(13, new ProtoMessage().string(1, k).string(2, v));
    }
    m.varint(14, 1);
  } else {
    m.bytes(9, t.data);
  }
  return m;
}

function encodeAttr(name: string, a: Attr): ProtoMessage {
  const m = new ProtoMessage().string(1, name);
  if (typeof a === "number") {
    if (!Number.isInteger(a)) throw new TypeError(`attribute ${name}: ${a} is not an integer; wrap floats with f()`);
    m.int(3, a).varint(20, 2);
  } else if (typeof a === "string") {
    m.string(4, a).varint(20, 3);
  } else if (Array.isArray(a)) {
    for (const v of a as readonly number[]) {
      if (!Number.isInteger(v)) throw new TypeError(`attribute ${name}: ints must be integers`);
      m.int(8, v);
    }
    m.varint(20, 7);
  } else if ("f" in a) {
    m.float(2, a.f).varint(20, 1);
  } else if ("floats" in a) {
    for (const v of a.floats) m.float(7, v);
    m.varint(20, 6);
  } else if ("t" in a) {
    m.message(5, encodeTensor(a.t)).varint(20, 4);
  }
  return m;
}

export function encodeValueInfo(v: ValueInfoSpec): ProtoMessage {
  const shape = new ProtoMessage();
  for (const d of v.dims) {
    shape.message(1, typeof d === "number" ? new ProtoMessage().int(1, d) : new ProtoMessage().string(2, d));
  }
  const tensorType = new ProtoMessage().varint(1, DataType[v.elemType]).message(2, shape);
  return new ProtoMessage().string(1, v.name).message(2, new ProtoMessage().message(1, tensorType));
}

export function encodeNode(n: NodeSpec): ProtoMessage {
  const m = new ProtoMessage();
  for (const i of n.inputs) m.string(1, i);
  for (const o of n.outputs) m.string(2, o);
  m.string(3, n.name).string(4, n.opType);
  for (const [k, a] of Object.entries(n.attrs)) m.message(5, encodeAttr(k, a));
  if (n.domain) m.string(7, n.domain);
  return m;
}

export function encodeModel(spec: ModelSpec, external?: ReadonlyMap<string, ExternalLocation>): ProtoMessage {
  const graph = new ProtoMessage();
  for (const n of spec.nodes) graph.message(1, encodeNode(n));
  graph.string(2, spec.graphName);
  for (const t of spec.initializers) graph.message(5, encodeTensor(t, external?.get(t.name)));
  for (const v of spec.inputs) graph.message(11, encodeValueInfo(v));
  for (const v of spec.outputs) graph.message(12, encodeValueInfo(v));

  const model = new ProtoMessage().int(1, spec.irVersion).string(2, spec.producer);
  for (const [domain, version] of Object.entries(spec.opsets)) {
    model.message(8, new ProtoMessage().string(1, domain).int(2, version));
  }
  model.message(7, graph);
  for (const [k, v] of Object.entries(spec.metadata)) model.message(14, new ProtoMessage().string(1, k).string(2, v));
  return model;
}

// ---- saving --------------------------------------------------------------------------------------

export interface SaveOptions {
  /**
   * Where the initializers go. "embed" keeps everything in the .onnx file (fails above the 2 GB protobuf
   * limit), "external" writes them to `externalFile` next to it, "auto" (default) goes external only when
   * the weights exceed `embedLimitBytes`.
   */
  readonly weights?: "auto" | "embed" | "external";
  /** Name of the external-data file, relative to the model's folder. Default "weights.pb" (diffusers' name). */
  readonly externalFile?: string;
  readonly embedLimitBytes?: number;
  /** In external mode, float tensors smaller than this stay inline (default 1024 bytes). */
  readonly externalMinBytes?: number;
  /**
   * In external mode, tensors whose bytes already sit verbatim in a file (LazyBytes.fileRange) are not
   * copied: the model folder gets a hard link of that file under this name and points into it. When the
   * link cannot be made (another file system), they are copied to `externalFile` as usual.
   */
  readonly linkName?: string;
}

export interface SavedModel {
  readonly modelPath: string;
  readonly modelBytes: number;
  /** Absent when the weights are embedded. */
  readonly externalPath?: string;
  readonly externalBytes: number;
  /** Where each initializer's bytes sit in the external file (name → offset, length). */
  readonly layout: ReadonlyMap<string, ExternalLocation>;
}

/** protobuf's hard limit is 2 GiB; stay well below it so the graph itself fits too. */
export const DEFAULT_EMBED_LIMIT = 1_800_000_000;

function alignmentFor(bytes: number): number {
  // Page-aligned big tensors let ONNX Runtime map them instead of copying.
  return bytes >= 65536 ? 4096 : 64;
}

/** Writes the model, streaming lazy initializer data, so memory stays at about one tensor. */
export async function saveModel(spec: ModelSpec, path: string, opts: SaveOptions = {}): Promise<SavedModel> {
  const total = spec.initializers.reduce((s, t) => s + t.data.byteLength, 0);
  const mode = opts.weights ?? "auto";
  const external = mode === "external" || (mode === "auto" && total > (opts.embedLimitBytes ?? DEFAULT_EMBED_LIMIT));
  const layout = new Map<string, ExternalLocation>();
  if (!external) {
    const handle = await open(path, "w");
    try {
      const n = await writeMessage(encodeModel(spec), handle);
      return { modelPath: path, modelBytes: n, externalBytes: 0, layout };
    } finally {
      await handle.close();
    }
  }
  const location = opts.externalFile ?? "weights.pb";
  if (location !== basename(location)) throw new RangeError(`external file ${location} must be a plain file name`);
  let offset = 0;
  const minBytes = opts.externalMinBytes ?? 1024;
  // Small tensors stay inline: ONNX Runtime's shape inference must read axes/shape constants from the proto.
  const goesOut = (t: InitializerSpec): boolean => t.data.byteLength >= minBytes && t.elemType !== "int64" && t.elemType !== "int32";
  const linked = await linkSource(spec, dirname(path), opts.linkName, goesOut);
  for (const t of spec.initializers) {
    if (!goesOut(t)) continue;
    const range = linked && isLazy(t.data) ? t.data.fileRange : undefined;
    if (range && range.path === linked) {
      layout.set(t.name, { location: opts.linkName!, offset: range.offset, length: t.data.byteLength });
      continue;
    }
    const align = alignmentFor(t.data.byteLength);
    offset = Math.ceil(offset / align) * align;
    layout.set(t.name, { location, offset, length: t.data.byteLength });
    offset += t.data.byteLength;
  }
  const externalPath = join(dirname(path), location);
  const copied = [...layout.values()].some((l) => l.location === location);
  const dataHandle = copied ? await open(externalPath, "w") : undefined;
  try {
    for (const t of spec.initializers) {
      const loc = layout.get(t.name);
      if (!loc || loc.location !== location) continue;
      const data = isLazy(t.data) ? await t.data.load() : t.data;
      if (data.byteLength !== loc.length)
        throw new Error(`initializer ${t.name} produced ${data.byteLength} bytes, promised ${loc.length}`);
      await writeFully(dataHandle!, data, loc.offset);
    }
    await dataHandle?.truncate(offset);
  } finally {
    await dataHandle?.close();
  }
  const handle = await open(path, "w");
  try {
    const n = await writeMessage(encodeModel(spec, layout), handle);
    return { modelPath: path, modelBytes: n, ...(copied ? { externalPath } : {}), externalBytes: copied ? offset : 0, layout };
  } finally {
    await handle.close();
  }
}

/**
 * Hard-links the file that most external tensors already live in into the model folder. Returns that
 * file's path, or undefined when nothing can be linked.
 */
async function linkSource(
  spec: ModelSpec,
  dir: string,
  linkName: string | undefined,
  goesOut: (t: InitializerSpec) => boolean,
): Promise<string | undefined> {
  if (!linkName) return undefined;
  if (linkName !== basename(linkName)) throw new RangeError(`link name ${linkName} must be a plain file name`);
  const bytesByFile = new Map<string, number>();
  for (const t of spec.initializers) {
    const range = goesOut(t) && isLazy(t.data) ? t.data.fileRange : undefined;
    if (range) bytesByFile.set(range.path, (bytesByFile.get(range.path) ?? 0) + t.data.byteLength);
  }
  const best = [...bytesByFile].sort((a, b) => b[1] - a[1])[0]?.[0];
  if (!best) return undefined;
  const target = join(dir, linkName);
  await rm(target, { force: true });
  try {
    // link() does not follow symlinks: a symlinked checkpoint would become a symlink that ONNX Runtime
    // rejects as escaping the model folder, so link the real file.
    await link(await realpath(best), target);
    return best;
  } catch {
    return undefined;
  }
}

// ---- builder -------------------------------------------------------------------------------------

export interface OpOptions {
  /** Number of outputs (default 1) or explicit output names. */
  readonly outputs?: number | readonly string[];
  readonly domain?: string;
  readonly name?: string;
}

/**
 * Collects nodes, initializers and graph I/O. Value names are generated under the current scope
 * (`withScope`), which keeps node names readable in profilers and error messages.
 */
export class GraphBuilder {
  readonly nodes: NodeSpec[] = [];
  readonly initializers: InitializerSpec[] = [];
  readonly inputs: ValueInfoSpec[] = [];
  readonly outputs: ValueInfoSpec[] = [];
  readonly opsets: Record<string, number>;
  private readonly names = new Set<string>();
  private readonly initByName = new Map<string, InitializerSpec>();
  private readonly constCache = new Map<string, string>();
  private scopes: string[] = [];
  private counter = 0;

  constructor(
    readonly graphName: string,
    opset = 17,
  ) {
    this.opsets = { "": opset };
  }

  withScope<T>(scope: string, fn: () => T): T {
    this.scopes.push(scope);
    try {
      return fn();
    } finally {
      this.scopes.pop();
    }
  }

  /** A fresh value name under the current scope. */
  fresh(hint: string): string {
    const prefix = this.scopes.length ? `/${this.scopes.join("/")}/` : "/";
    let name = `${prefix}${hint}`;
    while (this.names.has(name)) name = `${prefix}${hint}_${++this.counter}`;
    this.names.add(name);
    return name;
  }

  input(name: string, elemType: ElemType, dims: readonly Dim[]): string {
    this.claim(name);
    this.inputs.push({ name, elemType, dims });
    return name;
  }

  /** Marks `value` as a graph output called `name` (through an Identity when the names differ). */
  output(value: string, name: string, elemType: ElemType, dims: readonly Dim[]): void {
    if (value !== name) this.op("Identity", [value], {}, { outputs: [name] });
    this.outputs.push({ name, elemType, dims });
  }

  hasInitializer(name: string): boolean {
    return this.initByName.has(name);
  }

  /** Adds a named initializer; adding the same name twice returns the existing one (weights shared by two nodes). */
  initializer(name: string, elemType: ElemType, dims: readonly number[], data: Uint8Array | LazyBytes): string {
    const prev = this.initByName.get(name);
    if (prev) return prev.name;
    const expected = dims.reduce((a, b) => a * b, 1) * ELEM_BYTES[elemType];
    if (data.byteLength !== expected) {
      throw new RangeError(`initializer ${name}: ${elemType} ${JSON.stringify(dims)} needs ${expected} bytes, got ${data.byteLength}`);
    }
    this.claim(name);
    const spec: InitializerSpec = { name, elemType, dims: [...dims], data };
    this.initializers.push(spec);
    this.initByName.set(name, spec);
    return name;
  }

  /** A small constant tensor, deduplicated by value. */
  constant(elemType: ElemType, dims: readonly number[], values: ArrayLike<number> | readonly bigint[], hint = "const"): string {
    let bytes: Uint8Array;
    switch (elemType) {
      case "float32":
        bytes = new Uint8Array(Float32Array.from(values as ArrayLike<number>).buffer);
        break;
      case "int64":
        bytes = new Uint8Array(BigInt64Array.from(values as ArrayLike<number>, (v) => BigInt(v)).buffer);
        break;
      case "int32":
        bytes = new Uint8Array(Int32Array.from(values as ArrayLike<number>).buffer);
        break;
      case "bool":
      case "uint8":
        bytes = Uint8Array.from(values as ArrayLike<number>);
        break;
      case "float16":
        bytes = new Uint8Array(Uint16Array.from(values as ArrayLike<number>).buffer);
        break;
      default:
        throw new TypeError(`constant(): ${elemType} not supported`);
    }
    const key = `${elemType}|${dims.join(",")}|${Buffer.from(bytes).toString("base64")}`;
    const hit = this.constCache.get(key);
    if (hit) return hit;
    const name = this.fresh(hint);
    this.names.delete(name);
    this.initializer(name, elemType, dims, bytes);
    this.constCache.set(key, name);
    return name;
  }

  /** 1-D int64 constant, the usual shape/axes argument. */
  ints(values: readonly number[]): string {
    return this.constant("int64", [values.length], values, "ints");
  }

  /** Scalar float32 constant. */
  scalar(value: number): string {
    return this.constant("float32", [], [value], "scalar");
  }

  op(opType: string, inputs: readonly string[], attrs: Readonly<Record<string, Attr>> = {}, opts: OpOptions = {}): string[] {
    const outs =
      typeof opts.outputs === "object"
        ? opts.outputs.map((o) => this.claim(o))
        : Array.from({ length: opts.outputs ?? 1 }, (_, i) =>
            this.fresh(`${opType}${opts.outputs && opts.outputs !== 1 ? `_out${i}` : ""}`),
          );
    if (opts.domain !== undefined && !(opts.domain in this.opsets)) this.opsets[opts.domain] = 1;
    const name = opts.name ?? `${outs[0]}:node`;
    this.nodes.push({ opType, inputs: [...inputs], outputs: outs, name, domain: opts.domain ?? "", attrs });
    return outs;
  }

  /** Single-output op. */
  op1(opType: string, inputs: readonly string[], attrs: Readonly<Record<string, Attr>> = {}, opts: OpOptions = {}): string {
    return this.op(opType, inputs, attrs, opts)[0]!;
  }

  toSpec(meta: { producer?: string; irVersion?: number; metadata?: Record<string, string> } = {}): ModelSpec {
    return {
      graphName: this.graphName,
      nodes: this.nodes,
      initializers: this.initializers,
      inputs: this.inputs,
      outputs: this.outputs,
      opsets: this.opsets,
      irVersion: meta.irVersion ?? 8,
      producer: meta.producer ?? "latentfarm",
      metadata: meta.metadata ?? {},
    };
  }

  private claim(name: string): string {
    if (this.names.has(name)) throw new Error(`value name ${name} is used twice`);
    this.names.add(name);
    return name;
  }
}
