// Runs inside a worker thread: a BrownianWorkers service's tree thread (brownian-thread.ts). It holds
// the Brownian trees (BrownianTreeNoiseSampler) of every run open on the service, each under its run id,
// and answers the (σ, σ_next) queries the SDE samplers announce, so the ~15 full-size normal draws each
// answer costs happen off the sampler's thread. Answers are pure functions of the query and of the run's
// own trees, so computing them here changes no value; a tree's cache lives here too, which is why every
// query of a run comes here. With `ahead`, a run's draws come from its ring (brownian-pool.ts), made
// ahead by the service's helper threads and by this thread between queries, so an answer costs only the
// tree's cheap split and sum kernels.
import { parentPort, workerData } from "node:worker_threads";
import { BrownianTreeNoiseSampler, seededNormals } from "./brownian.js";
import { PooledNormals, planDraws } from "./brownian-pool.js";
import type { BrownianTreeData, TreeReply, TreeRequest } from "./brownian-protocol.js";

const requests = parentPort!;
const port = (workerData as BrownianTreeData).replies;

interface Run {
  sampler: BrownianTreeNoiseSampler;
  pooled: PooledNormals | undefined;
}

const runs = new Map<number, Run>();
const errorText = (error: unknown): string => (error instanceof Error ? error.message : String(error));

// Between queries this thread draws ahead too, one draw per turn of the event loop so queries wait at
// most one draw (~2 ms) for it; with several runs open, one draw of each in turn.
let pumping = false;
const pump = (): void => {
  if (pumping) return;
  pumping = true;
  setImmediate(() => {
    pumping = false;
    let more = false;
    for (const run of runs.values()) if (run.pooled?.drawIdle() === true) more = true;
    if (more) pump();
  });
};

function open(request: Extract<TreeRequest, { kind: "open" }>): TreeReply {
  try {
    const { options, ahead } = request;
    const pooled =
      ahead === undefined ? undefined : new PooledNormals(ahead.ring, planDraws(options, ahead.queries), seededNormals(options));
    runs.set(request.run, { sampler: new BrownianTreeNoiseSampler(options, pooled?.randnFor), pooled });
    return { kind: "opened", run: request.run };
  } catch (error) {
    // Only this run fails (e.g. an unknown RNG source): its queries answer nothing, the sampler meets the error.
    return { kind: "opened", run: request.run, error: errorText(error) };
  }
}

requests.on("message", (request: TreeRequest) => {
  if (request.kind === "open") {
    port.postMessage(open(request) satisfies TreeReply);
    pump();
    return;
  }
  if (request.kind === "close") {
    runs.delete(request.run);
    return;
  }
  const run = runs.get(request.run);
  let reply: TreeReply;
  try {
    if (run === undefined) {
      reply = { kind: "answer", run: request.run, id: request.id, error: "run not open" };
    } else {
      const noise = run.sampler.sample(request.sigma, request.sigmaNext);
      const answer: TreeReply = { kind: "answer", run: request.run, id: request.id, noise };
      // sample() returns a fresh array owning its whole buffer: handing the buffer over detaches nothing cached.
      port.postMessage(answer, [noise.buffer as ArrayBuffer]);
      return;
    }
  } catch (error) {
    reply = { kind: "answer", run: request.run, id: request.id, error: errorText(error) };
  } finally {
    pump();
  }
  port.postMessage(reply);
});

port.postMessage({ kind: "ready" } satisfies TreeReply);
