import { philoxNormals, philoxNormalsCuda } from "./philox.js";
import { TorchCpuGenerator, type TorchCpuGeneratorState } from "./torch-cpu.js";

/** A1111's `randn_source` option. "GPU" means CUDA's Philox, which "NV" reproduces on any hardware. */
export type RngSource = "CPU" | "GPU" | "NV";

export const RNG_SOURCES: readonly RngSource[] = ["GPU", "CPU", "NV"];

export type NoiseShape = readonly number[];

/** One per-image generator; each `next` call is one `torch.randn(shape, generator=…)` call. */
export interface ImageGenerator {
  readonly source: RngSource;
  readonly seed: number;
  /** Draws `shape`'s element count (or `length`) standard normals in row-major order. */
  next(shapeOrLength: NoiseShape | number): Float32Array;
  /** The generator's state: restoreGenerator(snapshot()) continues with the very values this one would draw. */
  snapshot(): GeneratorSnapshot;
}

/** A generator's state as plain data (it crosses threads by structured clone). */
export type GeneratorSnapshot =
  | { kind: "torch-cpu"; seed: number; state: TorchCpuGeneratorState }
  | { kind: "philox"; source: "GPU" | "NV"; seed: number; offset: number; residentThreads: number | undefined };

export function elementCount(shapeOrLength: NoiseShape | number): number {
  if (typeof shapeOrLength === "number") return checkedLength(shapeOrLength);
  let n = 1;
  for (const dim of shapeOrLength) n *= checkedLength(dim);
  return n;
}

function checkedLength(n: number): number {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`invalid tensor dimension ${n}`);
  return n;
}

function checkedSeed(seed: number): void {
  if (!Number.isSafeInteger(seed)) throw new RangeError(`seed must be an integer, got ${seed}`);
}

class TorchCpuImageGenerator implements ImageGenerator {
  readonly source = "CPU" as const;
  private generator: TorchCpuGenerator;

  constructor(readonly seed: number) {
    this.generator = new TorchCpuGenerator(seed);
  }

  next(shapeOrLength: NoiseShape | number): Float32Array {
    return this.generator.randn(elementCount(shapeOrLength));
  }

  snapshot(): GeneratorSnapshot {
    return { kind: "torch-cpu", seed: this.seed, state: this.generator.saveState() };
  }

  static restore(s: Extract<GeneratorSnapshot, { kind: "torch-cpu" }>): TorchCpuImageGenerator {
    const g = new TorchCpuImageGenerator(s.seed);
    g.generator = TorchCpuGenerator.fromState(s.state);
    return g;
  }
}

export interface GeneratorOptions {
  /**
   * "GPU" only: the CUDA device's resident thread count (SMs × max threads per SM; 270336 on H100/H200,
   * 196608 on RTX 4090). torch's CUDA randn changes its element-to-counter mapping for tensors larger
   * than that, so images that big depend on the GPU model. Absent: A1111's NV mapping, which equals
   * every NVIDIA GPU's output up to its thread count.
   */
  cudaResidentThreads?: number;
}

class PhiloxImageGenerator implements ImageGenerator {
  private readonly k0: number;
  private readonly k1: number;
  private offset = 0;

  constructor(
    readonly source: "GPU" | "NV",
    readonly seed: number,
    private readonly residentThreads: number | undefined,
  ) {
    // numpy stores the seed as uint64; negative seeds wrap like a two's-complement cast.
    const wide = BigInt.asUintN(64, BigInt(seed));
    this.k0 = Number(wide & 0xffffffffn);
    this.k1 = Number(wide >> 32n);
  }

  next(shapeOrLength: NoiseShape | number): Float32Array {
    const out = new Float32Array(elementCount(shapeOrLength));
    if (out.length > 2 ** 32) throw new RangeError("NV generator supports at most 2^32 values per draw");
    if (this.residentThreads !== undefined) {
      this.offset += philoxNormalsCuda(out, this.k0, this.k1, this.offset, this.residentThreads);
    } else {
      philoxNormals(out, this.k0, this.k1, this.offset);
      this.offset++;
    }
    return out;
  }

  snapshot(): GeneratorSnapshot {
    return { kind: "philox", source: this.source, seed: this.seed, offset: this.offset, residentThreads: this.residentThreads };
  }

  /** Counter-based: any position is one assignment away. */
  seek(offset: number): void {
    this.offset = offset;
  }
}

/** A generator that continues exactly where the snapshotted one stood. */
export function restoreGenerator(s: GeneratorSnapshot): ImageGenerator {
  if (s.kind === "torch-cpu") return TorchCpuImageGenerator.restore(s);
  const g = new PhiloxImageGenerator(s.source, s.seed, s.residentThreads);
  g.seek(s.offset);
  return g;
}

export function createGenerator(source: RngSource, seed: number, options: GeneratorOptions = {}): ImageGenerator {
  checkedSeed(seed);
  const threads = options.cudaResidentThreads;
  if (threads !== undefined && (!Number.isSafeInteger(threads) || threads < 256)) {
    throw new RangeError(`cudaResidentThreads must be an integer ≥ 256, got ${threads}`);
  }
  switch (source) {
    case "CPU":
      return new TorchCpuImageGenerator(seed);
    case "GPU":
      return new PhiloxImageGenerator(source, seed, threads);
    case "NV":
      return new PhiloxImageGenerator(source, seed, undefined);
    default:
      throw new RangeError(`unknown RNG source ${String(source)}`);
  }
}
