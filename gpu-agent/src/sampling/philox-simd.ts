/**
 * The NV generator's normals in one WebAssembly SIMD loop: Philox4x32-10 on four counters at once,
 * then Box–Muller two lanes at a time in float64, written as float32.
 *
 * A1111's Box–Muller is float64 `sqrt(−2·ln u)·sin v` rounded to float32, with libm's log and sin.
 * WebAssembly has neither, so this loop evaluates them by polynomials whose error is bounded, and
 * keeps a result only when that bound proves the float32 rounding:
 *
 * - ln u, u = (2w+1)·2⁻³³: u = 2^k·f with f in (√2/2, √2], ln f = 2·atanh(s), s = (f−1)/(f+1),
 *   |s| ≤ 0.1716, series through s²¹ (truncation < 2⁻⁵⁵ relative); f − 1 is exact, s carries ≤ 2⁻⁵²,
 *   and k·ln 2 uses a 33-bit ln 2 head (k·head exact) plus its tail. Relative error < 2⁻⁵⁰.
 * - sin v, 0 < v ≤ 2π: q = round(v/π), r = v − q·π with π in three parts (33 + 33 + 53 bits, so
 *   q·part is exact and r keeps its relative accuracy even next to a multiple of π), sin v = (−1)^q·sin r,
 *   and the Taylor series of sin r through r²¹ for |r| ≤ π/2 + ε (truncation < 2⁻⁶⁰ relative, since
 *   sin r ≥ 2r/π there). Relative error < 2⁻⁵⁰.
 * - The product therefore differs from the exact value by less than 2⁻⁴⁹ relative, and libm's (each
 *   function within 1 ulp, sqrt and × correctly rounded) by less than 2⁻⁵⁰; together < 2⁻⁴⁸·⁸. A value
 *   is kept when value ± |value|·2⁻⁴⁴ round to the same float32 — then libm's value, which lies in that
 *   interval, rounds to it too. Otherwise (about one element in 2¹⁹) the pair is listed and JS recomputes
 *   it with Math.log/Math.sin, exactly as the scalar path does.
 *
 * Speed (the loop is bound by instruction throughput): each iteration runs two Philox blocks and four
 * Box–Muller pairs whose statements are interleaved into one branch-free block, so the CPU overlaps
 * their dependency chains; the constants are loaded into locals once, since V8 would rebuild every
 * `v128.const` at each use; what the counter (offset, 0, i, 0) fixes for all elements (round 0's c0
 * product, round 1's c2 product) is computed before the loop; and one test per iteration guards the
 * rare fix-ups.
 */

import { name, section, sleb, uleb } from "../runtime/wasm-encoding.js";
import { ConstPool } from "../runtime/wasm-asm.js";
const PHILOX_M0 = 0xd2511f53;
const PHILOX_M1 = 0xcd9e8d57;
const PHILOX_W0 = 0x9e3779b9;
const PHILOX_W1 = 0xbb67ae85;

/** Exactly 2⁻³²: u = w·A + A/2 is then formed from the word's bits (see the loop). */
const BOX_MULLER_A = Math.fround(2.3283064e-10);
const BOX_MULLER_B = Math.fround(2.3283064e-10 * 6.2831855);

/** π = PI_1 + PI_2 + PI_3 (+ 2e−37): 33, 33 and 53 significant bits. */
const PI_1 = 3.1415926534682512;
const PI_2 = 1.2154201012607932e-10;
const PI_3 = 4.044532497591901e-21;
/** ln 2 = LN2_HI (33 bits) + LN2_LO. */
const LN2_HI = 0.6931471804855391;
const LN2_LO = 7.440617110012397e-11;
const TOLERANCE = 2 ** -44;
/** Linear memory below this holds the constants; the output and fix-up list follow. */
const POOL_BYTES = 1024;

const ATANH_SERIES = [3, 5, 7, 9, 11, 13, 15, 17, 19, 21].map((k) => 1 / k);
const factorial = (k: number): number => (k <= 1 ? 1 : k * factorial(k - 1));
/** sin r = r + r·r²·(S₃ + r²·(S₅ + …)). */
const SIN_SERIES = [3, 5, 7, 9, 11, 13, 15, 17, 19, 21].map((k, j) => (j % 2 === 0 ? -1 : 1) / factorial(k));

/* ---- a minimal assembler ---- */

const I32 = 0x7f;
/** i32 locals reserved ahead of the v128 ones (their indices are fixed before the count is known). */
const MAX_I32_LOCALS = 16;
const V128 = 0x7b;

/** SIMD opcodes (0xfd prefix) used below. */
const S = {
  load: 0x00,
  shuffle: 0x0d,
  i32x4Splat: 0x11,
  f64x2Splat: 0x14,
  const: 0x0c,
  store64Lane: 0x5b,
  demoteF64x2Zero: 0x5e,
  f32x4Eq: 0x41,
  f64x2Eq: 0x47,
  f64x2Gt: 0x4a,
  and: 0x4e,
  or: 0x50,
  xor: 0x51,
  bitselect: 0x52,
  f64x2Floor: 0x75,
  f64x2Nearest: 0x94,
  i32x4AllTrue: 0xa3,
  i32x4Add: 0xae,
  i64x2Shl: 0xcb,
  i64x2ShrU: 0xcd,
  i64x2ExtmulLowU: 0xde,
  i64x2ExtmulHighU: 0xdf,
  f64x2Abs: 0xec,
  f64x2Neg: 0xed,
  f64x2Sqrt: 0xef,
  f64x2Add: 0xf0,
  f64x2Sub: 0xf1,
  f64x2Mul: 0xf2,
  f64x2Div: 0xf3,
  f64x2ConvertLowI32x4U: 0xff,
} as const;

class Asm {
  readonly code: number[] = [];
  /** i32 locals in use; `i32Local(i32Count++)` adds one. */
  i32Count: number;
  private v128Count = 0;

  constructor(
    private readonly params: number,
    i32Locals: number,
  ) {
    this.i32Count = i32Locals;
  }

  /** A new v128 local's index. */
  v128(): number {
    return this.params + MAX_I32_LOCALS + this.v128Count++;
  }

  i32Local(k: number): number {
    return this.params + k;
  }

  op(...bytes: number[]): this {
    this.code.push(...bytes);
    return this;
  }

  simd(op: number, ...imm: number[]): this {
    return this.op(0xfd, ...uleb(op), ...imm);
  }

  get(local: number): this {
    return this.op(0x20, ...uleb(local));
  }

  /** Where recording, the code offsets after each local.set: the statement boundaries `interleave` cuts at. */
  marks: number[] | null = null;

  set(local: number): this {
    this.op(0x21, ...uleb(local));
    this.marks?.push(this.code.length);
    return this;
  }

  /**
   * Emits the statements of each stream round-robin: independent computations (the two Box–Muller
   * pairs) then sit side by side in one basic block, which gives the CPU two dependency chains to
   * overlap. Each stream must cut only where its stack is empty (after local.set).
   */
  interleave(streams: ReadonlyArray<() => void>): void {
    const statements: number[][][] = [];
    for (const emit of streams) {
      const start = this.code.length;
      this.marks = [];
      emit();
      const bounds = [start, ...this.marks];
      this.marks = null;
      if (bounds[bounds.length - 1] !== this.code.length) throw new Error("a stream must end with local.set");
      const pieces: number[][] = [];
      for (let j = 0; j + 1 < bounds.length; j++) pieces.push(this.code.slice(bounds[j], bounds[j + 1]));
      this.code.length = start;
      statements.push(pieces);
    }
    const longest = Math.max(...statements.map((p) => p.length));
    for (let j = 0; j < longest; j++) for (const pieces of statements) if (j < pieces.length) this.code.push(...pieces[j]!);
  }

  tee(local: number): this {
    return this.op(0x22, ...uleb(local));
  }

  i32(value: number): this {
    return this.op(0x41, ...sleb(value));
  }

  readonly pool = new ConstPool(POOL_BYTES);
  private readonly constLocals = new Map<number, number>();

  /**
   * A 16-byte constant as a local loaded once from the pool before the loop. V8 rebuilds each
   * `v128.const` through general registers at every use (three or four instructions), and a load
   * inside the loop would be ordered after the loop's stores; a loaded local is a plain value.
   */
  bytes16(bytes: Uint8Array): this {
    const address = this.pool.address(bytes);
    let local = this.constLocals.get(address);
    if (local === undefined) {
      local = this.v128();
      this.constLocals.set(address, local);
    }
    return this.get(local);
  }

  f64x2(value: number): this {
    return this.bytes16(new Uint8Array(new Float64Array([value, value]).buffer));
  }

  i64x2Bits(hi: number, lo: number): this {
    return this.bytes16(new Uint8Array(new Uint32Array([lo, hi, lo, hi]).buffer));
  }

  i32x4(a: number, b: number, c: number, d: number): this {
    return this.bytes16(new Uint8Array(new Uint32Array([a, b, c, d]).buffer));
  }

  shuffle(lanes: readonly number[]): this {
    return this.simd(S.shuffle, ...lanes);
  }

  body(): number[] {
    const decls = [2, ...uleb(MAX_I32_LOCALS), I32, ...uleb(this.v128Count), V128];
    const loads: number[] = [];
    for (const [address, local] of this.constLocals) loads.push(0x41, 0, 0xfd, S.load, 4, ...uleb(address), 0x21, ...uleb(local));
    const body = [...decls, ...loads, ...this.code, 0x0b];
    return [...uleb(body.length), ...body];
  }
}

/** Bytes 0–3, 8–11 of a then of b (the low words of four 64-bit products), and the high words. */
/** Philox blocks of four elements per loop iteration: their dependency chains interleave. */
const BLOCKS = 2;
const splat4 = (x: number): [number, number, number, number] => [x, x, x, x];

/** 32-bit lanes (a0, b0, a1, b1) and (a2, b2, a3, b3). */
const INTERLEAVE_LOW = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
const INTERLEAVE_HIGH = INTERLEAVE_LOW.map((b) => b + 8);

const LOW_WORDS = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27];
const HIGH_WORDS = LOW_WORDS.map((b) => b + 4);

/**
 * normals(n, offset, k0, k1, out, fix) → fixCount: writes n (a multiple of 4·BLOCKS) float32 normals at
 * byte offset `out`, and at `fix` the element index of each pair the bound could not settle.
 */
function functionBody(): { body: number[]; pool: ConstPool } {
  const N = 0,
    OFFSET = 1,
    K0 = 2,
    K1 = 3,
    OUT = 4,
    FIX = 5;
  const a = new Asm(6, 2);
  const I = a.i32Local(0);
  const FIXES = a.i32Local(1);
  const mul = (src: number, m: number, hi: number, lo: number): void => {
    const pLo = a.v128();
    const pHi = a.v128();
    a.get(src).i32x4(m, m, m, m).simd(S.i64x2ExtmulLowU).set(pLo);
    a.get(src).i32x4(m, m, m, m).simd(S.i64x2ExtmulHighU).set(pHi);
    a.get(pLo).get(pHi).shuffle(HIGH_WORDS).set(hi);
    a.get(pLo).get(pHi).shuffle(LOW_WORDS).set(lo);
  };

  // Before the loop: the round keys, and what does not depend on the element index. The counter is
  // (offset, 0, i, 0), so round 0's c0 product and c2/c3 outputs, and round 1's c2 product, are the
  // same for every element.
  const key0: number[] = [];
  const key1: number[] = [];
  for (let round = 0; round < 10; round++) {
    key0.push(a.v128());
    key1.push(a.v128());
    a.get(K0).simd(S.i32x4Splat);
    if (round > 0) a.i32x4(...splat4((round * PHILOX_W0) >>> 0)).simd(S.i32x4Add);
    a.set(key0[round]!);
    a.get(K1).simd(S.i32x4Splat);
    if (round > 0) a.i32x4(...splat4((round * PHILOX_W1) >>> 0)).simd(S.i32x4Add);
    a.set(key1[round]!);
  }
  const offsetV = a.v128();
  const [hi0c, lo0c, c2After0, hi1c, lo1c] = [a.v128(), a.v128(), a.v128(), a.v128(), a.v128()];
  a.get(OFFSET).simd(S.i32x4Splat).set(offsetV);
  mul(offsetV, PHILOX_M0, hi0c, lo0c);
  a.get(hi0c).get(key1[0]!).simd(S.xor).set(c2After0);
  mul(c2After0, PHILOX_M1, hi1c, lo1c);

  a.i32(0).set(I).i32(0).set(FIXES);
  a.op(0x02, 0x40, 0x03, 0x40); // block, loop
  a.get(I).get(N).op(0x4f, 0x0d, 1); // i32.ge_u; br_if 1

  /** Philox4x32-10 of elements i + 4·blk … + 3: the final (c0, c1) words in words[blk]. */
  const words = Array.from({ length: BLOCKS }, () => [a.v128(), a.v128()] as const);
  const philox = (blk: number): void => {
    const c = [a.v128(), a.v128(), a.v128(), a.v128()];
    const [hi0, lo0, hi1, lo1] = [a.v128(), a.v128(), a.v128(), a.v128()];
    const ctr = a.v128();
    a.get(I)
      .simd(S.i32x4Splat)
      .i32x4(4 * blk, 4 * blk + 1, 4 * blk + 2, 4 * blk + 3)
      .simd(S.i32x4Add)
      .set(ctr);
    // Round 0: c = (offset, 0, ctr, 0).
    mul(ctr, PHILOX_M1, hi1, lo1);
    a.get(hi1).get(key0[0]!).simd(S.xor).set(c[0]!);
    a.get(lo1).set(c[1]!);
    // Round 1: c2 = c2After0 and c3 = lo0c for every element.
    mul(c[0]!, PHILOX_M0, hi0, lo0);
    a.get(hi1c).get(c[1]!).simd(S.xor).get(key0[1]!).simd(S.xor).set(c[0]!);
    a.get(lo1c).set(c[1]!);
    a.get(hi0).get(lo0c).simd(S.xor).get(key1[1]!).simd(S.xor).set(c[2]!);
    a.get(lo0).set(c[3]!);
    for (let round = 2; round < 10; round++) {
      mul(c[0]!, PHILOX_M0, hi0, lo0);
      mul(c[2]!, PHILOX_M1, hi1, lo1);
      // c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0
      a.get(hi1).get(c[1]!).simd(S.xor).get(key0[round]!).simd(S.xor).set(c[0]!);
      a.get(lo1).set(c[1]!);
      a.get(hi0).get(c[3]!).simd(S.xor).get(key1[round]!).simd(S.xor).set(c[2]!);
      a.get(lo0).set(c[3]!);
    }
    a.get(c[0]!).set(words[blk]![0]);
    a.get(c[1]!).set(words[blk]![1]);
  };
  a.interleave(Array.from({ length: BLOCKS }, (_, blk) => () => philox(blk)));

  const low32s = Array.from({ length: 2 * BLOCKS }, () => a.v128());
  /** Per pair: all lanes true where value ± margin round to the same float32. */
  const settled = Array.from({ length: 2 * BLOCKS }, () => a.v128());
  const boxMuller = (blk: number, pair: number): void => {
    const c = words[blk]!;
    const u = a.v128();
    const v = a.v128();
    const f = a.v128();
    const mask = a.v128();
    const k = a.v128();
    const s = a.v128();
    const z = a.v128();
    const logu = a.v128();
    const radius = a.v128();
    const q = a.v128();
    const r = a.v128();
    const rr = a.v128();
    const value = a.v128();
    const margin = a.v128();
    const low32 = low32s[2 * blk + pair]!;
    /** c₀ + x·(c₁ + x·(…)), left on the stack. */
    const horner = (x: number, coefficients: readonly number[]): void => {
      a.f64x2(coefficients[coefficients.length - 1]!);
      for (let j = coefficients.length - 2; j >= 0; j--) a.get(x).simd(S.f64x2Mul).f64x2(coefficients[j]!).simd(S.f64x2Add);
    };

    // u = w0·A + A/2, v = w1·B + B/2 in float64, as the scalar path computes them. A word w becomes
    // a double by pairing it with high bits: 0x41300000:w is 2²⁰ + w·2⁻³², so subtracting
    // 2²⁰ − 2⁻³³ gives u = w·2⁻³² + 2⁻³³ exactly; 0x43300000:w − 2⁵² is w.
    const pairUp = pair === 0 ? INTERLEAVE_LOW : INTERLEAVE_HIGH;
    a.get(c[0])
      .i32x4(...splat4(0x41300000))
      .shuffle(pairUp)
      .f64x2(2 ** 20 - BOX_MULLER_A / 2)
      .simd(S.f64x2Sub)
      .set(u);
    a.get(c[1])
      .i32x4(...splat4(0x43300000))
      .shuffle(pairUp)
      .f64x2(2 ** 52)
      .simd(S.f64x2Sub);
    a.f64x2(BOX_MULLER_B)
      .simd(S.f64x2Mul)
      .f64x2(BOX_MULLER_B / 2)
      .simd(S.f64x2Add)
      .set(v);

    // ln u: u = 2^k·f with f in (√2/2, √2]; k = (exponent bits) − 1023, computed as 2⁵² + e − (2⁵² + 1023),
    // plus 1 where f was halved.
    a.get(u).i64x2Bits(0x000fffff, 0xffffffff).simd(S.and).i64x2Bits(0x3ff00000, 0).simd(S.or).set(f);
    a.get(f).f64x2(Math.SQRT2).simd(S.f64x2Gt).set(mask);
    a.get(f).f64x2(0.5).simd(S.f64x2Mul).get(f).get(mask).simd(S.bitselect).set(f);
    a.get(u)
      .i32(52)
      .simd(S.i64x2ShrU)
      .i64x2Bits(0x43300000, 0)
      .simd(S.or)
      .f64x2(2 ** 52 + 1023)
      .simd(S.f64x2Sub);
    a.get(mask).f64x2(1).simd(S.and).simd(S.f64x2Add).set(k);
    // s = (f − 1)/(f + 1), z = s²; ln f = 2s + 2s·(z·series(z)).
    a.get(f).f64x2(1).simd(S.f64x2Sub).get(f).f64x2(1).simd(S.f64x2Add).simd(S.f64x2Div).tee(s).get(s).simd(S.f64x2Mul).set(z);
    a.get(s).get(s).simd(S.f64x2Add).tee(s);
    a.get(s).get(z);
    horner(z, ATANH_SERIES);
    a.simd(S.f64x2Mul).simd(S.f64x2Mul).simd(S.f64x2Add).set(logu);
    // ln u = k·ln2_hi + (k·ln2_lo + ln f), radius = sqrt(−2·ln u).
    a.get(k).f64x2(LN2_HI).simd(S.f64x2Mul);
    a.get(k).f64x2(LN2_LO).simd(S.f64x2Mul).get(logu).simd(S.f64x2Add);
    a.simd(S.f64x2Add).f64x2(-2).simd(S.f64x2Mul).simd(S.f64x2Sqrt).set(radius);

    // sin v: q = round(v/π), r = v − q·π, value = (−1)^q·sin r·radius.
    a.get(v)
      .f64x2(1 / Math.PI)
      .simd(S.f64x2Mul)
      .simd(S.f64x2Nearest)
      .set(q);
    a.get(v).get(q).f64x2(PI_1).simd(S.f64x2Mul).simd(S.f64x2Sub);
    a.get(q).f64x2(PI_2).simd(S.f64x2Mul).simd(S.f64x2Sub);
    a.get(q).f64x2(PI_3).simd(S.f64x2Mul).simd(S.f64x2Sub).tee(r).get(r).simd(S.f64x2Mul).set(rr);
    a.get(r).get(r).get(rr).simd(S.f64x2Mul);
    horner(rr, SIN_SERIES);
    a.simd(S.f64x2Mul).simd(S.f64x2Add).get(radius).simd(S.f64x2Mul);
    // (−1)^q as a sign flip: q ∈ {0, 1, 2} is exact, so the low mantissa bit of q + 2⁵² is its parity.
    a.get(q)
      .f64x2(2 ** 52)
      .simd(S.f64x2Add)
      .i32(63)
      .simd(S.i64x2Shl)
      .simd(S.xor)
      .set(value);

    // Keep the float32 rounding only where the error bound settles it; list the pair otherwise.
    // (margin takes value's sign: the two ends swap for negative values, which the test does not mind.)
    a.get(value).f64x2(TOLERANCE).simd(S.f64x2Mul).set(margin);
    a.get(value).get(margin).simd(S.f64x2Sub).simd(S.demoteF64x2Zero).tee(low32);
    a.get(value).get(margin).simd(S.f64x2Add).simd(S.demoteF64x2Zero);
    a.simd(S.f32x4Eq).set(settled[2 * blk + pair]!);
  };
  a.interleave(Array.from({ length: 2 * BLOCKS }, (_, j) => () => boxMuller(j >> 1, j & 1)));
  // One test for all pairs; the pairs the bound cannot settle (about one in 2¹⁸) are listed in order.
  a.get(settled[0]!);
  for (let j = 1; j < 2 * BLOCKS; j++) a.get(settled[j]!).simd(S.and);
  a.simd(S.i32x4AllTrue).op(0x45).op(0x04, 0x40); // if not all settled
  for (let j = 0; j < 2 * BLOCKS; j++) {
    a.get(settled[j]!).simd(S.i32x4AllTrue).op(0x45).op(0x04, 0x40); // if
    a.get(FIX).get(FIXES).i32(2).op(0x74).op(0x6a); // fix + fixes·4
    a.get(I)
      .i32(2 * j)
      .op(0x6a)
      .op(0x36, 2, 0); // i32.store
    a.get(FIXES).i32(1).op(0x6a).set(FIXES);
    a.op(0x0b); // end if
  }
  a.op(0x0b); // end if
  for (let j = 0; j < 2 * BLOCKS; j++) {
    a.get(OUT)
      .get(I)
      .i32(4 * (j >> 1))
      .op(0x6a)
      .i32(2)
      .op(0x74)
      .op(0x6a)
      .get(low32s[j]!)
      .simd(S.store64Lane, 3, 8 * (j & 1), 0);
  }

  a.get(I)
    .i32(4 * BLOCKS)
    .op(0x6a)
    .set(I);
  a.op(0x0c, 0); // br 0
  a.op(0x0b, 0x0b); // end loop, end block
  a.get(FIXES);
  return { body: a.body(), pool: a.pool };
}

function moduleBytes(): Uint8Array {
  const type = section(1, [1, 0x60, 6, I32, I32, I32, I32, I32, I32, 1, I32]);
  const func = section(3, [1, 0]);
  const memory = section(5, [1, 0x00, 1]);
  const exports = section(7, [2, ...name("normals"), 0x00, 0, ...name("memory"), 0x02, 0]);
  const { body, pool } = functionBody();
  const code = section(10, [1, ...body]);
  const data = section(11, [1, 0x00, 0x41, 0, 0x0b, ...uleb(pool.bytes.length), ...pool.bytes]);
  return Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, ...type, ...func, ...memory, ...exports, ...code, ...data]);
}

// The project's TypeScript lib (ES2023 without DOM) has no WebAssembly types; Node has the global.
interface WasmMemory {
  readonly buffer: ArrayBuffer;
  grow(pages: number): number;
}
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { readonly exports: object };
};

interface SimdExports {
  normals(n4: number, offset: number, k0: number, k1: number, out: number, fix: number): number;
  memory: WasmMemory;
}

let instance: SimdExports | null | undefined;

function load(): SimdExports | null {
  if (instance !== undefined) return instance;
  try {
    instance = new WebAssembly.Instance(new WebAssembly.Module(moduleBytes())).exports as unknown as SimdExports;
  } catch {
    // No WebAssembly SIMD: philoxNormals uses the scalar loops instead.
    instance = null;
  }
  return instance;
}

/**
 * Fills `out` like philoxNormals (element i from counter (offset, 0, i, 0), key (k0, k1)); returns
 * false without SIMD. `exact(i)` must return the scalar path's value of element i; it is called for
 * the few elements whose rounding the polynomial bound cannot settle.
 */
export function philoxNormalsSimd(out: Float32Array, k0: number, k1: number, offset: number, exact: (i: number) => number): boolean {
  const wasm = load();
  if (wasm === null) return false;
  const n = out.length;
  const n4 = (n + 4 * BLOCKS - 1) & -(4 * BLOCKS);
  const fixAt = POOL_BYTES + n4 * 4;
  // Every pair could need a fix-up entry.
  const bytes = fixAt + (n4 / 2) * 4;
  const have = wasm.memory.buffer.byteLength;
  if (bytes > have) wasm.memory.grow(Math.ceil((bytes - have) / 65536));
  const fixes = wasm.normals(n4, offset | 0, k0 | 0, k1 | 0, POOL_BYTES, fixAt);
  out.set(new Float32Array(wasm.memory.buffer, POOL_BYTES, n));
  if (fixes > 0) {
    const list = new Int32Array(wasm.memory.buffer, fixAt, fixes);
    for (const first of list) {
      for (let i = first; i < first + 2 && i < n; i++) out[i] = exact(i);
    }
  }
  return true;
}
