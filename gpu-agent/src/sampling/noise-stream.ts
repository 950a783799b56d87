/**
 * Sampler noise made on another thread. Ancestral and SDE samplers draw one latent of normals per
 * step (2.9 ms for 4×128×128 from the NV source, 6.3 ms from the CPU source, on this 2-core VM). Where
 * the render runs in the same thread as the UNet (the agent's pipeline threads), a draw made "ahead"
 * on that thread still waits for the UNet or delays it; a NoiseThread makes it during the UNet call.
 *
 * Values never change. A stream continues the exact generator states of an ImageRng after first()
 * (ImageRng.continuation), and draws are handed out strictly in order. A draw that has not arrived
 * when the sampler takes it is waited for synchronously (the thread was asked for it); if the thread
 * is gone, the stream continues on this thread from the same state, skipping the draws already taken.
 */
import { MessageChannel, receiveMessageOnPort, type MessagePort, type Worker } from "node:worker_threads";
import { spawnModuleWorker } from "../runtime/spawn-worker.js";
import { NoiseContinuation, type NoiseContinuationState } from "./image-rng.js";
import type { NoiseDraw, NoiseThreadInit, ToNoiseThread } from "./noise-stream-protocol.js";

/** How long a synchronous take() waits for the thread before continuing the stream here instead. */
const SYNC_WAIT_LIMIT_MS = 10_000;

/** One thread serving the noise streams of many runs (a pipeline's). close() ends it. */
export class NoiseThread {
  private worker: Worker | undefined;
  private port: MessagePort | undefined;
  private posted: Int32Array | undefined;
  private failed = false;
  private closed = false;
  private nextId = 1;
  private readonly streams = new Map<number, NoiseStream>();
  /** Draws the thread delivered (tests, metrics). */
  delivered = 0;

  /** The thread, started on first use; undefined when it cannot run (the streams then draw here). */
  private start(): boolean {
    if (this.worker || this.failed || this.closed) return !this.failed && !this.closed;
    try {
      const { port1, port2 } = new MessageChannel();
      const posted = new SharedArrayBuffer(4);
      const init: NoiseThreadInit = { port: port2, posted };
      this.worker = spawnModuleWorker(import.meta.url, "noise-stream-worker", { workerData: init, transferList: [port2] });
      this.port = port1;
      this.posted = new Int32Array(posted);
      port1.on("message", (m: NoiseDraw) => this.accept(m));
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

  private accept(m: NoiseDraw): void {
    this.delivered++;
    this.streams.get(m.id)?.arrive(m.index, m.draw);
  }

  /** @internal */
  send(m: ToNoiseThread): void {
    this.port?.postMessage(m);
  }

  /**
   * Synchronously takes whatever the thread has posted; waits up to `limitMs` for one more message.
   * @internal
   */
  drainOrWait(limitMs: number): void {
    if (!this.port || !this.posted) return;
    const before = Atomics.load(this.posted, 0);
    if (this.drain() === 0) {
      Atomics.wait(this.posted, 0, before, limitMs);
      this.drain();
    }
  }

  /**
   * Synchronously takes whatever the thread has posted, without waiting; returns how many draws came.
   * A stream checks here before waiting for a "message" event, which needs a turn of the event loop:
   * in a pipeline thread the draws usually arrived during the UNet call, and that turn (with whatever
   * else it runs) would sit between the model's answer and the sampler's next step.
   * @internal
   */
  drain(): number {
    if (!this.port) return 0;
    let count = 0;
    for (let m = receiveMessageOnPort(this.port); m !== undefined; m = receiveMessageOnPort(this.port)) {
      this.accept(m.message as NoiseDraw);
      count++;
    }
    return count;
  }

  /** A stream continuing `state`; its draws are made on this thread's worker when it runs. */
  open(state: NoiseContinuationState): NoiseStream {
    const id = this.nextId++;
    const remote = this.start();
    const stream = new NoiseStream(remote ? this : undefined, id, state, () => this.streams.delete(id));
    if (remote) {
      this.streams.set(id, stream);
      this.send({ op: "open", id, state });
    }
    return stream;
  }

  /** Draws the thread has posted so far, taken or not (tests: waiting for them without taking any). */
  get postedDraws(): number {
    return this.posted === undefined ? 0 : Atomics.load(this.posted, 0);
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
  private readonly arrived = new Map<number, Float32Array>();
  private requested = 0;
  private taken = 0;
  private local: NoiseContinuation | undefined;
  private waiter: { resolve: () => void } | undefined;
  private closed = false;

  /** @internal */
  constructor(
    private thread: NoiseThread | undefined,
    private readonly id: number,
    private readonly state: NoiseContinuationState,
    private readonly onClose: () => void,
  ) {
    if (!thread) this.local = NoiseContinuation.resume(state);
  }

  /** Whether the draws are made on another thread (false after a fallback to this one). */
  get remote(): boolean {
    return this.thread !== undefined;
  }

  /** Draws asked for and not taken yet. */
  get pending(): number {
    return this.requested - this.taken;
  }

  /** Asks for `count` more draws beyond those already requested, to be made now, off this thread. */
  request(count: number): void {
    if (count <= 0 || this.closed) return;
    this.requested += count;
    this.thread?.send({ op: "want", id: this.id, upTo: this.requested });
  }

  /** Resolves once every requested draw has arrived (at once when drawing here). */
  ready(): Promise<void> {
    if (this.readyNow()) return Promise.resolve();
    return new Promise((resolve) => (this.waiter = { resolve }));
  }

  /** Whether every requested draw is here, taking what the thread posted without an event-loop turn. */
  readyNow(): boolean {
    if (!this.thread) return true;
    if (!this.allArrived()) this.thread.drain();
    return !this.thread || this.allArrived();
  }

  private allArrived(): boolean {
    for (let i = this.taken; i < this.requested; i++) if (!this.arrived.has(i)) return false;
    return true;
  }

  /** The next draw, in order: what ImageRng.next() would have returned. */
  readonly take = (): Float32Array => {
    const index = this.taken;
    if (this.thread) {
      if (index >= this.requested) this.request(index + 1 - this.requested);
      const deadline = performance.now() + SYNC_WAIT_LIMIT_MS;
      while (!this.arrived.has(index) && this.thread && performance.now() < deadline) {
        this.thread.drainOrWait(Math.max(1, deadline - performance.now()));
      }
      const draw = this.arrived.get(index);
      if (draw) {
        this.arrived.delete(index);
        this.taken++;
        return draw;
      }
      this.threadFailed();
    }
    this.taken++;
    return this.local!.next();
  };

  /** @internal The thread sent draw `index`. */
  arrive(index: number, draw: Float32Array): void {
    if (index < this.taken || this.closed || !this.thread) return;
    this.arrived.set(index, draw);
    if (this.waiter && this.allArrived()) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve();
    }
  }

  /** @internal From here on the draws are made on this thread, continuing after those already taken. */
  threadFailed(): void {
    if (!this.thread) return;
    this.thread.send({ op: "close", id: this.id });
    this.thread = undefined;
    this.arrived.clear();
    this.local = NoiseContinuation.resume(this.state);
    for (let i = 0; i < this.taken; i++) this.local.next();
    this.waiter?.resolve();
    this.waiter = undefined;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.thread?.send({ op: "close", id: this.id });
    this.onClose();
    this.arrived.clear();
    this.waiter?.resolve();
    this.waiter = undefined;
  }
}
