import { abortError } from "@latentfarm/shared";
import type { SdModel } from "../models/sd-model.js";

/** One image's request: evaluate the UNet on the same input against one or more contexts. */
export interface UnetRequest {
  /** Scaled model input x·c_in, [C,h,w]. */
  readonly x: Float32Array;
  /** Fractional UNet timestep. */
  readonly t: number;
  /** Contexts [seq,dim] each; the result has one prediction per context. */
  readonly contexts: readonly Float32Array[];
  readonly h: number;
  readonly w: number;
  readonly seq: number;
  /**
   * Inputs an inpainting UNet takes after x (A1111's c_concat: mask and masked-picture latent),
   * [Cc,h,w], unscaled and the same for every context.
   */
  readonly concat?: Float32Array;
  /**
   * SDXL: each context's pooled text vector (in the order of `contexts`) and the time ids: one row the
   * model's timeIdsSize long for every context, or a row per context (the refiner's aesthetic score
   * differs between the prompt and the negative prompt).
   */
  readonly added?: { readonly pooled: readonly Float32Array[]; readonly timeIds: Float32Array };
}

/** A model's UNet call (SdModel.unet), or a stand-in of the same shape in tests. */
export type UnetCall = SdModel["unet"];

interface Pending {
  req: UnetRequest;
  resolve: (out: Float32Array[]) => void;
  reject: (err: unknown) => void;
}

export interface StepBatcherOptions {
  /** Rows (images × contexts) per UNet call at most (default 16). */
  readonly maxRows?: number;
  /** Called after each UNet call with its rows and seconds, for metrics. */
  readonly onCall?: (rows: number, seconds: number) => void;
  /**
   * Whether a batch's input buffers are kept for the next batch of the same shape (default true). Only
   * benchmarks turn this off, to measure what it saves.
   */
  readonly reuseBuffers?: boolean;
  /** Width of the pooled text vector an SDXL UNet takes; requests then carry `added`. */
  readonly pooledSize?: number;
  /** Values per row of the time ids requests carry (default 6, SDXL base's). */
  readonly timeIdsSize?: number;
}

/**
 * One batch shape's UNet inputs, kept between calls. At 4×128×128 with CFG, a fresh 0.5 MB sample and
 * 0.5 MB context (SD1.5) per call fault their pages in on the pipeline thread's critical path: alone, 1.3
 * ms to allocate and fill after a 30 ms sleep on a 2-vCPU VM against 0.17 ms to fill kept ones; in the
 * unet-call bench, 0.51 against 0.33 ms per call. `rowContext` remembers which context array each row
 * holds, so an unchanged prompt is not copied again: conditioning tensors are never written once made
 * (the conditioning cache shares them). At most KEPT_SHAPES sets are kept: 56 MB at worst (16 rows of
 * 1024×1024 against an SDXL context, four times).
 */
interface BatchBuffers {
  readonly sample: Float32Array;
  readonly timesteps: Float32Array;
  readonly context: Float32Array;
  readonly rowContext: (Float32Array | undefined)[];
  readonly rowConcat: (Float32Array | undefined)[];
}

/** Batch shapes whose buffers are kept: a pipeline sees one or two (a hires pass adds one). */
const KEPT_SHAPES = 4;

/**
 * Packs concurrent UNet requests into one call. Images of any job that share a resolution and a
 * context length ride in the same batch; each keeps its own timestep. Nothing waits for company:
 * a batch goes out as soon as the model is free, and whatever arrived meanwhile forms the next one.
 */
export class StepBatcher {
  private readonly queue: Pending[] = [];
  private running = false;
  private scheduled = false;
  private readonly kept = new Map<string, BatchBuffers>();
  private readonly maxRows: number;
  private readonly onCall: ((rows: number, seconds: number) => void) | undefined;
  private readonly reuseBuffers: boolean;
  private readonly pooledSize: number;
  private readonly timeIdsSize: number;
  /** Model calls made and rows evaluated, for metrics and tests. */
  calls = 0;
  rows = 0;

  constructor(
    private readonly unet: UnetCall,
    private readonly channels: number,
    private readonly dim: number,
    opts: StepBatcherOptions = {},
  ) {
    this.maxRows = opts.maxRows ?? 16;
    this.onCall = opts.onCall;
    this.reuseBuffers = opts.reuseBuffers ?? true;
    this.pooledSize = opts.pooledSize ?? 0;
    this.timeIdsSize = opts.timeIdsSize ?? 6;
  }

  /** The UNet's output for each of `req.contexts`: views of this request's rows of the batch's output. */
  evaluate(req: UnetRequest, signal?: AbortSignal): Promise<Float32Array[]> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    const ids = req.added?.timeIds.length;
    if (
      (req.added !== undefined) !== this.pooledSize > 0 ||
      (req.added !== undefined && req.added.pooled.length !== req.contexts.length) ||
      (ids !== undefined && ids !== this.timeIdsSize && ids !== this.timeIdsSize * req.contexts.length)
    ) {
      return Promise.reject(
        new Error("a UNet request's added conditions do not match the model (SDXL takes one pooled vector per context)"),
      );
    }
    return new Promise((resolve, reject) => {
      this.queue.push({ req, resolve, reject });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.running || this.scheduled) return;
    this.scheduled = true;
    // setImmediate lets every generator that became ready in this turn join the batch.
    setImmediate(() => {
      this.scheduled = false;
      void this.flush();
    });
  }

  private async flush(): Promise<void> {
    if (this.running || this.queue.length === 0) return;
    const first = this.queue[0]!.req;
    const key = (r: UnetRequest) => `${r.h}x${r.w}x${r.seq}x${r.concat?.length ?? 0}`;
    const batch: Pending[] = [];
    let rows = 0;
    for (let i = 0; i < this.queue.length;) {
      const p = this.queue[i]!;
      if (key(p.req) === key(first) && (batch.length === 0 || rows + p.req.contexts.length <= this.maxRows)) {
        batch.push(p);
        rows += p.req.contexts.length;
        this.queue.splice(i, 1);
      } else i++;
    }
    this.running = true;
    let buffers: BatchBuffers | undefined;
    try {
      const { h, w, seq } = first;
      const plane = this.channels * h * w;
      const inPlane = plane + (first.concat?.length ?? 0);
      const ctxSize = seq * this.dim;
      const shape = `${key(first)}x${rows}`;
      buffers = this.buffersFor(shape, rows, inPlane, ctxSize);
      const { sample, timesteps: ts, context: ctx, rowContext, rowConcat } = buffers;
      const pooledSize = this.pooledSize;
      // A few KB per row: packed afresh for every call, as the UNet call may take them to another thread.
      const idsSize = this.timeIdsSize;
      const added =
        pooledSize > 0 ? { textEmbeds: new Float32Array(rows * pooledSize), timeIds: new Float32Array(rows * idsSize) } : undefined;
      let r = 0;
      let contextUnchanged = true;
      for (const p of batch) {
        for (const [k, c] of p.req.contexts.entries()) {
          if (added !== undefined) {
            added.textEmbeds.set(p.req.added!.pooled[k]!, r * pooledSize);
            const ids = p.req.added!.timeIds;
            const at = ids.length === idsSize ? 0 : k * idsSize;
            added.timeIds.set(ids.subarray(at, at + idsSize), r * idsSize);
          }
          sample.set(p.req.x, r * inPlane);
          const concat = p.req.concat;
          if (concat !== undefined && rowConcat[r] !== concat) {
            sample.set(concat, r * inPlane + plane);
            rowConcat[r] = concat;
          }
          ts[r] = p.req.t;
          if (rowContext[r] !== c) {
            ctx.set(c, r * ctxSize);
            rowContext[r] = c;
            contextUnchanged = false;
          }
          r++;
        }
      }
      const started = performance.now();
      const out = await this.unet(sample, ts, ctx, { n: rows, h, w, seq, dim: this.dim, contextUnchanged }, undefined, added);
      // An output written over one of the inputs must not be overwritten by the next batch's packing.
      if (out.buffer === sample.buffer || out.buffer === ctx.buffer) this.kept.delete(shape);
      this.calls++;
      this.rows += rows;
      this.onCall?.(rows, (performance.now() - started) / 1000);
      r = 0;
      for (const p of batch) {
        const res: Float32Array[] = [];
        // Views, not copies: the output is this batch's own (ONNX Runtime's worker hands each run's result
        // over), and each request reads and writes only its own rows.
        for (let k = 0; k < p.req.contexts.length; k++, r++) res.push(out.subarray(r * plane, (r + 1) * plane));
        p.resolve(res);
      }
    } catch (err) {
      // A failed call may have left its buffers anywhere (a worker that took them, say): start afresh.
      if (buffers !== undefined) this.forget(buffers);
      for (const p of batch) p.reject(err);
    } finally {
      this.running = false;
      if (this.queue.length > 0) this.schedule();
    }
  }

  /**
   * The shape's kept buffers, or new ones. Kept buffers are dropped when a session took them away
   * (OrtWorker transfers its feeds, which leaves them detached, of length 0).
   */
  private buffersFor(shape: string, rows: number, inPlane: number, ctxSize: number): BatchBuffers {
    const kept = this.kept.get(shape);
    if (kept !== undefined && kept.sample.length > 0 && kept.context.length > 0 && kept.timesteps.length > 0) {
      // Most recently used last, so the oldest shape is the first to go.
      this.kept.delete(shape);
      this.kept.set(shape, kept);
      return kept;
    }
    const made: BatchBuffers = {
      sample: new Float32Array(rows * inPlane),
      timesteps: new Float32Array(rows),
      context: new Float32Array(rows * ctxSize),
      rowContext: new Array<Float32Array | undefined>(rows),
      rowConcat: new Array<Float32Array | undefined>(rows),
    };
    if (this.reuseBuffers) {
      this.kept.delete(shape);
      this.kept.set(shape, made);
      if (this.kept.size > KEPT_SHAPES) this.kept.delete(this.kept.keys().next().value!);
    }
    return made;
  }

  private forget(buffers: BatchBuffers): void {
    for (const [shape, kept] of this.kept) if (kept === buffers) this.kept.delete(shape);
  }
}
