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
 *
 * Staged (stageInKernelMemory, which the NoiseAhead drivers turn on for their run): what is made ahead
 * here, and tree answers as they are offered, are copied into the kernels' WebAssembly memory then, so
 * the step's kernel reads the noise where it is instead of copying 256 KB in between two model calls
 * (0.16 → 0.12 ms for a three-input pass over 4×128×128 right after a 30 ms wait, on the test VM). An
 * answer offered only after the model call (a pipeline thread takes the replies then) is copied on the
 * critical path, but the kernel then reads memory just written: DPM++ 2M SDE there, 394 → 372 µs from
 * the model's end to the next request.
 * A staged array handed to the sampler stays valid until the sampler takes its next draw or answer, or
 * the driver calls unstage(): every sampler uses a draw before it takes another (DPM adaptive keeps one
 * over rejected attempts, and takes the next only once a step is accepted). Draws from a NoiseStream
 * arrive while the sampler's thread is blocked by the model, so copying them would only move the copy.
 */
import type { NoiseStream } from "./noise-stream.js";
import { freeResidentCopy, residentCopy } from "./samplers/latent-pool.js";
import type { ModelRequest, NoiseSampler, UpcomingNoise } from "./samplers/types.js";

/** Answers kept for queries announced but not (yet) asked; each is one latent of memory. */
const MAX_PENDING_ANSWERS = 4;

export class NoisePrefetcher {
  private readonly ready: Float32Array[] = [];
  private readonly answers: Array<{ sigma: number; sigmaNext: number; noise: Float32Array }> = [];
  private onCall = 0;
  /** Where plain draws come from once set: another thread continuing the source (see useStream). */
  private stream: NoiseStream | undefined;
  private staging = false;
  /** Copies in the kernels' memory that this prefetcher owns: waiting, or lent to the sampler. */
  private readonly staged = new Set<Float32Array>();
  /** The staged copy the sampler took last, given back when it takes the next. */
  private lent: Float32Array | undefined;
  private stagedTaken = 0;

  constructor(
    private readonly source: () => Float32Array,
    private readonly querySource?: NoiseSampler,
  ) {}

  /** The samplers' `noise()`: the oldest draw made ahead, else a draw now. */
  readonly noise = (): Float32Array => this.lend(this.ready.shift() ?? (this.stream ? this.stream.take() : this.source()));

  /** From now on draws and answers made ahead are copied into the kernels' memory (see above), until unstage(). */
  stageInKernelMemory(): void {
    this.staging = true;
  }

  /**
   * Ends staging: the copy lent last goes back, and draws and answers still waiting become ordinary
   * arrays again (a later run of the same sampling may still take them, in order).
   */
  unstage(): void {
    this.staging = false;
    this.giveBackLent();
    for (let k = 0; k < this.ready.length; k++) this.ready[k] = this.unstaged(this.ready[k]!);
    for (const a of this.answers) a.noise = this.unstaged(a.noise);
  }

  /** Draws and answers the sampler took from the kernels' memory (tests, benchmarks). */
  get stagedTakes(): number {
    return this.stagedTaken;
  }

  private stage(a: Float32Array): Float32Array {
    const copy = this.staging ? residentCopy(a) : undefined;
    if (copy === undefined) return a;
    this.staged.add(copy);
    return copy;
  }

  private unstaged(a: Float32Array): Float32Array {
    if (!this.staged.delete(a)) return a;
    const plain = a.slice();
    freeResidentCopy(a);
    return plain;
  }

  private drop(a: Float32Array): void {
    if (this.staged.delete(a)) freeResidentCopy(a);
  }

  private lend(a: Float32Array): Float32Array {
    this.giveBackLent();
    if (this.staged.has(a)) {
      this.lent = a;
      this.stagedTaken++;
    }
    return a;
  }

  private giveBackLent(): void {
    if (this.lent === undefined) return;
    this.drop(this.lent);
    this.lent = undefined;
  }

  /**
   * From now on plain draws come from `stream`, which continues this prefetcher's source exactly where it
   * stands (its ImageRng's continuation): the source itself is never called again. drawAhead then asks
   * the stream's thread for the draws instead of making them here.
   */
  useStream(stream: NoiseStream): void {
    this.stream = stream;
  }

  /** Whether the draws asked of the stream have all arrived (taking what it posted meanwhile; true without one). */
  streamReadyNow(): boolean {
    return this.stream?.readyNow() ?? true;
  }

  /** Resolves once the draws asked of the stream have arrived (at once without one). */
  streamReady(): Promise<void> {
    return this.stream ? this.stream.ready() : Promise.resolve();
  }

  /** The samplers' noise sampler: an answer computed ahead for exactly these arguments, else one now. */
  readonly query: NoiseSampler = (sigma, sigmaNext) => {
    const i = this.answers.findIndex((a) => a.sigma === sigma && a.sigmaNext === sigmaNext);
    if (i >= 0) return this.lend(this.answers.splice(i, 1)[0]!.noise);
    if (this.querySource === undefined) throw new TypeError("this sampling has no noise sampler");
    this.onCall++;
    return this.lend(this.querySource(sigma, sigmaNext));
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
    this.answers.push({ sigma, sigmaNext, noise: this.stage(noise) });
    if (this.answers.length > MAX_PENDING_ANSWERS) this.drop(this.answers.shift()!.noise);
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
          this.ready.push(this.stage(this.source()));
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
