// Runs inside a worker thread: owns the ONNX Runtime sessions of one pipeline. ORT's run() and
// session creation block whichever thread calls them, so they never run on the agent's event loop.
import { parentPort, workerData } from "node:worker_threads";
import type { InitMessage, Request, Response } from "./protocol.js";
import { InThreadOrtSessions } from "./ort-sessions.js";

const init = workerData as InitMessage;
const sessions = new InThreadOrtSessions(
  init.intraOpNumThreads ? { ep: init.ep, intraOpNumThreads: init.intraOpNumThreads } : { ep: init.ep },
);

async function handle(req: Request): Promise<Response> {
  switch (req.op) {
    case "load":
      return { id: req.id, ok: true, info: await sessions.load(req.name, req.model) };
    case "run": {
      const before = sessions.runStats.get(req.session)?.ms ?? 0;
      const outputs = await sessions.run(req.session, req.feeds, req.outputs);
      return { id: req.id, ok: true, outputs, runMs: sessions.runStats.get(req.session)!.ms - before };
    }
    case "close":
      await sessions.close();
      return { id: req.id, ok: true };
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
