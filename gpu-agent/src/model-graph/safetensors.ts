// safetensors: 8-byte little-endian header length N, N bytes of JSON, then the data section.
// Format rules follow onnx-notes.md §D.5. Tensors are read with positional reads on one file handle,
// so a 4 GB checkpoint never has to fit in one Buffer and nothing is read twice.

import { open, writeFile } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import { ModelFileError } from "./errors.js";
import { bf16ToF32, f16ToF32 } from "./half.js";

/** Header lengths above this are rejected, as the reference implementation does. */
export const MAX_HEADER_BYTES = 100_000_000;

/** Bits per element; sub-byte formats (F4, F6) are valid in headers even though we cannot compute with them. */
const DTYPE_BITS = {
  BOOL: 8,
  U8: 8,
  I8: 8,
  F8_E5M2: 8,
  F8_E4M3: 8,
  F8_E8M0: 8,
  F8_E4M3FNUZ: 8,
  F8_E5M2FNUZ: 8,
  I16: 16,
  U16: 16,
  F16: 16,
  BF16: 16,
  I32: 32,
  U32: 32,
  F32: 32,
  F64: 64,
  I64: 64,
  U64: 64,
  C64: 64,
  F4: 4,
  F6_E2M3: 6,
  F6_E3M2: 6,
} as const;

export type SafetensorsDType = keyof typeof DTYPE_BITS;

export function isSafetensorsDType(s: string): s is SafetensorsDType {
  return Object.prototype.hasOwnProperty.call(DTYPE_BITS, s);
}

export function dtypeBits(dtype: SafetensorsDType): number {
  return DTYPE_BITS[dtype];
}

export interface TensorInfo {
  readonly name: string;
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  /** Absolute position of the first byte in the file. */
  readonly fileOffset: number;
  readonly byteLength: number;
}

export type TensorData =
  | Float32Array
  | Float64Array
  | Uint16Array
  | Int8Array
  | Uint8Array
  | Int16Array
  | Int32Array
  | Uint32Array
  | BigInt64Array
  | BigUint64Array;

export interface Tensor {
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  /** F16 and BF16 come as raw bits in a Uint16Array; see `toFloat32`. */
  readonly data: TensorData;
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

interface ParsedHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
  dataOffset: number;
}

/** Validates a header against the file size; every violation names what is wrong. */
export function parseHeader(file: string, headerBytes: Uint8Array, fileSize: number): ParsedHeader {
  const bad = (msg: string): never => {
    throw ModelFileError.invalidFile(file, `not a valid safetensors file: ${msg}`);
  };
  const n = headerBytes.length;
  const dataOffset = 8 + n;
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(headerBytes);
  } catch {
    return bad("header is not UTF-8");
  }
  if (!text.startsWith("{")) bad("header does not start with '{'");
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    return bad(`header is not JSON (${(err as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) return bad("header is not a JSON object");

  // Null-prototype: a key named "__proto__" must stay an ordinary key.
  const metadata: Record<string, string> = Object.create(null) as Record<string, string>;
  const entries: TensorInfo[] = [];
  const dataSize = fileSize - dataOffset;
  for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof value !== "object" || value === null || Array.isArray(value)) bad("__metadata__ is not an object");
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        if (typeof v !== "string") bad(`__metadata__.${k} is not a string`);
        metadata[k] = v as string;
      }
      continue;
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) return bad(`entry ${name} is not an object`);
    const { dtype, shape, data_offsets: offsets } = value as Record<string, unknown>;
    if (typeof dtype !== "string" || !isSafetensorsDType(dtype)) return bad(`tensor ${name} has unknown dtype ${JSON.stringify(dtype)}`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
      return bad(`tensor ${name} has an invalid shape ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && (o as number) >= 0)) {
      return bad(`tensor ${name} has invalid data_offsets ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as [number, number];
    if (end < begin) bad(`tensor ${name} has data_offsets [${begin}, ${end}] with end before begin`);
    if (end > dataSize) {
      bad(`tensor ${name} ends at byte ${end} of the data section, which holds only ${dataSize} bytes (file truncated?)`);
    }
    const elements = numel(shape as number[]);
    const bits = elements * DTYPE_BITS[dtype];
    if (!Number.isSafeInteger(bits) || bits % 8 !== 0 || bits / 8 !== end - begin) {
      bad(`tensor ${name} (${dtype} ${JSON.stringify(shape)}) needs ${bits / 8} bytes but data_offsets span ${end - begin}`);
    }
    entries.push({ name, dtype, shape: shape as number[], fileOffset: dataOffset + begin, byteLength: end - begin });
  }

  // The data section must be tiled exactly: no gaps (which also catches duplicate keys, since JSON.parse
  // keeps only the last one), no overlaps, nothing trailing.
  const sorted = [...entries].sort((a, b) => a.fileOffset - b.fileOffset || a.byteLength - b.byteLength);
  let cursor = dataOffset;
  for (const t of sorted) {
    if (t.fileOffset < cursor) bad(`tensor ${t.name} overlaps the tensor before it`);
    if (t.fileOffset > cursor) bad(`gap of ${t.fileOffset - cursor} bytes before tensor ${t.name}`);
    cursor = t.fileOffset + t.byteLength;
  }
  if (cursor !== fileSize) {
    bad(`data section is ${dataSize} bytes but the tensors cover ${cursor - dataOffset}`);
  }
  return { tensors: new Map(entries.map((e) => [e.name, e])), metadata, dataOffset };
}

/** An open safetensors file. Close it when done (or use `await using`). */
export class SafetensorsFile {
  readonly path: string;
  readonly metadata: Readonly<Record<string, string>>;
  /** Position of the data section (8 + header length). */
  readonly dataOffset: number;
  readonly fileSize: number;
  private readonly infos: Map<string, TensorInfo>;
  private handle: FileHandle | undefined;

  private constructor(path: string, handle: FileHandle, header: ParsedHeader, fileSize: number) {
    this.path = path;
    this.handle = handle;
    this.infos = header.tensors;
    this.metadata = header.metadata;
    this.dataOffset = header.dataOffset;
    this.fileSize = fileSize;
  }

  static async open(path: string): Promise<SafetensorsFile> {
    let handle: FileHandle;
    try {
      handle = await open(path, "r");
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") throw ModelFileError.fileNotFound(path, "no such file", err);
      throw ModelFileError.invalidFile(path, `cannot open: ${(err as Error).message}`, err);
    }
    try {
      const stat = await handle.stat();
      if (!stat.isFile()) throw ModelFileError.invalidFile(path, "not a regular file");
      const fileSize = stat.size;
      if (fileSize < 8) throw ModelFileError.invalidFile(path, `not a valid safetensors file: only ${fileSize} bytes`);
      const lenBuf = Buffer.alloc(8);
      await readExactly(handle, path, lenBuf, 0);
      const n = lenBuf.readBigUInt64LE(0);
      if (n > BigInt(MAX_HEADER_BYTES)) {
        throw ModelFileError.invalidFile(path, `not a valid safetensors file: header length ${n} exceeds ${MAX_HEADER_BYTES}`);
      }
      if (n + 8n > BigInt(fileSize)) {
        throw ModelFileError.invalidFile(path, `not a valid safetensors file: header length ${n} exceeds the file size ${fileSize}`);
      }
      if (n < 2n) throw ModelFileError.invalidFile(path, `not a valid safetensors file: header length ${n} is too short`);
      const headerBytes = Buffer.alloc(Number(n));
      await readExactly(handle, path, headerBytes, 8);
      const header = parseHeader(path, headerBytes, fileSize);
      return new SafetensorsFile(path, handle, header, fileSize);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  keys(): string[] {
    return [...this.infos.keys()];
  }

  has(name: string): boolean {
    return this.infos.has(name);
  }

  info(name: string): TensorInfo {
    const info = this.infos.get(name);
    if (!info) throw ModelFileError.fileNotFound(this.path, `no tensor named ${name}`);
    return info;
  }

  /** Tensors in the order of their data, which is the fastest order to read them in. */
  infosByOffset(): TensorInfo[] {
    return [...this.infos.values()].sort((a, b) => a.fileOffset - b.fileOffset);
  }

  /** The raw little-endian bytes of a tensor, in a fresh (hence aligned) buffer unless `into` is given. */
  async readBytes(name: string, into?: Uint8Array): Promise<Uint8Array> {
    const info = this.info(name);
    const buf = into ?? new Uint8Array(info.byteLength);
    if (buf.byteLength < info.byteLength) throw new RangeError(`buffer of ${buf.byteLength} bytes is too small for ${name}`);
    await readExactly(this.fileHandle(), this.path, buf.subarray(0, info.byteLength), info.fileOffset);
    return buf.subarray(0, info.byteLength);
  }

  async tensor(name: string): Promise<Tensor> {
    const info = this.info(name);
    const bytes = await this.readBytes(name);
    return { dtype: info.dtype, shape: info.shape, data: typedView(this.path, info, bytes) };
  }

  /** Any floating or integer tensor as float32 (F16 and BF16 are widened exactly). */
  async float32(name: string): Promise<Float32Array> {
    return toFloat32(await this.tensor(name), this.path);
  }

  async close(): Promise<void> {
    const h = this.handle;
    this.handle = undefined;
    if (h) await h.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private fileHandle(): FileHandle {
    if (!this.handle) throw ModelFileError.invalidFile(this.path, "file is already closed");
    return this.handle;
  }
}

/** Opens and validates a safetensors file; see `SafetensorsFile`. */
export function readSafetensors(path: string): Promise<SafetensorsFile> {
  return SafetensorsFile.open(path);
}

async function readExactly(handle: FileHandle, file: string, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.byteLength) {
    const { bytesRead } = await handle.read(buf, done, buf.byteLength - done, position + done);
    if (bytesRead === 0) {
      throw ModelFileError.invalidFile(file, `truncated: expected ${buf.byteLength} bytes at offset ${position}, got ${done}`);
    }
    done += bytesRead;
  }
}

function typedView(file: string, info: TensorInfo, bytes: Uint8Array): TensorData {
  const { buffer, byteOffset } = bytes;
  const n = numel(info.shape);
  switch (info.dtype) {
    case "F32":
      return new Float32Array(buffer, byteOffset, n);
    case "F64":
      return new Float64Array(buffer, byteOffset, n);
    case "F16":
    case "BF16":
    case "U16":
      return new Uint16Array(buffer, byteOffset, n);
    case "I16":
      return new Int16Array(buffer, byteOffset, n);
    case "I32":
      return new Int32Array(buffer, byteOffset, n);
    case "U32":
      return new Uint32Array(buffer, byteOffset, n);
    case "I64":
      return new BigInt64Array(buffer, byteOffset, n);
    case "U64":
      return new BigUint64Array(buffer, byteOffset, n);
    case "I8":
      return new Int8Array(buffer, byteOffset, n);
    case "U8":
    case "BOOL":
      return new Uint8Array(buffer, byteOffset, n);
    default:
      throw ModelFileError.invalidFile(file, `tensor ${info.name} has dtype ${info.dtype}, which this reader cannot decode`);
  }
}

/** Widens a tensor's data to float32. F16/BF16 data must be the raw-bit Uint16Array that `tensor()` returns. */
export function toFloat32(t: Tensor, file = "<memory>"): Float32Array {
  switch (t.dtype) {
    case "F32":
      return t.data as Float32Array;
    case "F16":
      return f16ToF32(t.data as Uint16Array);
    case "BF16":
      return bf16ToF32(t.data as Uint16Array);
    case "F64":
    case "I8":
    case "U8":
    case "BOOL":
    case "I16":
    case "U16":
    case "I32":
    case "U32":
      return Float32Array.from(t.data as ArrayLike<number>);
    case "I64":
    case "U64":
      return Float32Array.from(t.data as BigInt64Array, (v) => Number(v));
    default:
      throw ModelFileError.invalidFile(file, `cannot convert ${t.dtype} to float32`);
  }
}

// ---- writing -------------------------------------------------------------------------------------

export interface TensorToWrite {
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  /** Little-endian element data; F16/BF16 as raw bits. */
  readonly data: ArrayBufferView;
}

/** Serialises tensors in the given key order; the header is space-padded to a multiple of 8 like the reference writer. */
export function encodeSafetensors(
  tensors: Readonly<Record<string, TensorToWrite>> | ReadonlyMap<string, TensorToWrite>,
  metadata?: Readonly<Record<string, string>>,
): Uint8Array {
  const list: [string, TensorToWrite][] =
    tensors instanceof Map
      ? [...(tensors as ReadonlyMap<string, TensorToWrite>)]
      : Object.entries(tensors as Record<string, TensorToWrite>);
  const header: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of list) {
    const bits = numel(t.shape) * DTYPE_BITS[t.dtype];
    if (bits % 8 !== 0 || bits / 8 !== t.data.byteLength) {
      throw new RangeError(`tensor ${name}: ${t.dtype} ${JSON.stringify(t.shape)} needs ${bits / 8} bytes, got ${t.data.byteLength}`);
    }
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = Buffer.from(JSON.stringify(header), "utf8");
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) json = Buffer.concat([json, Buffer.alloc(padded - json.length, 0x20)]);
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let pos = 8 + json.length;
  for (const [, t] of list) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), pos);
    pos += t.data.byteLength;
  }
  return out;
}

export async function writeSafetensors(
  path: string,
  tensors: Readonly<Record<string, TensorToWrite>> | ReadonlyMap<string, TensorToWrite>,
  metadata?: Readonly<Record<string, string>>,
): Promise<void> {
  await writeFile(path, encodeSafetensors(tensors, metadata));
}

export interface LazyTensorToWrite {
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  /** Produces the tensor's bytes when its turn comes; only one tensor is in memory at a time. */
  readonly load: () => Promise<ArrayBufferView> | ArrayBufferView;
}

/** Like writeSafetensors, for files too big to assemble in memory (multi-gigabyte checkpoints). */
export async function writeSafetensorsStreaming(
  path: string,
  tensors: ReadonlyMap<string, LazyTensorToWrite>,
  metadata?: Readonly<Record<string, string>>,
): Promise<void> {
  const header: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of tensors) {
    const bits = numel(t.shape) * DTYPE_BITS[t.dtype];
    if (bits % 8 !== 0) throw new RangeError(`tensor ${name}: ${t.dtype} ${JSON.stringify(t.shape)} is not a whole number of bytes`);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bits / 8] };
    offset += bits / 8;
  }
  let json = Buffer.from(JSON.stringify(header), "utf8");
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) json = Buffer.concat([json, Buffer.alloc(padded - json.length, 0x20)]);
  const handle = await open(path, "w");
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    await handle.write(len, 0, 8, 0);
    await handle.write(json, 0, json.length, 8);
    let pos = 8 + json.length;
    for (const [name, t] of tensors) {
      const view = await t.load();
      const expected = (numel(t.shape) * DTYPE_BITS[t.dtype]) / 8;
      if (view.byteLength !== expected) throw new RangeError(`tensor ${name}: produced ${view.byteLength} bytes, needs ${expected}`);
      const bytes = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
      let done = 0;
      while (done < bytes.byteLength) {
        const { bytesWritten } = await handle.write(bytes, done, bytes.byteLength - done, pos + done);
        done += bytesWritten;
      }
      pos += bytes.byteLength;
    }
  } finally {
    await handle.close();
  }
}
