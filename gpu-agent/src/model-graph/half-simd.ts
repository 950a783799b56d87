/**
 * Half-float conversion of whole arrays as WebAssembly SIMD loops, eight values per iteration, for the
 * arrays an fp16 UNet export takes and gives on every model call (0.5 MB at 1024×1024 with CFG), where
 * even a tight JavaScript loop costs 3–5 ns per value. Both directions are branch-free forms of the
 * scalar rules in half.ts, with the same results (tested against them):
 * - float32 → half, round to nearest even. Normal halves: subtract the exponent bias difference, add
 *   0xfff plus the lowest kept bit, shift by 13 (a carry moves into the exponent, up to Inf). Subnormal
 *   halves: add 0.5 as a float, so that the FPU's own round-to-nearest-even aligns the mantissa, then
 *   subtract 0.5's bits. |x| ≥ 65536, Inf and NaN: 0x7c00, or 0x7e00 for NaN. Then the sign.
 * - half → float32. Shift the exponent and mantissa into place and add the bias difference; Inf and NaN
 *   get a second one, subnormals are renormalized by subtracting 2^-14 as a float. Then the sign. A NaN
 *   keeps its payload (the table in half.ts has one NaN for all): a NaN in is a NaN out either way.
 * Without WebAssembly SIMD, `halfSimd()` is null and half.ts uses its JavaScript loops.
 */
import { ConstPool, Fn, I32, S, V128, ensureMemory, instantiate, moduleBytes, op, type WasmMemory } from "../runtime/wasm-asm.js";

/** The constants' bytes (wasm-asm's ConstPool); the float region and the half region follow. */
const POOL_BYTES = 256;
/** Values per call into the module: a 128 KB float region and a 64 KB half region. */
const CHUNK = 32768;
const FLOATS_AT = POOL_BYTES;
const HALVES_AT = FLOATS_AT + CHUNK * 4;

/** float32 bits in i32x4 lanes (local `x`) → half bits in i32x4 lanes, left on the stack. */
function encodeLanes(f: Fn, x: number, abs: number, out: number): void {
  f.get(x).i32x4(0x7fffffff).simd(S.and).set(abs);
  // normal = (abs + (0xfff − 0x38000000) + ((abs >> 13) & 1)) >> 13
  f.get(abs)
    .i32x4(0xfff - 0x38000000)
    .simd(S.i32x4Add);
  f.get(abs).i32(13).simd(S.i32x4ShrU).i32x4(1).simd(S.and).simd(S.i32x4Add).i32(13).simd(S.i32x4ShrU);
  // subnormal = bits(float(abs) + 0.5) − bits(0.5)
  f.get(abs).i32x4(0x3f000000).simd(S.f32x4Add).i32x4(0x3f000000).simd(S.i32x4Sub);
  // abs ≥ 0x38800000 (2^-14) picks the normal form
  f.get(abs).i32x4(0x387fffff).simd(S.i32x4GtU).simd(S.bitselect).set(out);
  // abs ≥ 0x47800000: 0x7e00 for NaN (abs > 0x7f800000), else 0x7c00
  f.i32x4(0x7e00).i32x4(0x7c00).get(abs).i32x4(0x7f800000).simd(S.i32x4GtU).simd(S.bitselect);
  f.get(out).get(abs).i32x4(0x477fffff).simd(S.i32x4GtU).simd(S.bitselect);
  // | sign
  f.get(x).i32(16).simd(S.i32x4ShrU).i32x4(0x8000).simd(S.and).simd(S.or);
}

/** Half bits in i32x4 lanes (local `h`) → float32 bits, left on the stack. */
function decodeLanes(f: Fn, h: number, o: number, e: number): void {
  // o = ((h & 0x7fff) << 13) + 0x38000000
  f.get(h).i32x4(0x7fff).simd(S.and).i32(13).simd(S.i32x4Shl).i32x4(0x38000000).simd(S.i32x4Add).tee(o);
  // e = o & 0x7f800000: 0x47800000 for Inf/NaN, 0x38000000 for zero and subnormals
  f.i32x4(0x7f800000).simd(S.and).set(e);
  // Inf/NaN: o + 0x38000000; subnormal: float(o + 2^23) − 2^-14; else o
  f.get(o).i32x4(0x38000000).simd(S.i32x4Add);
  f.get(o).i32x4(0x00800000).simd(S.i32x4Add).i32x4(0x38800000).simd(S.f32x4Sub);
  f.get(o).get(e).i32x4(0x38000000).simd(S.i32x4Eq).simd(S.bitselect);
  f.get(e).i32x4(0x47800000).simd(S.i32x4Eq).simd(S.bitselect);
  // | sign << 16
  f.get(h).i32x4(0x8000).simd(S.and).i32(16).simd(S.i32x4Shl).simd(S.or);
}

/**
 * fn(src, dst, srcEnd): while src < srcEnd, `step` (which reads at src and writes at dst), then src and
 * dst move on by their strides.
 */
function stridedLoop(pool: ConstPool, srcStride: number, dstStride: number, step: (f: Fn, src: number, dst: number) => void): Fn {
  const f = new Fn([I32, I32, I32], [], pool);
  const [src, dst, end] = [f.param(0), f.param(1), f.param(2)];
  f.loop(() => {
    f.get(src).get(end).op(op.i32GeU, 0x0d, 1); // br_if 1: done
    step(f, src, dst);
    f.get(src).i32(srcStride).op(op.i32Add).set(src);
    f.get(dst).i32(dstStride).op(op.i32Add).set(dst);
    f.op(0x0c, 0); // br 0
  });
  return f;
}

/** 8 floats (two vectors) → 8 halves (one vector) per iteration. */
function encodeFunction(pool: ConstPool): Fn {
  return stridedLoop(pool, 32, 16, (f, src, dst) => {
    const [x, abs, out] = [f.local(V128), f.local(V128), f.local(V128)];
    f.get(dst);
    f.get(src).load(0).set(x);
    encodeLanes(f, x, abs, out);
    f.get(src).load(16).set(x);
    encodeLanes(f, x, abs, out);
    f.simd(S.i16x8NarrowI32x4U).store(0);
  });
}

/** 8 halves (one vector) → 8 floats (two vectors) per iteration. */
function decodeFunction(pool: ConstPool): Fn {
  return stridedLoop(pool, 16, 32, (f, src, dst) => {
    const [halves, h, o, e] = [f.local(V128), f.local(V128), f.local(V128), f.local(V128)];
    f.get(src).load(0).set(halves);
    f.get(dst).get(halves).simd(S.i32x4ExtendLowI16x8U).set(h);
    decodeLanes(f, h, o, e);
    f.store(0);
    f.get(dst).get(halves).simd(S.i32x4ExtendHighI16x8U).set(h);
    decodeLanes(f, h, o, e);
    f.store(16);
  });
}

interface HalfExports {
  encode(src: number, dst: number, end: number): void;
  decode(src: number, dst: number, end: number): void;
  memory: WasmMemory;
}

export interface HalfSimd {
  /** dst[i] = the half bits of src[i], for i < src.length rounded down to a multiple of 8; returns that count. */
  encode(src: Float32Array, dst: Uint16Array): number;
  /** dst[i] = the float32 value of half src[i], likewise; returns the count converted. */
  decode(src: Uint16Array, dst: Float32Array): number;
}

let made: HalfSimd | null | undefined;

/** The SIMD conversions, or null where WebAssembly SIMD is not available. */
export function halfSimd(): HalfSimd | null {
  if (made !== undefined) return made;
  const wasm = instantiate<HalfExports>(() => {
    const pool = new ConstPool(POOL_BYTES);
    return moduleBytes(
      [
        ["encode", encodeFunction(pool)],
        ["decode", decodeFunction(pool)],
      ],
      pool,
    );
  });
  if (wasm === null) return (made = null);
  ensureMemory(wasm.memory, HALVES_AT + CHUNK * 2);
  const floats = new Float32Array(wasm.memory.buffer, FLOATS_AT, CHUNK);
  const halves = new Uint16Array(wasm.memory.buffer, HALVES_AT, CHUNK);
  made = {
    encode(src, dst) {
      const whole = src.length & ~7;
      for (let i = 0; i < whole; i += CHUNK) {
        const n = Math.min(CHUNK, whole - i);
        floats.set(src.subarray(i, i + n));
        wasm.encode(FLOATS_AT, HALVES_AT, FLOATS_AT + n * 4);
        dst.set(halves.subarray(0, n), i);
      }
      return whole;
    },
    decode(src, dst) {
      const whole = src.length & ~7;
      for (let i = 0; i < whole; i += CHUNK) {
        const n = Math.min(CHUNK, whole - i);
        halves.set(src.subarray(i, i + n));
        wasm.decode(HALVES_AT, FLOATS_AT, HALVES_AT + n * 2);
        dst.set(floats.subarray(0, n), i);
      }
      return whole;
    },
  };
  return made;
}
