/**
 * Sampler noise made on another thread. Ancestral and SDE samplers draw one latent of normals per
 * step (2.9 ms for 4×128×128 from the NV source, 6.3 ms from the CPU source, on this 2-core VM). Where
 * the render runs in the same thread as the UNet (the agent's pipeline threads), a draw made "ahead"
 * on that thread still waits for the UNet or delays it; a NoiseThread makes it during the UNet call.
 *
 * Values never change. A stream continues the exact generator states of an ImageRng after first()
 * (ImageRng.continuation), and draws are handed out strictly in order. A draw that is not there when
 * the sampler takes it is waited for synchronously (the thread was asked for it); if the thread is
 * gone, the stream continues on this thread from the same state, skipping the draws already taken.
 *
 * Draws travel through shared memory, not messages: each stream has a ring of a few draws in a
 * SharedArrayBuffer, the thread writes draw i into slot i % slots, and both sides keep counters in the
 * ring's header (noise-stream-protocol.ts). Asking is a store and a notify on the thread's doorbell;
 * arriving is a counter the stream reads. Between two UNet calls on the test VM, posting a request cost
 * 70 µs and receiving a transferred 256 KB draw 75 µs, each 256 KB buffer also going to the GC; a
 * notify costs 6 µs. So take() lends the draw where it lies: **a draw is valid until the next take()**
 * (or close()), after which its slot is written again. Every sampler uses a draw before it takes the
 * next one (prefetch.ts, where staged draws follow the same rule).
 */
import { MessageChannel, type MessagePort, type Worker } from "node:worker_threads";
import { spawnModuleWorker } from "../runtime/spawn-worker.js";
import { NoiseContinuation, type NoiseContinuationState } from "./image-rng.js";
import { MADE, RELEASED, RING_HEADER_BYTES, WANTED, ringViews, type NoiseThreadInit, type ToNoiseThread } from "./noise-stream-protocol.js";

/** How long a synchronous take() waits for the thread before continuing the stream here instead. */
const SYNC_WAIT_LIMIT_MS = 10_000;
/**
 * Draws a stream's ring holds: the one lent to the sampler, the one asked for ahead, and one more, so
 * the thread can make the next draw while the sampler still holds the last (samplers ask one ahead).
 */
const RING_SLOTS = 3;

/** Atomics.waitAsync (ES2024; Node 16+), typed here because the project's lib is ES2023. */
const waitAsync = (
  Atomics as unknown as {
    waitAsync(a: Int32Array, index: number, value: number, timeoutMs: number): { async: boolean; value: Promise<unknown> | string };
  }
).waitAsync;

/** One thread serving the noise streams of many runs (a pipeline's). close() ends it. */
export class NoiseThread {
  private worker: Worker | undefined;
  private port: MessagePort | undefined;
  private bell: Int32Array | undefined;
  private failed = false;
  private closed = false;
  private nextId = 1;
  private readonly streams = new Map<number, NoiseStream>();
  /** Draws the thread delivered, i.e. that streams took from it (tests, metrics). */
  delivered = 0;

  /** The thread, started on first use; undefined when it cannot run (the streams then draw here). */
  private start(): boolean {
    if (this.worker || this.failed || this.closed) return !this.failed && !this.closed;
    try {
      const { port1, port2 } = new MessageChannel();
      const bell = new SharedArrayBuffer(4);
      const init: NoiseThreadInit = { port: port2, bell };
      this.worker = spawnModuleWorker(import.meta.url, "noise-stream-worker", { workerData: init, transferList: [port2] });
      this.port = port1;
      this.bell = new Int32Array(bell);
      const fail = (): void => {
        this.failed = true;
        for (const s of this.streams.values()) s.threadFailed();
      };
      this.worker.on("error", fail);
      this.worker.on("exit", () => {
        if (!this.closed) fail();
      });
      return true;
    } catch {
      this.failed = true;
      return false;
    }
  }

  /** @internal A control message for the thread's loop, which reads its port when the doorbell rings. */
  send(m: ToNoiseThread): void {
    this.port?.postMessage(m);
    this.ring();
  }

  /** @internal Wakes the thread: a stream asked for draws or gave slots back. */
  ring(): void {
    if (this.bell === undefined) return;
    Atomics.add(this.bell, 0, 1);
    Atomics.notify(this.bell, 0);
  }

  /** A stream continuing `state`; its draws are made on this thread's worker when it runs. */
  open(state: NoiseContinuationState): NoiseStream {
    const id = this.nextId++;
    const remote = this.start();
    const length = state.generators.length * state.shape[0] * state.shape[1] * state.shape[2];
    const ring = remote ? new SharedArrayBuffer(RING_HEADER_BYTES + RING_SLOTS * length * 4) : undefined;
    const stream = new NoiseStream(remote ? this : undefined, id, state, ring, () => this.streams.delete(id));
    if (ring !== undefined) {
      this.streams.set(id, stream);
      this.send({ op: "open", id, state, ring, slots: RING_SLOTS });
    }
    return stream;
  }

  /** Draws the thread has made so far for the open streams, taken or not (tests: waiting for them without taking any). */
  get postedDraws(): number {
    let made = 0;
    for (const s of this.streams.values()) made += s.made;
    return made;
  }

  get threadFailed(): boolean {
    return this.failed;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.streams.values()]) s.close();
    this.send({ op: "exit" });
    this.port?.close();
    await this.worker?.terminate();
  }
}

/** One run's sampler noise: request() ahead, ready() before the sampler resumes, take() in the sampler. */
export class NoiseStream {
  private readonly header: Int32Array | undefined;
  private readonly slots: Float32Array[];
  private requested = 0;
  private taken = 0;
  private local: NoiseContinuation | undefined;
  private closed = false;

  /** @internal */
  constructor(
    private thread: NoiseThread | undefined,
    private readonly id: number,
    private readonly state: NoiseContinuationState,
    ring: SharedArrayBuffer | undefined,
    private readonly onClose: () => void,
  ) {
    if (ring === undefined) {
      this.local = NoiseContinuation.resume(state);
      this.slots = [];
      return;
    }
    const views = ringViews(ring, RING_SLOTS);
    this.header = views.header;
    this.slots = views.slots;
  }

  /** Whether the draws are made on another thread (false after a fallback to this one). */
  get remote(): boolean {
    return this.thread !== undefined;
  }

  /** Draws asked for and not taken yet. */
  get pending(): number {
    return this.requested - this.taken;
  }

  /** @internal Draws the thread has written so far. */
  get made(): number {
    return this.header === undefined ? 0 : Atomics.load(this.header, MADE);
  }

  /** Asks for `count` more draws beyond those already requested, to be made now, off this thread. */
  request(count: number): void {
    if (count <= 0 || this.closed) return;
    this.requested += count;
    if (this.thread === undefined) return;
    Atomics.store(this.header!, WANTED, this.requested);
    this.thread.ring();
  }

  /**
   * The draws the thread can have made now: those requested, as far as the ring holds them (the thread
   * writes no slot still lent to the sampler, so a request further ahead waits for the takes).
   */
  private get reachable(): number {
    return Math.min(this.requested, Math.max(0, this.taken - 1) + RING_SLOTS);
  }

  /** Resolves once every requested draw the ring can hold is here (at once when drawing here). */
  async ready(): Promise<void> {
    while (this.thread !== undefined && !this.closed) {
      const made = this.made;
      if (made >= this.reachable) return;
      // Woken by the thread's notify for each draw (or by threadFailed/close); the timeout is a backstop.
      const wait = waitAsync(this.header!, MADE, made, 1000);
      if (wait.async) await wait.value;
    }
  }

  /** Whether every requested draw the ring can hold is here: one read of shared memory, no event-loop turn. */
  readyNow(): boolean {
    return this.thread === undefined || this.made >= this.reachable;
  }

  /** The next draw, in order: what ImageRng.next() would have returned. Valid until the next take() (see above). */
  readonly take = (): Float32Array => {
    const index = this.taken;
    const thread = this.thread;
    if (thread !== undefined) {
      const header = this.header!;
      // The draw lent before is given back: its slot may be written again. The thread is woken only if it
      // may be waiting for that slot.
      Atomics.store(header, RELEASED, index);
      if (this.made - (index - 1) >= RING_SLOTS) thread.ring();
      if (index >= this.requested) this.request(index + 1 - this.requested);
      const deadline = performance.now() + SYNC_WAIT_LIMIT_MS;
      for (let made = this.made; made <= index && this.thread !== undefined && performance.now() < deadline; made = this.made) {
        Atomics.wait(header, MADE, made, Math.max(1, deadline - performance.now()));
      }
      if (this.made > index && this.thread !== undefined) {
        this.taken++;
        thread.delivered++;
        return this.slots[index % RING_SLOTS]!;
      }
      this.threadFailed();
    }
    this.taken++;
    return this.local!.next();
  };

  /** @internal From here on the draws are made on this thread, continuing after those already taken. */
  threadFailed(): void {
    if (!this.thread) return;
    this.thread.send({ op: "close", id: this.id });
    this.thread = undefined;
    this.local = NoiseContinuation.resume(this.state);
    for (let i = 0; i < this.taken; i++) this.local.next();
    this.wake();
  }

  /** Ends a ready() that waits on the ring. */
  private wake(): void {
    if (this.header !== undefined) Atomics.notify(this.header, MADE);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.thread?.send({ op: "close", id: this.id });
    this.onClose();
    this.wake();
  }
}
