/**
 * The agent-thread side of the Brownian-tree worker: one worker thread per sampling run, holding that
 * run's trees (see brownian-worker.ts). Queries go over as two numbers; answers come back as
 * transferred Float32Arrays (no copy).
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import type { BrownianNoiseOptions } from "./brownian.js";
import type { BrownianQuery, BrownianReply } from "./brownian-protocol.js";

// The built agent runs brownian-worker.js. Under tsx (tests, benchmarks) only the .ts source exists,
// and a worker does not inherit the parent's loader hooks, so the worker registers tsx itself
// (as runtime/ort-runtime.ts does for the ORT worker).
function spawnWorker(options: BrownianNoiseOptions): Worker {
  const js = new URL("./brownian-worker.js", import.meta.url);
  if (existsSync(fileURLToPath(js))) return new Worker(js, { workerData: options });
  const ts = new URL("./brownian-worker.ts", import.meta.url).href;
  const boot = `import("tsx/esm/api").then((m) => { m.register(); return import(${JSON.stringify(ts)}); });`;
  return new Worker(boot, { eval: true, workerData: options });
}

export class BrownianThread {
  private readonly worker: Worker;
  private readonly pending = new Map<number, (noise: Float32Array | undefined) => void>();
  private nextId = 1;
  private closed = false;
  private failure: Error | undefined;
  private alive = true;
  private readonly exited: Promise<void>;
  /** Resolves true once the worker has built its trees and answers queries; false if it never will. */
  readonly ready: Promise<boolean>;
  private settleReady: (ready: boolean) => void = () => {};

  constructor(options: BrownianNoiseOptions) {
    this.ready = new Promise((resolve) => (this.settleReady = resolve));
    this.worker = spawnWorker(options);
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
  }

  /** Why the worker stopped answering, if it did (a failed start, a crash). */
  get error(): Error | undefined {
    return this.failure;
  }

  /** Whether the worker thread is still there (tests: nothing is left running after close()). */
  get running(): boolean {
    return this.alive;
  }

  private fail(error: Error): void {
    this.failure ??= error;
    this.settleAll();
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
      await this.worker.terminate();
    }
    await this.exited;
  }
}
