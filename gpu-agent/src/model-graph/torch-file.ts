// Reads the tensors of a `torch.save` file (the zip format torch has written since 1.6): a pickle,
// `<archive>/data.pkl`, whose persistent ids name raw little-endian storages `<archive>/data/<key>`.
// Nothing in the pickle runs: pickleparser turns every global it does not know into an inert object,
// and only the few torch and collections names that rebuild tensors and dicts are given meaning here.
// Textual-inversion embeddings (.pt, .bin) are the files this exists for.

import { unzipSync } from "fflate";
import { NameRegistry, Parser } from "pickleparser";
import { ModelFileError } from "./errors.js";
import { bf16ToF32, f16ToF32 } from "./half.js";

/** A tensor from a torch file, widened to float32 in row-major order (whatever its strides were). */
export class TorchTensor {
  constructor(
    readonly dtype: TorchFloatType,
    readonly shape: readonly number[],
    readonly data: Float32Array,
  ) {}
}

export type TorchFloatType = "float32" | "float16" | "bfloat16" | "float64";

const STORAGE_TYPES: Record<string, TorchFloatType> = {
  FloatStorage: "float32",
  HalfStorage: "float16",
  BFloat16Storage: "bfloat16",
  DoubleStorage: "float64",
};

const ELEMENT_BYTES: Record<TorchFloatType, number> = { float32: 4, float16: 2, bfloat16: 2, float64: 8 };

/** The storage a persistent id points at, read lazily: a file's storages are only decoded when a tensor uses them. */
class StorageRef {
  constructor(
    readonly dtype: TorchFloatType,
    readonly key: string,
    readonly numel: number,
  ) {}
}

/** True for the bytes of a zip archive (torch ≥ 1.6's format). */
function isZip(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && bytes[0] === 0x50 && bytes[1] === 0x4b && bytes[2] === 0x03 && bytes[3] === 0x04;
}

function asFloat32(dtype: TorchFloatType, raw: Uint8Array): Float32Array {
  // Entries are copied out of the archive at offset 0, so views of them are aligned.
  const bytes = raw.byteOffset % 8 === 0 ? raw : raw.slice();
  const n = bytes.byteLength / ELEMENT_BYTES[dtype];
  switch (dtype) {
    case "float32":
      return new Float32Array(bytes.buffer, bytes.byteOffset, n);
    case "float64":
      return Float32Array.from(new Float64Array(bytes.buffer, bytes.byteOffset, n));
    case "float16":
      return f16ToF32(new Uint16Array(bytes.buffer, bytes.byteOffset, n));
    case "bfloat16":
      return bf16ToF32(new Uint16Array(bytes.buffer, bytes.byteOffset, n));
  }
}

function intList(value: unknown, what: string, label: string): number[] {
  if (!Array.isArray(value) || !value.every((v) => typeof v === "number" && Number.isInteger(v) && v >= 0)) {
    throw ModelFileError.invalidFile(label, `a tensor's ${what} is not a tuple of sizes`);
  }
  return value as number[];
}

/**
 * Unpickles a torch file. Tensors come back as TorchTensor, dicts (and OrderedDicts) as Maps, and other
 * objects (an nn.ParameterDict, say) as inert objects with their pickled state as properties.
 */
export function readTorchFile(bytes: Uint8Array, label: string): unknown {
  if (!isZip(bytes)) {
    throw ModelFileError.invalidFile(
      label,
      "not a torch zip archive: files saved by torch before 1.6 (or not by torch.save) are not read; " + "convert it to .safetensors",
    );
  }
  let entries: Record<string, Uint8Array>;
  try {
    entries = unzipSync(bytes);
  } catch (err) {
    throw ModelFileError.invalidFile(label, `unreadable zip archive: ${(err as Error).message}`, err);
  }
  const pickleName = Object.keys(entries).find((n) => n === "data.pkl" || n.endsWith("/data.pkl"));
  if (pickleName === undefined) throw ModelFileError.invalidFile(label, "a zip archive without data.pkl is not a torch file");
  const prefix = pickleName.slice(0, -"data.pkl".length);
  const byteOrder = entries[`${prefix}byteorder`];
  if (byteOrder !== undefined && new TextDecoder().decode(byteOrder).trim() !== "little") {
    throw ModelFileError.invalidFile(label, "big-endian torch files are not read");
  }

  const storages = new Map<string, Float32Array>();
  const storage = (ref: StorageRef): Float32Array => {
    let data = storages.get(ref.key);
    if (data === undefined) {
      const raw = entries[`${prefix}data/${ref.key}`];
      if (raw === undefined) throw ModelFileError.invalidFile(label, `storage ${ref.key} is missing from the archive`);
      if (raw.byteLength < ref.numel * ELEMENT_BYTES[ref.dtype]) {
        throw ModelFileError.invalidFile(label, `storage ${ref.key} is truncated`);
      }
      data = asFloat32(ref.dtype, raw.subarray(0, ref.numel * ELEMENT_BYTES[ref.dtype]));
      storages.set(ref.key, data);
    }
    return data;
  };

  const rebuildTensor = (ref: unknown, offset: unknown, size: unknown, stride: unknown): TorchTensor => {
    if (!(ref instanceof StorageRef)) throw ModelFileError.invalidFile(label, "a tensor's storage is not a float storage");
    const shape = intList(size, "size", label);
    const strides = intList(stride, "stride", label);
    if (typeof offset !== "number" || strides.length !== shape.length) {
      throw ModelFileError.invalidFile(label, "a tensor's offset or strides do not match its size");
    }
    const src = storage(ref);
    const n = shape.reduce((a, b) => a * b, 1);
    // Row-major walk over the strided view; bounds are checked once, at the view's last element.
    let last = offset;
    shape.forEach((d, i) => (last += d === 0 ? 0 : (d - 1) * strides[i]!));
    if (n > 0 && last >= src.length) throw ModelFileError.invalidFile(label, "a tensor reaches past the end of its storage");
    // A row-major view (nearly every tensor of a saved model) is one slice: a VAE's 84 M values, element
    // by element, took seconds.
    let contiguous = 1;
    const rowMajor = shape.every((_, i) => {
      const k = shape.length - 1 - i;
      const ok = shape[k] === 1 || strides[k] === contiguous;
      contiguous *= shape[k]!;
      return ok;
    });
    if (rowMajor) return new TorchTensor(ref.dtype, shape, src.slice(offset, offset + n));
    const out = new Float32Array(n);
    const index = new Array<number>(shape.length).fill(0);
    for (let i = 0; i < n; i++) {
      let at = offset;
      for (let k = 0; k < shape.length; k++) at += index[k]! * strides[k]!;
      out[i] = src[at]!;
      for (let k = shape.length - 1; k >= 0; k--) {
        if (++index[k]! < shape[k]!) break;
        index[k] = 0;
      }
    }
    return new TorchTensor(ref.dtype, shape, out);
  };

  const names = new NameRegistry()
    .register("torch._utils", "_rebuild_tensor_v2", rebuildTensor)
    .register("torch._utils", "_rebuild_tensor", rebuildTensor)
    .register("torch._utils", "_rebuild_parameter", (t: unknown) => t)
    .register("torch._utils", "_rebuild_parameter_with_state", (t: unknown) => t)
    .register("collections", "OrderedDict", () => new Map());
  const storageTypes = new Map<unknown, TorchFloatType>();
  for (const [name, dtype] of Object.entries(STORAGE_TYPES)) {
    const marker = (): never => {
      throw ModelFileError.invalidFile(label, `torch.${name} is only a storage type`);
    };
    storageTypes.set(marker, dtype);
    names.register("torch", name, marker);
  }

  const parser = new Parser({
    nameResolver: names,
    unpicklingTypeOfDictionary: "Map",
    persistentResolver: {
      resolve: (pid: unknown): unknown => {
        if (!Array.isArray(pid) || pid[0] !== "storage") throw ModelFileError.invalidFile(label, "unknown persistent id in the pickle");
        const [, type, key, , numel] = pid as [string, unknown, unknown, unknown, unknown];
        const dtype = storageTypes.get(type);
        if (dtype === undefined) throw ModelFileError.invalidFile(label, "a storage that is not float32, float16, bfloat16 or float64");
        if (typeof key !== "string" || typeof numel !== "number") throw ModelFileError.invalidFile(label, "a malformed storage id");
        return new StorageRef(dtype, key, numel);
      },
    },
  });
  try {
    return parser.parse(entries[pickleName]!);
  } catch (err) {
    if (err instanceof ModelFileError) throw err;
    throw ModelFileError.invalidFile(label, `unreadable pickle: ${(err as Error).message}`, err);
  }
}
