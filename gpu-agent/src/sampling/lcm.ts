/**
 * A1111's LCM denoiser (modules/sd_samplers_lcm.py, LCMCompVisDenoiser): a 50-entry σ table taken from
 * every 20th training timestep, nearest-timestep quantisation, and LCM's boundary-condition scalings
 * (σ_data = 0.5 on the timestep scaled by 10).
 */
import { f32, linspaceF32 } from "./float32.js";
import type { SigmaModel } from "./schedules.js";
import type { LcmDenoiser } from "./samplers/kdiffusion.js";
import { lcmStep } from "./samplers/updates.js";
import { sd1Schedule, type DiscreteSchedule } from "./sigmas.js";

const ORIGINAL_TIMESTEPS = 50;

export class LcmSchedule implements SigmaModel, LcmDenoiser {
  readonly sigmas: Float32Array;
  readonly logSigmas: Float32Array;
  readonly skipSteps: number;

  constructor(base: DiscreteSchedule = sd1Schedule()) {
    const timesteps = base.alphasCumprod.length;
    this.skipSteps = Math.floor(timesteps / ORIGINAL_TIMESTEPS);
    this.sigmas = new Float32Array(ORIGINAL_TIMESTEPS);
    this.logSigmas = new Float32Array(ORIGINAL_TIMESTEPS);
    for (let k = 0; k < ORIGINAL_TIMESTEPS; k++) {
      const a = base.alphasCumprod[timesteps - 1 - (ORIGINAL_TIMESTEPS - 1 - k) * this.skipSteps]!;
      this.sigmas[k] = Math.sqrt(f32(f32(1 - a) / a));
      this.logSigmas[k] = Math.log(this.sigmas[k]!);
    }
  }

  get sigmaMin(): number {
    return this.sigmas[0]!;
  }

  get sigmaMax(): number {
    return this.sigmas[this.sigmas.length - 1]!;
  }

  /** Nearest table entry, mapped back to a training timestep (…·20 + 19). */
  sigmaToT(sigma: number): number {
    const logSigma = f32(Math.log(f32(sigma)));
    let best = 0;
    let bestDistance = Infinity;
    for (let i = 0; i < this.logSigmas.length; i++) {
      const distance = Math.abs(f32(logSigma - this.logSigmas[i]!));
      if (distance < bestDistance) {
        bestDistance = distance;
        best = i;
      }
    }
    return best * this.skipSteps + (this.skipSteps - 1);
  }

  tToSigma(t: number): number {
    const index = Math.min(Math.max(f32(f32(f32(t) - (this.skipSteps - 1)) / this.skipSteps), 0), this.sigmas.length - 1);
    const low = Math.floor(index);
    const high = Math.ceil(index);
    const w = f32(index - Math.trunc(index));
    return f32(Math.exp(f32(f32(f32(1 - w) * this.logSigmas[low]!) + f32(w * this.logSigmas[high]!))));
  }

  getSigmas(n: number): Float32Array {
    const ts = linspaceF32(this.sigmaToT(this.sigmaMax), this.sigmaToT(this.sigmaMin), n);
    const out = new Float32Array(n + 1);
    for (let i = 0; i < n; i++) out[i] = this.tToSigma(ts[i]!);
    return out;
  }

  /** c_skip and c_out of LCM's boundary condition (σ_data = 0.5, timestep scaled by 10). */
  boundaryScalings(sigma: number): { cSkip: number; cOut: number } {
    const scaledTimestep = f32(this.sigmaToT(sigma) * 10);
    const st2 = f32(scaledTimestep * scaledTimestep);
    return { cSkip: f32(0.25 / f32(st2 + 0.25)), cOut: f32(scaledTimestep / f32(Math.sqrt(f32(st2 + 0.25)))) };
  }

  /** LCM's denoised output from the CFG-combined eps of UNet(x·c_in(σ), sigmaToT(σ)). */
  denoisedFromEps(x: Float32Array, eps: Float32Array, sigma: number): Float32Array {
    const { cSkip, cOut } = this.boundaryScalings(sigma);
    return lcmStep(new Float32Array(x.length), x, eps, -f32(sigma), cOut, cSkip);
  }
}
