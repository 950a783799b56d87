/**
 * The Brownian tree's normal draws, made ahead by several threads for a whole sampling run.
 *
 * Why this works without changing a value: every split node's noise is the first draw of a generator
 * seeded with that node's W seed, and the seed comes from the tree's structure alone (entropy, spawn
 * key, depth), never from another node's values. The structure a run visits is a function of its
 * (σ, σ_next) queries, which are a function of the σ schedule, known before the first model call. So
 * `planDraws` walks the tree with one-element arrays (same code, same caches, same order) and records
 * the seed of every draw the real tree will ask for, in order; any thread can then make draw i.
 *
 * The draws meet in a ring of shared slots. The tree's thread (brownian-worker.ts) consumes them in plan
 * order (`PooledNormals`), drawing itself whenever it would otherwise wait or idle; helper threads
 * (brownian-pool-worker.ts) claim the next undrawn index and fill its slot. A draw the plan did not
 * foresee, or one whose helper died, is made by the tree's thread itself, so the plan only decides cost.
 */
import { BrownianTreeNoiseSampler, type BrownianNoiseOptions, type SeededNormals } from "./brownian.js";

export type BrownianQueryList = ReadonlyArray<readonly [sigma: number, sigmaNext: number]>;

/**
 * Every draw the tree makes for `queries` asked in this order: the k-th is image images[k]'s generator
 * seeded seeds[k]. Planned lazily, query by query, so the first draws can start before the whole run is
 * walked; every thread of a run plans for itself and, the walk being deterministic, gets the same plan.
 */
export class DrawPlanner {
  readonly images: number[] = [];
  readonly seeds: number[] = [];
  private readonly walker: BrownianTreeNoiseSampler;
  private walked = 0;

  constructor(
    options: BrownianNoiseOptions,
    private readonly queries: BrownianQueryList,
  ) {
    // The structure (split times, seeds, cache evictions) does not depend on the values, nor on their length.
    const recorder =
      (image: number): SeededNormals =>
      (seed, length) => {
        this.images.push(image);
        this.seeds.push(seed);
        return new Float32Array(length);
      };
    this.walker = new BrownianTreeNoiseSampler({ ...options, shape: [1, 1, 1] }, recorder);
  }

  /** Whether the plan has a draw `index`, walking further queries as needed. */
  has(index: number): boolean {
    while (index >= this.seeds.length && this.walked < this.queries.length) {
      const [sigma, sigmaNext] = this.queries[this.walked++]!;
      this.walker.sample(sigma, sigmaNext);
    }
    return index < this.seeds.length;
  }

  /** The whole run's plan length (walks every query). */
  get total(): number {
    this.has(Infinity);
    return this.seeds.length;
  }
}

export function planDraws(options: BrownianNoiseOptions, queries: BrownianQueryList): DrawPlanner {
  return new DrawPlanner(options, queries);
}

/* ---- the shared ring ---- */

/** Control words: next index to claim, indices the tree has taken (slots free below it + slots), stop, a helper failed. */
const CLAIM = 0;
const TAKEN = 1;
const STOP = 2;
const FAILED = 3;
const CONTROL_WORDS = 4;
/** Waits are bounded so that a stop or a failure is seen even if its notify is missed. */
const WAIT_MS = 50;

export interface DrawRing {
  /** Int32 control words (see above). */
  control: SharedArrayBuffer;
  /** Int32 per slot: the plan index whose draw the slot holds, −1 before any. */
  filled: SharedArrayBuffer;
  /** Float32 slots × length. */
  data: SharedArrayBuffer;
  slots: number;
  length: number;
  /**
   * A service's wake word, shared by all its runs' rings (Int32 ×1): bumped and notified whenever a ring
   * gets room or stops, so one helper can wait for any of several runs' rings at once (RingDrawer).
   */
  wake?: SharedArrayBuffer;
}

/** Slots for the ring: enough for a few steps' draws, at most ~16 MiB of them. */
export function ringSlots(length: number): number {
  return Math.max(4, Math.min(64, Math.floor((16 * 2 ** 20) / (4 * Math.max(1, length)))));
}

export function createDrawRing(length: number, slots = ringSlots(length), wake?: SharedArrayBuffer): DrawRing {
  const ring: DrawRing = {
    control: new SharedArrayBuffer(4 * CONTROL_WORDS),
    filled: new SharedArrayBuffer(4 * slots),
    data: new SharedArrayBuffer(4 * slots * length),
    slots,
    length,
    ...(wake !== undefined && { wake }),
  };
  new Int32Array(ring.filled).fill(-1);
  return ring;
}

/** Tells every thread of the ring to stop (the run ended); waiting threads wake. */
export function stopRing(ring: DrawRing): void {
  const control = new Int32Array(ring.control);
  Atomics.store(control, STOP, 1);
  Atomics.notify(control, TAKEN);
  Atomics.notify(new Int32Array(ring.filled), 0);
  wakeAll(ring);
}

/** A new wake word for a service's rings. */
export function createWakeWord(): SharedArrayBuffer {
  return new SharedArrayBuffer(4);
}

/** Tells the helpers waiting on `wake` (or on `ring`'s wake word) to look again. */
export function wakeAll(wake: DrawRing | SharedArrayBuffer | undefined): void {
  const buffer = wake instanceof SharedArrayBuffer ? wake : wake?.wake;
  if (buffer === undefined) return;
  const word = new Int32Array(buffer);
  Atomics.add(word, 0, 1);
  Atomics.notify(word, 0);
}

/** Marks that a helper stopped drawing before the end: its claimed draws will never be filled. */
export function failRing(ring: DrawRing): void {
  const control = new Int32Array(ring.control);
  Atomics.store(control, FAILED, 1);
  const filled = new Int32Array(ring.filled);
  for (let s = 0; s < ring.slots; s++) Atomics.notify(filled, s);
}

class RingView {
  readonly control: Int32Array;
  readonly filled: Int32Array;
  readonly data: Float32Array;

  constructor(
    readonly ring: DrawRing,
    readonly plan: DrawPlanner,
    readonly randn: SeededNormals,
  ) {
    this.control = new Int32Array(ring.control);
    this.filled = new Int32Array(ring.filled);
    this.data = new Float32Array(ring.data);
  }

  get stopped(): boolean {
    return Atomics.load(this.control, STOP) !== 0;
  }

  slot(index: number): Float32Array {
    const s = index % this.ring.slots;
    return this.data.subarray(s * this.ring.length, (s + 1) * this.ring.length);
  }

  /** Makes draw `index` (claimed by the caller) into its slot and publishes it. */
  fill(index: number): void {
    this.slot(index).set(this.randn(this.plan.seeds[index]!, this.ring.length));
    const s = index % this.ring.slots;
    Atomics.store(this.filled, s, index);
    Atomics.notify(this.filled, s);
  }
}

/**
 * A helper thread's whole job: claim the next draw of the plan, wait for its slot to be free, fill it;
 * until the plan is drawn or the ring stops. Throws (after marking the ring failed) if a draw throws.
 */
export function drawPlanned(ring: DrawRing, plan: DrawPlanner, randn: SeededNormals): void {
  const view = new RingView(ring, plan, randn);
  const { control } = view;
  try {
    for (;;) {
      if (view.stopped) return;
      const index = Atomics.add(control, CLAIM, 1);
      if (!plan.has(index)) return;
      for (;;) {
        const taken = Atomics.load(control, TAKEN);
        if (index < taken + ring.slots) break;
        if (view.stopped) return;
        Atomics.wait(control, TAKEN, taken, WAIT_MS);
      }
      view.fill(index);
    }
  } catch (error) {
    failRing(ring);
    throw error;
  }
}

/**
 * A long-lived helper's side of one run (brownian-pool-worker.ts): unlike drawPlanned it never waits,
 * so one helper can serve several runs' rings in turn and wait on the service's wake word instead.
 */
export class RingDrawer {
  private readonly view: RingView;

  constructor(ring: DrawRing, plan: DrawPlanner, randn: SeededNormals) {
    this.view = new RingView(ring, plan, randn);
  }

  get ring(): DrawRing {
    return this.view.ring;
  }

  /**
   * Claims and makes the next draw if its slot is free: "drew"; "full" when the ring has no room now;
   * "done" once the plan is claimed to the end or the ring stopped (drop the run). If a draw throws,
   * the ring is marked failed (the tree's thread makes that draw itself) and the error is thrown.
   */
  tryDraw(): "drew" | "full" | "done" {
    const { control, plan, ring } = this.view;
    if (this.view.stopped) return "done";
    const index = Atomics.load(control, CLAIM);
    if (!plan.has(index)) return "done";
    if (index >= Atomics.load(control, TAKEN) + ring.slots) return "full";
    if (Atomics.compareExchange(control, CLAIM, index, index + 1) !== index) return "drew";
    try {
      this.view.fill(index);
    } catch (error) {
      failRing(ring);
      throw error;
    }
    return "drew";
  }
}

/**
 * The tree thread's side: its trees' draws, taken from the ring in plan order. `randnFor` is what
 * BrownianTreeNoiseSampler takes; `drawIdle` lets the tree's thread draw ahead between queries.
 */
export class PooledNormals {
  private readonly view: RingView;
  /** Plan index of the next draw the trees will ask for. */
  private cursor = 0;
  private unplanned = 0;
  private readonly wake: Int32Array | undefined;

  constructor(ring: DrawRing, plan: DrawPlanner, randn: SeededNormals) {
    this.view = new RingView(ring, plan, randn);
    this.wake = ring.wake === undefined ? undefined : new Int32Array(ring.wake);
  }

  /** Draws the trees asked for that the plan did not foresee (tests: 0 when the plan was right). */
  get unplannedDraws(): number {
    return this.unplanned;
  }

  readonly randnFor =
    (image: number): SeededNormals =>
    (seed, length) =>
      this.take(image, seed, length);

  private take(image: number, seed: number, length: number): Float32Array {
    const { plan, control, filled } = this.view;
    const index = this.cursor;
    if (!plan.has(index) || plan.images[index] !== image || plan.seeds[index] !== seed || length !== this.view.ring.length) {
      this.unplanned++;
      return this.view.randn(seed, length);
    }
    this.cursor++;
    let out: Float32Array | undefined;
    const s = index % this.view.ring.slots;
    for (;;) {
      if (Atomics.load(filled, s) === index) {
        out = this.view.slot(index).slice();
        break;
      }
      // Not claimed yet: draw it here rather than wait for a helper to get to it.
      if (Atomics.compareExchange(control, CLAIM, index, index + 1) === index) break;
      // Claimed by a helper that will never fill it (it failed, or the ring stopped): draw it here too.
      if (Atomics.load(control, FAILED) !== 0 || this.view.stopped) break;
      Atomics.wait(filled, s, Atomics.load(filled, s), WAIT_MS);
    }
    out ??= this.view.randn(seed, length);
    // Only this thread advances TAKEN; a helper waiting for this slot may now reuse it.
    Atomics.store(control, TAKEN, index + 1);
    Atomics.notify(control, TAKEN);
    if (this.wake !== undefined) {
      Atomics.add(this.wake, 0, 1);
      Atomics.notify(this.wake, 0);
    }
    return out;
  }

  /**
   * Makes the next unclaimed draw into its slot if there is room (never waits). Returns whether there
   * may be more to draw now; false once the plan is drawn, the ring is full, or the ring stopped.
   */
  drawIdle(): boolean {
    const { control, plan } = this.view;
    if (this.view.stopped) return false;
    const index = Atomics.load(control, CLAIM);
    if (index >= Atomics.load(control, TAKEN) + this.view.ring.slots || !plan.has(index)) return false;
    if (Atomics.compareExchange(control, CLAIM, index, index + 1) !== index) return true;
    this.view.fill(index);
    return true;
  }
}
