/**
 * Messages between a BrownianWorkers service (brownian-thread.ts), its tree thread (brownian-worker.ts)
 * and its draw helpers (brownian-pool-worker.ts). One service serves many runs, each under its own id:
 * a run's trees, plan and ring are its own, so runs never see each other's answers.
 */
import type { MessagePort } from "node:worker_threads";
import type { BrownianNoiseOptions } from "./brownian.js";
import type { BrownianQueryList, DrawRing } from "./brownian-pool.js";

/** A whole run's queries, in the order they will be asked, and the ring their draws meet in (brownian-pool.ts). */
export interface BrownianAhead {
  queries: BrownianQueryList;
  ring: DrawRing;
}

/** The tree thread's workerData: every TreeReply goes out on `replies` (the service reads it synchronously too). */
export interface BrownianTreeData {
  replies: MessagePort;
}

/** To the tree thread. Messages of one run arrive in order: open, queries, close. */
export type TreeRequest =
  | { kind: "open"; run: number; options: BrownianNoiseOptions; ahead?: BrownianAhead }
  | { kind: "query"; run: number; id: number; sigma: number; sigmaNext: number }
  | { kind: "close"; run: number };

/** From the tree thread; the first message of all is `{ kind: "ready" }`, once the thread has started. */
export type TreeReply =
  | { kind: "ready" }
  /** The run's trees are built (no error) or cannot be (error: every query of the run answers nothing). */
  | { kind: "opened"; run: number; error?: string }
  | { kind: "answer"; run: number; id: number; noise?: Float32Array; error?: string };

/** To a draw helper: draw ahead for this run until its plan is drawn or its ring stops. */
export interface HelperJob {
  run: number;
  options: BrownianNoiseOptions;
  queries: BrownianQueryList;
  ring: DrawRing;
}

/** A draw helper's workerData: the service's wake word (bumped whenever any ring has new room or a new job). */
export interface BrownianHelperData {
  wake: SharedArrayBuffer;
}

/** From a draw helper: `{ kind: "ready" }` once it has started. */
export interface HelperReply {
  kind: "ready";
}
