/**
 * Elementwise float32 kernels: a sampler update such as x + ((x − D)/σ)·dt is written once as an
 * expression over whole arrays and compiled to a WebAssembly SIMD loop (four lanes per instruction).
 *
 * Every node is one IEEE binary32 operation with round-to-nearest, which is exactly what the JS
 * form `Math.fround(a op b)` of two float32 values computes (a double result of +, −, ×, ÷ or √ of
 * float32 operands rounds to the same float32 as the single-precision operation), so a kernel gives
 * the same bits as the scalar loops it replaces. (abs and max pick or sign-flip an operand: exact.) Without WebAssembly the same expression runs as a
 * scalar JS loop, which is also the reference the tests compare the compiled form against.
 */

import { name, section, uleb } from "../runtime/wasm-encoding.js";
export type Expr =
  | { readonly op: "in"; readonly index: number }
  | { readonly op: "param"; readonly index: number }
  | { readonly op: "add" | "sub" | "mul" | "div" | "max" | "pmax"; readonly a: Expr; readonly b: Expr }
  | { readonly op: "sqrt" | "abs"; readonly a: Expr };

export const e = {
  in: (index: number): Expr => ({ op: "in", index }),
  param: (index: number): Expr => ({ op: "param", index }),
  add: (a: Expr, b: Expr): Expr => ({ op: "add", a, b }),
  sub: (a: Expr, b: Expr): Expr => ({ op: "sub", a, b }),
  mul: (a: Expr, b: Expr): Expr => ({ op: "mul", a, b }),
  div: (a: Expr, b: Expr): Expr => ({ op: "div", a, b }),
  sqrt: (a: Expr): Expr => ({ op: "sqrt", a }),
  /** |a|: exact (no rounding). */
  abs: (a: Expr): Expr => ({ op: "abs", a }),
  /** JS Math.max(a, b): NaN when either is NaN, +0 over −0; exact (it picks one operand). */
  max: (a: Expr, b: Expr): Expr => ({ op: "max", a, b }),
  /**
   * a < b ? b : a (WebAssembly's pmax): exact, one instruction where max takes several to get NaN and
   * signed zeros right. It is NaN only when a is, so it equals max when a is the operand that may be NaN
   * and neither is −0 against +0 (as for magnitudes, or a positive tolerance).
   */
  pmax: (a: Expr, b: Expr): Expr => ({ op: "pmax", a, b }),
};

export interface KernelSpec {
  /** Array operands, referenced as e.in(0…inputs − 1). */
  inputs: number;
  /** Scalar operands, referenced as e.param(…); each must already be a float32 value. */
  params: number;
  /** One expression per output array; shared subexpressions (same object) are computed once. */
  outputs: readonly Expr[];
  /**
   * An expression whose values' squares runSumOfSquares adds up in float64 (a square of a float32 is exact
   * in float64, so only the order of the additions matters), in a fixed order: four running sums S_j of
   * the values at indices k ≡ j (mod 4) below the last whole vector of four, each in index order,
   * combined as (S₀ + S₁) + (S₂ + S₃), then the last n mod 4 values in index order
   * (`interleavedSumOfSquares`). Four chains of additions instead of one: a single chain took as long as
   * the rest of DPM adaptive's error kernel. (torch's own norm reduction has an order of its own.)
   * Its values are not stored unless the same object is also an output: a sum that is all a caller
   * reads costs no array written and read back.
   */
  sumOfSquares?: Expr;
}

/* ---- WebAssembly encoding ---- */

const I32 = 0x7f;
const F32 = 0x7d;
const V128 = 0x7b;
const SIMD = 0xfd;
const SIMD_OP = {
  load: 0x00,
  store: 0x0b,
  splat: 0x13,
  abs: 0xe0,
  sqrt: 0xe3,
  add: 0xe4,
  sub: 0xe5,
  mul: 0xe6,
  div: 0xe7,
  // f32x4.max, not pmax: NaN-propagating and +0 over −0, as Math.max.
  max: 0xe9,
  pmax: 0xeb,
  shuffle: 0x0d,
  promoteLow: 0x5f,
  f64Add: 0xf0,
  f64Mul: 0xf2,
} as const;
/** i8x16.shuffle lanes: a vector's bytes 8–15 (float lanes 2 and 3) moved to the low half. */
const HIGH_LANES_DOWN = [8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15];
const OP = {
  block: 0x02,
  loop: 0x03,
  if: 0x04,
  br: 0x0c,
  brIf: 0x0d,
  end: 0x0b,
  localGet: 0x20,
  localSet: 0x21,
  localTee: 0x22,
  i32Const: 0x41,
  i32LtU: 0x49,
  i32GeU: 0x4f,
  i32Add: 0x6a,
  i32Shl: 0x74,
} as const;
const simd = (op: number): number[] => [SIMD, ...uleb(op)];

function countUses(outputs: readonly Expr[]): Map<Expr, number> {
  const uses = new Map<Expr, number>();
  const visit = (node: Expr): void => {
    const seen = uses.get(node) ?? 0;
    uses.set(node, seen + 1);
    if (seen > 0) return;
    if (node.op === "add" || node.op === "sub" || node.op === "mul" || node.op === "div" || node.op === "max" || node.op === "pmax") {
      visit(node.a);
      visit(node.b);
    } else if (node.op === "sqrt" || node.op === "abs") visit(node.a);
  };
  outputs.forEach(visit);
  return uses;
}

/**
 * Function (n4, in0…, out0…, p0…): n4 = element count rounded up to a multiple of 4, pointers are
 * byte offsets into the imported memory (16-byte aligned). With sumOfSquares, two more arguments: the
 * byte offset where the whole vectors end, and where the four float64 running sums S₀…S₃ are kept
 * between calls (whole vectors only: the caller adds the last few values itself).
 */
function moduleBytes(spec: KernelSpec): Uint8Array {
  const { inputs, params, outputs, sumOfSquares: summed } = spec;
  const nOut = outputs.length;
  const sums = summed !== undefined;
  const argTypes = [
    I32,
    ...new Array<number>(inputs + nOut).fill(I32),
    ...new Array<number>(params).fill(F32),
    ...(sums ? [I32, I32] : []),
  ];
  const WHOLE_END = 1 + inputs + nOut + params;
  /** Byte offset of the four float64 running sums, loaded at the start and stored at the end of a call. */
  const SUMS_AT = WHOLE_END + 1;
  const N = 0;
  const inPtr = (j: number): number => 1 + j;
  const outPtr = (j: number): number => 1 + inputs + j;
  const paramArg = (j: number): number => 1 + inputs + nOut + j;
  let nextLocal = argTypes.length;
  const I = nextLocal++;
  const END = nextLocal++;
  const i32Locals = 2;
  const splatBase = nextLocal;
  const splat = (j: number): number => splatBase + j;
  nextLocal += params;
  const uses = countUses(sums ? [...outputs, summed] : outputs);
  const shared = new Map<Expr, number>();
  for (const [node, count] of uses) {
    if (count > 1 && node.op !== "in" && node.op !== "param") shared.set(node, nextLocal++);
  }
  // Each input read is loaded once per vector, before any output is stored: an output may then be
  // written over one of the inputs, at the same place (Kernel.execute).
  const read = new Set<number>();
  for (const node of uses.keys()) if (node.op === "in") read.add(node.index);
  const inputLocal = new Map<number, number>();
  for (const index of [...read].sort((a, b) => a - b)) inputLocal.set(index, nextLocal++);
  const SUMMED = nextLocal++;
  const SQUARE = nextLocal++;
  // Sums S₀, S₁ (low lanes) and S₂, S₃ (high lanes).
  const SUMS_LOW = nextLocal++;
  const SUMS_HIGH = nextLocal++;
  const v128Locals = nextLocal - (argTypes.length + i32Locals);

  const code: number[] = [];
  for (let j = 0; j < params; j++) code.push(OP.localGet, ...uleb(paramArg(j)), ...simd(SIMD_OP.splat), OP.localSet, ...uleb(splat(j)));
  code.push(OP.localGet, N, OP.i32Const, 2, OP.i32Shl, OP.localSet, ...uleb(END));
  if (sums) {
    code.push(OP.localGet, ...uleb(SUMS_AT), ...simd(SIMD_OP.load), 4, 0, OP.localSet, ...uleb(SUMS_LOW));
    code.push(OP.localGet, ...uleb(SUMS_AT), ...simd(SIMD_OP.load), 4, 16, OP.localSet, ...uleb(SUMS_HIGH));
  }
  code.push(OP.i32Const, 0, OP.localSet, ...uleb(I));
  code.push(OP.block, 0x40, OP.loop, 0x40);
  code.push(OP.localGet, ...uleb(I), OP.localGet, ...uleb(END), OP.i32GeU, OP.brIf, 1);
  for (const [index, local] of inputLocal) {
    code.push(
      OP.localGet,
      ...uleb(inPtr(index)),
      OP.localGet,
      ...uleb(I),
      OP.i32Add,
      ...simd(SIMD_OP.load),
      4,
      0,
      OP.localSet,
      ...uleb(local),
    );
  }
  const computed = new Set<Expr>();
  const emit = (node: Expr): void => {
    const local = shared.get(node);
    if (local !== undefined && computed.has(node)) {
      code.push(OP.localGet, ...uleb(local));
      return;
    }
    switch (node.op) {
      case "in":
        code.push(OP.localGet, ...uleb(inputLocal.get(node.index)!));
        break;
      case "param":
        code.push(OP.localGet, ...uleb(splat(node.index)));
        break;
      case "sqrt":
      case "abs":
        emit(node.a);
        code.push(...simd(SIMD_OP[node.op]));
        break;
      default:
        emit(node.a);
        emit(node.b);
        code.push(...simd(SIMD_OP[node.op]));
    }
    if (local !== undefined) {
      code.push(OP.localTee, ...uleb(local));
      computed.add(node);
    }
  };
  outputs.forEach((out, j) => {
    code.push(OP.localGet, ...uleb(outPtr(j)), OP.localGet, ...uleb(I), OP.i32Add);
    emit(out);
    code.push(...simd(SIMD_OP.store), 4, 0);
  });
  if (sums) {
    // When it is also an output, it is a shared node computed above, and this reads its local.
    emit(summed);
    code.push(OP.localSet, ...uleb(SUMMED));
    // For whole vectors (I < whole end): lanes 0 and 1 promoted and squared into SUMS_LOW, lanes 2 and
    // 3 (shuffled down) into SUMS_HIGH.
    code.push(OP.localGet, ...uleb(I), OP.localGet, ...uleb(WHOLE_END), OP.i32LtU, OP.if, 0x40);
    for (const [sums, lanes] of [
      [SUMS_LOW, []],
      [SUMS_HIGH, HIGH_LANES_DOWN],
    ] as const) {
      code.push(OP.localGet, ...uleb(sums), OP.localGet, ...uleb(SUMMED));
      if (lanes.length > 0) code.push(OP.localGet, ...uleb(SUMMED), ...simd(SIMD_OP.shuffle), ...lanes);
      code.push(...simd(SIMD_OP.promoteLow), OP.localTee, ...uleb(SQUARE), OP.localGet, ...uleb(SQUARE));
      code.push(...simd(SIMD_OP.f64Mul), ...simd(SIMD_OP.f64Add), OP.localSet, ...uleb(sums));
    }
    code.push(OP.end);
  }
  code.push(OP.localGet, ...uleb(I), OP.i32Const, 16, OP.i32Add, OP.localSet, ...uleb(I), OP.br, 0, OP.end, OP.end);
  if (sums) {
    code.push(OP.localGet, ...uleb(SUMS_AT), OP.localGet, ...uleb(SUMS_LOW), ...simd(SIMD_OP.store), 4, 0);
    code.push(OP.localGet, ...uleb(SUMS_AT), OP.localGet, ...uleb(SUMS_HIGH), ...simd(SIMD_OP.store), 4, 16);
  }
  code.push(OP.end);

  const localDecls = [2, ...uleb(i32Locals), I32, ...uleb(v128Locals), V128];
  const body = [...localDecls, ...code];
  const type = section(1, [1, 0x60, ...uleb(argTypes.length), ...argTypes, 0]);
  const imports = section(2, [1, ...name("m"), ...name("memory"), 0x02, 0x00, 0]);
  const func = section(3, [1, 0]);
  const exports = section(7, [1, ...name("k"), 0x00, 0]);
  const codeSection = section(10, [1, ...uleb(body.length), ...body]);
  return Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, ...type, ...imports, ...func, ...exports, ...codeSection]);
}

// The project's TypeScript lib (ES2023 without DOM) has no WebAssembly types; Node has the global.
interface WasmMemory {
  readonly buffer: ArrayBuffer;
  grow(pages: number): number;
}
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { readonly exports: object };
  Memory: new (descriptor: { initial: number }) => WasmMemory;
};

type WasmKernel = (...args: number[]) => void;

/** Elements per kernel block (a multiple of 4). */
export const KERNEL_BLOCK = 16384;

/**
 * One memory for all kernels of a thread (they run synchronously). Two regions:
 * - [0, SCRATCH_BYTES): a call's operand slots, where operands that do not live in this memory are
 *   copied in block by block and results are written before being copied out;
 * - after it, resident arrays (allocateResident): a sampler's latents, which kernels read and write
 *   where they are. Copying every operand in and every result out moved more bytes than the arithmetic:
 *   a 5-input, 3-output update on 4×128×128 latents took 0.47 ms with copies, 0.13 ms in place.
 * Growing a memory detaches its buffer, and with it every view, so it grows only while no resident
 * array is out; its first size leaves room for several runs' latents (address space: pages are only
 * backed once written). A shared memory would grow without detaching, but copying into or out of one
 * is 2–5× slower than a plain memcpy, and noise draws and drivers' arrays are still copied in.
 */
let arena: WasmMemory | null | undefined;
let arenaView: Float32Array | undefined;
/** The four running sums of a sumOfSquares call, a view of the same buffer as arenaView. */
let arenaSums: Float64Array | undefined;
const SCRATCH_BYTES = 16 * KERNEL_BLOCK * 4;
/** The scratch region's last 32 bytes: the running sums of a sumOfSquares call; operand slots use the rest. */
const SUMS_AT = SCRATCH_BYTES - 32;
/** The memory's size once a resident array is asked for: 64 MiB, 250 latents of 4×128×128. */
const RESIDENT_FIRST_BYTES = 64 << 20;
/** The most it grows to (between runs, when it turned out too small). */
const ARENA_MAX_BYTES = 1 << 30;
/**
 * The memory's buffer now. Each growth gives a new one and detaches the old, whose views then have no
 * values, so only views of this one are resident. A field of our own, not memory.buffer: that getter
 * is a call into the engine, and the kernels ask for every operand.
 */
let arenaBuffer: ArrayBufferLike | undefined;
/** Resident arrays as handed out: whole slots, padded to whole vectors. */
const slotViews = new WeakSet<Float32Array>();
/** Released arrays by slot size: their views are handed out again (making one costs more than a step's bookkeeping). */
const freeSlots = new Map<number, Float32Array[]>();
let residentEnd = SCRATCH_BYTES;
let residentsOut = 0;

function kernelMemory(): WasmMemory | null {
  if (arena !== undefined) return arena;
  try {
    arena = new WebAssembly.Memory({ initial: SCRATCH_BYTES / 65536 });
    arenaBuffer = arena.buffer;
  } catch {
    arena = null;
  }
  return arena;
}

/** The memory as floats (its scratch region never needs it to grow). */
function arenaFloats(): Float32Array {
  if (arenaView === undefined || arenaView.buffer !== arenaBuffer) {
    arenaView = new Float32Array(arenaBuffer!);
    arenaSums = new Float64Array(arenaBuffer!, SUMS_AT, 4);
  }
  return arenaView;
}

/** A slot's size for an array of `byteLength` bytes: whole vectors, so that a kernel's last store stays in it. */
function slotBytes(byteLength: number): number {
  return (byteLength + 15) & ~15;
}

/** Whether `a` lives in this thread's kernel memory. */
export function isResident(a: Float32Array): boolean {
  return a.buffer === arenaBuffer;
}

/**
 * A Float32Array of `length` values in the kernels' memory, or undefined when there is no WebAssembly
 * or no room. Its values are whatever the slot held last: the caller writes every value before reading
 * any. It stays valid until freeResident; the caller owns that rule (see samplers/latent-pool.ts).
 */
export function allocateResident(length: number): Float32Array | undefined {
  if (!(length > 0)) return undefined;
  const memory = kernelMemory();
  if (memory === null) return undefined;
  if (residentsOut === 0) {
    // Every slot is free: start the region afresh, so that a burst of another size reuses the space
    // instead of growing past free slots of sizes no longer asked for.
    freeSlots.clear();
    residentEnd = SCRATCH_BYTES;
  }
  const bytes = slotBytes(length * 4);
  const spare = freeSlots.get(bytes)?.pop();
  let view: Float32Array;
  if (spare !== undefined) {
    view = spare.length === length ? spare : new Float32Array(memory.buffer, spare.byteOffset, length);
  } else {
    // 16 bytes past the last slot: a kernel's last vector may read past its array's end.
    const needed = residentEnd + bytes + 16;
    if (needed > memory.buffer.byteLength) {
      if (residentsOut > 0 || needed > ARENA_MAX_BYTES) return undefined;
      const target = Math.min(ARENA_MAX_BYTES, Math.max(needed, RESIDENT_FIRST_BYTES, 2 * memory.buffer.byteLength));
      try {
        memory.grow(Math.ceil((target - memory.buffer.byteLength) / 65536));
      } catch {
        return undefined;
      }
      arenaBuffer = memory.buffer;
    }
    view = new Float32Array(memory.buffer, residentEnd, length);
    residentEnd += bytes;
  }
  slotViews.add(view);
  residentsOut++;
  return view;
}

/** How many resident arrays are out now (tests: a finished or cancelled run gives all of its back). */
export function residentArraysOut(): number {
  return residentsOut;
}

/** Gives a resident array's slot back; the array must not be used afterwards (`poison` fills it with NaN first). */
export function freeResident(a: Float32Array, poison = false): void {
  if (!slotViews.has(a)) throw new RangeError("not an array from allocateResident");
  slotViews.delete(a);
  residentsOut--;
  if (poison) a.fill(NaN);
  const bytes = slotBytes(a.byteLength);
  let list = freeSlots.get(bytes);
  if (list === undefined) freeSlots.set(bytes, (list = []));
  list.push(a);
}

function compile(spec: KernelSpec): WasmKernel | null {
  const memory = kernelMemory();
  if (memory === null) return null;
  try {
    const module = new WebAssembly.Module(moduleBytes(spec));
    return (new WebAssembly.Instance(module, { m: { memory } }).exports as { k: WasmKernel }).k;
  } catch {
    // No WebAssembly SIMD (or compilation is forbidden): the scalar loop below is used instead.
    return null;
  }
}

const fround = Math.fround;

/** The scalar form: one Math.fround per operation, element by element. */
function evaluate(node: Expr, ins: readonly Float32Array[], params: readonly number[], k: number): number {
  switch (node.op) {
    case "in":
      return ins[node.index]![k]!;
    case "param":
      return params[node.index]!;
    case "add":
      return fround(evaluate(node.a, ins, params, k) + evaluate(node.b, ins, params, k));
    case "sub":
      return fround(evaluate(node.a, ins, params, k) - evaluate(node.b, ins, params, k));
    case "mul":
      return fround(evaluate(node.a, ins, params, k) * evaluate(node.b, ins, params, k));
    case "div":
      return fround(evaluate(node.a, ins, params, k) / evaluate(node.b, ins, params, k));
    case "sqrt":
      return fround(Math.sqrt(evaluate(node.a, ins, params, k)));
    case "abs":
      return Math.abs(evaluate(node.a, ins, params, k));
    case "max":
      return Math.max(evaluate(node.a, ins, params, k), evaluate(node.b, ins, params, k));
    case "pmax": {
      const a = evaluate(node.a, ins, params, k);
      const b = evaluate(node.b, ins, params, k);
      return a < b ? b : a;
    }
  }
}

export class Kernel {
  private compiled: WasmKernel | null | undefined;
  private readonly args: number[];
  /** Per call: each operand's byte offset when it is resident, else −1 (kept to spare the garbage). */
  private readonly inAt: number[];
  private readonly outAt: number[];

  constructor(readonly spec: KernelSpec) {
    // The outputs' length is the call's: a kernel that only sums still names an output to size it.
    if (spec.outputs.length === 0) throw new RangeError("a kernel needs at least one output");
    const summed = spec.sumOfSquares;
    this.args = new Array<number>(1 + spec.inputs + spec.outputs.length + spec.params + (summed === undefined ? 0 : 2)).fill(0);
    this.inAt = new Array<number>(spec.inputs).fill(-1);
    this.outAt = new Array<number>(spec.outputs.length).fill(-1);
  }

  /** Whether calls run as WebAssembly SIMD (false: the scalar JS loop). */
  get simd(): boolean {
    return this.wasm() !== null;
  }

  private wasm(): WasmKernel | null {
    if (this.compiled === undefined) this.compiled = compile(this.spec);
    return this.compiled;
  }

  /**
   * outs[j][k] = outputs[j](ins[…][k], params) for k < outs[0].length. Outputs may be the same arrays
   * as inputs (every input is read before any output is written): an output that is an input itself is
   * written in place, one that overlaps an input elsewhere goes through scratch.
   */
  run(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[] = []): void {
    this.execute(outs, ins, params);
  }

  /**
   * run(), and Σ v² over the values v of `spec.sumOfSquares` in float64, in the order given there.
   */
  runSumOfSquares(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[] = []): number {
    if (this.spec.sumOfSquares === undefined) throw new RangeError("this kernel sums no squares");
    return this.execute(outs, ins, params);
  }

  private execute(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[]): number {
    const compiled = this.compiled;
    if (compiled && this.spec.sumOfSquares === undefined && this.residentArgs(outs, ins, params)) {
      compiled(...this.args);
      return 0;
    }
    return this.general(outs, ins, params);
  }

  /**
   * The call between two model calls, made short: compiled, every operand resident and in whole vectors,
   * no output over a shifted input, nothing summed. Fills the arguments and says whether it applies;
   * anything else (and any error) takes the general path. There, right after a model call, the JS alone
   * cost 40–45 µs per call on the test VM before V8 optimized it (a run makes too few calls for that),
   * and still 15 µs after; the WebAssembly call itself 6.
   */
  private residentArgs(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[]): boolean {
    const n = outs[0]!.length;
    const spec = this.spec;
    if ((n & 3) !== 0 || ins.length !== spec.inputs || outs.length !== spec.outputs.length || params.length !== spec.params) return false;
    const args = this.args;
    const buffer = arenaBuffer;
    const bytes = n * 4;
    args[0] = n;
    for (let j = 0; j < ins.length; j++) {
      const a = ins[j]!;
      if (a.buffer !== buffer || a.length < n) return false;
      args[1 + j] = a.byteOffset;
    }
    const firstOut = 1 + ins.length;
    for (let j = 0; j < outs.length; j++) {
      const a = outs[j]!;
      if (a.buffer !== buffer || a.length !== n) return false;
      const at = a.byteOffset;
      for (let i = 0; i < ins.length; i++) {
        const from = args[1 + i]!;
        if (readsShifted(from, at, bytes)) return false;
      }
      args[firstOut + j] = at;
    }
    const firstParam = firstOut + outs.length;
    for (let j = 0; j < params.length; j++) {
      const p = params[j]!;
      if (fround(p) !== p) return false;
      args[firstParam + j] = p;
    }
    return true;
  }

  private general(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[]): number {
    const { spec } = this;
    const n = outs[0]!.length;
    if (ins.length !== spec.inputs || outs.length !== spec.outputs.length || params.length !== spec.params) {
      throw new RangeError("kernel called with the wrong number of operands");
    }
    for (const a of ins) if (a.length < n) throw new RangeError(`kernel input has ${a.length} values, needs ${n}`);
    for (const a of outs) if (a.length !== n) throw new RangeError("kernel outputs differ in length");
    for (const p of params) {
      if (fround(p) !== p && !Number.isNaN(p)) throw new RangeError(`kernel parameter ${p} is not a float32 value`);
    }
    const wasm = n >= 4 ? this.wasm() : null;
    if (wasm === null) return this.reference(outs, ins, params);
    const slots = ins.length + outs.length;
    const n4 = (n + 3) & ~3;
    // Resident operands are used where they are (a byte offset); the others go through scratch, in slots
    // 0, 1, … in operand order (−1 − slot).
    const inAt = this.inAt;
    const outAt = this.outAt;
    let copied = 0;
    for (let j = 0; j < ins.length; j++) {
      const a = ins[j]!;
      inAt[j] = isResident(a) ? a.byteOffset : -1 - copied++;
    }
    for (let j = 0; j < outs.length; j++) {
      const out = outs[j]!;
      let at = isResident(out) && (n % 4 === 0 || slotViews.has(out)) ? out.byteOffset : -1;
      for (let i = 0; at >= 0 && i < ins.length; i++) {
        const from = inAt[i]!;
        if (from >= 0 && readsShifted(from, at, n4 * 4)) at = -1;
      }
      outAt[j] = at >= 0 ? at : -1 - copied++;
    }
    // Copied operands go block by block, so that the scratch slots stay in the core's cache from the copy
    // in through the kernel to the copy out. Even a noise draw alone was slower copied whole: 0.03–0.04 ms
    // per DPM2 a and DPM++ SDE step on the Xeon of the GPU machine, side by side. With every operand
    // resident there is nothing to keep: one call covers the whole latent, as each call into WebAssembly
    // and each block's views cost µs right after a model call, when the caches are cold.
    const block = copied === 0 ? n : Math.min(n, KERNEL_BLOCK, Math.floor(SUMS_AT / (copied * 16)) * 4);
    const block4 = (block + 3) & ~3;
    const view = arenaFloats();
    const args = this.args;
    for (let j = 0; j < params.length; j++) args[1 + slots + j] = params[j]!;
    const summed = spec.sumOfSquares;
    const wholeEndArg = 1 + slots + params.length;
    const sums = summed === undefined ? undefined : arenaSums!.fill(0);
    if (sums !== undefined) args[wholeEndArg + 1] = SUMS_AT;
    // The summed values past the last whole vector are added here, from the inputs as they are before
    // the call: an output may overwrite an input.
    const tail = summed === undefined ? [] : tailValues(summed, ins, params, n & ~3, n);
    for (let start = 0; start < n; start += block) {
      const end = Math.min(n, start + block);
      const m = end - start;
      args[0] = (m + 3) & ~3;
      for (let j = 0; j < ins.length; j++) {
        const at = inAt[j]!;
        if (at >= 0) {
          args[1 + j] = at + start * 4;
        } else {
          const slot = (-1 - at) * block4;
          args[1 + j] = slot * 4;
          view.set(ins[j]!.subarray(start, end), slot);
        }
      }
      for (let j = 0; j < outs.length; j++) {
        const at = outAt[j]!;
        args[1 + ins.length + j] = at >= 0 ? at + start * 4 : (-1 - at) * block4 * 4;
      }
      // Blocks are whole vectors but the last: its few values past them are added below.
      if (summed !== undefined) args[wholeEndArg] = (m & ~3) * 4;
      wasm(...args);
      for (let j = 0; j < outs.length; j++) {
        const at = outAt[j]!;
        if (at >= 0) continue;
        const slot = (-1 - at) * block4;
        outs[j]!.set(view.subarray(slot, slot + m), start);
      }
    }
    if (sums === undefined) return 0;
    return addSquares(sums[0]! + sums[1]! + (sums[2]! + sums[3]!), tail, 0, tail.length);
  }

  /** The scalar loop (also the tests' reference for the compiled form): one Math.fround per operation. */
  runReference(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[] = []): void {
    this.reference(outs, ins, params);
  }

  /** runSumOfSquares by the scalar loop. */
  runSumOfSquaresReference(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[] = []): number {
    if (this.spec.sumOfSquares === undefined) throw new RangeError("this kernel sums no squares");
    return this.reference(outs, ins, params);
  }

  private reference(outs: readonly Float32Array[], ins: readonly Float32Array[], params: readonly number[]): number {
    const { outputs, sumOfSquares: summed } = this.spec;
    const n = outs[0]!.length;
    const results = new Float64Array(outputs.length);
    const summedValues = summed === undefined ? undefined : new Float32Array(n);
    for (let k = 0; k < n; k++) {
      for (let j = 0; j < outputs.length; j++) results[j] = evaluate(outputs[j]!, ins, params, k);
      if (summedValues !== undefined) summedValues[k] = evaluate(summed!, ins, params, k);
      for (let j = 0; j < outputs.length; j++) outs[j]![k] = results[j]!;
    }
    return summedValues === undefined ? 0 : interleavedSumOfSquares(summedValues);
  }
}

/**
 * Σ a[k]² in float64 in the order of KernelSpec.sumOfSquares: four running sums S_j over k ≡ j (mod 4)
 * below the last whole vector of four, (S₀ + S₁) + (S₂ + S₃), then the last a.length mod 4 values.
 */
function interleavedSumOfSquares(a: Float32Array): number {
  const whole = a.length & ~3;
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  for (let k = 0; k < whole; k += 4) {
    const v0 = a[k]!;
    const v1 = a[k + 1]!;
    const v2 = a[k + 2]!;
    const v3 = a[k + 3]!;
    s0 += v0 * v0;
    s1 += v1 * v1;
    s2 += v2 * v2;
    s3 += v3 * v3;
  }
  return addSquares(s0 + s1 + (s2 + s3), a, whole, a.length);
}

/**
 * Whether an input at byte `from` overlaps an output at byte `at` (both `bytes` long) at another place. Each
 * vector of every input is loaded before that vector of any output is stored, so an output exactly over
 * an input is written where it is; a shifted one would read values the call has already written, and goes
 * through scratch. (Two outputs in one place are the caller's error.)
 */
function readsShifted(from: number, at: number, bytes: number): boolean {
  return from !== at && from < at + bytes && at < from + bytes;
}

/** The values of `node` at indices from…to − 1, by the scalar form. */
function tailValues(node: Expr, ins: readonly Float32Array[], params: readonly number[], from: number, to: number): number[] {
  const values: number[] = [];
  for (let k = from; k < to; k++) values.push(evaluate(node, ins, params, k));
  return values;
}

/** sum + a[from]² + … + a[to − 1]², one float64 addition at a time. */
function addSquares(sum: number, a: ArrayLike<number>, from: number, to: number): number {
  for (let k = from; k < to; k++) {
    const v = a[k]!;
    sum += v * v;
  }
  return sum;
}
