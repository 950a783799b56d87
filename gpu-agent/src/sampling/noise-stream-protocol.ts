import type { MessagePort } from "node:worker_threads";
import type { NoiseContinuationState } from "./image-rng.js";

export interface NoiseThreadInit {
  /** Control messages come in on this port (read synchronously by the thread's loop). */
  port: MessagePort;
  /** Int32 [0]: the doorbell, added to and notified whenever there is something new for the thread. */
  bell: SharedArrayBuffer;
}

export type ToNoiseThread =
  /** A stream continuing `state`, whose draws go into `ring` (RING_* below) of `slots` draws. */
  | { op: "open"; id: number; state: NoiseContinuationState; ring: SharedArrayBuffer; slots: number }
  | { op: "close"; id: number }
  | { op: "exit" };

/**
 * A stream's ring: an Int32 header of RING_HEADER_BYTES, then `slots` draws, draw i in slot i % slots.
 * WANTED (written by the stream): draws asked for; MADE (by the thread): draws written; RELEASED (by the
 * stream): draws given back, whose slots the thread may write again. The thread writes draw i only while
 * i < WANTED and i < RELEASED + slots.
 */
export const RING_HEADER_BYTES = 16;
export const WANTED = 0;
export const MADE = 1;
export const RELEASED = 2;

/** The views of a ring made for `slots` draws: its header and each slot's draw (both sides use the same). */
export function ringViews(ring: SharedArrayBuffer, slots: number): { header: Int32Array; slots: Float32Array[] } {
  const length = (ring.byteLength - RING_HEADER_BYTES) / 4 / slots;
  return {
    header: new Int32Array(ring, 0, RING_HEADER_BYTES / 4),
    slots: Array.from({ length: slots }, (_, k) => new Float32Array(ring, RING_HEADER_BYTES + k * length * 4, length)),
  };
}
