/**
 * The Philox4x32-10 counter loop of the NV generator as a tiny WebAssembly function: its native
 * 64-bit multiply replaces the 16-bit-limb emulation of the JS loop. It writes the (c0, c1) output
 * words of every element; Box–Muller stays in JS (it needs Math.log/Math.sin). The module is
 * assembled here from its instruction bytes, so there is no build step or binary file.
 */

import { name, section, slebBig as signedLeb, uleb as unsignedLeb } from "../runtime/wasm-encoding.js";
const PHILOX_M0 = 0xd2511f53n;
const PHILOX_M1 = 0xcd9e8d57n;
const PHILOX_W0 = 0x9e3779b9 | 0;
const PHILOX_W1 = 0xbb67ae85 | 0;

const op = {
  block: 0x02,
  loop: 0x03,
  br: 0x0c,
  brIf: 0x0d,
  end: 0x0b,
  localGet: 0x20,
  localSet: 0x21,
  i32Store: 0x36,
  i32Const: 0x41,
  i64Const: 0x42,
  i32GeU: 0x4f,
  i32Add: 0x6a,
  i32Shl: 0x74,
  i32Xor: 0x73,
  i64Mul: 0x7e,
  i64ShrU: 0x88,
  i32WrapI64: 0xa7,
  i64ExtendI32U: 0xad,
  void: 0x40,
  i32: 0x7f,
  i64: 0x7e,
} as const;

// params: n, offset, k0, k1; locals: i, c0, c1, c2, c3, key0, key1, t (i32), p0, p1 (i64)
const N = 0,
  OFFSET = 1,
  K0 = 2,
  K1 = 3,
  I = 4,
  C0 = 5,
  C1 = 6,
  C2 = 7,
  C3 = 8,
  KEY0 = 9,
  KEY1 = 10,
  T = 11,
  P0 = 12,
  P1 = 13;

function functionBody(): number[] {
  const get = (l: number): number[] => [op.localGet, l];
  const set = (l: number): number[] => [op.localSet, l];
  const code: number[] = [
    op.i32Const,
    0,
    ...set(I),
    op.block,
    op.void,
    op.loop,
    op.void,
    ...get(I),
    ...get(N),
    op.i32GeU,
    op.brIf,
    1,
    ...get(OFFSET),
    ...set(C0),
    op.i32Const,
    0,
    ...set(C1),
    ...get(I),
    ...set(C2),
    op.i32Const,
    0,
    ...set(C3),
    ...get(K0),
    ...set(KEY0),
    ...get(K1),
    ...set(KEY1),
  ];
  for (let round = 0; round < 10; round++) {
    code.push(
      ...get(C0),
      op.i64ExtendI32U,
      op.i64Const,
      ...signedLeb(PHILOX_M0),
      op.i64Mul,
      ...set(P0),
      ...get(C2),
      op.i64ExtendI32U,
      op.i64Const,
      ...signedLeb(PHILOX_M1),
      op.i64Mul,
      ...set(P1),
      ...get(P1),
      op.i64Const,
      32,
      op.i64ShrU,
      op.i32WrapI64,
      ...get(C1),
      op.i32Xor,
      ...get(KEY0),
      op.i32Xor,
      ...set(T),
      ...get(P1),
      op.i32WrapI64,
      ...set(C1),
      ...get(P0),
      op.i64Const,
      32,
      op.i64ShrU,
      op.i32WrapI64,
      ...get(C3),
      op.i32Xor,
      ...get(KEY1),
      op.i32Xor,
      ...set(C2),
      ...get(P0),
      op.i32WrapI64,
      ...set(C3),
      ...get(T),
      ...set(C0),
    );
    if (round < 9) {
      code.push(...get(KEY0), op.i32Const, ...signedLeb(BigInt(PHILOX_W0)), op.i32Add, ...set(KEY0));
      code.push(...get(KEY1), op.i32Const, ...signedLeb(BigInt(PHILOX_W1)), op.i32Add, ...set(KEY1));
    }
  }
  code.push(
    ...get(I),
    op.i32Const,
    3,
    op.i32Shl,
    ...get(C0),
    op.i32Store,
    2,
    0,
    ...get(I),
    op.i32Const,
    3,
    op.i32Shl,
    ...get(C1),
    op.i32Store,
    2,
    4,
    ...get(I),
    op.i32Const,
    1,
    op.i32Add,
    ...set(I),
    op.br,
    0,
    op.end,
    op.end,
    op.end,
  );
  const locals = [2, 8, op.i32, 2, op.i64];
  const body = [...locals, ...code];
  return [...unsignedLeb(body.length), ...body];
}

function moduleBytes(): Uint8Array {
  const type = section(1, [1, 0x60, 4, op.i32, op.i32, op.i32, op.i32, 0]);
  const func = section(3, [1, 0]);
  const memory = section(5, [1, 0x00, 1]);
  const exports = section(7, [2, ...name("philox"), 0x00, 0, ...name("memory"), 0x02, 0]);
  const code = section(10, [1, ...functionBody()]);
  return Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, ...type, ...func, ...memory, ...exports, ...code]);
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

interface PhiloxExports {
  philox(n: number, offset: number, k0: number, k1: number): void;
  memory: WasmMemory;
}

let instance: PhiloxExports | null | undefined;

function load(): PhiloxExports | null {
  if (instance !== undefined) return instance;
  try {
    const module = new WebAssembly.Module(moduleBytes());
    instance = new WebAssembly.Instance(module).exports as unknown as PhiloxExports;
  } catch {
    // No WebAssembly (or a policy forbids compiling it): callers fall back to the JS loop.
    instance = null;
  }
  return instance;
}

/**
 * (c0, c1) of Philox4x32-10 for counters (offset, 0, i, 0), i < n, key (k0, k1), interleaved in a
 * Uint32Array view of WebAssembly memory (valid until the next call). Null without WebAssembly.
 */
export function philoxOutputWords(n: number, offset: number, k0: number, k1: number): Uint32Array | null {
  const wasm = load();
  if (wasm === null) return null;
  const bytes = n * 8;
  const have = wasm.memory.buffer.byteLength;
  if (bytes > have) wasm.memory.grow(Math.ceil((bytes - have) / 65536));
  wasm.philox(n, offset | 0, k0 | 0, k1 | 0);
  return new Uint32Array(wasm.memory.buffer, 0, n * 2);
}
