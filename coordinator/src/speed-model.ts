/** What a model call costs depends on the model and the latent size; seconds per call are kept per key. */
export interface SpeedKey {
  readonly model: string;
  readonly width: number;
  readonly height: number;
}

export interface Estimate {
  /** Seconds for the whole task on that agent, model load included when it is not loaded. */
  seconds: number;
  /** From this agent's own measurements (or scaled from them); false = a fleet figure or a guess. */
  measured: boolean;
}

const pixels = (k: SpeedKey): number => Math.max(1, k.width * k.height);

class Ema {
  value: number;
  n = 1;
  constructor(first: number) {
    this.value = first;
  }
  add(x: number, alpha: number): void {
    // The first few samples weigh in fully, so one outlier at start-up does not linger.
    const a = Math.max(alpha, 1 / (this.n + 1));
    this.value += a * (x - this.value);
    this.n++;
  }
}

/**
 * Measured speed per agent and (model, resolution), as exponential moving averages: seconds per
 * model call (one UNet evaluation of an image: a sampling step of most samplers, half a step of the
 * second-order ones; shared SamplingWork), the fixed cost of a task around its steps (dispatch, VAE decode, PNG encode), and
 * each model's load time. Missing figures fall back to the agent's speed at other resolutions
 * (scaled by pixel count), then to the fleet's.
 */
export class SpeedModel {
  // agent → model → pixel count → seconds per model call
  private readonly perStep = new Map<string, Map<string, Map<number, Ema>>>();
  private readonly overhead = new Map<string, Ema>(); // agent → s
  private readonly load = new Map<string, Ema>(); // model → s
  private readonly alpha: number;
  /** Guess for a 512×512 model call when nothing at all is known. */
  private readonly defaultCallSeconds: number;
  // Fleet figures are asked for once per agent and task in a placement pass; they change only when
  // a sample arrives, so they are cached until then.
  private version = 0;
  private readonly fleetCache = new Map<string, { version: number; value: number | undefined }>();
  private overheadMean: { version: number; value: number } | undefined;
  private readonly agentVersions = new Map<string, number>();

  constructor(opts: { alpha?: number; defaultCallSeconds?: number } = {}) {
    this.alpha = opts.alpha ?? 0.3;
    this.defaultCallSeconds = opts.defaultCallSeconds ?? 0.1;
  }

  /** Changes whenever any figure changes (fleet means and load times depend on every agent). */
  get fleetVersion(): number {
    return this.version;
  }

  /** Changes whenever this agent's own figures change. */
  agentVersion(agentId: string): number {
    return this.agentVersions.get(agentId) ?? 0;
  }

  observe(agentId: string, key: SpeedKey, sample: { secondsPerCall: number; overheadSeconds?: number; loadSeconds?: number }): void {
    this.version++;
    this.agentVersions.set(agentId, (this.agentVersions.get(agentId) ?? 0) + 1);
    if (Number.isFinite(sample.secondsPerCall) && sample.secondsPerCall >= 0) {
      let byModel = this.perStep.get(agentId);
      if (!byModel) this.perStep.set(agentId, (byModel = new Map()));
      let byPixels = byModel.get(key.model);
      if (!byPixels) byModel.set(key.model, (byPixels = new Map()));
      const px = pixels(key);
      const e = byPixels.get(px);
      if (e) e.add(sample.secondsPerCall, this.alpha);
      else byPixels.set(px, new Ema(sample.secondsPerCall));
    }
    if (sample.overheadSeconds !== undefined && Number.isFinite(sample.overheadSeconds) && sample.overheadSeconds >= 0) {
      const e = this.overhead.get(agentId);
      if (e) e.add(sample.overheadSeconds, this.alpha);
      else this.overhead.set(agentId, new Ema(sample.overheadSeconds));
    }
    if (sample.loadSeconds !== undefined && Number.isFinite(sample.loadSeconds) && sample.loadSeconds >= 0) {
      const e = this.load.get(key.model);
      if (e) e.add(sample.loadSeconds, this.alpha);
      else this.load.set(key.model, new Ema(sample.loadSeconds));
    }
  }

  /** This agent's seconds per model call for the key, scaled from its nearest measured resolution of the model. */
  agentCallSeconds(agentId: string, key: SpeedKey): number | undefined {
    const byPixels = this.perStep.get(agentId)?.get(key.model);
    if (!byPixels) return undefined;
    const px = pixels(key);
    const exact = byPixels.get(px);
    if (exact) return exact.value;
    let best: { v: number; dist: number } | undefined;
    for (const [p, e] of byPixels) {
      const dist = Math.abs(Math.log(p / px));
      if (!best || dist < best.dist) best = { v: (e.value * px) / p, dist };
    }
    return best?.v;
  }

  /** The fleet's mean seconds per model call for the key (agents that measured it or the model). */
  fleetCallSeconds(key: SpeedKey): number | undefined {
    const k = `${key.model}|${pixels(key)}`;
    const cached = this.fleetCache.get(k);
    if (cached && cached.version === this.version) return cached.value;
    let sum = 0;
    let n = 0;
    for (const agentId of this.perStep.keys()) {
      const v = this.agentCallSeconds(agentId, key);
      if (v !== undefined) {
        sum += v;
        n++;
      }
    }
    const value = n > 0 ? sum / n : undefined;
    this.fleetCache.set(k, { version: this.version, value });
    return value;
  }

  loadSeconds(model: string): number | undefined {
    return this.load.get(model)?.value;
  }

  overheadSeconds(agentId: string): number | undefined {
    return this.overhead.get(agentId)?.value;
  }

  private fleetOverhead(): number {
    if (this.overheadMean?.version === this.version) return this.overheadMean.value;
    let sum = 0;
    for (const e of this.overhead.values()) sum += e.value;
    const value = this.overhead.size > 0 ? sum / this.overhead.size : 0;
    this.overheadMean = { version: this.version, value };
    return value;
  }

  /** Estimated wall time of one task of `modelCalls` model calls on the agent. */
  taskSeconds(agentId: string, key: SpeedKey, modelCalls: number, modelLoaded: boolean): Estimate {
    const own = this.agentCallSeconds(agentId, key);
    const perCall = own ?? this.fleetCallSeconds(key) ?? (this.defaultCallSeconds * pixels(key)) / (512 * 512);
    const overhead = this.overhead.get(agentId)?.value ?? this.fleetOverhead();
    const load = modelLoaded ? 0 : (this.loadSeconds(key.model) ?? 0);
    return { seconds: overhead + perCall * modelCalls + load, measured: own !== undefined };
  }

  forget(agentId: string): void {
    this.version++;
    this.agentVersions.set(agentId, (this.agentVersions.get(agentId) ?? 0) + 1);
    this.perStep.delete(agentId);
    this.overhead.delete(agentId);
  }
}
