// Runs inside a worker thread: one of a run's draw helpers (brownian-pool.ts). It makes the run's
// planned Brownian-tree draws into the shared ring until the plan is drawn or the run stops, then ends.
import { workerData } from "node:worker_threads";
import { seededNormals } from "./brownian.js";
import { drawPlanned, planDraws } from "./brownian-pool.js";
import type { BrownianHelperData } from "./brownian-protocol.js";

const { options, queries, ring } = workerData as BrownianHelperData;
drawPlanned(ring, planDraws(options, queries), seededNormals(options));
