/**
 * Brownian-tree noise for the SDE samplers, following A1111 1.10: k-diffusion's BrownianTreeNoiseSampler
 * over one torchsde BrownianTree per image (BrownianInterval with halfway_tree, tol 1e-6, pool_size 24),
 * numpy SeedSequence seed splitting, and torchsde's normal draws redirected to the configured RNG source
 * (A1111's randn_local: the first draw of a fresh generator).
 *
 * What is verified, and how:
 * - SeedSequence: against numpy's own output (brownian.test.ts).
 * - The whole construction, bit for bit: brownian-torchsde.test.ts replays every tree query of DPM++ SDE,
 *   2M SDE, 2M SDE Heun and 3M SDE runs (NV, CPU and GPU sources, batches, a seed above 2³¹) and compares
 *   the float32 bits with answers computed outside this repository by a line-by-line Python transcription
 *   of torchsde's BrownianInterval and k-diffusion's BrownianTreeNoiseSampler, run with numpy's own
 *   SeedSequence and float32 arithmetic (testdata/brownian-torchsde.json says how). A deliberate change
 *   of pool size or rounding there breaks every query, so the comparison discriminates.
 * What is still not verified: that output against torchsde 0.2.6 run under real torch (no torch here). Two
 * things could differ there: torch's float32 ops are the same IEEE operations, so only the query points
 * (σ values from torch's own log/exp, which may differ from ours in the last bit) and the tree's root σ
 * range could move values, by float32 rounding at most.
 */
import { createGenerator, type RngSource } from "./generator.js";
import type { LatentShape } from "./image-rng.js";
import { Kernel, e } from "./kernels.js";

const f32 = Math.fround;

/**
 * Both children of a split node from its increment W and the split noise n:
 * left = (Δ_left·W)·(1/h) + root·n, right = W − left.
 */
const leftW = e.add(e.mul(e.mul(e.param(0), e.in(0)), e.param(1)), e.mul(e.param(2), e.in(1)));
const splitKernel = new Kernel({ inputs: 2, params: 3, outputs: [leftW, e.sub(e.in(0), leftW)] });
/** a + b */
const sumKernel = new Kernel({ inputs: 2, params: 0, outputs: [e.add(e.in(0), e.in(1))] });
/** (W·sign)/scale */
const normalizeKernel = new Kernel({ inputs: 1, params: 2, outputs: [e.div(e.mul(e.in(0), e.param(0)), e.param(1))] });

/* ---- numpy.random.SeedSequence (entropy pool hashing, generate_state) ---- */

const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;

const WORD = 2 ** 32;

/**
 * Appends the little-endian 32-bit words of a non-negative integer (numpy _int_to_uint32_array; 0 → [0]).
 * Plain number arithmetic where it is exact (every integer-valued double: % and ÷ by 2³² are exact), as
 * the tree makes one SeedSequence per split and BigInt made those a visible share of its time.
 */
function pushUint32Words(out: number[], value: bigint | number): void {
  if (typeof value === "bigint") {
    if (value < 0n) throw new RangeError("SeedSequence entropy must be non-negative");
    if (value <= BigInt(Number.MAX_SAFE_INTEGER)) {
      value = Number(value);
    } else {
      for (let v = value; v > 0n; v >>= 32n) out.push(Number(v & 0xffffffffn));
      return;
    }
  }
  if (!Number.isInteger(value)) throw new RangeError(`SeedSequence entropy must be an integer, got ${value}`);
  if (value < 0) throw new RangeError("SeedSequence entropy must be non-negative");
  if (value === 0) {
    out.push(0);
    return;
  }
  for (let v = value; v > 0; v = Math.floor(v / WORD)) out.push(v % WORD);
}

export class SeedSequence {
  readonly pool: Uint32Array;

  constructor(entropy: bigint | number, spawnKey: readonly (bigint | number)[] = [], poolSize = 4) {
    const entropyArray: number[] = [];
    pushUint32Words(entropyArray, entropy);
    if (spawnKey.length > 0) {
      while (entropyArray.length < poolSize) entropyArray.push(0);
      for (const k of spawnKey) pushUint32Words(entropyArray, k);
    }
    // numpy's mix_entropy, written out without closures: the tree runs it once per split node.
    const pool = (this.pool = new Uint32Array(poolSize));
    let hashConst = INIT_A;
    let value: number;
    let mixed: number;
    for (let i = 0; i < poolSize; i++) {
      value = ((i < entropyArray.length ? entropyArray[i]! : 0) ^ hashConst) >>> 0;
      hashConst = Math.imul(hashConst, MULT_A) >>> 0;
      value = Math.imul(value, hashConst) >>> 0;
      pool[i] = (value ^ (value >>> 16)) >>> 0;
    }
    for (let src = 0; src < poolSize; src++) {
      for (let dst = 0; dst < poolSize; dst++) {
        if (src === dst) continue;
        value = (pool[src]! ^ hashConst) >>> 0;
        hashConst = Math.imul(hashConst, MULT_A) >>> 0;
        value = Math.imul(value, hashConst) >>> 0;
        value = (value ^ (value >>> 16)) >>> 0;
        mixed = (Math.imul(MIX_MULT_L, pool[dst]!) - Math.imul(MIX_MULT_R, value)) >>> 0;
        pool[dst] = (mixed ^ (mixed >>> 16)) >>> 0;
      }
    }
    for (let src = poolSize; src < entropyArray.length; src++) {
      for (let dst = 0; dst < poolSize; dst++) {
        value = (entropyArray[src]! ^ hashConst) >>> 0;
        hashConst = Math.imul(hashConst, MULT_A) >>> 0;
        value = Math.imul(value, hashConst) >>> 0;
        value = (value ^ (value >>> 16)) >>> 0;
        mixed = (Math.imul(MIX_MULT_L, pool[dst]!) - Math.imul(MIX_MULT_R, value)) >>> 0;
        pool[dst] = (mixed ^ (mixed >>> 16)) >>> 0;
      }
    }
  }

  generateState(words: number): Uint32Array {
    const out = new Uint32Array(words);
    let hashConst = INIT_B;
    for (let i = 0; i < words; i++) {
      let value = (this.pool[i % this.pool.length]! ^ hashConst) >>> 0;
      hashConst = Math.imul(hashConst, MULT_B) >>> 0;
      value = Math.imul(value, hashConst) >>> 0;
      out[i] = (value ^ (value >>> 16)) >>> 0;
    }
    return out;
  }
}

/* ---- torchsde BrownianInterval (halfway tree, no Lévy area) ---- */

/**
 * Python's round(x, 6): the exact binary value to 6 decimals, ties to even. JS toFixed breaks ties away
 * from zero instead; a double is an exact tie at 6 decimals precisely when it is an odd multiple of 2⁻⁷.
 */
export function roundTol(x: number): number {
  const scaled = x * 128;
  if (Number.isInteger(scaled) && scaled % 2 !== 0) {
    const micro = x * 1e6; // exact: an odd multiple of 7812.5
    const down = Math.floor(micro);
    return (down % 2 === 0 ? down : down + 1) / 1e6;
  }
  return Number(x.toFixed(6));
}

interface Node {
  readonly start: number;
  readonly end: number;
  readonly parent: Node | undefined;
  readonly isLeft: boolean;
  readonly spawnKey: bigint;
  readonly depth: number;
  midway?: number;
  wSeed?: number;
  left?: Node;
  right?: Node;
}

/** Draws the first normal tensor of a fresh generator seeded `seed` (A1111 randn_local). */
export type SeededNormals = (seed: number, length: number) => Float32Array;

export class BrownianInterval {
  private readonly top: Node;
  private readonly topW: Float32Array;
  /** LRU caches of node increments and of each split node's W_seed draw (shared by both children). */
  private readonly cache = new Map<Node, Float32Array>();
  private readonly noiseCache = new Map<Node, Float32Array>();

  constructor(
    t0: number,
    t1: number,
    private readonly length: number,
    private readonly entropy: number,
    private readonly randn: SeededNormals,
    private readonly poolSize = 24,
    private readonly cacheSize = 96,
  ) {
    if (!(t0 <= t1)) throw new RangeError(`Brownian interval needs t0 ≤ t1, got ${t0}, ${t1}`);
    this.top = { start: roundTol(t0), end: roundTol(t1), parent: undefined, isLeft: false, spawnKey: 0n, depth: 0 };
    const [wSeed] = new SeedSequence(entropy, [], poolSize).generateState(3);
    const scale = f32(Math.sqrt(t1 - t0));
    this.topW = this.randn(wSeed!, length).map((v) => v * scale);
  }

  /** W(tb) − W(ta) for ta ≤ tb, clamped to the interval like torchsde. */
  increment(ta: number, tb: number): Float32Array {
    ta = Math.min(Math.max(ta, this.top.start), this.top.end);
    tb = Math.min(Math.max(tb, this.top.start), this.top.end);
    if (ta > tb) throw new RangeError(`query times must satisfy ta ≤ tb, got ${ta}, ${tb}`);
    if (ta === tb) return new Float32Array(this.length);
    const intervals: Node[] = [];
    this.locate(this.top, roundTol(ta), roundTol(tb), intervals);
    const first = this.incrementOf(intervals[0]!);
    if (intervals.length === 1) return first;
    // Summed left to right, one float32 rounding per addition, like torchsde's sum of the pieces.
    const w = new Float32Array(this.length);
    sumKernel.run([w], [first, this.incrementOf(intervals[1]!)]);
    for (let i = 2; i < intervals.length; i++) sumKernel.run([w], [w, this.incrementOf(intervals[i]!)]);
    return w;
  }

  private locate(node: Node, ta: number, tb: number, out: Node[]): void {
    // Iterative form of torchsde's _loc_inner (which recurses through a trampoline).
    const pending: Array<[Node, number, number]> = [[node, ta, tb]];
    while (pending.length > 0) {
      const [start, a, end] = pending.shift()!;
      let current = start;
      let b = end;
      for (;;) {
        if (a < current.start || b > current.end) {
          current = current.parent!;
          continue;
        }
        if (a === current.start && b === current.end) {
          out.push(current);
          break;
        }
        if (current.midway === undefined) {
          if (a === current.start) {
            this.split(current, b);
            current = current.left!;
          } else {
            this.split(current, a);
            current = current.right!;
          }
          continue;
        }
        if (b <= current.midway) {
          current = current.left!;
          continue;
        }
        if (a >= current.midway) {
          current = current.right!;
          continue;
        }
        pending.unshift([current.right!, current.midway, b]);
        b = current.midway;
        current = current.left!;
      }
    }
  }

  /** halfway_tree split: always at the (rounded) midpoint, descending until `target` is a node edge. */
  private split(node: Node, target: number): void {
    let current = node;
    for (;;) {
      this.splitExact(current, 0.5 * (current.end + current.start));
      const mid = current.midway!;
      if (target > mid) current = current.right!;
      else if (target < mid) current = current.left!;
      else return;
      if (current.midway !== undefined) return;
    }
  }

  private splitExact(node: Node, midway: number): void {
    const mid = roundTol(midway);
    node.midway = mid;
    const state = new SeedSequence(this.entropy, [node.spawnKey, node.depth], this.poolSize).generateState(4);
    node.wSeed = state[0]!;
    const childDepth = node.depth + 1;
    node.left = { start: node.start, end: mid, parent: node, isLeft: true, spawnKey: 2n * node.spawnKey, depth: childDepth };
    node.right = { start: mid, end: node.end, parent: node, isLeft: false, spawnKey: 2n * node.spawnKey + 1n, depth: childDepth };
  }

  private lookup(cache: Map<Node, Float32Array>, node: Node): Float32Array | undefined {
    const value = cache.get(node);
    if (value !== undefined) {
      cache.delete(node);
      cache.set(node, value);
    }
    return value;
  }

  private remember(cache: Map<Node, Float32Array>, node: Node, value: Float32Array): void {
    cache.set(node, value);
    if (cache.size > this.cacheSize) cache.delete(cache.keys().next().value!);
  }

  private splitNoise(parent: Node): Float32Array {
    let noise = this.lookup(this.noiseCache, parent);
    if (noise === undefined) {
      noise = this.randn(parent.wSeed!, this.length);
      this.remember(this.noiseCache, parent, noise);
    }
    return noise;
  }

  /**
   * Caching changes no value (every node is a pure function of its place in the tree), only the cost.
   * Both children of a split are computed together, since they share the parent's increment and noise.
   */
  private incrementOf(node: Node): Float32Array {
    if (node === this.top) return this.topW;
    const cached = this.lookup(this.cache, node);
    if (cached !== undefined) return cached;
    const parent = node.parent!;
    const w = this.incrementOf(parent);
    const hReciprocal = 1 / (parent.end - parent.start);
    const leftDiff = parent.midway! - parent.start;
    const rightDiff = parent.end - parent.midway!;
    const root = f32(Math.sqrt(leftDiff * rightDiff * hReciprocal));
    const noise = this.splitNoise(parent);
    const left = new Float32Array(this.length);
    const right = new Float32Array(this.length);
    splitKernel.run([left, right], [w, noise], [f32(leftDiff), f32(hReciprocal), root]);
    const sibling = node.isLeft ? parent.right! : parent.left!;
    if (this.cache.get(sibling) === undefined) this.remember(this.cache, sibling, node.isLeft ? right : left);
    const out = node.isLeft ? left : right;
    this.remember(this.cache, node, out);
    return out;
  }
}

export interface BrownianNoiseOptions {
  /** Smallest positive σ of the full schedule and its largest σ (PreparedSampling.brownianRange). */
  sigmaMin: number;
  sigmaMax: number;
  /** One entropy per image: the batch's seeds (A1111 all_seeds, without ENSD). */
  seeds: readonly number[];
  /** Latent shape of one image. */
  shape: LatentShape;
  source: RngSource;
  /** "GPU" source only: see GeneratorOptions.cudaResidentThreads. */
  cudaResidentThreads?: number;
}

/** The tree's draws from the configured source: the first normals of a generator seeded `seed`. */
export function seededNormals(options: Pick<BrownianNoiseOptions, "source" | "cudaResidentThreads">): SeededNormals {
  const generatorOptions = options.cudaResidentThreads === undefined ? {} : { cudaResidentThreads: options.cudaResidentThreads };
  return (seed, length) => createGenerator(options.source, seed, generatorOptions).next(length);
}

/**
 * k-diffusion BrownianTreeNoiseSampler with a list of seeds: noise(σ, σnext) =
 * (W(σnext) − W(σ))/sqrt|σnext − σ| per image, concatenated image after image.
 */
export class BrownianTreeNoiseSampler {
  private readonly trees: BrownianInterval[];
  private readonly imageSize: number;

  /**
   * `randnFor` replaces the configured source's draws for image i (brownian-pool.ts hands out draws made
   * ahead by other threads; brownian-plan.ts records which draws a run needs). It must return exactly
   * seededNormals(options)'s values, or the tree changes.
   */
  constructor(options: BrownianNoiseOptions, randnFor?: (image: number) => SeededNormals) {
    const [c, h, w] = options.shape;
    this.imageSize = c * h * w;
    const t0 = Math.min(options.sigmaMin, options.sigmaMax);
    const t1 = Math.max(options.sigmaMin, options.sigmaMax);
    const randn = seededNormals(options);
    this.trees = options.seeds.map((seed, i) => new BrownianInterval(t0, t1, this.imageSize, seed, randnFor?.(i) ?? randn));
  }

  sample(sigma: number, sigmaNext: number): Float32Array {
    const a = f32(sigma);
    const b = f32(sigmaNext);
    const sign = a < b ? 1 : -1;
    const lo = Math.min(a, b);
    const hi = Math.max(a, b);
    const scale = f32(Math.sqrt(Math.abs(f32(b - a))));
    const out = new Float32Array(this.trees.length * this.imageSize);
    this.trees.forEach((tree, i) => {
      const offset = i * this.imageSize;
      normalizeKernel.run([out.subarray(offset, offset + this.imageSize)], [tree.increment(lo, hi)], [sign, scale]);
    });
    return out;
  }
}

/** Convenience: a NoiseSampler function for `prepareSampling` / the SDE samplers. */
export function createBrownianNoiseSampler(options: BrownianNoiseOptions): (sigma: number, sigmaNext: number) => Float32Array {
  const sampler = new BrownianTreeNoiseSampler(options);
  return (sigma, sigmaNext) => sampler.sample(sigma, sigmaNext);
}
