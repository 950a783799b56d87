// Runs inside a worker thread: one of a BrownianWorkers service's draw helpers (brownian-pool.ts). It
// lives as long as the service and makes the planned Brownian-tree draws of every run it is given into
// that run's ring, one draw per run in turn, until each run's plan is drawn or its ring stops. When every
// ring is full it waits on the service's wake word; with no run left it returns to its event loop (idle).
import { parentPort, receiveMessageOnPort, workerData } from "node:worker_threads";
import { seededNormals } from "./brownian.js";
import { RingDrawer, planDraws } from "./brownian-pool.js";
import type { BrownianHelperData, HelperJob, HelperReply } from "./brownian-protocol.js";

/** Bounded, so a missed notify (or a job posted while this thread waits) costs at most this long. */
const WAIT_MS = 50;

const port = parentPort!;
const wake = new Int32Array((workerData as BrownianHelperData).wake);
const jobs = new Map<number, RingDrawer>();

function add(job: HelperJob): void {
  // Each thread plans for itself; the walk is deterministic, so every thread gets the run's same plan.
  jobs.set(job.run, new RingDrawer(job.ring, planDraws(job.options, job.queries), seededNormals(job.options)));
}

function drain(): void {
  for (;;) {
    for (let m = receiveMessageOnPort(port); m !== undefined; m = receiveMessageOnPort(port)) add(m.message as HelperJob);
    if (jobs.size === 0) return;
    const seen = Atomics.load(wake, 0);
    let progressed = false;
    for (const [run, drawer] of jobs) {
      let state: ReturnType<RingDrawer["tryDraw"]>;
      try {
        state = drawer.tryDraw();
      } catch {
        // The ring is marked failed: the tree's thread makes this run's draws itself. Other runs go on.
        state = "done";
      }
      if (state === "done") jobs.delete(run);
      else if (state === "drew") progressed = true;
    }
    if (!progressed && jobs.size > 0) Atomics.wait(wake, 0, seen, WAIT_MS);
  }
}

port.on("message", (job: HelperJob) => {
  add(job);
  drain();
});
port.postMessage({ kind: "ready" } satisfies HelperReply);
