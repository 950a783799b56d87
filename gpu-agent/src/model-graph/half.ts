// IEEE binary16 and bfloat16 <-> float32 conversion. Node 20 has no Float16Array, so halves travel
// as raw bits in Uint16Array (the same convention onnxruntime-node uses for float16 tensors).

import { halfSimd } from "./half-simd.js";

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

let halfTable: Float32Array | undefined;

/** All 65,536 half values, decoded once: a table lookup beats bit-twiddling per element. */
function table(): Float32Array {
  if (halfTable) return halfTable;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) t[h] = decodeHalf(h);
  halfTable = t;
  return t;
}

function decodeHalf(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac === 0 ? sign * Infinity : NaN;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** Arrays at least this long go through the SIMD loops (half-simd.ts), their last few values through JavaScript. */
const SIMD_FROM = 64;

export function f16ToF32(src: Uint16Array, dst: Float32Array = new Float32Array(src.length)): Float32Array {
  const simd = src.length >= SIMD_FROM ? halfSimd() : null;
  const t = table();
  for (let i = simd?.decode(src, dst) ?? 0; i < src.length; i++) dst[i] = t[src[i]!]!;
  return dst;
}

export function bf16ToF32(src: Uint16Array, dst: Float32Array = new Float32Array(src.length)): Float32Array {
  const out = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) out[i] = src[i]! << 16;
  return dst;
}

/** `value` as float32, then rounded to the nearest half: a float16 tensor op's result as torch gives it. */
export function roundToF16(value: number): number {
  return decodeHalf(f32ToF16Bits(value));
}

/** Round-to-nearest-even, as torch's `.half()` does; overflow becomes ±Inf, NaN stays NaN. */
export function f32ToF16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let r = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    if (rest > half || (rest === half && r & 1)) r++;
    return sign | r;
  }
  let r = mant >>> 13;
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && r & 1)) {
    r++;
    if (r === 0x400) {
      r = 0;
      e++;
      if (e >= 31) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | r;
}

/**
 * f32ToF16Bits over an array: an fp16 UNet export's inputs go through here on every model call, so long
 * arrays go through the SIMD loop (half-simd.ts, the same bits; tested) and only the last few values, or
 * everything where there is no WebAssembly SIMD, value by value.
 */
export function f32ToF16(src: Float32Array, dst: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  const simd = src.length >= SIMD_FROM ? halfSimd() : null;
  for (let i = simd?.encode(src, dst) ?? 0; i < src.length; i++) dst[i] = f32ToF16Bits(src[i]!);
  return dst;
}

/** Round-to-nearest-even truncation of the low 16 bits, as torch's `.bfloat16()` does. */
export function f32ToBf16(src: Float32Array, dst: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const x = bits[i]!;
    if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) {
      dst[i] = (x >>> 16) | 0x40;
      continue;
    }
    const lsb = (x >>> 16) & 1;
    dst[i] = ((x + 0x7fff + lsb) >>> 16) & 0xffff;
  }
  return dst;
}
