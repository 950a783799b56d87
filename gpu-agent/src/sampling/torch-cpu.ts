/**
 * torch's CPU generator (mt19937) and its float32 `randn`, reproduced so that A1111's "CPU" RNG
 * source gives the same latents here.
 */

import { mtUniformsSimd, torchNormalsAvx2Simd } from "./rng-mt-simd.js";
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

const TWO_PI = 2 * Math.PI;
const TWO_POW_MINUS_24 = 2 ** -24;
const TWO_POW_MINUS_53 = 2 ** -53;
const TWO_POW_32 = 2 ** 32;

export class Mt19937 {
  private readonly state = new Uint32Array(MT_N);
  private index = MT_N;

  constructor(seed: number) {
    const state = this.state;
    state[0] = seed >>> 0;
    for (let i = 1; i < MT_N; i++) {
      const prev = state[i - 1]!;
      state[i] = (Math.imul(1812433253, prev ^ (prev >>> 30)) + i) >>> 0;
    }
  }

  /** The whole engine state, to continue the same stream elsewhere (another thread). */
  saveState(): { words: Uint32Array; index: number } {
    return { words: this.state.slice(), index: this.index };
  }

  static fromState(saved: { words: Uint32Array; index: number }): Mt19937 {
    if (saved.words.length !== MT_N || !(saved.index >= 0 && saved.index <= MT_N)) throw new RangeError("not an mt19937 state");
    const mt = new Mt19937(0);
    mt.state.set(saved.words);
    mt.index = saved.index;
    return mt;
  }

  nextUint32(): number {
    if (this.index >= MT_N) this.twist();
    let y = this.state[this.index++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** out[start…start+count) = the next `count` uniforms (y & 0xffffff)·2⁻²⁴, torch's float32 `uniform`. */
  fillUniformFloats(out: Float32Array, start: number, count: number): void {
    const next = mtUniformsSimd(this.state, this.index, out, start, count);
    if (next >= 0) {
      this.index = next;
      return;
    }
    for (let i = 0; i < count; i++) out[start + i] = (this.nextUint32() & 0xffffff) * TWO_POW_MINUS_24;
  }

  /** torch's AVX2 float32 normal_fill (out.length ≥ 16) in WebAssembly SIMD; false where that is unavailable. */
  normalFillAvx2Simd(out: Float32Array): boolean {
    const next = torchNormalsAvx2Simd(this.state, this.index, out);
    if (next < 0) return false;
    this.index = next;
    return true;
  }

  private twist(): void {
    const s = this.state;
    // Split where i + 397 and i + 1 wrap, so the loops need no modulo.
    for (let i = 0; i < MT_N - MT_M; i++) {
      const y = (s[i]! & 0x80000000) | (s[i + 1]! & 0x7fffffff);
      s[i] = s[i + MT_M]! ^ (y >>> 1) ^ (-(y & 1) & 0x9908b0df);
    }
    for (let i = MT_N - MT_M; i < MT_N - 1; i++) {
      const y = (s[i]! & 0x80000000) | (s[i + 1]! & 0x7fffffff);
      s[i] = s[i + MT_M - MT_N]! ^ (y >>> 1) ^ (-(y & 1) & 0x9908b0df);
    }
    const y = (s[MT_N - 1]! & 0x80000000) | (s[0]! & 0x7fffffff);
    s[MT_N - 1] = s[MT_M - 1]! ^ (y >>> 1) ^ (-(y & 1) & 0x9908b0df);
    this.index = 0;
  }
}

/**
 * Which build of torch's float32 Box–Muller to reproduce. x86-64 wheels run the AVX2 kernel
 * (avx_mathfun log/sincos polynomials, compiled with FMA contraction); other builds (e.g. Apple
 * silicon, where A1111 uses the CPU source for MPS) run the scalar libm kernel.
 */
export type TorchCpuKernel = "avx2" | "scalar";

export interface TorchCpuGeneratorState {
  engine: { words: Uint32Array; index: number };
  kernel: TorchCpuKernel;
  cachedDoubleNormal?: number;
}

/**
 * A torch CPU generator after `manual_seed(seed)`. Seeds are taken mod 2^64 (torch accepts negative
 * seeds as their two's complement); mt19937 itself only sees the low 32 bits.
 */
export class TorchCpuGenerator {
  engine: Mt19937;
  /** torch caches the second Box–Muller value of its double-precision path between calls. */
  private cachedDoubleNormal: number | undefined;

  constructor(
    seed: number | bigint,
    private readonly kernel: TorchCpuKernel = "avx2",
  ) {
    const low32 = Number(BigInt.asUintN(32, BigInt(seed)));
    this.engine = new Mt19937(low32);
  }

  /** Everything that decides the values drawn from here on. */
  saveState(): TorchCpuGeneratorState {
    return {
      engine: this.engine.saveState(),
      kernel: this.kernel,
      ...(this.cachedDoubleNormal !== undefined && { cachedDoubleNormal: this.cachedDoubleNormal }),
    };
  }

  static fromState(saved: TorchCpuGeneratorState): TorchCpuGenerator {
    const g = new TorchCpuGenerator(0, saved.kernel);
    g.engine = Mt19937.fromState(saved.engine);
    g.cachedDoubleNormal = saved.cachedDoubleNormal;
    return g;
  }

  /** `torch.randn(n)` in float32 (contiguous tensor). */
  randn(n: number): Float32Array {
    const out = new Float32Array(n);
    if (n >= 16) this.fillNormal16(out);
    else for (let i = 0; i < n; i++) out[i] = this.doubleNormal();
    return out;
  }

  /** torch `normal_fill`: all uniforms first, Box–Muller per block of 16, last 16 redrawn when n % 16 ≠ 0. */
  private fillNormal16(data: Float32Array): void {
    if (this.kernel === "avx2" && this.engine.normalFillAvx2Simd(data)) return;
    const n = data.length;
    this.engine.fillUniformFloats(data, 0, n);
    const transform = this.kernel === "avx2" ? boxMuller16Avx2 : boxMuller16Scalar;
    for (let start = 0; start + 16 <= n; start += 16) transform(data, start);
    if (n % 16 !== 0) {
      const start = n - 16;
      this.engine.fillUniformFloats(data, start, 16);
      transform(data, start);
    }
  }

  /**
   * The path torch takes for tensors under 16 elements: `normal_distribution<double>` with a
   * cached second value. Not exercised by real latents (4 channels × at least 2×2).
   */
  private doubleNormal(): number {
    if (this.cachedDoubleNormal !== undefined) {
      const cached = this.cachedDoubleNormal;
      this.cachedDoubleNormal = undefined;
      return cached;
    }
    const u1 = this.uniformDouble();
    const u2 = this.uniformDouble();
    const radius = Math.sqrt(-2 * Math.log1p(-u2));
    const theta = TWO_PI * u1;
    this.cachedDoubleNormal = radius * Math.sin(theta);
    return radius * Math.cos(theta);
  }

  private uniformDouble(): number {
    const hi = this.engine.nextUint32();
    const lo = this.engine.nextUint32();
    return ((hi & 0x1fffff) * TWO_POW_32 + lo) * TWO_POW_MINUS_53;
  }
}

const f32 = Math.fround;

/** torch `normal_fill_16` (scalar build): float32 libm calls, θ = 2π·u2 formed in double. */
function boxMuller16Scalar(data: Float32Array, start: number): void {
  for (let j = 0; j < 8; j++) {
    const u1 = f32(1 - data[start + j]!);
    const u2 = data[start + j + 8]!;
    const radius = f32(Math.sqrt(f32(-2 * f32(Math.log(u1)))));
    const theta = f32(TWO_PI * u2);
    data[start + j] = radius * f32(Math.cos(theta));
    data[start + j + 8] = radius * f32(Math.sin(theta));
  }
}

/** torch `normal_fill_16_AVX2`: θ = float32(2π)·u2 in float32, avx_mathfun log and sincos. */
function boxMuller16Avx2(data: Float32Array, start: number): void {
  for (let j = 0; j < 8; j++) {
    const u1 = f32(1 - data[start + j]!);
    const u2 = data[start + j + 8]!;
    const radius = f32(Math.sqrt(f32(-2 * avxMathfunLog(u1))));
    avxMathfunSinCos(f32(TWO_PI_F32 * u2));
    data[start + j] = radius * sinCosOut[1]!;
    data[start + j + 8] = radius * sinCosOut[0]!;
  }
}

/*
 * avx_mathfun (Cephes-derived) float32 log and sincos as torch's AVX2 kernel evaluates them.
 * Each statement mirrors one vector instruction; `f32(a * b + c)` stands for a fused multiply-add,
 * which GCC forms from the intrinsics' mul+add pairs (exact product in float64, one rounding,
 * apart from a vanishingly rare double-rounding case). Verified bit-exact against torch output.
 */
const bitsF32 = new Float32Array(1);
const bitsI32 = new Int32Array(bitsF32.buffer);

/** Only called with u ∈ (0, 1], so the NaN/denormal handling of the vector code never applies. */
function avxMathfunLog(value: number): number {
  bitsF32[0] = value;
  const bits = bitsI32[0]!;
  let exponent = f32((bits >>> 23) - 0x7f + 1);
  bitsI32[0] = (bits & ~0x7f800000) | 0x3f000000;
  let x = bitsF32[0]!;
  const below = x < LOG_SQRTHF;
  const tmp = below ? x : 0;
  x = f32(x - 1);
  if (below) exponent = f32(exponent - 1);
  x = f32(x + tmp);
  const z = f32(x * x);
  let y = LOG_P[0];
  for (let k = 1; k < 9; k++) y = f32(y * x + LOG_P[k as 1]);
  y = f32(y * x);
  y = f32(y * z + f32(exponent * LOG_Q1));
  y = f32(y - z * 0.5);
  x = f32(x + y);
  return f32(exponent * LOG_Q2 + x);
}

/** [sin, cos] of the last `avxMathfunSinCos` call; a shared buffer avoids an allocation per value. */
const sinCosOut = new Float32Array(2);

function avxMathfunSinCos(value: number): void {
  const negative = value < 0;
  let x = Math.abs(value);
  let octant = Math.trunc(f32(x * FOUR_OVER_PI));
  octant = (octant + 1) & ~1;
  const y = octant;
  const flipSin = (octant & 4) !== 0;
  const polynomialsSwapped = (octant & 2) !== 0;
  const flipCos = (~(octant - 2) & 4) !== 0;
  x = f32(y * DP1 + x);
  x = f32(y * DP2 + x);
  x = f32(y * DP3 + x);
  const z = f32(x * x);
  let cosPoly = f32(COS_P0 * z + COS_P1);
  cosPoly = f32(cosPoly * z + COS_P2);
  cosPoly = f32(cosPoly * z);
  cosPoly = f32(cosPoly * z - z * 0.5);
  cosPoly = f32(cosPoly + 1);
  let sinPoly = f32(SIN_P0 * z + SIN_P1);
  sinPoly = f32(sinPoly * z + SIN_P2);
  sinPoly = f32(sinPoly * z);
  sinPoly = f32(sinPoly * x + x);
  const sin = polynomialsSwapped ? cosPoly : sinPoly;
  const cos = polynomialsSwapped ? sinPoly : cosPoly;
  sinCosOut[0] = negative !== flipSin ? -sin : sin;
  sinCosOut[1] = flipCos ? -cos : cos;
}
