// Runs inside a noise thread (NoiseThread): continues the sampler-noise streams of the runs it is
// given and posts each draw, in order, as soon as it is made. Draws are made on request only.
import { workerData, type MessagePort } from "node:worker_threads";
import { NoiseContinuation } from "./image-rng.js";
import type { NoiseThreadInit, ToNoiseThread } from "./noise-stream-protocol.js";

const { port, posted } = workerData as NoiseThreadInit;
const count = new Int32Array(posted);
const streams = new Map<number, { source: NoiseContinuation; made: number; wanted: number }>();
let pumping = false;

function pump(): void {
  pumping = false;
  let more = false;
  // One draw per stream per turn, so a new request (or a close) is seen between draws.
  for (const [id, s] of streams) {
    if (s.made >= s.wanted) continue;
    const draw = s.source.next();
    (port as MessagePort).postMessage({ id, index: s.made, draw }, [draw.buffer as ArrayBuffer]);
    s.made++;
    Atomics.add(count, 0, 1);
    Atomics.notify(count, 0);
    if (s.made < s.wanted) more = true;
  }
  if (more) schedule();
}

function schedule(): void {
  if (pumping) return;
  pumping = true;
  setImmediate(pump);
}

(port as MessagePort).on("message", (m: ToNoiseThread) => {
  switch (m.op) {
    case "open":
      streams.set(m.id, { source: NoiseContinuation.resume(m.state), made: 0, wanted: 0 });
      return;
    case "want": {
      const s = streams.get(m.id);
      if (s && m.upTo > s.wanted) {
        s.wanted = m.upTo;
        schedule();
      }
      return;
    }
    case "close":
      streams.delete(m.id);
      return;
    case "exit":
      (port as MessagePort).close();
      return;
  }
});
