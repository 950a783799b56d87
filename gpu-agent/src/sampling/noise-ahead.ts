/**
 * Drawing ahead for one sampling run driven asynchronously (the agent's denoise loop). The sampler
 * generators are synchronous, so the driver works in three moves per model request:
 *   drawAhead(request)   once the model evaluation is dispatched: starts what the request announces;
 *   ensureReady(request) after the evaluation, before resuming the generator: waits for what was started
 *                        off-thread, so the sampler finds it instead of computing it again here;
 *   close()              when the run ends, fails or is cancelled.
 * With a Brownian tree built from `brownian` options, its queries go to a tree thread: the run's own
 * (BrownianThread, spawned at the first query and ended by close()), or, given a BrownianWorkers service
 * (a pipeline's), the service's long-lived thread, where the run opens its trees at the first query and
 * close() ends only the run. Either way the tree never runs on this thread (unless no thread can answer).
 * Given the run's whole query list (PreparedSampling passes it), the tree thread and its draw helpers
 * make the tree's draws for the whole run from the start, not one step ahead (brownian-pool.ts), and
 * nothing of it assumes this is the main thread.
 * Plain `noise()` draws stay on this thread (they come
 * from the caller's generators) and are drawn ahead here as before, into the kernels' memory (the
 * prefetcher's staging, ended by close()). Values never change:
 * the tree's answers are pure functions of (σ, σ_next), and a missing answer is computed by the sampler.
 */
import { abortError } from "@latentfarm/shared";
import type { BrownianQueryList } from "./brownian-pool.js";
import { BrownianThread, type BrownianQueries, type BrownianWorkers } from "./brownian-thread.js";
import type { BrownianNoiseOptions } from "./brownian.js";
import type { NoiseStream } from "./noise-stream.js";
import type { NoisePrefetcher } from "./prefetch.js";
import type { ModelRequest } from "./samplers/types.js";

export interface NoiseAhead {
  /** Starts what `request` announces: tree queries posted to the worker, plain draws made here. Never throws. */
  drawAhead(request: ModelRequest, signal?: AbortSignal): void;
  /**
   * Resolves once what `request` announced is ready for the sampler (at once when nothing is pending, or
   * when the worker could not answer: the sampler then computes it itself). Rejects only when `signal` aborts.
   */
  ensureReady(request: ModelRequest, signal?: AbortSignal): Promise<void>;
  /**
   * Synchronously takes what has arrived for `request` and says whether the sampler may resume now; only
   * when it may not does the driver need to await ensureReady. Between two model calls that await alone,
   * with nothing to wait for, cost 40–60 µs on the test VM (its promises and microtask turns, cold after
   * the model call).
   */
  readyNow(request: ModelRequest): boolean;
  /**
   * Plain draws from now on come from `stream` (which continues the run's noise source exactly), made on
   * its thread during the model calls instead of here. Closed with this object.
   */
  usePlainDraws(stream: NoiseStream): void;
  /** Starts any thread this run will need now (e.g. while the prompt is encoded), instead of at the first request. */
  warmUp(): void;
  /**
   * Ends the run's tree state (and its own worker thread, if it started one; a service's threads go on)
   * and the plain-draw stream. Safe to call more than once.
   */
  close(): Promise<void>;
  /** Tree queries the sampler computed on its own thread because no answer was ready (metrics, benchmarks). */
  readonly queriesOnCall: number;
}

/** Everything on this thread: PreparedSampling.drawAhead behind the async interface. */
export class InThreadNoiseAhead implements NoiseAhead {
  private stream: NoiseStream | undefined;

  constructor(private readonly prefetcher: NoisePrefetcher) {
    prefetcher.stageInKernelMemory();
  }

  drawAhead(request: ModelRequest, signal?: AbortSignal): void {
    this.prefetcher.drawAhead(request.upcoming, signal);
  }

  usePlainDraws(stream: NoiseStream): void {
    this.stream = stream;
    this.prefetcher.useStream(stream);
  }

  warmUp(): void {}

  ensureReady(_request: ModelRequest, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    return untilAborted(this.prefetcher.streamReady(), signal);
  }

  readyNow(): boolean {
    return this.prefetcher.streamReadyNow();
  }

  close(): Promise<void> {
    this.prefetcher.unstage();
    this.stream?.close();
    return Promise.resolve();
  }

  get queriesOnCall(): number {
    return this.prefetcher.queriesOnCall;
  }
}

const queryKey = (sigma: number, sigmaNext: number): string => `${sigma} ${sigmaNext}`;

/** `work`, or a rejection as soon as `signal` aborts. */
async function untilAborted(work: Promise<void>, signal: AbortSignal | undefined): Promise<void> {
  if (signal === undefined) return work;
  let onAbort: (() => void) | undefined;
  try {
    await Promise.race([
      work,
      new Promise<never>((_, reject) => {
        onAbort = () => reject(abortError(signal));
        signal.addEventListener("abort", onAbort, { once: true });
      }),
    ]);
  } finally {
    if (onAbort !== undefined) signal.removeEventListener("abort", onAbort);
  }
}

/** PreparedSampling.openNoiseAhead's options. */
export interface OpenNoiseAheadOptions {
  /** The pipeline's Brownian-tree service; without it an SDE run starts (and ends) threads of its own. */
  brownian?: BrownianWorkers;
}

export interface WorkerNoisePlan {
  /**
   * The run's tree queries in the order the sampler asks them (computed when the thread starts): with
   * them the thread's draws for the whole run are made ahead, by `helpers` more threads (BrownianThread).
   */
  queries?: () => BrownianQueryList | undefined;
  /** Without `service`: draw helper threads (default: defaultDrawHelpers(); 0 = the tree's own thread draws alone). */
  helpers?: number;
  /** The long-lived tree thread and helpers to use (a pipeline's) instead of threads of the run's own. */
  service?: BrownianWorkers;
}

/** Brownian-tree queries answered by a worker thread; plain draws ahead on this thread. */
export class WorkerNoiseAhead implements NoiseAhead {
  private thread: BrownianQueries | undefined;
  private closed = false;
  private spawnFailed = false;
  private workerAnswers = 0;
  /** Queries posted and not answered yet, by (σ, σ_next). */
  private readonly inFlight = new Map<string, Promise<void>>();
  /** Requests whose queries were posted already (drawAhead and ensureReady may both see one). */
  private readonly posted = new WeakSet<ModelRequest>();
  private stream: NoiseStream | undefined;

  constructor(
    private readonly prefetcher: NoisePrefetcher,
    private readonly tree: BrownianNoiseOptions,
    private readonly plan: WorkerNoisePlan = {},
  ) {
    prefetcher.stageInKernelMemory();
  }

  drawAhead(request: ModelRequest, signal?: AbortSignal): void {
    this.post(request, signal);
    const draws = request.upcoming?.draws;
    if (draws !== undefined && !this.closed) this.prefetcher.drawAhead({ draws }, signal);
  }

  private post(request: ModelRequest, signal: AbortSignal | undefined): void {
    if (this.posted.has(request)) return;
    this.posted.add(request);
    for (const [sigma, sigmaNext] of request.upcoming?.queries ?? []) {
      if (this.closed || signal?.aborted) return;
      const key = queryKey(sigma, sigmaNext);
      if (this.inFlight.has(key) || this.prefetcher.hasAnswer(sigma, sigmaNext)) continue;
      const thread = this.startThread();
      if (thread === undefined) {
        this.prefetcher.drawAhead({ queries: [[sigma, sigmaNext]] }, signal);
        continue;
      }
      // Posted even while the worker is starting (~60 ms built, ~300 ms under tsx, which registers
      // itself there first): it answers once started. Drawing the first queries here meanwhile was
      // measured slower on a loaded 2-core machine (the start competes for the same cores, and the
      // worker's tree then begins cold) and would hold up the event loop, which this worker exists to avoid.
      // Settled synchronously when the reply is taken, so that readyNow() sees it at once.
      let settled = false;
      const answered = thread
        .query(sigma, sigmaNext, (noise) => {
          settled = true;
          this.inFlight.delete(key);
          if (noise === undefined || this.closed) return;
          this.workerAnswers++;
          this.prefetcher.offer(sigma, sigmaNext, noise);
        })
        .then(() => undefined);
      if (!settled) this.inFlight.set(key, answered);
    }
  }

  /** The run's tree thread, opened at the first call; undefined when no thread can be had or the run is closed. */
  private startThread(): BrownianQueries | undefined {
    if (this.closed || this.spawnFailed) return undefined;
    try {
      if (this.thread === undefined) {
        const queries = this.plan.queries?.();
        const ahead =
          queries === undefined ? undefined : { queries, ...(this.plan.helpers !== undefined && { helpers: this.plan.helpers }) };
        const service = this.plan.service;
        this.thread =
          service !== undefined
            ? service.open(this.tree, queries === undefined ? undefined : { queries })
            : new BrownianThread(this.tree, ahead);
      }
      return this.thread;
    } catch {
      // No worker: the queries are drawn ahead on this thread, as without one.
      this.spawnFailed = true;
      return undefined;
    }
  }

  /**
   * Starts the worker thread now instead of at the first query, and resolves once it answers queries
   * (true) or never will (false). Optional: queries posted before that wait in the worker's queue.
   */
  async start(): Promise<boolean> {
    return (await this.startThread()?.ready) ?? false;
  }

  usePlainDraws(stream: NoiseStream): void {
    this.stream = stream;
    this.prefetcher.useStream(stream);
  }

  warmUp(): void {
    this.startThread();
  }

  async ensureReady(request: ModelRequest, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) throw abortError(signal);
    // Posts what drawAhead did not, and settles the answers that came during the model call now.
    if (this.readyNow(request)) return;
    const waits: Promise<void>[] = [this.prefetcher.streamReady()];
    for (const [sigma, sigmaNext] of request.upcoming?.queries ?? []) {
      const wait = this.inFlight.get(queryKey(sigma, sigmaNext));
      if (wait !== undefined) waits.push(wait);
    }
    await untilAborted(
      Promise.all(waits).then(() => undefined),
      signal,
    );
  }

  readyNow(request: ModelRequest): boolean {
    this.post(request, undefined);
    // Answers that came during the model call settle now, not a turn of the event loop later.
    this.thread?.takeArrived();
    if (!this.prefetcher.streamReadyNow()) return false;
    for (const [sigma, sigmaNext] of request.upcoming?.queries ?? []) if (this.inFlight.has(queryKey(sigma, sigmaNext))) return false;
    return true;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.prefetcher.unstage();
    this.stream?.close();
    await this.thread?.close();
  }

  get queriesOnCall(): number {
    return this.prefetcher.queriesOnCall;
  }

  /** Tree queries the worker answered (tests, benchmarks); the rest were drawn ahead or on call here. */
  get answeredByWorker(): number {
    return this.workerAnswers;
  }

  /** "none" until the first query starts the worker thread (tests); "ended" once the run can no longer be answered there. */
  get threadState(): "none" | "running" | "ended" {
    return this.thread === undefined ? "none" : this.thread.running ? "running" : "ended";
  }
}
