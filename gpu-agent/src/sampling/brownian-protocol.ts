/** Messages between the agent thread and the Brownian-tree worker (brownian-worker.ts). */
import type { BrownianNoiseOptions } from "./brownian.js";
import type { BrownianQueryList, DrawRing } from "./brownian-pool.js";

export interface BrownianQuery {
  id: number;
  sigma: number;
  sigmaNext: number;
}

/** Replies to queries; the first message of all is `{ id: 0, ready: true }`, once the trees are built. */
export type BrownianReply =
  | { id: number; noise: Float32Array; error?: undefined; ready?: undefined }
  | { id: number; noise?: undefined; error: string; ready?: undefined }
  | { id: 0; noise?: undefined; error?: undefined; ready: true };

/** A whole run's queries, in the order they will be asked, and the ring their draws meet in (brownian-pool.ts). */
export interface BrownianAhead {
  queries: BrownianQueryList;
  ring: DrawRing;
}

/** The tree worker's workerData: the trees, and the run's draws made ahead when `ahead` is given. */
export type BrownianWorkerData = BrownianNoiseOptions & { ahead?: BrownianAhead };

/** A draw helper's workerData (brownian-pool-worker.ts). */
export interface BrownianHelperData extends BrownianAhead {
  options: BrownianNoiseOptions;
}
