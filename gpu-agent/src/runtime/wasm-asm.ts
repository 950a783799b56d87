/**
 * A small assembler for the agent's generated WebAssembly (SIMD) functions (the RNG's, the half-float
 * conversions): typed locals, the scalar and SIMD opcodes they use, and a module with several exported
 * functions and one exported memory. Encoding primitives come from wasm-encoding.ts.
 */

import { name, section, sleb, uleb } from "./wasm-encoding.js";

export const I32 = 0x7f;
export const V128 = 0x7b;
type ValType = typeof I32 | typeof V128;

/** Scalar opcodes. */
export const op = {
  i32Eqz: 0x45,
  i32Eq: 0x46,
  i32Ne: 0x47,
  i32LtU: 0x49,
  i32GtU: 0x4b,
  i32GeU: 0x4f,
  i32Add: 0x6a,
  i32Sub: 0x6b,
  i32And: 0x71,
  i32Shl: 0x74,
  select: 0x1b,
} as const;

/** SIMD opcodes (after the 0xfd prefix). */
export const S = {
  load: 0x00,
  store: 0x0b,
  const: 0x0c,
  shuffle: 0x0d,
  i32x4Splat: 0x11,
  f32x4Splat: 0x13,
  f64x2Splat: 0x14,
  i32x4Eq: 0x37,
  i32x4GtU: 0x3c,
  f32x4Eq: 0x41,
  f32x4Lt: 0x43,
  f64x2Eq: 0x47,
  f64x2Gt: 0x4a,
  not: 0x4d,
  and: 0x4e,
  or: 0x50,
  xor: 0x51,
  bitselect: 0x52,
  demoteF64x2Zero: 0x5e,
  promoteLowF32x4: 0x5f,
  store64Lane: 0x5b,
  i16x8NarrowI32x4U: 0x86,
  i32x4AllTrue: 0xa3,
  i32x4Neg: 0xa1,
  i32x4ExtendLowI16x8U: 0xa9,
  i32x4ExtendHighI16x8U: 0xaa,
  i32x4Shl: 0xab,
  i32x4ShrU: 0xad,
  i32x4Add: 0xae,
  i32x4Sub: 0xb1,
  i64x2ShrU: 0xcd,
  i64x2ExtmulLowU: 0xde,
  i64x2ExtmulHighU: 0xdf,
  f32x4Sqrt: 0xe3,
  f32x4Add: 0xe4,
  f32x4Sub: 0xe5,
  f32x4Mul: 0xe6,
  f64x2Abs: 0xec,
  f64x2Neg: 0xed,
  f64x2Sqrt: 0xef,
  f64x2Add: 0xf0,
  f64x2Sub: 0xf1,
  f64x2Mul: 0xf2,
  f64x2Div: 0xf3,
  i32x4TruncSatF32x4S: 0xf8,
  f32x4ConvertI32x4S: 0xfa,
  f64x2Floor: 0x75,
  f64x2Nearest: 0x94,
  f64x2ConvertLowI32x4U: 0xff,
} as const;

/**
 * The module's 16-byte constants, laid out from address 0 by a data segment. V8 materialises each
 * `v128.const` through general registers (three or four instructions); a load from here is one.
 */
export class ConstPool {
  readonly bytes: number[] = [];
  private readonly addresses = new Map<string, number>();

  /** Linear memory from `capacity` on is free for the kernels. */
  constructor(readonly capacity: number) {}

  address(value: Uint8Array): number {
    const key = value.join(",");
    let address = this.addresses.get(key);
    if (address === undefined) {
      address = this.bytes.length;
      if (address + 16 > this.capacity) throw new RangeError("constant pool full");
      this.bytes.push(...value);
      this.addresses.set(key, address);
    }
    return address;
  }
}

export class Fn {
  readonly code: number[] = [];
  private readonly locals: ValType[] = [];

  constructor(
    readonly params: readonly ValType[],
    readonly results: readonly ValType[],
    private readonly pool?: ConstPool,
  ) {}

  param(k: number): number {
    return k;
  }

  local(type: ValType): number {
    this.locals.push(type);
    return this.params.length + this.locals.length - 1;
  }

  op(...bytes: number[]): this {
    this.code.push(...bytes);
    return this;
  }

  simd(code: number, ...imm: number[]): this {
    return this.op(0xfd, ...uleb(code), ...imm);
  }

  get(local: number): this {
    return this.op(0x20, ...uleb(local));
  }

  set(local: number): this {
    return this.op(0x21, ...uleb(local));
  }

  tee(local: number): this {
    return this.op(0x22, ...uleb(local));
  }

  i32(value: number): this {
    return this.op(0x41, ...sleb(value));
  }

  call(index: number): this {
    return this.op(0x10, ...uleb(index));
  }

  /** v128.load / v128.store with a constant byte offset (alignment hint 1 byte: addresses may be unaligned). */
  load(offset = 0): this {
    return this.simd(S.load, 0, ...uleb(offset));
  }

  store(offset = 0): this {
    return this.simd(S.store, 0, ...uleb(offset));
  }

  /** Pool constants as locals, loaded once at function entry: a plain value, not a load ordered after the loop's stores. */
  private readonly constLocals = new Map<number, number>();

  bytes16(bytes: Uint8Array): this {
    if (this.pool === undefined) return this.simd(S.const, ...bytes);
    const address = this.pool.address(bytes);
    let local = this.constLocals.get(address);
    if (local === undefined) {
      local = this.local(V128);
      this.constLocals.set(address, local);
    }
    return this.get(local);
  }

  i32x4(a: number, b = a, c = a, d = a): this {
    return this.bytes16(new Uint8Array(new Uint32Array([a, b, c, d]).buffer));
  }

  f32x4(value: number): this {
    return this.bytes16(new Uint8Array(new Float32Array([value, value, value, value]).buffer));
  }

  f64x2(value: number): this {
    return this.bytes16(new Uint8Array(new Float64Array([value, value]).buffer));
  }

  /** Rounds an f64x2 to float32 precision, keeping it in f64x2 (demote, promote). */
  rnd(): this {
    return this.simd(S.demoteF64x2Zero).simd(S.promoteLowF32x4);
  }

  shuffle(lanes: readonly number[]): this {
    return this.simd(S.shuffle, ...lanes);
  }

  /** block … loop; `br 0` continues, `br 1` leaves. */
  loop(body: () => void): this {
    this.op(0x02, 0x40, 0x03, 0x40);
    body();
    return this.op(0x0b, 0x0b);
  }

  if(body: () => void): this {
    this.op(0x04, 0x40);
    body();
    return this.op(0x0b);
  }

  encoded(): number[] {
    const groups: number[] = [];
    let count = 0;
    for (let i = 0; i < this.locals.length; i++) {
      count++;
      if (i + 1 === this.locals.length || this.locals[i + 1] !== this.locals[i]) {
        groups.push(...uleb(count), this.locals[i]!);
        count = 0;
      }
    }
    const runs = groups.length / 2;
    const loads: number[] = [];
    for (const [address, local] of this.constLocals) loads.push(0x41, 0, 0xfd, S.load, 4, ...uleb(address), 0x21, ...uleb(local));
    const body = [...uleb(runs), ...groups, ...loads, ...this.code, 0x0b];
    return [...uleb(body.length), ...body];
  }
}

/** A module whose functions are exported under the given names, with its memory exported as "memory". */
export function moduleBytes(functions: ReadonlyArray<readonly [string, Fn]>, pool?: ConstPool): Uint8Array {
  const types = functions.map(([, f]) => [0x60, ...uleb(f.params.length), ...f.params, ...uleb(f.results.length), ...f.results]);
  const type = section(1, [...uleb(types.length), ...types.flat()]);
  const func = section(3, [...uleb(functions.length), ...functions.flatMap((_, i) => uleb(i))]);
  const memory = section(5, [1, 0x00, 1]);
  const exportEntries = functions.flatMap(([n], i) => [...name(n), 0x00, ...uleb(i)]);
  const exports = section(7, [...uleb(functions.length + 1), ...exportEntries, ...name("memory"), 0x02, 0]);
  const code = section(10, [...uleb(functions.length), ...functions.flatMap(([, f]) => f.encoded())]);
  const data = pool === undefined ? [] : section(11, [1, 0x00, 0x41, 0, 0x0b, ...uleb(pool.bytes.length), ...pool.bytes]);
  return Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, ...type, ...func, ...memory, ...exports, ...code, ...data]);
}

// The project's TypeScript lib (ES2023 without DOM) has no WebAssembly types; Node has the global.
export interface WasmMemory {
  readonly buffer: ArrayBuffer;
  grow(pages: number): number;
}
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { readonly exports: object };
};

/** The instance's exports, or null where WebAssembly (SIMD) is unavailable, e.g. `node --jitless`. */
export function instantiate<T>(bytes: () => Uint8Array): T | null {
  try {
    return new WebAssembly.Instance(new WebAssembly.Module(bytes())).exports as T;
  } catch {
    return null;
  }
}

/** Grows `memory` so that it holds at least `bytes` bytes. */
export function ensureMemory(memory: WasmMemory, bytes: number): void {
  const have = memory.buffer.byteLength;
  if (bytes > have) memory.grow(Math.ceil((bytes - have) / 65536));
}
