// A1111's "Model hash" of each checkpoint in the models folder, for heartbeats: what a pasted infotext's
// "Model hash" finds a model by. Files are hashed in the background, one at a time, and the result is
// recorded beside the build cache (checkpointSha256), so an agent hashes a checkpoint once per version.

import type { Logger } from "@latentfarm/shared";
import { a1111ModelHash, checkpointSha256, knownSha256 } from "../model-graph/index.js";
import type { ModelEntry } from "./catalog.js";

export class CheckpointHashes {
  /** By path: the recorded hash and when it was last checked against the file. */
  private readonly known = new Map<string, { sha256: string | undefined; checkedAt: number }>();
  private readonly queue: string[] = [];
  private readonly abort = new AbortController();
  private worker: Promise<void> | undefined;

  constructor(
    private readonly cacheDir: string,
    private readonly logger: Logger,
    /** How long a file's recorded hash is trusted before its record is looked at again. */
    private readonly recheckMs = 30_000,
  ) {}

  /** Model name → AutoV2 hash, for the checkpoints hashed so far; the others are queued for hashing. */
  async of(entries: readonly ModelEntry[]): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    const now = Date.now();
    for (const e of entries) {
      if (e.format !== "safetensors") continue;
      let k = this.known.get(e.path);
      // Looked at again after a while: the file may have changed (its record then no longer matches).
      if (k === undefined || (now - k.checkedAt > this.recheckMs && !this.queue.includes(e.path))) {
        k = { sha256: await knownSha256(e.path, this.cacheDir), checkedAt: now };
        this.known.set(e.path, k);
        if (k.sha256 === undefined && !this.queue.includes(e.path)) this.queue.push(e.path);
      }
      if (k.sha256 !== undefined) out.set(e.name, a1111ModelHash(k.sha256));
    }
    if (this.queue.length > 0 && this.worker === undefined && !this.abort.signal.aborted) this.worker = this.drain();
    return out;
  }

  private async drain(): Promise<void> {
    for (let path = this.queue[0]; path !== undefined && !this.abort.signal.aborted; path = this.queue[0]) {
      try {
        const sha256 = await checkpointSha256(path, this.cacheDir, this.abort.signal);
        this.known.set(path, { sha256, checkedAt: Date.now() });
      } catch (err) {
        if (this.abort.signal.aborted) break;
        this.logger.warn("cannot hash a checkpoint", { path, error: String(err) });
        // Tried again when the file is next looked at, after recheckMs.
        this.known.set(path, { sha256: undefined, checkedAt: Date.now() });
      }
      this.queue.shift();
    }
    this.worker = undefined;
  }

  /** Stops hashing (a file being read is left mid-way) and waits for the reader to stop. */
  async close(): Promise<void> {
    this.abort.abort(new Error("closed"));
    await this.worker;
  }
}
