// Writes float32 tensors in torch.save's zip layout, for tests of files that are .pt/.ckpt in the wild
// (VAEs, embeddings): an uncompressed zip holding <archive>/data.pkl, a protocol-2 pickle whose tensors
// are torch._utils._rebuild_tensor_v2 calls on persistent storage ids, and each storage raw as
// <archive>/data/<key>. Only what the reader under test needs: dicts of string keys, tensors, numbers.

import { zipSync, type Zippable } from "fflate";

export interface TensorToPickle {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

export type Picklable = TensorToPickle | number | string | { readonly [key: string]: Picklable };

class PickleWriter {
  private readonly parts: Uint8Array[] = [];
  readonly storages = new Map<string, Float32Array>();

  byte(...b: number[]): void {
    this.parts.push(Uint8Array.from(b));
  }

  str(s: string): void {
    const utf8 = new TextEncoder().encode(s);
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, utf8.length, true);
    this.byte(0x58); // BINUNICODE
    this.parts.push(len, utf8);
  }

  int(n: number): void {
    const b = new Uint8Array(5);
    b[0] = 0x4a; // BININT
    new DataView(b.buffer).setInt32(1, n, true);
    this.parts.push(b);
  }

  global(module: string, name: string): void {
    this.byte(0x63); // GLOBAL
    this.parts.push(new TextEncoder().encode(`${module}\n${name}\n`));
  }

  ints(values: readonly number[]): void {
    this.byte(0x28); // MARK
    for (const v of values) this.int(v);
    this.byte(0x74); // TUPLE
  }

  value(v: Picklable): void {
    if (typeof v === "number") return this.int(v);
    if (typeof v === "string") return this.str(v);
    if ("data" in v && v.data instanceof Float32Array) return this.tensor(v as TensorToPickle);
    this.byte(0x7d); // EMPTY_DICT
    const entries = Object.entries(v as Record<string, Picklable>);
    if (entries.length === 0) return;
    this.byte(0x28); // MARK
    for (const [k, item] of entries) {
      this.str(k);
      this.value(item);
    }
    this.byte(0x75); // SETITEMS
  }

  tensor(t: TensorToPickle): void {
    const key = String(this.storages.size);
    this.storages.set(key, t.data);
    const stride: number[] = [];
    let s = 1;
    for (let i = t.shape.length - 1; i >= 0; i--) {
      stride[i] = s;
      s *= t.shape[i]!;
    }
    this.global("torch._utils", "_rebuild_tensor_v2");
    this.byte(0x28); // MARK: the call's arguments
    this.byte(0x28); // MARK: the persistent id
    this.str("storage");
    this.global("torch", "FloatStorage");
    this.str(key);
    this.str("cpu");
    this.int(t.data.length);
    this.byte(0x74, 0x51); // TUPLE, BINPERSID
    this.int(0); // storage offset
    this.ints(t.shape);
    this.ints(stride);
    this.byte(0x89); // NEWFALSE: requires_grad
    this.global("collections", "OrderedDict");
    this.byte(0x29, 0x52); // EMPTY_TUPLE, REDUCE: backward hooks
    this.byte(0x74, 0x52); // TUPLE, REDUCE
  }

  bytes(): Uint8Array {
    const total = this.parts.reduce((a, p) => a + p.length, 0);
    const out = new Uint8Array(total);
    let at = 0;
    for (const p of this.parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
}

/** The bytes of a torch.save file holding `value`, its archive folder named `archive`. */
export function encodeTorchFile(value: Picklable, archive = "archive"): Uint8Array {
  const w = new PickleWriter();
  w.byte(0x80, 0x02); // PROTO 2
  w.value(value);
  w.byte(0x2e); // STOP
  const files: Zippable = {
    [`${archive}/data.pkl`]: [w.bytes(), { level: 0 }],
    [`${archive}/byteorder`]: [new TextEncoder().encode("little"), { level: 0 }],
    [`${archive}/version`]: [new TextEncoder().encode("3\n"), { level: 0 }],
  };
  for (const [key, data] of w.storages) {
    files[`${archive}/data/${key}`] = [new Uint8Array(data.buffer, data.byteOffset, data.byteLength), { level: 0 }];
  }
  return zipSync(files);
}
