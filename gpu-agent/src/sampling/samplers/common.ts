import { sd1Schedule, type DiscreteSchedule } from "../sigmas.js";
import { allocateAhead, answerSlot, heldByRun, releaseLatent } from "./latent-pool.js";
import type { EpsWithUncond, ModelRequest, ModelResponse, NoiseSampler, SamplerOptions, UpcomingNoise } from "./types.js";

// A module-local alias: an imported binding can cost a getter call per use under some loaders.
const f32 = Math.fround;

/** Counts model calls and builds requests; one per sampler run. */
export class ModelCaller {
  private calls = 0;
  readonly schedule: DiscreteSchedule;

  /**
   * @param freshPerCall how many new latent arrays the sampler takes (freshLatent) between a model
   *   answer and its next request; they are allocated while the model runs (./latent-pool.ts).
   */
  constructor(
    private readonly length: number,
    schedule?: DiscreteSchedule,
    private readonly freshPerCall = 2,
  ) {
    this.schedule = schedule ?? sd1Schedule();
  }

  /** D(x, σ): the CFG-combined denoised prediction. */
  *denoise(x: Float32Array, sigma: number, step: number, upcoming?: UpcomingNoise): Generator<ModelRequest, Float32Array, ModelResponse> {
    const request = this.denoiseRequest(x, sigma, step, upcoming);
    return this.denoised(request, yield request);
  }

  /**
   * denoise() in two halves, for a sampler that yields the request itself: each yield* level between the
   * driver and the yield is one more generator frame to resume on every model call.
   */
  denoiseRequest(x: Float32Array, sigma: number, step: number, upcoming?: UpcomingNoise): ModelRequest {
    const into = this.offer();
    return {
      kind: "denoise",
      x,
      sigma,
      timestep: this.schedule.sigmaToT(sigma),
      step,
      call: this.calls++,
      ...(upcoming !== undefined && { upcoming }),
      ...(into !== undefined && { into }),
    };
  }

  /** The answer to a denoiseRequest, checked, its slot settled. */
  denoised(request: ModelRequest, response: ModelResponse): Float32Array {
    const answer = expectArray(response, this.length);
    this.settle(request.into, answer);
    return answer;
  }

  /** CFG-combined eps at a model timestep. */
  *eps(
    x: Float32Array,
    timestep: number,
    sigma: number,
    step: number,
    inputScale = 1,
    upcoming?: UpcomingNoise,
  ): Generator<ModelRequest, Float32Array, ModelResponse> {
    const into = this.offer();
    const request: ModelRequest = {
      kind: "eps",
      x,
      sigma,
      timestep,
      inputScale,
      step,
      call: this.calls++,
      ...(upcoming !== undefined && { upcoming }),
      ...(into !== undefined && { into }),
    };
    // Not a shared generator helper: every yield* level is one more frame on each resume.
    const answer = expectArray(yield request, this.length);
    this.settle(into, answer);
    return answer;
  }

  /** CFG-combined eps plus the unconditional eps (DDIM CFG++). */
  *epsWithUncond(
    x: Float32Array,
    timestep: number,
    sigma: number,
    step: number,
    cfgScaleMultiplier: number,
    upcoming?: UpcomingNoise,
  ): Generator<ModelRequest, EpsWithUncond, ModelResponse> {
    const into = this.offer();
    const request: ModelRequest = {
      kind: "eps",
      x,
      sigma,
      timestep,
      inputScale: 1,
      step,
      call: this.calls++,
      cfgScaleMultiplier,
      needUncond: true,
      ...(upcoming !== undefined && { upcoming }),
      ...(into !== undefined && { into }),
    };
    const response = yield request;
    if (response instanceof Float32Array || response.output.length !== this.length || response.uncond.length !== this.length) {
      throw new TypeError("this request needs { output, uncond } arrays of the latent's length");
    }
    // Checked while the slot is still the run's, so an uncond in the slot is refused too.
    if (heldByRun(response.uncond)) throw new TypeError("the unconditional eps must be an array of the driver's own");
    this.settle(into, response.output);
    return response;
  }

  /**
   * A slot for the next answer. An answer in its slot belongs to the sampler, which releases it
   * (releaseLatent) once no later step reads it; any other answer is the driver's, and releasing it does
   * nothing.
   */
  private offer(): Float32Array | undefined {
    const into = answerSlot(this.length);
    allocateAhead(this.length, this.freshPerCall);
    return into;
  }

  /** The slot goes back when the driver answered elsewhere; an answer in another of the run's arrays is refused. */
  private settle(into: Float32Array | undefined, answer: Float32Array): void {
    if (answer === into) return;
    releaseLatent(into);
    if (heldByRun(answer)) throw new TypeError("the model's answer must be the request's `into` or an array of the driver's own");
  }
}

function expectArray(response: ModelResponse, length: number): Float32Array {
  const array = response instanceof Float32Array ? response : response.output;
  if (!(array instanceof Float32Array) || array.length !== length) {
    throw new TypeError(`model result must be a Float32Array of ${length} values`);
  }
  return array;
}

export function checkedNoise(noise: () => Float32Array, length: number): Float32Array {
  const n = noise();
  if (n.length !== length) throw new RangeError(`noise draw has ${n.length} values, the latent has ${length}`);
  return n;
}

export function brownianOrPlain(options: SamplerOptions, length: number): NoiseSampler {
  const sampler = options.noiseSampler;
  if (sampler === undefined) return () => checkedNoise(options.noise, length);
  return (sigma, sigmaNext) => {
    const n = sampler(sigma, sigmaNext);
    if (n.length !== length) throw new RangeError(`noise sampler returned ${n.length} values, the latent has ${length}`);
    return n;
  };
}

/** k-diffusion `get_ancestral_step` in float32; eta 0 gives (σ_to, 0). */
export function ancestralStep(sigmaFrom: number, sigmaTo: number, eta: number): { sigmaDown: number; sigmaUp: number } {
  if (!eta) return { sigmaDown: sigmaTo, sigmaUp: 0 };
  const from2 = f32(sigmaFrom * sigmaFrom);
  const to2 = f32(sigmaTo * sigmaTo);
  const candidate = f32(f32(eta) * f32(Math.sqrt(f32(f32(to2 * f32(from2 - to2)) / from2))));
  // Python's min(a, b) keeps a unless b is strictly smaller.
  const sigmaUp = candidate < sigmaTo ? candidate : sigmaTo;
  const sigmaDown = f32(Math.sqrt(f32(to2 - f32(sigmaUp * sigmaUp))));
  return { sigmaDown, sigmaUp };
}

/** float32 natural log / exp / expm1 of a float32 value, as torch's 0-d tensor ops. */
export const logF = (v: number): number => f32(Math.log(v));
export const expF = (v: number): number => f32(Math.exp(v));
export const expm1F = (v: number): number => f32(Math.expm1(v));
/** k-diffusion t = −ln σ and σ = exp(−t), each rounded like the tensor ops. */
export const tOfSigma = (sigma: number): number => -logF(sigma);
export const sigmaOfT = (t: number): number => expF(-t);

/** torch.lerp(a, b, w) for scalars in float32. */
export function lerpF(a: number, b: number, w: number): number {
  const diff = f32(b - a);
  return w < 0.5 ? f32(a + f32(w * diff)) : f32(b - f32(diff * f32(1 - w)));
}

/** One upcoming `noise()` draw (or none). */
export const ONE_DRAW: UpcomingNoise = { draws: 1 };

/** An upcoming noise-sampler call: a Brownian-tree query, or a plain draw where there is no tree. */
export function upcomingSde(options: SamplerOptions, sigma: number, sigmaNext: number): UpcomingNoise {
  return options.noiseSampler === undefined ? ONE_DRAW : { queries: [[sigma, sigmaNext]] };
}

export function checkSigmas(sigmas: Float32Array): void {
  if (sigmas.length < 2) throw new RangeError("a schedule needs at least two sigmas (one step)");
  for (const s of sigmas) if (!(s >= 0) || !Number.isFinite(s)) throw new RangeError(`invalid sigma ${s}`);
}
