/**
 * Noise drawn ahead, while the model runs. Samplers announce with each model request the noise they
 * will draw next (ModelRequest.upcoming); during that evaluation the JS thread is idle (the UNet runs in
 * the ONNX Runtime worker), so the driver calls `drawAhead` and the draws happen then instead of on the
 * critical path between two UNet calls.
 *
 * Nothing changes value or order:
 * - plain draws come from the same source in the same sequence: a draw made ahead waits in a FIFO and
 *   the sampler's next `noise()` takes the oldest one, so the k-th value the sampler gets is the k-th
 *   value the source produced, whenever it was produced;
 * - noise-sampler (Brownian-tree) answers are pure functions of their (σ, σ_next) arguments, so an
 *   answer computed early is the answer, and it is only handed out for exactly those arguments.
 * A wrong announcement therefore costs time (a draw nobody takes), never a different image.
 */
import type { NoiseStream } from "./noise-stream.js";
import type { ModelRequest, NoiseSampler, UpcomingNoise } from "./samplers/types.js";

/** Answers kept for queries announced but not (yet) asked; each is one latent of memory. */
const MAX_PENDING_ANSWERS = 4;

export class NoisePrefetcher {
  private readonly ready: Float32Array[] = [];
  private readonly answers: Array<{ sigma: number; sigmaNext: number; noise: Float32Array }> = [];
  private onCall = 0;
  /** Where plain draws come from once set: another thread continuing the source (see useStream). */
  private stream: NoiseStream | undefined;

  constructor(
    private readonly source: () => Float32Array,
    private readonly querySource?: NoiseSampler,
  ) {}

  /** The samplers' `noise()`: the oldest draw made ahead, else a draw now. */
  readonly noise = (): Float32Array => this.ready.shift() ?? (this.stream ? this.stream.take() : this.source());

  /**
   * From now on plain draws come from `stream`, which continues this prefetcher's source exactly where it
   * stands (its ImageRng's continuation): the source itself is never called again. drawAhead then asks
   * the stream's thread for the draws instead of making them here.
   */
  useStream(stream: NoiseStream): void {
    this.stream = stream;
  }

  /** Resolves once the draws asked of the stream have arrived (at once without one). */
  streamReady(): Promise<void> {
    return this.stream ? this.stream.ready() : Promise.resolve();
  }

  /** The samplers' noise sampler: an answer computed ahead for exactly these arguments, else one now. */
  readonly query: NoiseSampler = (sigma, sigmaNext) => {
    const i = this.answers.findIndex((a) => a.sigma === sigma && a.sigmaNext === sigmaNext);
    if (i >= 0) return this.answers.splice(i, 1)[0]!.noise;
    if (this.querySource === undefined) throw new TypeError("this sampling has no noise sampler");
    this.onCall++;
    return this.querySource(sigma, sigmaNext);
  };

  /** Draws made ahead and not yet taken (for tests and metrics). */
  get readyDraws(): number {
    return this.ready.length;
  }

  /** Noise-sampler queries computed when the sampler asked, i.e. not ready ahead (for tests and metrics). */
  get queriesOnCall(): number {
    return this.onCall;
  }

  /** Whether an answer for exactly (σ, σ_next) is waiting. */
  hasAnswer(sigma: number, sigmaNext: number): boolean {
    return this.answers.some((a) => a.sigma === sigma && a.sigmaNext === sigmaNext);
  }

  /**
   * Stores an answer computed elsewhere (the Brownian-tree worker) for exactly (σ, σ_next). The caller
   * vouches that it equals querySource(σ, σ_next); the tree's answers are pure functions of the query.
   */
  offer(sigma: number, sigmaNext: number, noise: Float32Array): void {
    if (this.hasAnswer(sigma, sigmaNext)) return;
    this.answers.push({ sigma, sigmaNext, noise });
    if (this.answers.length > MAX_PENDING_ANSWERS) this.answers.shift();
  }

  /**
   * Computes what `upcoming` announces and is not computed yet. Never throws: a failing draw is left
   * to the sampler, which makes it again in its own context and gets the error there.
   */
  drawAhead(upcoming: UpcomingNoise | undefined, signal?: AbortSignal): void {
    if (upcoming === undefined) return;
    try {
      const draws = upcoming.draws ?? 0;
      if (this.stream) {
        this.stream.request(draws - this.ready.length - this.stream.pending);
      } else
        while (this.ready.length < draws) {
          if (signal?.aborted) return;
          this.ready.push(this.source());
        }
      for (const [sigma, sigmaNext] of upcoming.queries ?? []) {
        if (signal?.aborted || this.querySource === undefined) return;
        if (this.hasAnswer(sigma, sigmaNext)) continue;
        this.offer(sigma, sigmaNext, this.querySource(sigma, sigmaNext));
      }
    } catch {
      // Deliberately dropped: see above.
    }
  }
}

/** The driver's hook: draw what `request` announces, during its evaluation. */
export type DrawAhead = (request: ModelRequest, signal?: AbortSignal) => void;
