/**
 * The SDE samplers' Brownian trees off the sampler's thread, for as long as their owner lives.
 *
 * BrownianWorkers is the service a pipeline owns (LoadedPipeline.brownian): one tree thread
 * (brownian-worker.ts) holding the trees of every open run, and one pool of draw helpers
 * (brownian-pool-worker.ts) that make the open runs' normal draws ahead, in parallel, into each run's
 * own ring (brownian-pool.ts). Threads start at the first run (or at start()), serve every later run,
 * concurrent ones included, and end with close(), so a run no longer pays their start-up on its
 * critical path and concurrent runs share one bounded set of threads. Each run (BrownianRun) has its
 * own id, trees, plan and ring: its answers are its own, and closing it drops its state and its queued
 * draws without touching other runs. Queries go over as two numbers; answers come back as transferred
 * Float32Arrays (no copy). If the tree thread dies, its runs' queries answer nothing (their samplers
 * compute the values themselves) and the next run starts a new tree thread.
 *
 * BrownianThread is one run on a service of its own, ended with the run (callers without a pipeline).
 */
import { availableParallelism } from "node:os";
import { MessageChannel, receiveMessageOnPort, type MessagePort, type Worker } from "node:worker_threads";
import { spawnModuleWorker } from "../runtime/spawn-worker.js";
import type { BrownianNoiseOptions } from "./brownian.js";
import { createDrawRing, createWakeWord, failRing, stopRing, wakeAll, type BrownianQueryList, type DrawRing } from "./brownian-pool.js";
import type { BrownianHelperData, BrownianTreeData, HelperJob, HelperReply, TreeReply, TreeRequest } from "./brownian-protocol.js";

const spawnWorker = (name: string, workerData: unknown, transferList?: MessagePort[]): Worker =>
  spawnModuleWorker(import.meta.url, name, { workerData, ...(transferList !== undefined && { transferList }) });

/**
 * Draw helpers per service by default: LATENTFARM_BROWNIAN_HELPERS when set (an integer ≥ 0), else all
 * cores but one, at least 1 and at most 4 (with the tree's own thread drawing too, 5 threads make a
 * 1024×1024 run's draws several times faster than its UNet steps).
 */
export function defaultDrawHelpers(): number {
  const configured = Number(process.env["LATENTFARM_BROWNIAN_HELPERS"] ?? Number.NaN);
  if (Number.isSafeInteger(configured) && configured >= 0) return configured;
  return Math.max(1, Math.min(4, availableParallelism() - 1));
}

export interface BrownianAheadOptions {
  /** Every query of the run, in the order they will be asked (PreparedSampling's plan). */
  queries: BrownianQueryList;
  /** BrownianThread only: helper threads besides the tree's own thread (default defaultDrawHelpers(); 0 = none). */
  helpers?: number;
}

/** The answers a run gets from its tree's thread (a BrownianRun or a BrownianThread). */
export interface BrownianQueries {
  /** Resolves true once the run's trees are built off-thread and answer queries; false if they never will. */
  readonly ready: Promise<boolean>;
  /**
   * The noise for (σ, σ_next), computed off-thread; undefined when it cannot be answered there. `onAnswer`
   * gets the same value synchronously, as the reply is taken (from takeArrived, say), before the promise
   * settles: a driver can then tell that everything is here without a turn of the microtask queue.
   */
  query(sigma: number, sigmaNext: number, onAnswer?: (noise: Float32Array | undefined) => void): Promise<Float32Array | undefined>;
  /**
   * Takes the answers the tree thread has posted so far, synchronously (their query promises settle
   * now), instead of at the next turn of the event loop.
   */
  takeArrived(): void;
  /** Whether queries can still be answered off-thread (open, not failed). */
  readonly running: boolean;
  close(): Promise<void>;
}

/** One tree thread: the runs it holds and their waiting queries. Replaced when it dies. */
class TreeThread {
  readonly worker: Worker;
  /**
   * The thread's replies come on a port of their own, not the worker's: a port can be read
   * synchronously (receiveMessageOnPort), so a sampler that resumes right after a blocking UNet call
   * takes the answers that arrived meanwhile without waiting for a turn of the event loop.
   */
  private readonly replies: MessagePort;
  readonly booted: Promise<boolean>;
  readonly exited: Promise<void>;
  readonly runs = new Map<number, BrownianRun>();
  alive = true;
  private settleBooted: (booted: boolean) => void = () => {};

  constructor(onDeath: (thread: TreeThread) => void) {
    this.booted = new Promise((resolve) => (this.settleBooted = resolve));
    const { port1, port2 } = new MessageChannel();
    this.replies = port1;
    const data: BrownianTreeData = { replies: port2 };
    this.worker = spawnWorker("brownian-worker", data, [port2]);
    port1.on("message", (reply: TreeReply) => this.dispatch(reply));
    this.worker.on("error", (error) => this.die(error, onDeath));
    this.exited = new Promise((resolve) => {
      this.worker.once("exit", (code) => {
        this.die(new Error(`Brownian-tree worker exited with code ${code}`), onDeath);
        resolve();
      });
    });
  }

  private dispatch(reply: TreeReply): void {
    if (reply.kind === "ready") this.settleBooted(true);
    else this.runs.get(reply.run)?.receive(reply);
  }

  /** Dispatches every reply already posted, synchronously. */
  takeArrived(): void {
    if (!this.alive) return;
    for (let m = receiveMessageOnPort(this.replies); m !== undefined; m = receiveMessageOnPort(this.replies)) {
      this.dispatch(m.message as TreeReply);
    }
  }

  /** Whether the thread and its reply port keep the process alive. */
  setRef(ref: boolean): void {
    if (ref) {
      this.worker.ref();
      this.replies.ref();
    } else {
      this.worker.unref();
      this.replies.unref();
    }
  }

  private die(error: Error, onDeath: (thread: TreeThread) => void): void {
    const wasAlive = this.alive;
    this.alive = false;
    this.replies.close();
    this.settleBooted(false);
    for (const run of [...this.runs.values()]) run.fail(error);
    this.runs.clear();
    if (wasAlive) onDeath(this);
  }

  post(request: TreeRequest, transfer?: ArrayBuffer[]): void {
    if (this.alive) this.worker.postMessage(request, transfer);
  }
}

export interface BrownianWorkersOptions {
  /** Draw helper threads shared by the runs (default defaultDrawHelpers(); 0 = the tree's thread draws alone). */
  helpers?: number;
}

/** A pipeline's Brownian-tree threads: one tree thread and one helper pool, shared by every run. */
export class BrownianWorkers {
  private tree: TreeThread | undefined;
  private readonly helperCount: number;
  private readonly helpers = new Set<Worker>();
  private readonly helpersBooted: Promise<void>[] = [];
  private readonly exits: Promise<void>[] = [];
  private readonly wake = createWakeWord();
  private readonly runs = new Set<BrownianRun>();
  private nextRun = 1;
  private closed = false;
  private treeStarts = 0;
  /** Open runs and awaited starts (see hold). */
  private holds = 0;

  constructor(options: BrownianWorkersOptions = {}) {
    this.helperCount = options.helpers ?? defaultDrawHelpers();
  }

  /**
   * Starts the threads now instead of at the first run, and resolves once the tree thread and the helpers
   * have started (true) or the tree thread never will (false). Optional.
   */
  async start(): Promise<boolean> {
    if (this.closed) return false;
    let tree: TreeThread;
    // Someone awaits the threads' start: they keep the process alive until then.
    this.hold(+1);
    try {
      tree = this.treeThread();
      this.ensureHelpers();
      const booted = await tree.booted;
      await Promise.all(this.helpersBooted);
      return booted;
    } catch {
      return false;
    } finally {
      this.hold(-1);
    }
  }

  /**
   * A new run with its own trees (and, given its query list, its draws made ahead by the helpers).
   * Throws if the service is closed or its tree thread cannot be spawned.
   */
  open(options: BrownianNoiseOptions, ahead?: { queries: BrownianQueryList }): BrownianRun {
    if (this.closed) throw new Error("the Brownian-tree service is closed");
    const tree = this.treeThread();
    const id = this.nextRun++;
    const length = options.shape[0] * options.shape[1] * options.shape[2];
    const ring = ahead !== undefined && ahead.queries.length > 0 ? createDrawRing(length, undefined, this.wake) : undefined;
    const run = new BrownianRun(id, tree, ring, (closing) => this.forget(closing));
    tree.runs.set(id, run);
    this.runs.add(run);
    this.hold(+1);
    tree.post({ kind: "open", run: id, options, ...(ring !== undefined && { ahead: { queries: ahead!.queries, ring } }) });
    if (ring !== undefined) {
      this.ensureHelpers();
      const job: HelperJob = { run: id, options, queries: ahead!.queries, ring };
      for (const helper of this.helpers) helper.postMessage(job);
      // A helper waiting on other runs' full rings looks at its messages again now.
      wakeAll(this.wake);
    }
    return run;
  }

  /** Tests: ends the tree thread now, as a crash would (its runs fail; the next run starts a new thread). */
  async killTreeThread(): Promise<void> {
    await this.tree?.worker.terminate();
  }

  /** Tree threads started so far (tests: 1 unless one died). */
  get treeThreadStarts(): number {
    return this.treeStarts;
  }

  /** Runs open now (tests). */
  get openRuns(): number {
    return this.runs.size;
  }

  /** Helper threads running (tests). */
  get runningHelpers(): number {
    return this.helpers.size;
  }

  /** Whether any of the service's threads is still there (tests: nothing is left running after close()). */
  get running(): boolean {
    return this.tree?.alive === true || this.helpers.size > 0;
  }

  /** Ends every thread; open runs' pending queries resolve undefined. Safe to call more than once. */
  async close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      for (const run of [...this.runs]) run.fail(new Error("the Brownian-tree service was closed"));
      await Promise.all([this.tree?.worker.terminate(), ...[...this.helpers].map((h) => h.terminate())]);
    }
    await Promise.all(this.exits);
  }

  private treeThread(): TreeThread {
    if (this.tree?.alive !== true) {
      this.tree = new TreeThread((dead) => {
        // Runs on it have failed (their samplers compute their own values); the next run starts a new one.
        if (this.tree === dead) this.tree = undefined;
      });
      this.treeStarts++;
      this.exits.push(this.tree.exited);
      if (this.holds === 0) this.tree.setRef(false);
    }
    return this.tree;
  }

  /** Spawns helpers up to the configured count (again after one died). Helpers that cannot be spawned are done without. */
  private ensureHelpers(): void {
    const data: BrownianHelperData = { wake: this.wake };
    while (this.helpers.size < this.helperCount) {
      let helper: Worker;
      try {
        helper = spawnWorker("brownian-pool-worker", data);
      } catch {
        return;
      }
      this.helpers.add(helper);
      if (this.holds === 0) helper.unref();
      this.helpersBooted.push(
        new Promise((resolve) => {
          helper.once("message", (_: HelperReply) => resolve());
          helper.once("exit", () => resolve());
        }),
      );
      // A helper's error is not the runs': it only means the tree's thread draws what it claimed.
      helper.on("error", () => {});
      this.exits.push(
        new Promise((resolve) => {
          helper.once("exit", () => {
            this.helpers.delete(helper);
            if (!this.closed) for (const run of this.runs) run.helperDied();
            resolve();
          });
        }),
      );
    }
  }

  /**
   * Threads keep the process alive only while something needs them (an open run, an awaited start):
   * idle, they would otherwise hold up the exit of an owner that forgot close().
   */
  private hold(change: 1 | -1): void {
    const before = this.holds;
    this.holds += change;
    if ((before === 0) === (this.holds === 0)) return;
    this.tree?.setRef(this.holds > 0);
    for (const worker of this.helpers) {
      if (this.holds > 0) worker.ref();
      else worker.unref();
    }
  }

  private forget(run: BrownianRun): void {
    if (this.runs.delete(run)) this.hold(-1);
  }
}

/** One run on a BrownianWorkers service: its trees in the tree thread, its ring, its waiting queries. */
export class BrownianRun implements BrownianQueries {
  private readonly pending = new Map<number, (noise: Float32Array | undefined) => void>();
  private nextId = 1;
  private closed = false;
  private failure: Error | undefined;
  readonly ready: Promise<boolean>;
  private settleReady: (ready: boolean) => void = () => {};

  /** @internal made by BrownianWorkers.open */
  constructor(
    readonly id: number,
    private readonly tree: TreeThread,
    private readonly ring: DrawRing | undefined,
    private readonly onEnd: (run: BrownianRun) => void,
  ) {
    this.ready = new Promise((resolve) => (this.settleReady = resolve));
  }

  /** @internal a reply from the tree thread for this run. */
  receive(reply: Exclude<TreeReply, { kind: "ready" }>): void {
    if (reply.kind === "opened") {
      if (reply.error === undefined) this.settleReady(true);
      else this.fail(new Error(reply.error));
      return;
    }
    const resolve = this.pending.get(reply.id);
    this.pending.delete(reply.id);
    resolve?.(reply.noise);
  }

  /** @internal the run cannot be answered any more (its thread died, it failed to open, the service closed). */
  fail(error: Error): void {
    this.failure ??= error;
    this.settleAll();
    // Nothing will take this run's draws any more.
    if (this.ring !== undefined) stopRing(this.ring);
  }

  /** @internal a helper died: the draws it claimed will never be filled, so the tree's thread makes them. */
  helperDied(): void {
    if (this.ring !== undefined) failRing(this.ring);
  }

  /** Why the run stopped answering, if it did (its trees could not be built, its thread died). */
  get error(): Error | undefined {
    return this.failure;
  }

  get running(): boolean {
    return !this.closed && this.failure === undefined && this.tree.alive;
  }

  private settleAll(): void {
    this.settleReady(false);
    for (const resolve of this.pending.values()) resolve(undefined);
    this.pending.clear();
  }

  /**
   * The run's noise for (σ, σ_next), computed in the tree thread. Resolves undefined instead of rejecting
   * when it cannot be answered there (the thread failed, threw for this query, or the run was closed):
   * the caller then lets the sampler compute the value on its own thread, where any error surfaces.
   */
  query(sigma: number, sigmaNext: number, onAnswer?: (noise: Float32Array | undefined) => void): Promise<Float32Array | undefined> {
    if (this.closed || this.failure !== undefined || !this.tree.alive) {
      onAnswer?.(undefined);
      return Promise.resolve(undefined);
    }
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.pending.set(id, (noise) => {
        onAnswer?.(noise);
        resolve(noise);
      });
      this.tree.post({ kind: "query", run: this.id, id, sigma, sigmaNext });
    });
  }

  takeArrived(): void {
    if (this.pending.size > 0) this.tree.takeArrived();
  }

  /**
   * Ends the run: pending queries resolve undefined, its trees and queued draws are dropped (helpers
   * leave its ring at once); other runs and the threads go on. Safe to call more than once.
   */
  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    this.settleAll();
    if (this.ring !== undefined) stopRing(this.ring);
    this.tree.runs.delete(this.id);
    this.tree.post({ kind: "close", run: this.id });
    this.onEnd(this);
    return Promise.resolve();
  }
}

/** One run on a service of its own, whose threads end with the run (callers without a pipeline). */
export class BrownianThread implements BrownianQueries {
  private readonly service: BrownianWorkers;
  private readonly run: BrownianRun;
  readonly ready: Promise<boolean>;

  /**
   * Throws if the tree's worker cannot be spawned. Helpers (started only with `ahead`) that cannot be
   * spawned, or that fail later, are done without: the tree's thread makes their draws itself.
   */
  constructor(options: BrownianNoiseOptions, ahead?: BrownianAheadOptions) {
    const helpers = ahead === undefined || ahead.queries.length === 0 ? 0 : (ahead.helpers ?? defaultDrawHelpers());
    this.service = new BrownianWorkers({ helpers });
    this.run = this.service.open(options, ahead === undefined ? undefined : { queries: ahead.queries });
    this.ready = this.run.ready;
  }

  query(sigma: number, sigmaNext: number, onAnswer?: (noise: Float32Array | undefined) => void): Promise<Float32Array | undefined> {
    return this.run.query(sigma, sigmaNext, onAnswer);
  }

  takeArrived(): void {
    this.run.takeArrived();
  }

  /** Helper threads started for this run and still running (tests). */
  get runningHelpers(): number {
    return this.service.runningHelpers;
  }

  /** Why the worker stopped answering, if it did (a failed start, a crash). */
  get error(): Error | undefined {
    return this.run.error;
  }

  /** Whether the worker thread (or a helper) is still there (tests: nothing is left running after close()). */
  get running(): boolean {
    return this.service.running;
  }

  /** Stops the threads, even mid-query; pending queries resolve undefined. Safe to call more than once. */
  async close(): Promise<void> {
    await this.run.close();
    await this.service.close();
  }
}
