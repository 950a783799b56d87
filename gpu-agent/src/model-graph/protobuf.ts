// Protocol-buffers wire format, just enough for ONNX: varints, fixed32, length-delimited fields.
// Messages are kept as lists of byte parts so that multi-gigabyte tensor payloads can stay lazy
// (loaded from a checkpoint only while the file is being written) and are never concatenated in memory.

import type { FileHandle } from "node:fs/promises";

/** Bytes whose length is known now and whose content is produced when the message is written. */
export interface LazyBytes {
  readonly byteLength: number;
  load(): Promise<Uint8Array>;
  /** Set when the bytes already sit verbatim in a file, so that an external-data writer can point at them. */
  readonly fileRange?: { readonly path: string; readonly offset: number };
}

export type Part = Uint8Array | LazyBytes;

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

export function isLazy(p: Part): p is LazyBytes {
  return !(p instanceof Uint8Array);
}

/** A message under construction. Fields are written in call order; parsers accept any order. */
export class ProtoMessage {
  readonly parts: Part[] = [];
  private pending: number[] = [];
  private size = 0;

  get byteLength(): number {
    return this.size + this.pending.length;
  }

  varint(field: number, value: number | bigint): this {
    this.tag(field, WIRE_VARINT);
    this.pushVarint(value);
    return this;
  }

  /** int64/int32 fields: negative values are written as 10-byte two's complement, as protobuf requires. */
  int(field: number, value: number | bigint): this {
    return this.varint(field, BigInt.asUintN(64, BigInt(value)));
  }

  float(field: number, value: number): this {
    this.tag(field, WIRE_FIXED32);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, value, true);
    this.pending.push(...b);
    return this;
  }

  string(field: number, value: string): this {
    return this.bytes(field, new TextEncoder().encode(value));
  }

  bytes(field: number, value: Uint8Array | LazyBytes): this {
    this.tag(field, WIRE_LEN);
    this.pushVarint(value.byteLength);
    this.append(value);
    return this;
  }

  message(field: number, msg: ProtoMessage): this {
    msg.flush();
    this.tag(field, WIRE_LEN);
    this.pushVarint(msg.byteLength);
    for (const p of msg.parts) this.append(p);
    return this;
  }

  toBytes(): Uint8Array {
    this.flush();
    const out = new Uint8Array(this.size);
    let pos = 0;
    for (const p of this.parts) {
      if (isLazy(p)) throw new Error("message holds lazy data; write it with writeMessage instead");
      out.set(p, pos);
      pos += p.byteLength;
    }
    return out;
  }

  flush(): void {
    if (this.pending.length === 0) return;
    const b = Uint8Array.from(this.pending);
    this.pending = [];
    this.parts.push(b);
    this.size += b.byteLength;
  }

  private append(p: Part): void {
    // Small payloads are copied into the running buffer so a graph of thousands of nodes is not
    // thousands of tiny parts; big ones are referenced.
    if (!isLazy(p) && p.byteLength < 256) {
      for (let i = 0; i < p.byteLength; i++) this.pending.push(p[i]!);
      return;
    }
    this.flush();
    this.parts.push(p);
    this.size += p.byteLength;
  }

  private tag(field: number, wire: number): void {
    this.pushVarint(field * 8 + wire);
  }

  private pushVarint(value: number | bigint): void {
    if (typeof value === "number" && value >= 0 && value < 2 ** 31) {
      let v = value;
      while (v >= 0x80) {
        this.pending.push((v & 0x7f) | 0x80);
        v >>>= 7;
      }
      this.pending.push(v);
      return;
    }
    let v = BigInt(value);
    if (v < 0n) throw new RangeError("negative varint; use int()");
    while (v >= 0x80n) {
      this.pending.push(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    this.pending.push(Number(v));
  }
}

/** Streams a message to a file, loading lazy parts one at a time. Returns the number of bytes written. */
export async function writeMessage(msg: ProtoMessage, handle: FileHandle, position = 0): Promise<number> {
  msg.flush();
  let pos = position;
  let batch: Uint8Array[] = [];
  let batchBytes = 0;
  const drain = async (): Promise<void> => {
    if (batchBytes === 0) return;
    const buf = batch.length === 1 ? batch[0]! : Buffer.concat(batch, batchBytes);
    await writeFully(handle, buf, pos);
    pos += batchBytes;
    batch = [];
    batchBytes = 0;
  };
  for (const p of msg.parts) {
    if (isLazy(p)) {
      await drain();
      const data = await p.load();
      if (data.byteLength !== p.byteLength) throw new Error(`lazy part produced ${data.byteLength} bytes, promised ${p.byteLength}`);
      await writeFully(handle, data, pos);
      pos += data.byteLength;
    } else {
      batch.push(p);
      batchBytes += p.byteLength;
      if (batchBytes >= 1 << 20) await drain();
    }
  }
  await drain();
  return pos - position;
}

export async function writeFully(handle: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.byteLength) {
    const { bytesWritten } = await handle.write(data, done, data.byteLength - done, position + done);
    done += bytesWritten;
  }
}

// ---- decoding (for reading ONNX files back: tests, inspection, patching) --------------------------

export interface Field {
  readonly field: number;
  readonly wire: number;
  /** varint and fixed64 as bigint, fixed32 as its raw uint32, length-delimited as a view into the input. */
  readonly value: bigint | number | Uint8Array;
}

export function decodeFields(buf: Uint8Array): Field[] {
  const out: Field[] = [];
  let pos = 0;
  const readVarint = (): bigint => {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      if (pos >= buf.length) throw new RangeError("truncated varint");
      const b = buf[pos++]!;
      result |= BigInt(b & 0x7f) << shift;
      if (b < 0x80) return result;
      shift += 7n;
      if (shift > 63n) throw new RangeError("varint too long");
    }
  };
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  while (pos < buf.length) {
    const key = readVarint();
    const field = Number(key >> 3n);
    const wire = Number(key & 7n);
    if (wire === WIRE_VARINT) out.push({ field, wire, value: readVarint() });
    else if (wire === WIRE_FIXED64) {
      if (pos + 8 > buf.length) throw new RangeError("truncated fixed64");
      out.push({ field, wire, value: view.getBigUint64(pos, true) });
      pos += 8;
    } else if (wire === WIRE_LEN) {
      const len = Number(readVarint());
      if (pos + len > buf.length) throw new RangeError("truncated length-delimited field");
      out.push({ field, wire, value: buf.subarray(pos, pos + len) });
      pos += len;
    } else if (wire === WIRE_FIXED32) {
      if (pos + 4 > buf.length) throw new RangeError("truncated fixed32");
      out.push({ field, wire, value: view.getUint32(pos, true) });
      pos += 4;
    } else throw new RangeError(`unsupported wire type ${wire}`);
  }
  return out;
}

export function decodePackedVarints(buf: Uint8Array): bigint[] {
  const out: bigint[] = [];
  let pos = 0;
  while (pos < buf.length) {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      const b = buf[pos++];
      if (b === undefined) throw new RangeError("truncated packed varint");
      result |= BigInt(b & 0x7f) << shift;
      if (b < 0x80) break;
      shift += 7n;
    }
    out.push(result);
  }
  return out;
}

export function fixed32ToFloat(bits: number): number {
  const dv = new DataView(new ArrayBuffer(4));
  dv.setUint32(0, bits, true);
  return dv.getFloat32(0, true);
}

export function toSigned64(v: bigint): bigint {
  return BigInt.asIntN(64, v);
}

/** Writes a decoded field into `m` as it was: what a graph rewrite leaves unchanged is copied this way. */
export function copyField(m: ProtoMessage, f: Field): void {
  if (f.wire === 0) m.varint(f.field, f.value as bigint);
  else if (f.wire === 2) m.bytes(f.field, f.value as Uint8Array);
  else if (f.wire === 5) m.float(f.field, fixed32ToFloat(f.value as number));
  else throw new RangeError(`cannot copy a fixed64 field (${f.field})`);
}
