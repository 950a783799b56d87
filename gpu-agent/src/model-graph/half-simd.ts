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
import { name, section, sleb, uleb } from "../runtime/wasm-encoding.js";

// The project's TypeScript lib (ES2023 without DOM) has no WebAssembly types; Node has the global.
interface WasmMemory {
  readonly buffer: ArrayBuffer;
}
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { readonly exports: object };
  Memory: new (descriptor: { initial: number }) => WasmMemory;
};

const I32 = 0x7f;
const SIMD = 0xfd;
const simd = (op: number): number[] => [SIMD, ...uleb(op)];
/** SIMD instructions: lanes are i32x4 unless the name says f (f32x4); narrow and extend are between i32x4 and i16x8. */
const V = {
  load: simd(0x00),
  store: simd(0x0b),
  const: simd(0x0c),
  and: simd(0x4e),
  or: simd(0x50),
  bitselect: simd(0x52),
  i32Eq: simd(0x37),
  i32GtU: simd(0x3c),
  narrowU: simd(0x86),
  extendLowU: simd(0xa9),
  extendHighU: simd(0xaa),
  shl: simd(0xab),
  shrU: simd(0xad),
  add: simd(0xae),
  sub: simd(0xb1),
  fAdd: simd(0xe4),
  fSub: simd(0xe5),
};
const OP = {
  block: 0x02,
  loop: 0x03,
  br: 0x0c,
  brIf: 0x0d,
  end: 0x0b,
  get: 0x20,
  set: 0x21,
  tee: 0x22,
  i32Const: 0x41,
  i32Add: 0x6a,
  i32GeU: 0x4f,
};
const memarg = [0x04, 0x00];
const i32 = (v: number): number[] => [OP.i32Const, ...sleb(v)];

/** v128.const with the same 32-bit value in all four lanes. */
function splat32(value: number): number[] {
  const bytes: number[] = [];
  for (let lane = 0; lane < 4; lane++) for (let b = 0; b < 4; b++) bytes.push((value >>> (8 * b)) & 0xff);
  return [...V.const, ...bytes];
}

const get = (local: number): number[] => [OP.get, ...uleb(local)];
const set = (local: number): number[] => [OP.set, ...uleb(local)];
const tee = (local: number): number[] => [OP.tee, ...uleb(local)];

/**
 * A loop over (src, dst, srcEnd): each iteration reads `srcStep` bytes at src and writes `dstStep` at dst.
 * Locals after the three parameters: v128 temporaries.
 */
function loop(srcStep: number, dstStep: number, body: number[]): number[] {
  const [SRC, DST, END] = [0, 1, 2];
  return [
    OP.block,
    0x40,
    OP.loop,
    0x40,
    ...get(SRC),
    ...get(END),
    OP.i32GeU,
    OP.brIf,
    1,
    ...body,
    ...get(SRC),
    ...i32(srcStep),
    OP.i32Add,
    ...set(SRC),
    ...get(DST),
    ...i32(dstStep),
    OP.i32Add,
    ...set(DST),
    OP.br,
    0,
    OP.end,
    OP.end,
  ];
}

/** float32 bits in i32x4 lanes (local `x`) → half bits in i32x4 lanes, left on the stack. Uses locals abs, out. */
function encodeBody(x: number, abs: number, out: number): number[] {
  return [
    ...get(x),
    ...splat32(0x7fffffff),
    ...V.and,
    ...set(abs),
    // normal = (abs + (0xfff − 0x38000000) + ((abs >> 13) & 1)) >> 13
    ...get(abs),
    ...splat32((0xfff - 0x38000000) | 0),
    ...V.add,
    ...get(abs),
    ...i32(13),
    ...V.shrU,
    ...splat32(1),
    ...V.and,
    ...V.add,
    ...i32(13),
    ...V.shrU,
    // subnormal = bits(float(abs) + 0.5) − bits(0.5)
    ...get(abs),
    ...splat32(0x3f000000),
    ...V.fAdd,
    ...splat32(0x3f000000),
    ...V.sub,
    // abs ≥ 0x38800000 (2^-14) picks the normal form
    ...get(abs),
    ...splat32(0x387fffff),
    ...V.i32GtU,
    ...V.bitselect,
    ...set(out),
    // abs ≥ 0x47800000: 0x7e00 for NaN (abs > 0x7f800000), else 0x7c00
    ...splat32(0x7e00),
    ...splat32(0x7c00),
    ...get(abs),
    ...splat32(0x7f800000),
    ...V.i32GtU,
    ...V.bitselect,
    ...get(out),
    ...get(abs),
    ...splat32(0x477fffff),
    ...V.i32GtU,
    ...V.bitselect,
    // | sign
    ...get(x),
    ...i32(16),
    ...V.shrU,
    ...splat32(0x8000),
    ...V.and,
    ...V.or,
  ];
}

/** Half bits in i32x4 lanes (local `h`) → float32 bits, left on the stack. Uses locals o, e. */
function decodeBody(h: number, o: number, e: number): number[] {
  return [
    // o = ((h & 0x7fff) << 13) + 0x38000000
    ...get(h),
    ...splat32(0x7fff),
    ...V.and,
    ...i32(13),
    ...V.shl,
    ...splat32(0x38000000),
    ...V.add,
    ...tee(o),
    // e = o & 0x7f800000: 0x47800000 for Inf/NaN, 0x38000000 for zero and subnormals
    ...splat32(0x7f800000),
    ...V.and,
    ...set(e),
    // Inf/NaN: o + 0x38000000
    ...get(o),
    ...splat32(0x38000000),
    ...V.add,
    // subnormal: float(o + 2^23) − 2^-14
    ...get(o),
    ...splat32(0x00800000),
    ...V.add,
    ...splat32(0x38800000),
    ...V.fSub,
    // else o
    ...get(o),
    ...get(e),
    ...splat32(0x38000000),
    ...V.i32Eq,
    ...V.bitselect,
    ...get(e),
    ...splat32(0x47800000),
    ...V.i32Eq,
    ...V.bitselect,
    // | sign << 16
    ...get(h),
    ...splat32(0x8000),
    ...V.and,
    ...i32(16),
    ...V.shl,
    ...V.or,
  ];
}

function moduleBytes(): Uint8Array {
  const V128 = 0x7b;
  // encode(src, dst, srcEnd): 8 floats (two vectors) → 8 halves (one vector) per iteration.
  const [SRC, DST] = [0, 1];
  const [X, ABS, OUT] = [3, 4, 5];
  const encode = loop(32, 16, [
    ...get(DST),
    ...get(SRC),
    ...V.load,
    ...memarg,
    ...set(X),
    ...encodeBody(X, ABS, OUT),
    ...get(SRC),
    ...i32(16),
    OP.i32Add,
    ...V.load,
    ...memarg,
    ...set(X),
    ...encodeBody(X, ABS, OUT),
    ...V.narrowU,
    ...V.store,
    ...memarg,
  ]);
  // decode(src, dst, srcEnd): 8 halves (one vector) → 8 floats (two vectors) per iteration.
  const [H, O, E, HALVES] = [3, 4, 5, 6];
  const decode = loop(16, 32, [
    ...get(SRC),
    ...V.load,
    ...memarg,
    ...set(HALVES),
    ...get(DST),
    ...get(HALVES),
    ...V.extendLowU,
    ...set(H),
    ...decodeBody(H, O, E),
    ...V.store,
    ...memarg,
    ...get(DST),
    ...i32(16),
    OP.i32Add,
    ...get(HALVES),
    ...V.extendHighU,
    ...set(H),
    ...decodeBody(H, O, E),
    ...V.store,
    ...memarg,
  ]);
  const fn = (locals: number, code: number[]): number[] => {
    const body = [1, ...uleb(locals), V128, ...code, OP.end];
    return [...uleb(body.length), ...body];
  };
  const type = section(1, [1, 0x60, 3, I32, I32, I32, 0]);
  const imports = section(2, [1, ...name("m"), ...name("memory"), 0x02, 0x00, 1]);
  const funcs = section(3, [2, 0, 0]);
  const exports = section(7, [2, ...name("encode"), 0x00, 0, ...name("decode"), 0x00, 1]);
  const code = section(10, [2, ...fn(3, encode), ...fn(4, decode)]);
  return Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, ...type, ...imports, ...funcs, ...exports, ...code]);
}

/** Values per call into the module: a 128 KB float region and a 64 KB half region, in a fixed memory. */
const CHUNK = 32768;
const HALF_AT = CHUNK * 4;

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
  try {
    const memory = new WebAssembly.Memory({ initial: (HALF_AT + CHUNK * 2) / 65536 });
    const { encode, decode } = new WebAssembly.Instance(new WebAssembly.Module(moduleBytes()), { m: { memory } }).exports as {
      encode: (src: number, dst: number, end: number) => void;
      decode: (src: number, dst: number, end: number) => void;
    };
    const floats = new Float32Array(memory.buffer, 0, CHUNK);
    const halves = new Uint16Array(memory.buffer, HALF_AT, CHUNK);
    made = {
      encode(src, dst) {
        const whole = src.length & ~7;
        for (let i = 0; i < whole; i += CHUNK) {
          const n = Math.min(CHUNK, whole - i);
          floats.set(src.subarray(i, i + n));
          encode(0, HALF_AT, n * 4);
          dst.set(halves.subarray(0, n), i);
        }
        return whole;
      },
      decode(src, dst) {
        const whole = src.length & ~7;
        for (let i = 0; i < whole; i += CHUNK) {
          const n = Math.min(CHUNK, whole - i);
          halves.set(src.subarray(i, i + n));
          decode(HALF_AT, 0, HALF_AT + n * 2);
          dst.set(floats.subarray(0, n), i);
        }
        return whole;
      },
    };
  } catch {
    made = null;
  }
  return made;
}
