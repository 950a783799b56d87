// Where initializer data comes from. Graph builders only ask for shapes and lazy bytes; the data is read
// (and converted, and LoRA-merged) when the model file is written, one tensor at a time.

import { ModelFileError } from "./errors.js";
import { f32ToF16 } from "./half.js";
import type { LazyBytes } from "./protobuf.js";
import { numel, toFloat32 } from "./safetensors.js";
import type { SafetensorsFile } from "./safetensors.js";

/** Element types that graph weights are stored in. */
export type WeightType = "float32" | "float16";

/**
 * Rewrites a tensor's float32 values before they are stored (LoRA merging). Must not change the length.
 * `targets`, when present, lists the only keys it changes; other tensors can then be used verbatim.
 */
export type WeightTransform = ((key: string, values: Float32Array, shape: readonly number[]) => Float32Array | Promise<Float32Array>) & {
  readonly targets?: ReadonlySet<string>;
};

export interface WeightSource {
  /** Identifies the source in error messages (a file path). */
  readonly label: string;
  has(key: string): boolean;
  /** Shape of a stored tensor, or undefined when absent. */
  shape(key: string): readonly number[] | undefined;
  keys(): Iterable<string>;
  /** Bytes of the tensor converted to `type`, produced on demand. */
  lazy(key: string, type: WeightType): LazyBytes;
  /** The float type the tensor is stored in, when it can be used without conversion. */
  storedType(key: string): WeightType | undefined;
  /** The tensor's values as float32 (for small tensors the builder needs to inspect). */
  float32(key: string): Promise<Float32Array>;
}

function encode(values: Float32Array, type: WeightType): Uint8Array {
  if (type === "float32") return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const h = f32ToF16(values);
  return new Uint8Array(h.buffer, h.byteOffset, h.byteLength);
}

/** Tensors of an open safetensors file, optionally transformed and with renamed keys. */
export class SafetensorsWeights implements WeightSource {
  readonly label: string;

  constructor(
    private readonly file: SafetensorsFile,
    private readonly transform?: WeightTransform,
  ) {
    this.label = file.path;
  }

  has(key: string): boolean {
    return this.file.has(key);
  }

  shape(key: string): readonly number[] | undefined {
    return this.file.has(key) ? this.file.info(key).shape : undefined;
  }

  keys(): Iterable<string> {
    return this.file.keys();
  }

  storedType(key: string): WeightType | undefined {
    // A transformed tensor is recomputed anyway; keep its full precision rather than the file's.
    if (!this.untouched(key)) return undefined;
    const dtype = this.file.info(key).dtype;
    return dtype === "F32" ? "float32" : dtype === "F16" ? "float16" : undefined;
  }

  private untouched(key: string): boolean {
    return !this.transform || (this.transform.targets !== undefined && !this.transform.targets.has(key));
  }

  lazy(key: string, type: WeightType): LazyBytes {
    const info = this.file.info(key);
    const n = numel(info.shape);
    const byteLength = n * (type === "float32" ? 4 : 2);
    if (this.storedType(key) === type) {
      // The checkpoint bytes are the initializer bytes.
      return { byteLength, load: () => this.file.readBytes(key), fileRange: { path: this.file.path, offset: info.fileOffset } };
    }
    return { byteLength, load: async () => encode(await this.float32(key), type) };
  }

  async float32(key: string): Promise<Float32Array> {
    const info = this.file.info(key);
    if (!["F32", "F16", "BF16", "F64"].includes(info.dtype)) {
      throw ModelFileError.invalidFile(this.file.path, `tensor ${key} has dtype ${info.dtype}; a float type is required`);
    }
    const values = toFloat32(await this.file.tensor(key), this.file.path);
    if (!this.transform) return values;
    const out = await this.transform(key, values, info.shape);
    if (out.length !== values.length) throw new Error(`weight transform changed the length of ${key}`);
    return out;
  }
}

export interface MemoryTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** Tensors held in memory: generated tiny models and tests. */
export class MemoryWeights implements WeightSource {
  constructor(
    private readonly tensors: ReadonlyMap<string, MemoryTensor>,
    readonly label = "<memory>",
  ) {}

  has(key: string): boolean {
    return this.tensors.has(key);
  }

  shape(key: string): readonly number[] | undefined {
    return this.tensors.get(key)?.shape;
  }

  keys(): Iterable<string> {
    return this.tensors.keys();
  }

  storedType(key: string): WeightType | undefined {
    return this.tensors.has(key) ? "float32" : undefined;
  }

  lazy(key: string, type: WeightType): LazyBytes {
    const t = this.get(key);
    const bytes = encode(t.data, type);
    return { byteLength: bytes.byteLength, load: () => Promise.resolve(bytes) };
  }

  float32(key: string): Promise<Float32Array> {
    return Promise.resolve(this.get(key).data);
  }

  private get(key: string): MemoryTensor {
    const t = this.tensors.get(key);
    if (!t) throw ModelFileError.fileNotFound(this.label, `no tensor named ${key}`);
    return t;
  }
}
