// Runs inside a worker thread: one run's Brownian trees (BrownianTreeNoiseSampler), answering the
// (σ, σ_next) queries the SDE samplers announce, so the ~15 full-size normal draws each answer costs
// happen off the agent's event loop. Answers are pure functions of the query, so computing them here
// changes no value; the tree's cache lives here too, which is why every query of a run comes here.
// With `ahead`, the draws come from the run's ring (brownian-pool.ts), made ahead by helper threads and
// by this thread between queries, so an answer costs only the tree's cheap split and sum kernels.
import { parentPort, workerData } from "node:worker_threads";
import { BrownianTreeNoiseSampler, seededNormals } from "./brownian.js";
import { PooledNormals, planDraws } from "./brownian-pool.js";
import type { BrownianQuery, BrownianReply, BrownianWorkerData } from "./brownian-protocol.js";

const port = parentPort!;
const { ahead, ...options } = workerData as BrownianWorkerData;
const pooled = ahead === undefined ? undefined : new PooledNormals(ahead.ring, planDraws(options, ahead.queries), seededNormals(options));
const sampler = new BrownianTreeNoiseSampler(options, pooled?.randnFor);
port.postMessage({ id: 0, ready: true } satisfies BrownianReply);

// Between queries this thread draws ahead too, one draw per turn of the event loop so queries wait at
// most one draw (~2 ms) for it.
let pumping = false;
const pump = (): void => {
  if (pooled === undefined || pumping) return;
  pumping = true;
  setImmediate(() => {
    pumping = false;
    if (pooled.drawIdle()) pump();
  });
};
pump();

port.on("message", (query: BrownianQuery) => {
  let reply: BrownianReply;
  try {
    const noise = sampler.sample(query.sigma, query.sigmaNext);
    // sample() returns a fresh array owning its whole buffer: handing the buffer over detaches nothing cached.
    port.postMessage({ id: query.id, noise } satisfies BrownianReply, [noise.buffer as ArrayBuffer]);
    return;
  } catch (error) {
    reply = { id: query.id, error: error instanceof Error ? error.message : String(error) };
  } finally {
    pump();
  }
  port.postMessage(reply);
});
