/**
 * torch's CPU `randn` (mt19937 + float32 Box–Muller in blocks of 16, AVX2 kernel) as generated
 * WebAssembly SIMD, bit-identical to the JS reference in torch-cpu.ts:
 *
 * - The twist runs four words at a time: s[i] needs s[i+1] and s[i+397], so in 0 ≤ i < 224 every input
 *   is still the old word, and in 227 ≤ i < 623 s[i−227] is already the new one, four lanes apart at
 *   least; the three words between and the last one are done one at a time.
 * - Tempering and the 24-bit float conversion are integer and exact float32 operations.
 * - The avx_mathfun log and sincos mirror torch-cpu.ts operation by operation. Plain float32 operations
 *   run as f32x4 (one IEEE rounding, as Math.fround of the exact double result). Each fused multiply-add
 *   of the reference, `fround(a·b + c)`, is evaluated the same way as there: in f64x2, the product exact,
 *   the sum rounded to double, then to float32 — so both round identically.
 */

import { ConstPool, Fn, I32, S, V128, ensureMemory, instantiate, moduleBytes, op, type WasmMemory } from "../runtime/wasm-asm.js";
import {
  LOG_SQRTHF,
  LOG_P,
  LOG_Q1,
  LOG_Q2,
  FOUR_OVER_PI,
  DP1,
  DP2,
  DP3,
  COS_P0,
  COS_P1,
  COS_P2,
  SIN_P0,
  SIN_P1,
  SIN_P2,
  TWO_PI_F32,
  MT_N,
  MT_M,
} from "./avx-mathfun.js";

const UPPER = 0x80000000;
const LOWER = 0x7fffffff;
const MATRIX_A = 0x9908b0df;
/** Constants at 0, the state at STATE (with 16 bytes for the last chunk's over-read), values at DATA. */
const POOL_BYTES = 1024;
const STATE = POOL_BYTES;
const DATA = 4096;

/** Lanes 2, 3 of a 32-bit vector moved to lanes 0, 1. */
const UPPER_HALF = [8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15];
/** Lanes 0, 1 of a then lanes 0, 1 of b. */
const JOIN_LOW = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];

const i32Load = (f: Fn, address: number): Fn => f.i32(STATE + address).op(0x28, 2, 0);

/** s[i] = s[(i+397) mod 624] ^ (y >>> 1) ^ (y odd ? MATRIX_A : 0), y = upper bit of s[i] | lower bits of s[i+1]. */
function twistScalar(f: Fn, y: number, i: number): void {
  f.i32(STATE + 4 * i);
  i32Load(f, 4 * ((i + MT_M) % MT_N));
  i32Load(f, 4 * i)
    .i32(UPPER | 0)
    .op(0x71);
  i32Load(f, 4 * ((i + 1) % MT_N))
    .i32(LOWER)
    .op(0x71)
    .op(0x72)
    .tee(y);
  f.i32(1).op(0x76, 0x73); // (y >>> 1) ^ m
  f.i32(0)
    .get(y)
    .i32(1)
    .op(0x71, 0x6b)
    .i32(MATRIX_A | 0)
    .op(0x71, 0x73);
  f.op(0x36, 2, 0);
}

function twistFunction(pool: ConstPool): Fn {
  const f = new Fn([], [], pool);
  const p = f.local(I32);
  const y = f.local(I32);
  const yv = f.local(V128);
  /** Four words from byte address p, the (i + m) words at p + mDelta. */
  const chunkLoop = (from: number, to: number, mDelta: number): void => {
    f.i32(STATE + 4 * from).set(p);
    f.loop(() => {
      f.get(p)
        .i32(STATE + 4 * to)
        .op(op.i32GeU, 0x0d, 1);
      f.get(p);
      f.get(p).i32(mDelta).op(op.i32Add).load();
      f.get(p).load().i32x4(UPPER).simd(S.and);
      f.get(p).load(4).i32x4(LOWER).simd(S.and).simd(S.or).tee(yv);
      f.i32(1).simd(S.i32x4ShrU).simd(S.xor);
      f.get(yv).i32x4(1).simd(S.and).simd(S.i32x4Neg).i32x4(MATRIX_A).simd(S.and).simd(S.xor);
      f.store();
      f.get(p).i32(16).op(op.i32Add).set(p);
      f.op(0x0c, 0);
    });
  };
  chunkLoop(0, 224, 4 * MT_M);
  for (let i = 224; i < 227; i++) twistScalar(f, y, i);
  chunkLoop(227, 623, 4 * (MT_M - MT_N));
  twistScalar(f, y, 623);
  return f;
}

/** uniforms(out, count, index) → index: `count` tempered words as (y & 0xffffff)·2⁻²⁴ at byte address out. */
function uniformsFunction(pool: ConstPool, twist: number): Fn {
  const f = new Fn([I32, I32, I32], [I32], pool);
  const [OUT, COUNT, INDEX] = [0, 1, 2];
  const avail = f.local(I32);
  const src = f.local(I32);
  const stop = f.local(I32);
  const y = f.local(V128);
  f.loop(() => {
    f.get(COUNT).op(op.i32Eqz, 0x0d, 1);
    f.get(INDEX)
      .i32(MT_N)
      .op(op.i32GeU)
      .if(() => {
        f.call(twist).i32(0).set(INDEX);
      });
    f.i32(MT_N).get(INDEX).op(op.i32Sub).tee(avail).get(COUNT).get(avail).get(COUNT).op(op.i32LtU, op.select).set(avail);
    f.get(INDEX).i32(2).op(op.i32Shl).i32(STATE).op(op.i32Add).tee(src).get(avail).i32(2).op(op.i32Shl, op.i32Add).set(stop);
    // Whole chunks of four: the last may read past the run (into the state's padding or words not
    // yet used) and write up to three values past it, which the next run or the caller's slack absorbs.
    f.loop(() => {
      f.get(src).get(stop).op(op.i32GeU, 0x0d, 1);
      f.get(OUT);
      f.get(src).load().tee(y).get(y).i32(11).simd(S.i32x4ShrU).simd(S.xor).set(y);
      f.get(y).get(y).i32(7).simd(S.i32x4Shl).i32x4(0x9d2c5680).simd(S.and).simd(S.xor).set(y);
      f.get(y).get(y).i32(15).simd(S.i32x4Shl).i32x4(0xefc60000).simd(S.and).simd(S.xor).set(y);
      f.get(y).get(y).i32(18).simd(S.i32x4ShrU).simd(S.xor);
      f.i32x4(0xffffff)
        .simd(S.and)
        .simd(S.f32x4ConvertI32x4S)
        .f32x4(2 ** -24)
        .simd(S.f32x4Mul);
      f.store();
      f.get(OUT).i32(16).op(op.i32Add).set(OUT);
      f.get(src).i32(16).op(op.i32Add).set(src);
      f.op(0x0c, 0);
    });
    // The chunk loop moved OUT by whole chunks; set it to exactly avail values past its start.
    f.get(OUT).get(src).get(stop).op(op.i32Sub, op.i32Sub).set(OUT);
    f.get(INDEX).get(avail).op(op.i32Add).set(INDEX);
    f.get(COUNT).get(avail).op(op.i32Sub).set(COUNT);
    f.op(0x0c, 0);
  });
  f.get(INDEX);
  return f;
}

/** boxMuller(ptr, blocks): torch's normal_fill_16_AVX2 on `blocks` consecutive blocks of 16 floats. */
function boxMullerFunction(pool: ConstPool): Fn {
  const f = new Fn([I32, I32], [], pool);
  const [PTR, BLOCKS] = [0, 1];
  const end = f.local(I32);
  const base = f.local(I32);
  const v = (): number => f.local(V128);
  const [u1, x, below, exponent, z, radius, theta, octant, yF, flipSin, swapped, flipCos] = [
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
    v(),
  ];
  const [X, Z, E, Y, Yo, T] = [v(), v(), v(), v(), v(), v()];
  const logHalf = [v(), v()];
  const cosHalf = [v(), v()];
  const sinHalf = [v(), v()];
  const c = v();
  const s = v();
  const promote = (src: number, half: number): Fn => {
    f.get(src);
    if (half === 1) f.get(src).shuffle(UPPER_HALF);
    return f.simd(S.promoteLowF32x4);
  };
  const join = (halves: number[]): Fn =>
    f.get(halves[0]!).simd(S.demoteF64x2Zero).get(halves[1]!).simd(S.demoteF64x2Zero).shuffle(JOIN_LOW);

  f.get(PTR).get(BLOCKS).i32(6).op(op.i32Shl, op.i32Add).set(end);
  f.get(PTR).set(base);
  f.loop(() => {
    f.get(base).get(end).op(op.i32GeU, 0x0d, 1);
    for (const group of [0, 16]) {
      // log(u1), u1 = 1 − data[j]: exponent and mantissa from the float32 bits.
      f.f32x4(1).get(base).load(group).simd(S.f32x4Sub).set(u1);
      f.get(u1).i32(23).simd(S.i32x4ShrU).i32x4(126).simd(S.i32x4Sub).simd(S.f32x4ConvertI32x4S).set(exponent);
      f.get(u1)
        .i32x4(~0x7f800000 >>> 0)
        .simd(S.and)
        .i32x4(0x3f000000)
        .simd(S.or)
        .tee(x)
        .f32x4(LOG_SQRTHF)
        .simd(S.f32x4Lt)
        .set(below);
      f.get(exponent).get(below).f32x4(1).simd(S.and).simd(S.f32x4Sub).set(exponent);
      f.get(x).f32x4(1).simd(S.f32x4Sub).get(x).get(below).simd(S.and).simd(S.f32x4Add).tee(x).get(x).simd(S.f32x4Mul).set(z);
      for (const half of [0, 1]) {
        promote(x, half).set(X);
        promote(z, half).set(Z);
        promote(exponent, half).set(E);
        f.f64x2(LOG_P[0]!).set(Y);
        for (let k = 1; k < 9; k++) f.get(Y).get(X).simd(S.f64x2Mul).f64x2(LOG_P[k]!).simd(S.f64x2Add).rnd().set(Y);
        f.get(Y).get(X).simd(S.f64x2Mul).rnd();
        f.get(Z).simd(S.f64x2Mul).get(E).f64x2(LOG_Q1).simd(S.f64x2Mul).rnd().simd(S.f64x2Add).rnd();
        f.get(Z).f64x2(0.5).simd(S.f64x2Mul).simd(S.f64x2Sub).rnd();
        f.get(X).simd(S.f64x2Add).rnd().set(T);
        f.get(E).f64x2(LOG_Q2).simd(S.f64x2Mul).get(T).simd(S.f64x2Add).set(logHalf[half]!);
      }
      join(logHalf).f32x4(-2).simd(S.f32x4Mul).simd(S.f32x4Sqrt).set(radius);

      // sincos(2π·u2); u2 ≥ 0, so the reference's sign handling of negative arguments never applies.
      f.f32x4(TWO_PI_F32)
        .get(base)
        .load(group + 32)
        .simd(S.f32x4Mul)
        .set(theta);
      f.get(theta).f32x4(FOUR_OVER_PI).simd(S.f32x4Mul).simd(S.i32x4TruncSatF32x4S);
      f.i32x4(1)
        .simd(S.i32x4Add)
        .i32x4(~1 >>> 0)
        .simd(S.and)
        .tee(octant)
        .simd(S.f32x4ConvertI32x4S)
        .set(yF);
      f.get(octant).i32x4(4).simd(S.and).i32x4(4).simd(S.i32x4Eq).set(flipSin);
      f.get(octant).i32x4(2).simd(S.and).i32x4(2).simd(S.i32x4Eq).set(swapped);
      f.get(octant).i32x4(2).simd(S.i32x4Sub).simd(S.not).i32x4(4).simd(S.and).i32x4(4).simd(S.i32x4Eq).set(flipCos);
      for (const half of [0, 1]) {
        promote(theta, half).set(X);
        promote(yF, half).set(Yo);
        for (const dp of [DP1, DP2, DP3]) f.get(Yo).f64x2(dp).simd(S.f64x2Mul).get(X).simd(S.f64x2Add).rnd().set(X);
        f.get(X).get(X).simd(S.f64x2Mul).rnd().set(Z);
        f.f64x2(COS_P0).get(Z).simd(S.f64x2Mul).f64x2(COS_P1).simd(S.f64x2Add).rnd();
        f.get(Z).simd(S.f64x2Mul).f64x2(COS_P2).simd(S.f64x2Add).rnd();
        f.get(Z).simd(S.f64x2Mul).rnd();
        f.get(Z).simd(S.f64x2Mul).get(Z).f64x2(0.5).simd(S.f64x2Mul).simd(S.f64x2Sub).set(cosHalf[half]!);
        f.f64x2(SIN_P0).get(Z).simd(S.f64x2Mul).f64x2(SIN_P1).simd(S.f64x2Add).rnd();
        f.get(Z).simd(S.f64x2Mul).f64x2(SIN_P2).simd(S.f64x2Add).rnd();
        f.get(Z).simd(S.f64x2Mul).rnd();
        f.get(X).simd(S.f64x2Mul).get(X).simd(S.f64x2Add).set(sinHalf[half]!);
      }
      join(cosHalf).f32x4(1).simd(S.f32x4Add).set(c);
      join(sinHalf).set(s);
      // data[j] = radius·cos, data[j + 8] = radius·sin, with the octant's swap and signs.
      f.get(base);
      f.get(radius).get(s).get(c).get(swapped).simd(S.bitselect).get(flipCos).i32x4(0x80000000).simd(S.and).simd(S.xor);
      f.simd(S.f32x4Mul).store(group);
      f.get(base);
      f.get(radius).get(c).get(s).get(swapped).simd(S.bitselect).get(flipSin).i32x4(0x80000000).simd(S.and).simd(S.xor);
      f.simd(S.f32x4Mul).store(group + 32);
    }
    f.get(base).i32(64).op(op.i32Add).set(base);
    f.op(0x0c, 0);
  });
  return f;
}

interface MtExports {
  uniforms(out: number, count: number, index: number): number;
  boxMuller(ptr: number, blocks: number): void;
  memory: WasmMemory;
}

let instance: MtExports | null | undefined;

function load(): MtExports | null {
  if (instance === undefined) {
    instance = instantiate<MtExports>(() => {
      const pool = new ConstPool(POOL_BYTES);
      const functions = [
        ["twist", twistFunction(pool)],
        ["uniforms", uniformsFunction(pool, 0)],
        ["boxMuller", boxMullerFunction(pool)],
      ] as const;
      return moduleBytes(functions, pool);
    });
  }
  return instance;
}

/** Whether the SIMD module loaded (false e.g. under `node --jitless`). */
export function mtSimdAvailable(): boolean {
  return load() !== null;
}

function withState(wasm: MtExports, state: Uint32Array, values: number, run: () => number): number {
  // Four floats of slack for the chunk loops' over-writes.
  ensureMemory(wasm.memory, DATA + (values + 4) * 4);
  new Uint32Array(wasm.memory.buffer, STATE, MT_N).set(state);
  const index = run();
  state.set(new Uint32Array(wasm.memory.buffer, STATE, MT_N));
  return index;
}

/**
 * `count` uniforms (y & 0xffffff)·2⁻²⁴ of the engine (state, index) into out[start…]; updates `state`
 * and returns the new index, or −1 without WebAssembly SIMD (nothing changed then).
 */
export function mtUniformsSimd(state: Uint32Array, index: number, out: Float32Array, start: number, count: number): number {
  const wasm = load();
  if (wasm === null) return -1;
  return withState(wasm, state, count, () => {
    const next = wasm.uniforms(DATA, count, index);
    out.set(new Float32Array(wasm.memory.buffer, DATA, count), start);
    return next;
  });
}

/**
 * torch's float32 normal_fill with the AVX2 kernel for out.length ≥ 16: all uniforms, Box–Muller per
 * block of 16, the last 16 redrawn when the length is not a multiple of 16. Updates `state` and
 * returns the new index, or −1 without WebAssembly SIMD.
 */
export function torchNormalsAvx2Simd(state: Uint32Array, index: number, out: Float32Array): number {
  const wasm = load();
  if (wasm === null) return -1;
  const n = out.length;
  return withState(wasm, state, n, () => {
    let next = wasm.uniforms(DATA, n, index);
    wasm.boxMuller(DATA, n >>> 4);
    if (n % 16 !== 0) {
      const tail = DATA + (n - 16) * 4;
      next = wasm.uniforms(tail, 16, next);
      wasm.boxMuller(tail, 1);
    }
    out.set(new Float32Array(wasm.memory.buffer, DATA, n));
    return next;
  });
}
