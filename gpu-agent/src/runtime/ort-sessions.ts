// ONNX Runtime sessions owned by the calling thread. Both the ORT worker (ort-worker.ts, behind
// OrtWorker's messages) and a pipeline host thread (which runs the whole render next to its sessions)
// use this class, so the session options, metadata and output handling are the same everywhere.
// Its run() blocks the calling thread for the model's duration: never use it on the agent's event loop.
import * as grpc from "@grpc/grpc-js";
import * as ort from "onnxruntime-node";
import { FarmError, abortError } from "@latentfarm/shared";
import type { ExecutionProvider, SessionInfo, WireTensor } from "./protocol.js";

/** What SdModel needs from a set of sessions, whichever thread runs them. */
export interface OrtSessions {
  /** Loads a model file, or a model's bytes (a graph patched in memory). */
  load(name: string, model: string | Uint8Array, signal?: AbortSignal): Promise<SessionInfo>;
  /** Runs a session. Feed buffers may be transferred away (OrtWorker): pass copies to keep the data. */
  run(session: string, feeds: Record<string, WireTensor>, outputs: string[], signal?: AbortSignal): Promise<Record<string, WireTensor>>;
  /** Per session: run() calls and the milliseconds spent inside ONNX Runtime's run(). */
  readonly runStats: Map<string, { runs: number; ms: number }>;
  close(): Promise<void>;
}

export interface OrtSessionOptions {
  ep: ExecutionProvider;
  intraOpNumThreads?: number;
}

function sessionOptions(o: OrtSessionOptions): ort.InferenceSession.SessionOptions {
  const ep = o.ep;
  const providers: ort.InferenceSession.SessionOptions["executionProviders"] =
    ep.name === "cuda" ? [{ name: "cuda", deviceId: ep.deviceId }] : ep.name === "webgpu" ? ["webgpu"] : ["cpu"];
  const opts: ort.InferenceSession.SessionOptions = { executionProviders: providers, graphOptimizationLevel: "all" };
  if (o.intraOpNumThreads) opts.intraOpNumThreads = o.intraOpNumThreads;
  return opts;
}

function info(s: ort.InferenceSession): SessionInfo {
  const meta = (m: readonly ort.InferenceSession.ValueMetadata[]) =>
    m.map((v) => ({
      name: v.name,
      type: v.isTensor ? String(v.type) : "non-tensor",
      shape: v.isTensor ? [...v.shape] : [],
    }));
  return { inputs: meta(s.inputMetadata), outputs: meta(s.outputMetadata) };
}

function toWire(t: ort.Tensor): WireTensor {
  const type = t.type as WireTensor["type"];
  const d = t.data as WireTensor["data"];
  // onnxruntime-node copies each CPU output into a new ArrayBuffer of its own, which can be kept and
  // transferred as it is: copying it again cost 0.7 ms per 0.5 MB UNet output on a 2-vCPU VM (fresh pages)
  // on the render's critical path. An output that is a view into a larger buffer is still copied, so that
  // nothing handed on shares memory it does not own.
  const owned = d.byteOffset === 0 && d.byteLength === d.buffer.byteLength && !(d.buffer instanceof SharedArrayBuffer);
  const data = owned
    ? d
    : d instanceof Float32Array
      ? new Float32Array(d)
      : d instanceof Int32Array
        ? new Int32Array(d)
        : d instanceof BigInt64Array
          ? new BigInt64Array(d)
          : new Uint16Array(d as Uint16Array);
  return { type, dims: [...t.dims], data };
}

export class InThreadOrtSessions implements OrtSessions {
  private readonly sessions = new Map<string, ort.InferenceSession>();
  private closed = false;
  readonly runStats = new Map<string, { runs: number; ms: number }>();

  constructor(private readonly options: OrtSessionOptions) {}

  async load(name: string, model: string | Uint8Array, signal?: AbortSignal): Promise<SessionInfo> {
    this.assertOpen();
    if (signal?.aborted) throw abortError(signal);
    const options = sessionOptions(this.options);
    const s =
      typeof model === "string" ? await ort.InferenceSession.create(model, options) : await ort.InferenceSession.create(model, options);
    await this.sessions.get(name)?.release();
    this.sessions.set(name, s);
    return info(s);
  }

  async run(
    session: string,
    feeds: Record<string, WireTensor>,
    outputs: string[],
    signal?: AbortSignal,
  ): Promise<Record<string, WireTensor>> {
    this.assertOpen();
    if (signal?.aborted) throw abortError(signal);
    const s = this.sessions.get(session);
    if (!s) throw new FarmError(grpc.status.INTERNAL, `ONNX Runtime: session ${session} is not loaded`);
    const input: Record<string, ort.Tensor> = {};
    for (const [k, v] of Object.entries(feeds)) input[k] = new ort.Tensor(v.type, v.data, v.dims);
    const started = performance.now();
    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await s.run(input, outputs);
    } catch (err) {
      throw new FarmError(grpc.status.INTERNAL, `ONNX Runtime: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    }
    const ms = performance.now() - started;
    let st = this.runStats.get(session);
    if (!st) this.runStats.set(session, (st = { runs: 0, ms: 0 }));
    st.runs++;
    st.ms += ms;
    const result: Record<string, WireTensor> = {};
    for (const name of outputs) {
      const t = out[name];
      if (!t) throw new FarmError(grpc.status.INTERNAL, `ONNX Runtime: session ${session} produced no output ${name}`);
      result[name] = toWire(t);
    }
    return result;
  }

  private assertOpen(): void {
    if (this.closed) throw new FarmError(grpc.status.UNAVAILABLE, "ONNX Runtime sessions are closed");
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const all = [...this.sessions.values()];
    this.sessions.clear();
    for (const s of all) await s.release();
  }
}
