import { allocateResident, freeResident, isResident } from "../kernels.js";
import type { ModelRequest, ModelResponse, SamplerRun } from "./types.js";

/**
 * Fresh latent arrays for the samplers' step results.
 *
 * Inside a run started through `inLatentScope` (the planner's runs, so the agent's), they are resident:
 * they live in the kernels' WebAssembly memory, where the kernels read and write them without copies
 * (kernels.ts). A resident array's slot is reused once the sampler releases it (`releaseLatent`, when no
 * step will read it again) or when the run ends. That makes two rules:
 * - a sampler releases only arrays it will never read again, and writes every value of a fresh array
 *   before reading it (slots are not cleared);
 * - a driver reads a request's arrays until it resumes the sampler, and copies what it wants to keep
 *   longer. The latent a run returns is copied out of the memory and is the caller's.
 * The model's answer can be resident too: each request offers a slot (`into`) that the driver writes its
 * CFG-combined answer into, where the agent would otherwise allocate one. The sampler then owns the
 * answer and releases it like its own latents, and its kernels read it without copying it in: at
 * 4×128×128 that saves a 256 KB copy per call, and for samplers that keep old answers (DPM++ 2M and
 * 3M SDE, PLMS) one copy per kept answer per step.
 * Tests run every sampler in a scope that fills released and fresh slots with NaN and compare its bits
 * with a run without residency, so a release too early shows.
 *
 * Outside a scope, arrays come from the pool below, allocated while the model runs instead of on the
 * sampler's critical path.
 *
 * Outside a scope nothing tells a sampler's own arrays from the caller's start latent, so a step never
 * writes over its x there (resultInPlaceOf): every step needs a new 4×128×128 array, and allocating one
 * costs far more than the step's arithmetic: a 256 KB zeroed backing store is fresh memory whose pages
 * fault in on first write, and the garbage it leaves drives GC. Before a sampler yields a model
 * request it asks for the arrays it will need once the answer arrives; they are allocated and paged in
 * from a setImmediate callback, which runs while the driver waits for the model. A synchronous driver
 * never lets that callback run in time, and then `freshLatent` simply allocates, as before. Every pool
 * array is new and zero-filled.
 */

/**
 * Spares kept per length, and lengths kept: bounds what the pool holds between runs (at most 16 × 256 KB
 * per length at 1024²; a single image leaves 2–3). Requests made in the same turn add up, so a batch of
 * images that all post their model calls before the model runs gets arrays for each.
 */
const MAX_SPARES = 16;
const MAX_LENGTHS = 4;

const spares = new Map<number, Float32Array[]>();
const wanted = new Map<number, number>();
let scheduled = false;

/**
 * A Float32Array of `length` values for a step's result: resident inside a scope (values undefined until
 * written), else new and zero-filled, from the pool when one is ready.
 */
export function freshLatent(length: number): Float32Array {
  return current?.fresh(length) ?? pooledLatent(length);
}

/** An ordinary zero-filled array: from the pool when one is ready, else new. */
function pooledLatent(length: number): Float32Array {
  return spares.get(length)?.pop() ?? new Float32Array(length);
}

/**
 * An array for the model's answer (ModelRequest.into): resident, in the running scope, with residency on;
 * else undefined, and the driver answers in an array of its own.
 */
export function answerSlot(length: number): Float32Array | undefined {
  return current?.fresh(length);
}

/** Whether `a` is one of the running scope's arrays. */
export function heldByRun(a: Float32Array): boolean {
  return current?.holds(a) ?? false;
}

/** The sampler will not read these arrays again: their slots may be reused (no-op for arrays not resident). */
export function releaseLatent(...arrays: (Float32Array | undefined)[]): void {
  if (current === undefined) return;
  for (const a of arrays) if (a !== undefined) current.release(a);
}

/**
 * Where a step's result that replaces `x` goes: into x itself when the run holds it, else a fresh array (x
 * is the caller's start latent, or residency is off). Only for a step whose kernel reads x at the index it
 * writes and whose sampler reads x no more: a kernel loads each value of its inputs before it stores that
 * of its outputs, and a driver is done with a request's arrays once it resumes the sampler. In place, the
 * step writes where it has just read instead of a latent last touched a model call ago, and takes and gives
 * back no array. Pass the result to supersede(x, …), which releases x only when it was not reused.
 */
export function resultInPlaceOf(x: Float32Array): Float32Array {
  return current?.holds(x) === true ? x : freshLatent(x.length);
}

/**
 * `next`, after releasing `old`, which it replaces as the sampler's state, and `alsoDone` (a step's
 * intermediate latents): `x = supersede(x, step(…, x, x2, …), x2)`.
 */
export function supersede(old: Float32Array, next: Float32Array, ...alsoDone: Float32Array[]): Float32Array {
  if (old !== next) releaseLatent(old);
  releaseLatent(...alsoDone);
  return next;
}

/** The scope of the run whose sampler code is running now (set around each resume by inLatentScope). */
let current: LatentScope | undefined;
let residency = true;
let poisonByDefault = false;

/**
 * Turns residency off or on (on by default): off, scopes hand out ordinary arrays and every kernel copies
 * its operands in and its results out. For side-by-side measurements; the results are the same bits.
 * `poison` makes scopes created without options fill fresh and released slots with NaN (tests).
 */
export function setLatentResidency(enabled: boolean, options: { poison?: boolean } = {}): void {
  residency = enabled;
  poisonByDefault = options.poison ?? false;
}

/**
 * A copy of `a` in the kernels' memory, for noise made while the model runs (prefetch.ts): a kernel then
 * reads it where it is instead of copying it in between two model calls. Undefined with residency off or
 * no room. The caller owns it and gives it back with freeResidentCopy.
 */
export function residentCopy(a: Float32Array): Float32Array | undefined {
  if (!residency) return undefined;
  const copy = allocateResident(a.length);
  copy?.set(a);
  return copy;
}

/** Gives back a residentCopy; poisoned with NaN first where scopes are (tests), so a late read shows. */
export function freeResidentCopy(a: Float32Array): void {
  freeResident(a, poisonByDefault);
}

export interface LatentScopeOptions {
  /** Fill fresh and released slots with NaN, so that a read before a write or after a release shows (tests). */
  poison?: boolean;
  /** Resident bytes the run may hold at once; beyond, fresh arrays are ordinary ones (default 256 MiB). */
  maxBytes?: number;
}

/** One run's resident arrays. */
export class LatentScope {
  private readonly held = new Set<Float32Array>();
  /**
   * Arrays the run released, handed out again to the run before the kernels' memory is asked (and given
   * back to it when the run ends): the memory's shared bookkeeping took 11 µs per array on the test VM
   * between two model calls, where the step's own kernel takes 0.1–0.2 ms. Last released, first reused:
   * the one most likely still in the cache.
   */
  private readonly spare: Float32Array[] = [];
  /** Resident bytes the run has taken from the kernels' memory, held and spare. */
  private bytes = 0;
  private readonly poison: boolean;
  private readonly maxBytes: number;

  constructor(options: LatentScopeOptions = {}) {
    this.poison = options.poison ?? poisonByDefault;
    this.maxBytes = options.maxBytes ?? 256 << 20;
  }

  /** Arrays the run holds now. */
  get size(): number {
    return this.held.size;
  }

  fresh(length: number): Float32Array | undefined {
    if (!residency) return undefined;
    let a = this.spare.length > 0 && this.spare[this.spare.length - 1]!.length === length ? this.spare.pop() : undefined;
    if (a === undefined) {
      if (this.bytes + length * 4 > this.maxBytes) return undefined;
      a = allocateResident(length);
      if (a === undefined) return undefined;
      this.bytes += a.byteLength;
    }
    if (this.poison) a.fill(NaN);
    this.held.add(a);
    return a;
  }

  holds(a: Float32Array): boolean {
    return this.held.has(a);
  }

  release(a: Float32Array): void {
    if (!this.held.delete(a)) return;
    if (this.poison) a.fill(NaN);
    this.spare.push(a);
  }

  /** Gives everything the run took back to the kernels' memory. */
  close(): void {
    for (const a of this.held) freeResident(a, this.poison);
    // Spare arrays were poisoned when released.
    for (const a of this.spare) freeResident(a);
    this.held.clear();
    this.spare.length = 0;
    this.bytes = 0;
  }
}

/**
 * `run` with its fresh latents resident (see above): every resume of the sampler runs in `scope`, the
 * latent it returns is copied out, and the scope closes when the run ends, however it ends.
 */
export function* inLatentScope(run: SamplerRun, scope: LatentScope = new LatentScope()): SamplerRun {
  try {
    let started = false;
    let response!: ModelResponse;
    for (;;) {
      const outer = current;
      current = scope;
      let r: IteratorResult<ModelRequest, Float32Array>;
      try {
        r = started ? run.next(response) : run.next();
      } finally {
        current = outer;
      }
      if (r.done) return isResident(r.value) ? resultCopy(r.value) : r.value;
      // The copy of the result above goes into an array allocated and paged in while the model runs.
      if (!started && residency) allocateAhead(r.value.x.length, 1);
      started = true;
      response = yield r.value;
    }
  } finally {
    // An abandoned run (the driver's return() or a throw) is closed too, inside its scope.
    const outer = current;
    current = scope;
    try {
      run.return(undefined as unknown as Float32Array);
    } finally {
      current = outer;
      scope.close();
    }
  }
}

/**
 * The caller's copy of a run's resident result: into a pool array when one is ready, since a new 256 KB
 * array costs its page faults on the copy (0.06–0.5 ms on the test VM where the copy itself takes 0.03).
 */
function resultCopy(result: Float32Array): Float32Array {
  const out = pooledLatent(result.length);
  out.set(result);
  return out;
}

/** Asks for `count` fresh arrays of `length` to be ready the next time the sampler runs. */
export function allocateAhead(length: number, count: number): void {
  // A run in a scope takes resident arrays (already paged in once reused), not these.
  if (length < MIN_POOLED || (current !== undefined && residency)) return;
  wanted.set(length, Math.min(MAX_SPARES, (wanted.get(length) ?? 0) + count));
  if (scheduled) return;
  scheduled = true;
  setImmediate(fill).unref();
}

/** Small latents are cheap to allocate on the spot (below the allocator's separate mapping of large blocks). */
const MIN_POOLED = 16384;

function fill(): void {
  scheduled = false;
  for (const [length, count] of wanted) {
    let list = spares.get(length);
    if (list === undefined) {
      if (spares.size >= MAX_LENGTHS) spares.delete(spares.keys().next().value!);
      list = [];
      spares.set(length, list);
    }
    while (list.length < count) {
      const array = new Float32Array(length);
      // Writing pages them in now; a zero fill keeps the array exactly what `new` gives.
      array.fill(0);
      list.push(array);
    }
  }
  wanted.clear();
}

/** Drops the spares (tests; or to give the memory back). */
export function clearLatentPool(): void {
  spares.clear();
  wanted.clear();
}
