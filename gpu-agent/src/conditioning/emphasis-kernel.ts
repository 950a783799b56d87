// The two inner loops of emphasis as a small WebAssembly module, generated here for one hidden size.
// V8's scalar code for them costs a few nanoseconds per value (bounds checks, one float32↔float64
// conversion per value); WebAssembly's SIMD does several values per instruction with the same IEEE
// results, which the bit-exact tests in emphasis.test.ts hold it to.
//
// Exports (pointers are byte offsets into `memory`; H is the hidden size compiled in):
//   memory
//   sums(src, positions, dst): dst[k] (f64) = Σ_h src[k·H + h] (f32), added in h order in float64
//     (each position one chain, several positions at a time).
//   scale(src, dst, mults, positions, s): dst[k·H + h] = f32(f32(src[k·H + h] · mults[k]) · s).

import { name, section, sleb, uleb, vec } from "../runtime/wasm-encoding.js";

const I32 = 0x7f;
const F32 = 0x7d;
const F64 = 0x7c;
const V128 = 0x7b;
const VOID = 0x40;

const BLOCK = 0x02;
const LOOP = 0x03;
const END = 0x0b;
const BR = 0x0c;
const BR_IF = 0x0d;
const GET = 0x20;
const SET = 0x21;
const TEE = 0x22;
const I32_CONST = 0x41;
const F64_CONST = 0x44;
const I32_GE_U = 0x4f;
const I32_GT_S = 0x4a;
const I32_LT_U = 0x49;
const I32_ADD = 0x6a;
const I32_MUL = 0x6c;
const F32_LOAD = 0x2a;
const F64_STORE = 0x39;
const F64_ADD = 0xa0;
const F64_PROMOTE_F32 = 0xbb;
const SIMD = 0xfd;
const V128_LOAD = [SIMD, 0x00];
const V128_STORE = [SIMD, 0x0b];
const F32X4_SPLAT = [SIMD, 0x13];
const F32X4_MUL = [SIMD, 0xe6, 0x01];
const I8X16_SHUFFLE = [SIMD, 0x0d];
const F64X2_SPLAT = [SIMD, 0x14];
const F64X2_ADD = [SIMD, 0xf0, 0x01];
const F64X2_PROMOTE_LOW_F32X4 = [SIMD, 0x5f];

const get = (i: number) => [GET, i];
const set = (i: number) => [SET, i];
const i32 = (n: number) => [I32_CONST, ...sleb(n)];
const memarg = (align: number, offset: number) => [align, ...uleb(offset)];
/** Local declarations: runs of [count, type]. */
const locals = (...runs: Array<[number, number]>) => vec(runs.map(([n, t]) => [...uleb(n), t]));
const body = (code: number[]): number[] => {
  const full = [...code, END];
  return [...uleb(full.length), ...full];
};

/** `while (k + lanes <= positions)`: sums `lanes` positions at once, one float64 chain each. */
function sumsLoop(lanes: number, stride: number, L: SumsLocals): number[] {
  const S = L.s.slice(0, lanes);
  const zero = [F64_CONST, 0, 0, 0, 0, 0, 0, 0, 0];
  return [
    BLOCK,
    VOID,
    LOOP,
    VOID,
    ...get(L.k),
    ...i32(lanes),
    I32_ADD,
    ...get(L.positions),
    I32_GT_S,
    BR_IF,
    1,
    ...get(L.src),
    ...get(L.k),
    ...i32(stride),
    I32_MUL,
    I32_ADD,
    TEE,
    L.p,
    ...i32(stride),
    I32_ADD,
    ...set(L.limit),
    ...S.flatMap((s) => [...zero, ...set(s)]),
    LOOP,
    VOID,
    ...S.flatMap((s, j) => [...get(s), ...get(L.p), F32_LOAD, ...memarg(2, j * stride), F64_PROMOTE_F32, F64_ADD, ...set(s)]),
    ...get(L.p),
    ...i32(4),
    I32_ADD,
    TEE,
    L.p,
    ...get(L.limit),
    I32_LT_U,
    BR_IF,
    0,
    END,
    ...S.flatMap((s, j) => [...get(L.dst), ...get(L.k), ...i32(8), I32_MUL, I32_ADD, ...get(s), F64_STORE, ...memarg(3, 8 * j)]),
    ...get(L.k),
    ...i32(lanes),
    I32_ADD,
    ...set(L.k),
    BR,
    0,
    END,
    END,
  ];
}

interface SumsLocals {
  src: number;
  positions: number;
  dst: number;
  k: number;
  p: number;
  limit: number;
  s: number[];
  va: number;
  vb: number;
  lo: number;
  hi: number;
  acc: number[];
}

// Lanes of two positions' rows side by side, as f32x4 shuffles: [a0 b0 a1 b1], [a2 b2 a3 b3], and
// the upper half of a vector moved down.
const bytesOf = (lanes: number[]) => lanes.flatMap((l) => [4 * l, 4 * l + 1, 4 * l + 2, 4 * l + 3]);
const INTERLEAVE_LOW = [...I8X16_SHUFFLE, ...bytesOf([0, 4, 1, 5])];
const INTERLEAVE_HIGH = [...I8X16_SHUFFLE, ...bytesOf([2, 6, 3, 7])];
const UPPER_HALF = [...I8X16_SHUFFLE, ...bytesOf([2, 3, 2, 3])];

/**
 * `while (k + 2·pairs <= positions)`: sums 2·pairs positions at once. Each f64x2 accumulator holds
 * two positions, one per lane, so every lane is still one chain adding its position's values in
 * order; the conversions and additions just do two positions per instruction.
 */
function sumsPairsLoop(pairs: number, stride: number, L: SumsLocals): number[] {
  const lanes = 2 * pairs;
  const acc = L.acc.slice(0, pairs);
  const addLow = (acc: number) => [...F64X2_PROMOTE_LOW_F32X4, ...get(acc), ...F64X2_ADD, ...set(acc)];
  const step = (j: number) => [
    ...get(L.p),
    ...V128_LOAD,
    ...memarg(2, 2 * j * stride),
    ...set(L.va),
    ...get(L.p),
    ...V128_LOAD,
    ...memarg(2, (2 * j + 1) * stride),
    ...set(L.vb),
    ...get(L.va),
    ...get(L.vb),
    ...INTERLEAVE_LOW,
    TEE,
    L.lo,
    ...addLow(acc[j]!),
    ...get(L.lo),
    ...get(L.lo),
    ...UPPER_HALF,
    ...addLow(acc[j]!),
    ...get(L.va),
    ...get(L.vb),
    ...INTERLEAVE_HIGH,
    TEE,
    L.hi,
    ...addLow(acc[j]!),
    ...get(L.hi),
    ...get(L.hi),
    ...UPPER_HALF,
    ...addLow(acc[j]!),
  ];
  return [
    BLOCK,
    VOID,
    LOOP,
    VOID,
    ...get(L.k),
    ...i32(lanes),
    I32_ADD,
    ...get(L.positions),
    I32_GT_S,
    BR_IF,
    1,
    ...get(L.src),
    ...get(L.k),
    ...i32(stride),
    I32_MUL,
    I32_ADD,
    TEE,
    L.p,
    ...i32(stride),
    I32_ADD,
    ...set(L.limit),
    ...acc.flatMap((a) => [F64_CONST, 0, 0, 0, 0, 0, 0, 0, 0, ...F64X2_SPLAT, ...set(a)]),
    LOOP,
    VOID,
    ...Array.from({ length: pairs }, (_, j) => step(j)).flat(),
    ...get(L.p),
    ...i32(16),
    I32_ADD,
    TEE,
    L.p,
    ...get(L.limit),
    I32_LT_U,
    BR_IF,
    0,
    END,
    ...acc.flatMap((a, j) => [...get(L.dst), ...get(L.k), ...i32(8), I32_MUL, I32_ADD, ...get(a), ...V128_STORE, ...memarg(3, 16 * j)]),
    ...get(L.k),
    ...i32(lanes),
    I32_ADD,
    ...set(L.k),
    BR,
    0,
    END,
    END,
  ];
}

function sumsBody(hidden: number): number[] {
  // params: 0 src, 1 positions, 2 dst; locals: 3 k, 4 p, 5 limit (i32); 6-9 s0…s3 (f64);
  // 10 va, 11 vb, 12 lo, 13 hi, 14-17 acc0…acc3 (v128)
  const L: SumsLocals = {
    src: 0,
    positions: 1,
    dst: 2,
    k: 3,
    p: 4,
    limit: 5,
    s: [6, 7, 8, 9],
    va: 10,
    vb: 11,
    lo: 12,
    hi: 13,
    acc: [14, 15, 16, 17],
  };
  const stride = hidden * 4;
  return [
    ...locals([3, I32], [4, F64], [8, V128]),
    ...i32(0),
    ...set(L.k),
    ...sumsPairsLoop(4, stride, L),
    ...sumsLoop(4, stride, L),
    ...sumsLoop(1, stride, L),
  ];
}

function scaleBody(hidden: number): number[] {
  // params: 0 src, 1 dst, 2 mults, 3 positions, 4 s (f32); locals: 5 end, 6 limit (i32); 7 vm, 8 vs (v128)
  const [SRC, DST, MULTS, POSITIONS, SCALE, END_MULTS, LIMIT, VM, VS] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const vectors = hidden / 4;
  const unroll = vectors % 4 === 0 ? 4 : vectors % 2 === 0 ? 2 : 1;
  const one = (j: number) => [
    ...get(DST),
    ...get(SRC),
    ...V128_LOAD,
    ...memarg(4, 16 * j),
    ...get(VM),
    ...F32X4_MUL,
    ...get(VS),
    ...F32X4_MUL,
    ...V128_STORE,
    ...memarg(4, 16 * j),
  ];
  return [
    ...locals([2, I32], [2, V128]),
    ...get(SCALE),
    ...F32X4_SPLAT,
    ...set(VS),
    ...get(MULTS),
    ...get(POSITIONS),
    ...i32(4),
    I32_MUL,
    I32_ADD,
    ...set(END_MULTS),
    BLOCK,
    VOID,
    LOOP,
    VOID,
    ...get(MULTS),
    ...get(END_MULTS),
    I32_GE_U,
    BR_IF,
    1,
    ...get(MULTS),
    F32_LOAD,
    ...memarg(2, 0),
    ...F32X4_SPLAT,
    ...set(VM),
    ...get(SRC),
    ...i32(hidden * 4),
    I32_ADD,
    ...set(LIMIT),
    LOOP,
    VOID,
    ...Array.from({ length: unroll }, (_, j) => one(j)).flat(),
    ...get(SRC),
    ...i32(16 * unroll),
    I32_ADD,
    ...set(SRC),
    ...get(DST),
    ...i32(16 * unroll),
    I32_ADD,
    ...set(DST),
    ...get(SRC),
    ...get(LIMIT),
    I32_LT_U,
    BR_IF,
    0,
    END,
    ...get(MULTS),
    ...i32(4),
    I32_ADD,
    ...set(MULTS),
    BR,
    0,
    END,
    END,
  ];
}

function moduleBytes(hidden: number): Uint8Array {
  const types = vec([
    [0x60, ...vec([[I32], [I32], [I32]]), ...vec([])],
    [0x60, ...vec([[I32], [I32], [I32], [I32], [F32]]), ...vec([])],
  ]);
  const bytes = [
    0x00,
    0x61,
    0x73,
    0x6d,
    0x01,
    0x00,
    0x00,
    0x00,
    ...section(1, types),
    ...section(3, vec([[0], [1]])),
    ...section(5, vec([[0x00, 1]])),
    ...section(
      7,
      vec([
        [...name("memory"), 0x02, 0],
        [...name("sums"), 0x00, 0],
        [...name("scale"), 0x00, 1],
      ]),
    ),
    ...section(10, vec([body(sumsBody(hidden)), body(scaleBody(hidden))])),
  ];
  return Uint8Array.from(bytes);
}

// The project's lib settings carry no WebAssembly declarations; this is the part used here.
interface WasmMemory {
  readonly buffer: ArrayBuffer;
  grow(pages: number): number;
}
interface WasmApi {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { readonly exports: object };
}
const PAGE_BYTES = 65536;

/** Scratch memory with typed views over it; views are renewed when the memory grows. */
export class EmphasisKernel {
  private readonly memory: WasmMemory;
  private readonly sumsFn: (src: number, positions: number, dst: number) => void;
  private readonly scaleFn: (src: number, dst: number, mults: number, positions: number, s: number) => void;
  f32: Float32Array;
  f64: Float64Array;

  private constructor(exports: object) {
    const e = exports as {
      memory: WasmMemory;
      sums: EmphasisKernel["sumsFn"];
      scale: EmphasisKernel["scaleFn"];
    };
    this.memory = e.memory;
    this.sumsFn = e.sums;
    this.scaleFn = e.scale;
    this.f32 = new Float32Array(this.memory.buffer);
    this.f64 = new Float64Array(this.memory.buffer);
  }

  /**
   * The kernel for rows of `hidden` values (a multiple of 4; offsets are compiled in), or undefined
   * where this runtime has no WebAssembly SIMD (callers fall back to JS).
   */
  static create(hidden: number): EmphasisKernel | undefined {
    if (!Number.isInteger(hidden) || hidden <= 0 || hidden % 4 !== 0) return undefined;
    const wasm = (globalThis as { WebAssembly?: WasmApi }).WebAssembly;
    if (wasm === undefined) return undefined;
    try {
      return new EmphasisKernel(new wasm.Instance(new wasm.Module(moduleBytes(hidden))).exports);
    } catch {
      return undefined;
    }
  }

  /** Makes the memory at least `bytes` long. */
  reserve(bytes: number): void {
    const have = this.memory.buffer.byteLength;
    if (have >= bytes) return;
    this.memory.grow(Math.ceil((bytes - have) / PAGE_BYTES));
    this.f32 = new Float32Array(this.memory.buffer);
    this.f64 = new Float64Array(this.memory.buffer);
  }

  sums(src: number, positions: number, dst: number): void {
    this.sumsFn(src, positions, dst);
  }

  scale(src: number, dst: number, mults: number, positions: number, s: number): void {
    this.scaleFn(src, dst, mults, positions, s);
  }
}
