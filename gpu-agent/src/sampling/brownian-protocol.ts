/** Messages between the agent thread and the Brownian-tree worker (brownian-worker.ts). */
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
