import { abortError } from "@latentfarm/shared";

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
}

export interface UnetCall {
  (
    sample: Float32Array,
    timesteps: Float32Array,
    context: Float32Array,
    dims: { n: number; h: number; w: number; seq: number; dim: number },
    signal?: AbortSignal,
  ): Promise<Float32Array>;
}

interface Pending {
  req: UnetRequest;
  resolve: (out: Float32Array[]) => void;
  reject: (err: unknown) => void;
}

/**
 * Packs concurrent UNet requests into one call. Images of any job that share a resolution and a
 * context length ride in the same batch; each keeps its own timestep. Nothing waits for company:
 * a batch goes out as soon as the model is free, and whatever arrived meanwhile forms the next one.
 */
export class StepBatcher {
  private readonly queue: Pending[] = [];
  private running = false;
  private scheduled = false;
  /** Model calls made and rows evaluated, for metrics and tests. */
  calls = 0;
  rows = 0;

  constructor(
    private readonly unet: UnetCall,
    private readonly channels: number,
    private readonly dim: number,
    private readonly maxRows = 16,
    private readonly onCall?: (rows: number, seconds: number) => void,
  ) {}

  /** The UNet's output for each of `req.contexts`: views of this request's rows of the batch's output. */
  evaluate(req: UnetRequest, signal?: AbortSignal): Promise<Float32Array[]> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
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
    try {
      const { h, w, seq } = first;
      const plane = this.channels * h * w;
      const inPlane = plane + (first.concat?.length ?? 0);
      const ctxSize = seq * this.dim;
      const sample = new Float32Array(rows * inPlane);
      const ts = new Float32Array(rows);
      const ctx = new Float32Array(rows * ctxSize);
      let r = 0;
      for (const p of batch) {
        for (const c of p.req.contexts) {
          sample.set(p.req.x, r * inPlane);
          if (p.req.concat) sample.set(p.req.concat, r * inPlane + plane);
          ts[r] = p.req.t;
          ctx.set(c, r * ctxSize);
          r++;
        }
      }
      const started = performance.now();
      const out = await this.unet(sample, ts, ctx, { n: rows, h, w, seq, dim: this.dim });
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
      for (const p of batch) p.reject(err);
    } finally {
      this.running = false;
      if (this.queue.length > 0) this.schedule();
    }
  }
}
