/** A1111's Restart sampler (modules/sd_samplers_extra.py, "Restart Sampling for Improving Generative Processes"). */
import { karrasSigmas } from "../schedules.js";
import { ModelCaller, ONE_DRAW, checkSigmas, checkedNoise } from "./common.js";
import type { SamplerOptions, SamplerRun } from "./types.js";
import { addNoise, eulerStep, heunStep } from "./updates.js";
import { freshLatent, resultInPlaceOf, supersede } from "./latent-pool.js";

const f32 = Math.fround;

/** Index of the σ closest to `target` (torch.argmin of |σ − target|: first index on ties). */
function nearestIndex(sigmas: Float32Array, target: number): number {
  let best = 0;
  let bestDistance = Infinity;
  for (let i = 0; i < sigmas.length; i++) {
    const distance = Math.abs(f32(sigmas[i]! - f32(target)));
    if (distance < bestDistance) {
      bestDistance = distance;
      best = i;
    }
  }
  return best;
}

/**
 * The (σ_from, σ_to) pairs Restart walks: for 20+ steps the schedule is rebuilt as Karras over fewer
 * steps and a restart segment (σ ≈ 0.1 back up to σ ≈ 2) is inserted once (twice from 36 steps).
 */
export function restartStepList(sigmas: Float32Array): Array<[number, number]> {
  const steps = sigmas.length - 1;
  let schedule = sigmas;
  let restart: { minIndex: number; steps: number; times: number; max: number } | undefined;
  if (steps >= 20) {
    let restartSteps = 9;
    let restartTimes = 1;
    if (steps >= 36) {
      restartSteps = Math.floor(steps / 4);
      restartTimes = 2;
    }
    schedule = karrasSigmas(steps - restartSteps * restartTimes, sigmas[sigmas.length - 2]!, sigmas[0]!);
    restart = { minIndex: nearestIndex(schedule, 0.1), steps: restartSteps + 1, times: restartTimes, max: 2 };
  }
  const list: Array<[number, number]> = [];
  for (let i = 0; i < schedule.length - 1; i++) {
    list.push([schedule[i]!, schedule[i + 1]!]);
    if (restart !== undefined && i + 1 === restart.minIndex) {
      const maxIndex = nearestIndex(schedule, restart.max);
      if (maxIndex < restart.minIndex) {
        const full = karrasSigmas(restart.steps, schedule[restart.minIndex]!, schedule[maxIndex]!);
        const segment = full.subarray(0, full.length - 1);
        for (let time = 0; time < restart.times; time++) {
          for (let k = 0; k < segment.length - 1; k++) list.push([segment[k]!, segment[k + 1]!]);
        }
      }
    }
  }
  return list;
}

export function* sampleRestart(x: Float32Array, options: SamplerOptions): SamplerRun {
  checkSigmas(options.sigmas);
  const model = new ModelCaller(x.length, options.schedule);
  const sNoise = f32(options.sNoise ?? 1);
  const stepList = restartStepList(options.sigmas);
  let lastSigma: number | undefined;
  for (let step = 0; step < stepList.length; step++) {
    const [oldSigma, newSigma] = stepList[step]!;
    if (lastSigma !== undefined && lastSigma < oldSigma) {
      // Jumping back up: fresh noise to raise the level from lastSigma to oldSigma.
      const n = checkedNoise(options.noise, x.length);
      const scale = f32(Math.sqrt(f32(f32(oldSigma * oldSigma) - f32(lastSigma * lastSigma))));
      x = supersede(x, addNoise(resultInPlaceOf(x), x, n, sNoise, scale));
    }
    // The next item jumps back up when its start lies above this item's end.
    const following = stepList[step + 1];
    const upcoming = following !== undefined && newSigma < following[0] ? ONE_DRAW : undefined;
    const denoised = yield* model.denoise(x, oldSigma, step, upcoming);
    const dt = f32(newSigma - oldSigma);
    const x2 = eulerStep(freshLatent(x.length), x, denoised, oldSigma, dt);
    if (newSigma === 0) {
      x = supersede(x, x2, denoised);
    } else {
      const denoised2 = yield* model.denoise(x2, newSigma, step, upcoming);
      x = supersede(x, heunStep(resultInPlaceOf(x), x, denoised, denoised2, oldSigma, newSigma, dt), x2, denoised, denoised2);
    }
    lastSigma = newSigma;
  }
  return x;
}
