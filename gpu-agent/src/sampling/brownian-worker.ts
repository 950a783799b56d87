// Runs inside a worker thread: one run's Brownian trees (BrownianTreeNoiseSampler), answering the
// (σ, σ_next) queries the SDE samplers announce, so the ~15 full-size normal draws each answer costs
// happen off the agent's event loop. Answers are pure functions of the query, so computing them here
// changes no value; the tree's cache lives here too, which is why every query of a run comes here.
import { parentPort, workerData } from "node:worker_threads";
import { BrownianTreeNoiseSampler, type BrownianNoiseOptions } from "./brownian.js";
import type { BrownianQuery, BrownianReply } from "./brownian-protocol.js";

const port = parentPort!;
const sampler = new BrownianTreeNoiseSampler(workerData as BrownianNoiseOptions);
port.postMessage({ id: 0, ready: true } satisfies BrownianReply);

port.on("message", (query: BrownianQuery) => {
  let reply: BrownianReply;
  try {
    const noise = sampler.sample(query.sigma, query.sigmaNext);
    // sample() returns a fresh array owning its whole buffer: handing the buffer over detaches nothing cached.
    port.postMessage({ id: query.id, noise } satisfies BrownianReply, [noise.buffer as ArrayBuffer]);
    return;
  } catch (error) {
    reply = { id: query.id, error: error instanceof Error ? error.message : String(error) };
  }
  port.postMessage(reply);
});
