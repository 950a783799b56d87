// Runs inside a noise thread (NoiseThread): continues the sampler-noise streams of the runs it is given,
// writing each draw, in order, into its stream's shared ring as soon as the stream asks for it and has
// a free slot. It sleeps on the doorbell between requests; nothing it makes crosses a message port.
import { receiveMessageOnPort, workerData, type MessagePort } from "node:worker_threads";
import { NoiseContinuation } from "./image-rng.js";
import { MADE, RELEASED, WANTED, ringViews, type NoiseThreadInit, type ToNoiseThread } from "./noise-stream-protocol.js";

const { port, bell } = workerData as NoiseThreadInit;
const rung = new Int32Array(bell);

interface Ring {
  source: NoiseContinuation;
  header: Int32Array;
  slots: Float32Array[];
  made: number;
}

const streams = new Map<number, Ring>();

function open(m: Extract<ToNoiseThread, { op: "open" }>): Ring {
  return { source: NoiseContinuation.resume(m.state), ...ringViews(m.ring, m.slots), made: 0 };
}

/** Takes the control messages waiting; false once told to exit. */
function control(): boolean {
  for (let m = receiveMessageOnPort(port as MessagePort); m !== undefined; m = receiveMessageOnPort(port as MessagePort)) {
    const message = m.message as ToNoiseThread;
    if (message.op === "open") streams.set(message.id, open(message));
    else if (message.op === "close") streams.delete(message.id);
    else return false;
  }
  return true;
}

function serve(): void {
  for (;;) {
    // Read before looking for work: a request made after this read rings past it, so the wait below returns at once.
    const seen = Atomics.load(rung, 0);
    if (!control()) break;
    let drew = false;
    // One draw per stream per pass, so that a close or a new stream is seen between draws.
    for (const ring of streams.values()) {
      if (ring.made >= Atomics.load(ring.header, WANTED)) continue;
      if (ring.made - Atomics.load(ring.header, RELEASED) >= ring.slots.length) continue;
      ring.slots[ring.made % ring.slots.length]!.set(ring.source.next());
      ring.made++;
      Atomics.store(ring.header, MADE, ring.made);
      Atomics.notify(ring.header, MADE);
      drew = true;
    }
    if (!drew) Atomics.wait(rung, 0, seen);
  }
  (port as MessagePort).close();
}

// After the module has been evaluated (the loop never returns until told to exit).
setImmediate(serve);
