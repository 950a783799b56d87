import { philoxNormalsSimd } from "./philox-simd.js";
import { philoxOutputWords } from "./philox-wasm.js";

/**
 * A1111's "NV" random source: a re-implementation of the CUDA Philox4x32-10 normal generator
 * that torch uses on NVIDIA GPUs (modules/rng_philox.py). Output is the same on every machine.
 */

const PHILOX_M0 = 0xd2511f53;
const PHILOX_M1 = 0xcd9e8d57;
const PHILOX_W0 = 0x9e3779b9;
const PHILOX_W1 = 0xbb67ae85;

/** float32(2.3283064e-10): exactly 2^-32. */
const BOX_MULLER_A = Math.fround(2.3283064e-10);
/** float32 rounding of the float64 product 2.3283064e-10 × 6.2831855, as numpy computes it. */
const BOX_MULLER_B = Math.fround(2.3283064e-10 * 6.2831855);
const HALF_A = BOX_MULLER_A / 2;
const HALF_B = BOX_MULLER_B / 2;

/** High 32 bits of a·m for uint32 a and m, exact in float64 arithmetic (no BigInt in the hot loop). */
function mulHi32(a: number, m: number): number {
  const low = (a & 0xffff) * m;
  return Math.floor(((a >>> 16) * m + Math.floor(low / 65536)) / 65536);
}

/** Raw Philox4x32-10 block for counter (c0, c1, c2, c3) and key (k0, k1); used by tests and by `philoxNormals`. */
export function philox4x32(
  counter: readonly [number, number, number, number],
  key: readonly [number, number],
): [number, number, number, number] {
  let [c0, c1, c2, c3] = counter;
  let [k0, k1] = key;
  for (let round = 0; round < 10; round++) {
    const hi0 = mulHi32(c0, PHILOX_M0);
    const lo0 = Math.imul(c0, PHILOX_M0) >>> 0;
    const hi1 = mulHi32(c2, PHILOX_M1);
    const lo1 = Math.imul(c2, PHILOX_M1) >>> 0;
    c0 = (hi1 ^ c1 ^ k0) >>> 0;
    c1 = lo1;
    c2 = (hi0 ^ c3 ^ k1) >>> 0;
    c3 = lo0;
    if (round < 9) {
      k0 = (k0 + PHILOX_W0) >>> 0;
      k1 = (k1 + PHILOX_W1) >>> 0;
    }
  }
  return [c0 >>> 0, c1 >>> 0, c2 >>> 0, c3 >>> 0];
}

/**
 * Fills `out` with the normals of one NV `randn` call: element i uses counter (offset, 0, i, 0).
 * Box–Muller runs in float64 with float32 constants and is rounded to float32 at the end, as in A1111.
 * Fastest first: the WebAssembly SIMD loop (philox-simd.ts, same values by construction), else the
 * scalar WebAssembly Philox with Box–Muller in JS, else everything in JS.
 */
export function philoxNormals(out: Float32Array, k0: number, k1: number, offset: number): void {
  if (out.length > 0 && philoxNormalsSimd(out, k0, k1, offset, (i) => philoxNormalAt(i, k0, k1, offset))) return;
  philoxNormalsScalar(out, k0, k1, offset);
}

/** Element i of a draw, the slow way: for the elements the SIMD loop leaves to libm. */
function philoxNormalAt(i: number, k0: number, k1: number, offset: number): number {
  const [c0, c1] = philox4x32([offset >>> 0, 0, i >>> 0, 0], [k0 >>> 0, k1 >>> 0]);
  return Math.sqrt(-2 * Math.log(c0 * BOX_MULLER_A + HALF_A)) * Math.sin(c1 * BOX_MULLER_B + HALF_B);
}

/** The draw without SIMD: scalar WebAssembly Philox words, Box–Muller in JS. */
function philoxNormalsScalar(out: Float32Array, k0: number, k1: number, offset: number): void {
  const words = out.length > 0 ? philoxOutputWords(out.length, offset, k0, k1) : null;
  if (words !== null) {
    for (let i = 0; i < out.length; i++) {
      const u = words[2 * i]! * BOX_MULLER_A + HALF_A;
      const v = words[2 * i + 1]! * BOX_MULLER_B + HALF_B;
      out[i] = Math.sqrt(-2 * Math.log(u)) * Math.sin(v);
    }
    return;
  }
  philoxNormalsJs(out, k0, k1, offset);
}

/**
 * The same draw without WebAssembly (also the reference the WebAssembly path is tested against).
 * The 32×32→64 products are split into 16-bit limbs so that every intermediate stays in int32
 * arithmetic, which V8 keeps unboxed.
 */
export function philoxNormalsJs(out: Float32Array, k0: number, k1: number, offset: number): void {
  const keys0 = new Int32Array(10);
  const keys1 = new Int32Array(10);
  for (let round = 0; round < 10; round++) {
    keys0[round] = (k0 + Math.imul(round, PHILOX_W0)) | 0;
    keys1[round] = (k1 + Math.imul(round, PHILOX_W1)) | 0;
  }
  const n = out.length;
  const c0Start = offset | 0;
  for (let i = 0; i < n; i++) {
    let c0 = c0Start;
    let c1 = 0;
    let c2 = i | 0;
    let c3 = 0;
    for (let round = 0; round < 10; round++) {
      const a0 = c0 & 0xffff;
      const a1 = c0 >>> 16;
      const p00 = Math.imul(a0, 0x1f53) >>> 16;
      const p01 = Math.imul(a0, 0xd251);
      const p10 = Math.imul(a1, 0x1f53);
      const p11 = Math.imul(a1, 0xd251);
      const hi0 = (p11 + (p01 >>> 16) + (p10 >>> 16) + ((p00 + (p01 & 0xffff) + (p10 & 0xffff)) >>> 16)) | 0;
      const lo0 = Math.imul(c0, PHILOX_M0);
      const b0 = c2 & 0xffff;
      const b1 = c2 >>> 16;
      const q00 = Math.imul(b0, 0x8d57) >>> 16;
      const q01 = Math.imul(b0, 0xcd9e);
      const q10 = Math.imul(b1, 0x8d57);
      const q11 = Math.imul(b1, 0xcd9e);
      const hi1 = (q11 + (q01 >>> 16) + (q10 >>> 16) + ((q00 + (q01 & 0xffff) + (q10 & 0xffff)) >>> 16)) | 0;
      const lo1 = Math.imul(c2, PHILOX_M1);
      c0 = hi1 ^ c1 ^ keys0[round]!;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ keys1[round]!;
      c3 = lo0;
    }
    const u = (c0 >>> 0) * BOX_MULLER_A + HALF_A;
    const v = (c1 >>> 0) * BOX_MULLER_B + HALF_B;
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.sin(v);
  }
}

export const PHILOX_BOX_MULLER_CONSTANTS = { A: BOX_MULLER_A, B: BOX_MULLER_B } as const;

/**
 * torch's CUDA `randn` when the tensor has more elements than the GPU can run threads at once
 * (multiProcessorCount × maxThreadsPerMultiProcessor, e.g. 132 × 2048 = 270336 on H100/H200):
 * a grid-stride loop where each thread draws curand_normal4 (4 normals from one Philox block) per
 * iteration. With T threads, element i belongs to iteration k = ⌊i/4T⌋, lane ii = ⌊(i mod 4T)/T⌋ and
 * thread (i mod T); lanes 0/1 are s·sin/s·cos of outputs (c0, c1), lanes 2/3 the same of (c2, c3).
 * Returns how far the generator's offset advances (the number of iterations).
 * Up to the thread count this is exactly `philoxNormals` (one element per thread, lane 0).
 */
export function philoxNormalsCuda(out: Float32Array, k0: number, k1: number, offset: number, residentThreads: number): number {
  const n = out.length;
  const blockSize = 256;
  const threads = Math.min(residentThreads - (residentThreads % blockSize), Math.ceil(n / blockSize) * blockSize);
  if (n <= threads) {
    philoxNormals(out, k0, k1, offset);
    return 1;
  }
  const iterations = Math.ceil(n / (4 * threads));
  for (let i = 0; i < n; i++) {
    const k = Math.floor(i / (4 * threads));
    const r = i - k * 4 * threads;
    const lane = Math.floor(r / threads);
    const thread = r - lane * threads;
    const [c0, c1, c2, c3] = philox4x32([(offset + k) >>> 0, 0, thread, 0], [k0, k1]);
    const [x, y] = lane < 2 ? [c0, c1] : [c2, c3];
    const u = x * BOX_MULLER_A + HALF_A;
    const v = y * BOX_MULLER_B + HALF_B;
    const s = Math.sqrt(-2 * Math.log(u));
    out[i] = lane % 2 === 0 ? s * Math.sin(v) : s * Math.cos(v);
  }
  return iterations;
}
