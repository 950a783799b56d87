import type { TextEncoder } from "../conditioner.js";

/** Deterministic stand-in for CLIP: the hidden state of a position depends on its token and index. */
export function fakeHidden(token: number, position: number, h: number, clipSkip: number): number {
  return Math.sin(token * 0.37 + position * 0.11 + h * 0.07 + clipSkip) + 0.05;
}

export class FakeTextEncoder implements TextEncoder {
  readonly calls: Array<{ batch: Int32Array; n: number; clipSkip: number }> = [];

  constructor(
    readonly hiddenSize = 8,
    readonly maxClipSkip = 3,
    private readonly delayMs = 0,
  ) {}

  async encode(batch: Int32Array, n: number, clipSkip: number, signal?: AbortSignal): Promise<Float32Array> {
    this.calls.push({ batch: batch.slice(), n, clipSkip });
    if (this.delayMs > 0) {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(resolve, this.delayMs);
        signal?.addEventListener("abort", () => {
          clearTimeout(timer);
          reject(signal.reason instanceof Error ? signal.reason : new DOMException("aborted", "AbortError"));
        });
      });
    }
    signal?.throwIfAborted();
    const positions = batch.length / n;
    const out = new Float32Array(batch.length * this.hiddenSize);
    for (let r = 0; r < n; r++) {
      for (let k = 0; k < positions; k++) {
        for (let h = 0; h < this.hiddenSize; h++) {
          out[(r * positions + k) * this.hiddenSize + h] = fakeHidden(batch[r * positions + k]!, k, h, clipSkip);
        }
      }
    }
    return out;
  }
}
