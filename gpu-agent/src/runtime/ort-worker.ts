// Runs inside a worker thread: owns the ONNX Runtime sessions of one pipeline. ORT's run() and
// session creation block whichever thread calls them, so they never run on the agent's event loop.
import { parentPort, workerData } from "node:worker_threads";
import * as ort from "onnxruntime-node";
import type { InitMessage, Request, Response, SessionInfo, WireTensor } from "./protocol.js";

const init = workerData as InitMessage;
const sessions = new Map<string, ort.InferenceSession>();

function sessionOptions(): ort.InferenceSession.SessionOptions {
  const ep = init.ep;
  const providers: ort.InferenceSession.SessionOptions["executionProviders"] =
    ep.name === "cuda" ? [{ name: "cuda", deviceId: ep.deviceId }] : ep.name === "webgpu" ? ["webgpu"] : ["cpu"];
  const opts: ort.InferenceSession.SessionOptions = { executionProviders: providers, graphOptimizationLevel: "all" };
  if (init.intraOpNumThreads) opts.intraOpNumThreads = init.intraOpNumThreads;
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
  // Copy into a fresh buffer: ORT's output may be a view over memory we must not transfer.
  const d = t.data as WireTensor["data"];
  const data =
    d instanceof Float32Array
      ? new Float32Array(d)
      : d instanceof Int32Array
        ? new Int32Array(d)
        : d instanceof BigInt64Array
          ? new BigInt64Array(d)
          : new Uint16Array(d as Uint16Array);
  return { type, dims: [...t.dims], data };
}

async function handle(req: Request): Promise<Response> {
  switch (req.op) {
    case "load": {
      const s = await ort.InferenceSession.create(req.path, sessionOptions());
      await sessions.get(req.name)?.release();
      sessions.set(req.name, s);
      return { id: req.id, ok: true, info: info(s) };
    }
    case "run": {
      const s = sessions.get(req.session);
      if (!s) throw new Error(`session ${req.session} is not loaded`);
      const feeds: Record<string, ort.Tensor> = {};
      for (const [k, v] of Object.entries(req.feeds)) feeds[k] = new ort.Tensor(v.type, v.data, v.dims);
      const started = performance.now();
      const out = await s.run(feeds, req.outputs);
      const runMs = performance.now() - started;
      const outputs: Record<string, WireTensor> = {};
      for (const name of req.outputs) {
        const t = out[name];
        if (!t) throw new Error(`session ${req.session} produced no output ${name}`);
        outputs[name] = toWire(t);
      }
      return { id: req.id, ok: true, outputs, runMs };
    }
    case "close": {
      for (const s of sessions.values()) await s.release();
      sessions.clear();
      return { id: req.id, ok: true };
    }
  }
}

parentPort!.on("message", (req: Request) => {
  handle(req).then(
    (res) => {
      const transfer = res.ok && res.outputs ? Object.values(res.outputs).map((t) => t.data.buffer as ArrayBuffer) : [];
      parentPort!.postMessage(res, transfer);
    },
    (err: unknown) => parentPort!.postMessage({ id: req.id, ok: false, error: err instanceof Error ? err.message : String(err) }),
  );
});
