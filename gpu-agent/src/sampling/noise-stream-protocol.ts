import type { MessagePort } from "node:worker_threads";
import type { NoiseContinuationState } from "./image-rng.js";

export interface NoiseThreadInit {
  /** Requests come in and draws go out on this port. */
  port: MessagePort;
  /** Int32 [0]: draws posted so far, over all streams, for a caller that must wait synchronously. */
  posted: SharedArrayBuffer;
}

export type ToNoiseThread =
  | { op: "open"; id: number; state: NoiseContinuationState }
  /** Make this stream's draws up to index upTo (exclusive). */
  | { op: "want"; id: number; upTo: number }
  | { op: "close"; id: number }
  | { op: "exit" };

export interface NoiseDraw {
  id: number;
  index: number;
  draw: Float32Array;
}
