import type { Worker } from "node:worker_threads";
import { spawnModuleWorker } from "./spawn-worker.js";
import * as grpc from "@grpc/grpc-js";
import { FarmError, abortError } from "@latentfarm/shared";
import type { ExecutionProvider, InitMessage, Request, Response, SessionInfo, WireTensor } from "./protocol.js";
import type { OrtSessions } from "./ort-sessions.js";

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;
type Pending = { resolve: (r: Response) => void; reject: (e: Error) => void };

function spawnWorker(init: InitMessage): Worker {
  return spawnModuleWorker(import.meta.url, "ort-worker", { workerData: init });
}

/**
 * One worker thread holding a pipeline's ONNX Runtime sessions. Calls are queued in order; a
 * run() in the worker never blocks the caller's event loop.
 */
export class OrtWorker implements OrtSessions {
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;
  private failure: Error | undefined;
  /**
   * Per session: run() calls and the milliseconds spent inside ONNX Runtime's run() in the worker.
   * Against the wall time of the same calls this is what the agent adds to each model call.
   */
  readonly runStats = new Map<string, { runs: number; ms: number }>();

  constructor(ep: ExecutionProvider, opts: { intraOpNumThreads?: number } = {}) {
    this.worker = spawnWorker({ models: {}, ep, ...opts });
    this.worker.on("message", (res: Response) => {
      const p = this.pending.get(res.id);
      if (!p) return;
      this.pending.delete(res.id);
      p.resolve(res);
    });
    const failAll = (err: Error): void => {
      this.failure = err;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    this.worker.on("error", (err) => failAll(err));
    this.worker.on("exit", (code) => {
      if (!this.closed) failAll(new Error(`ONNX Runtime worker exited with code ${code}`));
    });
  }

  private call(req: DistributiveOmit<Request, "id">, transfer: ArrayBuffer[] = []): Promise<Response> {
    if (this.closed) return Promise.reject(new FarmError(grpc.status.UNAVAILABLE, "ONNX Runtime worker is closed"));
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise<Response>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...req, id } as Request, transfer);
    }).then((res) => {
      if (!res.ok)
        throw new FarmError(grpc.status.INTERNAL, res.error.startsWith("ONNX Runtime") ? res.error : `ONNX Runtime: ${res.error}`);
      return res;
    });
  }

  async load(name: string, model: string | Uint8Array, signal?: AbortSignal): Promise<SessionInfo> {
    if (signal?.aborted) throw abortError(signal);
    const res = await this.call({ op: "load", name, model });
    return (res as { info: SessionInfo }).info;
  }

  /**
   * Runs a session. The feeds' buffers are transferred to the worker (the caller loses them);
   * pass copies when the caller still needs the data.
   */
  async run(
    session: string,
    feeds: Record<string, WireTensor>,
    outputs: string[],
    signal?: AbortSignal,
  ): Promise<Record<string, WireTensor>> {
    if (signal?.aborted) throw abortError(signal);
    for (const [name, t] of Object.entries(feeds)) {
      // A buffer transferred by an earlier call arrives detached (empty); the worker could not even
      // read such a message, and the call would never settle, so it is refused here.
      const size = t.dims.reduce((n, d) => n * d, 1);
      if (t.data.length !== size) {
        throw new FarmError(
          grpc.status.INTERNAL,
          `feed ${name} has ${t.data.length} values for shape [${t.dims.join(",")}]${t.data.byteLength === 0 ? " (its buffer was already transferred)" : ""}`,
        );
      }
    }
    const transfer = Object.values(feeds).map((t) => t.data.buffer as ArrayBuffer);
    const res = (await this.call({ op: "run", session, feeds, outputs }, transfer)) as {
      outputs: Record<string, WireTensor>;
      runMs?: number;
    };
    let st = this.runStats.get(session);
    if (!st) this.runStats.set(session, (st = { runs: 0, ms: 0 }));
    st.runs++;
    st.ms += res.runMs ?? 0;
    return res.outputs;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.failure) await this.call({ op: "close" });
    } catch {
      // The worker is going away either way.
    }
    this.closed = true;
    await this.worker.terminate();
  }
}
