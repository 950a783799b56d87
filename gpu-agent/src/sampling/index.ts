/**
 * Public API of the sampling core: RNG, noise schedules, samplers (as generators) and their setup.
 *
 * Typical txt2img flow for one batch of images:
 *   const { seeds, subseeds } = seedsForJob({ seed, subseed, subseedStrength, count });
 *   const rng = new ImageRng({ shape: [4, h / 8, w / 8], seeds, subseeds, subseedStrength, source, etaNoiseSeedDelta });
 *   const prep = prepareSampling({ samplerName, scheduler, steps, noise: () => rng.next(), brownian: { seeds, shape, source } });
 *   const run = prep.run(prep.startLatent(rng.first()));
 *   for (let r = run.next(); !r.done; r = run.next(evaluate(r.value))) {}
 * where evaluate() runs the UNet for the request (see ModelRequest) and returns the CFG-combined
 * result; r.value.call selects the prompt-schedule entry, r.value.step is the progress step. When the
 * evaluation runs off-thread, call prep.drawAhead(r.value) once it is dispatched: the noise the sampler
 * needs next is drawn during the wait instead of after it (same values, same order). A driver that
 * awaits its evaluations uses prep.openNoiseAhead() instead: drawAhead, then before resuming the
 * generator readyNow(), and ensureReady() only when that is false; close() at the end. The Brownian tree's draws are then made on other threads: a
 * BrownianWorkers service shared by a pipeline's runs (openNoiseAhead({ brownian })), or threads of the
 * run's own without one; usePlainDraws(NoiseThread.open(rng.continuation())) does the same for plain draws.
 */
export {
  createGenerator,
  elementCount,
  RNG_SOURCES,
  type GeneratorOptions,
  type ImageGenerator,
  type NoiseShape,
  type RngSource,
} from "./generator.js";
export { philox4x32, philoxNormals, philoxNormalsCuda } from "./philox.js";
export { Mt19937, TorchCpuGenerator, type TorchCpuKernel } from "./torch-cpu.js";
export { ImageRng, NoiseContinuation, slerp, type ImageRngOptions, type LatentShape, type NoiseContinuationState } from "./image-rng.js";
export { NoiseStream, NoiseThread } from "./noise-stream.js";
export { seedsForJob, resolveSeed, RANDOM_SEED_LIMIT, type JobSeeds, type SeedInput, type SeedsForJobInput } from "./seeds.js";
export { InvalidSamplingParameter } from "./errors.js";
export { cfgCombine, type ToDenoised } from "./cfg-combine.js";
export {
  DiscreteSchedule,
  NUM_TRAIN_TIMESTEPS,
  cIn,
  discreteSigmas,
  epsToDenoised,
  rescaleZeroTerminalSnr,
  scaleLatent,
  scaleModelInput,
  sd1AlphasCumprod,
  sd1Schedule,
  sd1ScheduleWith,
  type NoiseScheduleOption,
  type TablePrecision,
  sigmaToT,
  tToSigma,
  vScalings,
  vToDenoised,
  vToEps,
} from "./sigmas.js";
export {
  DEFAULT_RHO,
  SCHEDULE_LABELS,
  alignYourStepsSigmas,
  betaSigmas,
  ddimSigmas,
  exponentialSigmas,
  karrasSigmas,
  klOptimalSigmas,
  normalSigmas,
  polyexponentialSigmas,
  samplerSigmas,
  scheduleSigmas,
  simpleSigmas,
  type SamplerSigmas,
  type SamplerSigmasInput,
  type ScheduleParameters,
  type ScheduleType,
  type SigmaModel,
} from "./schedules.js";
export { betaQuantile, regularizedIncompleteBeta, type BetaQuantile } from "./beta-quantile.js";
export { LcmSchedule } from "./lcm.js";
export { BrownianTreeNoiseSampler, createBrownianNoiseSampler, type BrownianNoiseOptions } from "./brownian.js";
export type { NoiseAhead } from "./noise-ahead.js";
export {
  img2imgSteps,
  listSamplers,
  listSchedulers,
  prepareSampling,
  promptScheduleSteps,
  resolveSampler,
  RUN_INFOTEXT_KEYS,
  type PreparedSampling,
  type PrepareSamplingInput,
  type ResolvedSamplerChoice,
  type SamplerListing,
  type SamplingSettings,
  type SchedulerListing,
} from "./plan.js";
export * from "./samplers/kdiffusion.js";
export { restartStepList, sampleRestart } from "./samplers/restart.js";
export { sampleDpmAdaptive, sampleDpmFast, type DpmAdaptiveOptions, type DpmSolverOptions } from "./samplers/dpm-solver.js";
export {
  ddimTimesteps,
  sampleDdim,
  sampleDdimCfgpp,
  samplePlms,
  sampleUniPc,
  type TimestepSamplerOptions,
  type UniPcOptions,
  type UniPcSkipType,
  type UniPcVariant,
} from "./samplers/timesteps.js";
export type {
  DenoiseRequest,
  EpsRequest,
  EpsWithUncond,
  ModelRequest,
  ModelResponse,
  NoiseSampler,
  SamplerFunction,
  SamplerOptions,
  SamplerRun,
} from "./samplers/types.js";
