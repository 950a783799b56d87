/**
 * The agent-thread side of the Brownian-tree worker: one worker thread per sampling run, holding that
 * run's trees (see brownian-worker.ts). Queries go over as two numbers; answers come back as
 * transferred Float32Arrays (no copy). Given the run's whole query list, it also starts draw helpers
 * (brownian-pool-worker.ts) that make the trees' normal draws ahead, in parallel (brownian-pool.ts).
 */
import { existsSync } from "node:fs";
import { availableParallelism } from "node:os";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import type { BrownianNoiseOptions } from "./brownian.js";
import { createDrawRing, failRing, stopRing, type BrownianQueryList, type DrawRing } from "./brownian-pool.js";
import type { BrownianHelperData, BrownianQuery, BrownianReply, BrownianWorkerData } from "./brownian-protocol.js";

// The built agent runs the .js worker. Under tsx (tests, benchmarks) only the .ts source exists,
// and a worker does not inherit the parent's loader hooks, so the worker registers tsx itself
// (as runtime/ort-runtime.ts does for the ORT worker).
function spawnWorker(name: string, workerData: unknown): Worker {
  const js = new URL(`./${name}.js`, import.meta.url);
  if (existsSync(fileURLToPath(js))) return new Worker(js, { workerData });
  const ts = new URL(`./${name}.ts`, import.meta.url).href;
  const boot = `import("tsx/esm/api").then((m) => { m.register(); return import(${JSON.stringify(ts)}); });`;
  return new Worker(boot, { eval: true, workerData });
}

/**
 * Draw helpers per run by default: LATENTFARM_BROWNIAN_HELPERS when set (an integer ≥ 0), else all cores
 * but one, at least 1 and at most 4 (with the tree's own thread drawing too, 5 threads make a
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
  /** Helper threads drawing ahead besides the tree's own thread (default defaultDrawHelpers(); 0 = none). */
  helpers?: number;
}

export class BrownianThread {
  private readonly worker: Worker;
  private readonly ring: DrawRing | undefined;
  private readonly helpers: Worker[] = [];
  private readonly helpersExited: Promise<void>[] = [];
  private helpersAlive = 0;
  private readonly pending = new Map<number, (noise: Float32Array | undefined) => void>();
  private nextId = 1;
  private closed = false;
  private failure: Error | undefined;
  private alive = true;
  private readonly exited: Promise<void>;
  /** Resolves true once the worker has built its trees and answers queries; false if it never will. */
  readonly ready: Promise<boolean>;
  private settleReady: (ready: boolean) => void = () => {};

  /**
   * Throws if the tree's worker cannot be spawned. Helpers that cannot be spawned, or that fail later,
   * are done without: the tree's thread makes their draws itself.
   */
  constructor(options: BrownianNoiseOptions, ahead?: BrownianAheadOptions) {
    this.ready = new Promise((resolve) => (this.settleReady = resolve));
    const length = options.shape[0] * options.shape[1] * options.shape[2];
    this.ring = ahead !== undefined && ahead.queries.length > 0 ? createDrawRing(length) : undefined;
    const data: BrownianWorkerData =
      this.ring === undefined ? options : { ...options, ahead: { queries: ahead!.queries, ring: this.ring } };
    this.worker = spawnWorker("brownian-worker", data);
    this.worker.on("message", (reply: BrownianReply) => {
      if (reply.ready === true) {
        this.settleReady(true);
        return;
      }
      const resolve = this.pending.get(reply.id);
      this.pending.delete(reply.id);
      resolve?.(reply.noise);
    });
    this.worker.on("error", (error) => this.fail(error));
    this.exited = new Promise((resolve) => {
      this.worker.once("exit", (code) => {
        this.alive = false;
        if (!this.closed) this.fail(new Error(`Brownian-tree worker exited with code ${code}`));
        resolve();
      });
    });
    // At once rather than once the tree's thread is ready: started later, their start-up (~0.3 s of CPU
    // under tsx) was measured to compete with the run's draws instead of with nothing.
    if (this.ring !== undefined) this.startHelpers(options, ahead!, this.ring);
  }

  private startHelpers(options: BrownianNoiseOptions, ahead: BrownianAheadOptions, ring: DrawRing): void {
    const data: BrownianHelperData = { options, queries: ahead.queries, ring };
    for (let k = 0; k < (ahead.helpers ?? defaultDrawHelpers()); k++) {
      let helper: Worker;
      try {
        helper = spawnWorker("brownian-pool-worker", data);
      } catch {
        return;
      }
      this.helpers.push(helper);
      this.helpersAlive++;
      // A helper's error is not the run's: it only means the tree's thread draws what it claimed.
      helper.on("error", () => failRing(ring));
      this.helpersExited.push(
        new Promise((resolve) => {
          helper.once("exit", (code) => {
            this.helpersAlive--;
            if (code !== 0 && !this.closed) failRing(ring);
            resolve();
          });
        }),
      );
    }
  }

  /** Helper threads started for this run and still running (tests). */
  get runningHelpers(): number {
    return this.helpersAlive;
  }

  /** Why the worker stopped answering, if it did (a failed start, a crash). */
  get error(): Error | undefined {
    return this.failure;
  }

  /** Whether the worker thread (or a helper) is still there (tests: nothing is left running after close()). */
  get running(): boolean {
    return this.alive || this.helpersAlive > 0;
  }

  private fail(error: Error): void {
    this.failure ??= error;
    this.settleAll();
    // Nothing will take the helpers' draws any more.
    if (this.ring !== undefined) stopRing(this.ring);
  }

  private settleAll(): void {
    this.settleReady(false);
    for (const resolve of this.pending.values()) resolve(undefined);
    this.pending.clear();
  }

  /**
   * The tree's noise for (σ, σ_next), computed in the worker. Resolves undefined instead of rejecting
   * when the worker cannot answer (it failed, threw for this query, or was closed): the caller then
   * lets the sampler compute the value on its own thread, where any error surfaces in its context.
   */
  query(sigma: number, sigmaNext: number): Promise<Float32Array | undefined> {
    if (this.closed || this.failure !== undefined) return Promise.resolve(undefined);
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.pending.set(id, resolve);
      this.worker.postMessage({ id, sigma, sigmaNext } satisfies BrownianQuery);
    });
  }

  /** Stops the worker, even mid-query; pending queries resolve undefined. Safe to call more than once. */
  async close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      this.settleAll();
      if (this.ring !== undefined) stopRing(this.ring);
      await Promise.all([this.worker.terminate(), ...this.helpers.map((h) => h.terminate())]);
    }
    await Promise.all([this.exited, ...this.helpersExited]);
  }
}
