// sharp keeps libvips loaded for the process only when the main thread loads it before any thread
// that uses it starts (its documented rule for worker threads on glibc Linux); host threads encode PNGs.
import "sharp";
import type { Worker } from "node:worker_threads";
import * as grpc from "@grpc/grpc-js";
import { FarmError, abortError, type Logger, type RunTaskRequest } from "@latentfarm/shared";
import type { RenderContext } from "../pipeline/render-common.js";
import { parsePipelineKey } from "../models/model-loader.js";
import { spawnModuleWorker } from "../runtime/spawn-worker.js";
import type { PipelineOutput } from "../pipeline/txt2img.js";
import { fromWireError, type FromHost, type HostInit, type ToHost } from "./protocol.js";

export type PipelineHostOptions = HostInit & {
  logger: Logger;
  /** Each UNet call the pipeline makes: rows evaluated and seconds taken (metrics). */
  onUnetCall?: (rows: number, seconds: number) => void;
};

interface Pending {
  ctx: RenderContext;
  resolve: (output: PipelineOutput) => void;
  reject: (err: unknown) => void;
  onAbort: () => void;
}

/** What the thread is given: the options without the callbacks, which stay on this side. */
function hostInit(o: PipelineHostOptions): HostInit {
  return {
    modelsDir: o.modelsDir,
    key: o.key,
    ep: o.ep,
    cacheDir: o.cacheDir,
    maxBatchRows: o.maxBatchRows,
    ...(o.intraOpNumThreads !== undefined && { intraOpNumThreads: o.intraOpNumThreads }),
    ...(o.tokenizerDir !== undefined && { tokenizerDir: o.tokenizerDir }),
    ...(o.lorasDir !== undefined && { lorasDir: o.lorasDir }),
    ...(o.embeddingsDir !== undefined && { embeddingsDir: o.embeddingsDir }),
  };
}

/** How long close() waits for the thread to finish its renders' current step and release its sessions. */
const CLOSE_GRACE_MS = 30_000;

/**
 * One loaded pipeline in a thread of its own, which runs whole renders: conditioning, the sampler
 * loop with its UNet calls, VAE, PNG. The alternative, a sampler on the agent's event loop calling a
 * sessions thread per model call, pays two thread wake-ups per step, and a thread that slept through
 * a UNet call is slow to wake on a virtual machine (0.3–1 ms measured here against a 14 ms step).
 * Images of concurrent tasks on this pipeline still share UNet calls: the step batcher lives in the thread.
 */
export class PipelineHost {
  private static alive = 0;
  /** Pipeline threads started and not yet exited, in this process (leak checks). */
  static get threadsAlive(): number {
    return PipelineHost.alive;
  }

  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failure: FarmError | undefined;
  private closing: Promise<void> | undefined;
  private closedSignal: (() => void) | undefined;
  /** The latest step event: when it ended in the host thread (epoch ms) and the UNet's ORT run() ms so far. */
  lastStep: { at: number; unetRunMs: number } = { at: 0, unetRunMs: 0 };
  modelHash: string | undefined;
  loraHashes: readonly string[] = [];
  loadWarnings: readonly string[] = [];

  private constructor(
    private readonly opts: PipelineHostOptions,
    ready: { resolve: () => void; reject: (err: unknown) => void },
  ) {
    this.name = parsePipelineKey(opts.key).model;
    this.worker = spawnModuleWorker(import.meta.url, "host-thread", { workerData: hostInit(opts) });
    PipelineHost.alive++;
    this.worker.on("message", (m: FromHost) => this.onMessage(m, ready));
    this.worker.on("error", (err) =>
      this.fail(new FarmError(grpc.status.INTERNAL, `pipeline thread failed: ${err.message}`, { cause: err }), ready),
    );
    this.worker.on("exit", (code) => {
      PipelineHost.alive--;
      this.closedSignal?.();
      if (!this.closing) this.fail(new FarmError(grpc.status.UNAVAILABLE, `pipeline thread exited with code ${code}`), ready);
    });
  }

  /** Starts the thread and loads the pipeline there; rejects with the load's error. */
  static async start(opts: PipelineHostOptions, signal?: AbortSignal): Promise<PipelineHost> {
    if (signal?.aborted) throw abortError(signal);
    let ready!: { resolve: () => void; reject: (err: unknown) => void };
    const loaded = new Promise<void>((resolve, reject) => (ready = { resolve, reject }));
    const host = new PipelineHost(opts, ready);
    const onAbort = (): void => ready.reject(abortError(signal!));
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await loaded;
      return host;
    } catch (err) {
      await host.close();
      throw err;
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /** The model's name (the pipeline key's). */
  readonly name: string;

  /** Renders a task in the pipeline thread; ctx.onStep, onWarning and onCheckpoint are called here as events arrive. */
  runTask(req: RunTaskRequest, ctx: RenderContext): Promise<PipelineOutput> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new FarmError(grpc.status.UNAVAILABLE, "the pipeline is closing"));
    if (ctx.signal.aborted) return Promise.reject(abortError(ctx.signal));
    const id = this.nextId++;
    return new Promise<PipelineOutput>((resolve, reject) => {
      const onAbort = (): void => this.send({ op: "cancel", id });
      ctx.signal.addEventListener("abort", onAbort, { once: true });
      this.pending.set(id, { ctx, resolve, reject, onAbort });
      this.send({ op: "run", id, req, agentId: ctx.agentId, resources: ctx.resources });
    });
  }

  private send(m: ToHost): void {
    this.worker.postMessage(m);
  }

  private settle(id: number): Pending | undefined {
    const p = this.pending.get(id);
    if (!p) return undefined;
    this.pending.delete(id);
    p.ctx.signal.removeEventListener("abort", p.onAbort);
    return p;
  }

  private onMessage(m: FromHost, ready: { resolve: () => void; reject: (err: unknown) => void }): void {
    switch (m.type) {
      case "ready":
        this.modelHash = m.modelHash;
        this.loraHashes = m.loraHashes;
        this.loadWarnings = m.warnings;
        ready.resolve();
        return;
      case "loadFailed":
        ready.reject(fromWireError(m.error));
        return;
      case "step": {
        this.lastStep = { at: m.at, unetRunMs: m.unetRunMs };
        this.pending.get(m.id)?.ctx.onStep(m.step, m.total, m.previewPng);
        return;
      }
      case "checkpoint":
        this.pending.get(m.id)?.ctx.onCheckpoint?.(m.checkpoint);
        break;
      case "warning":
        this.pending.get(m.id)?.ctx.onWarning(m.message);
        return;
      case "done":
        this.settle(m.id)?.resolve(m.output);
        return;
      case "failed": {
        const p = this.settle(m.id);
        if (!p) return;
        // A cancelled render fails with the abort; the caller's own signal carries the reason.
        p.reject(p.ctx.signal.aborted ? abortError(p.ctx.signal) : fromWireError(m.error));
        return;
      }
      case "unetCall":
        this.opts.onUnetCall?.(m.rows, m.seconds);
        return;
      case "log":
        this.opts.logger[m.level](m.msg, { pipeline: this.name, ...m.fields });
        return;
      case "closed":
        return;
    }
  }

  private fail(err: FarmError, ready: { reject: (err: unknown) => void }): void {
    this.failure ??= err;
    ready.reject(err);
    for (const id of [...this.pending.keys()]) this.settle(id)?.reject(err);
  }

  /** Whether the thread died; such a host only refuses tasks and should be dropped. */
  get failed(): boolean {
    return this.failure !== undefined;
  }

  /** Stops the renders in progress (they fail CANCELLED), releases the sessions and ends the thread. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const exited = new Promise<void>((resolve) => (this.closedSignal = resolve));
      if (!this.failure) {
        this.send({ op: "close" });
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([exited, new Promise<void>((resolve) => (timer = setTimeout(resolve, CLOSE_GRACE_MS)))]);
        clearTimeout(timer);
      }
      await this.worker.terminate();
      const err = new FarmError(grpc.status.UNAVAILABLE, "the pipeline closed");
      for (const id of [...this.pending.keys()]) this.settle(id)?.reject(err);
    })();
    return this.closing;
  }
}
