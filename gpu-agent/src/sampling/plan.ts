/**
 * From A1111 request fields to a runnable sampler: name resolution (legacy "DPM++ 2M Karras" names,
 * aliases), the σ list or timesteps for txt2img and img2img, the start latent, and the generator that
 * yields model requests. Names and options come from the shared catalog, so the coordinator validates
 * with the same table.
 */
import {
  SAMPLERS,
  SCHEDULERS,
  UnknownNameError,
  resolveSampler as resolveCatalogSampler,
  type SamplerEntry,
  type SchedulerId,
  img2imgStepPlan,
  type Img2imgStepPlan,
} from "@latentfarm/shared";
import type { BetaQuantile } from "./beta-quantile.js";
import { BrownianTreeNoiseSampler, type BrownianNoiseOptions } from "./brownian.js";
import type { BrownianQueryList } from "./brownian-pool.js";
import { InvalidSamplingParameter } from "./errors.js";
import { f32 } from "./float32.js";
import { LcmSchedule } from "./lcm.js";
import { InThreadNoiseAhead, WorkerNoiseAhead, type NoiseAhead, type OpenNoiseAheadOptions } from "./noise-ahead.js";
import { NoisePrefetcher } from "./prefetch.js";
import { DEFAULT_RHO, SCHEDULE_LABELS, samplerSigmas, type ScheduleType, type SigmaModel } from "./schedules.js";
import { sd1ScheduleWith, type DiscreteSchedule, type NoiseScheduleOption } from "./sigmas.js";
import { sampleDpmAdaptive, sampleDpmFast } from "./samplers/dpm-solver.js";
import {
  sampleDpm2,
  sampleDpm2Ancestral,
  sampleDpmpp2m,
  sampleDpmpp2mSde,
  sampleDpmpp3mSde,
  sampleDpmppSde,
  sampleDpmppSecondOrderAncestral,
  sampleEuler,
  sampleEulerAncestral,
  sampleHeun,
  sampleLcm,
  sampleLms,
} from "./samplers/kdiffusion.js";
import { sampleRestart } from "./samplers/restart.js";
import { inLatentScope } from "./samplers/latent-pool.js";
import {
  ddimTimesteps,
  sampleDdim,
  sampleDdimCfgpp,
  samplePlms,
  planUniPc,
  runUniPc,
  type UniPcSkipType,
  type UniPcVariant,
} from "./samplers/timesteps.js";
import type { ModelRequest, NoiseSampler, SamplerOptions, SamplerRun } from "./samplers/types.js";

export interface ResolvedSamplerChoice {
  sampler: SamplerEntry;
  /** The schedule type as chosen ("automatic" when none, or when it equals the sampler's default). */
  scheduler: SchedulerId;
  /** The schedule actually built; undefined = the model's own discrete schedule (uniform in t). */
  scheduleType: ScheduleType | undefined;
  /** What the infotext shows as "Schedule type". */
  label: string;
}

/**
 * A1111 get_sampler_and_scheduler plus Automatic resolution. Unknown names throw
 * InvalidSamplingParameter naming `sampler_name` / `scheduler` (or the hr_ fields).
 */
export function resolveSampler(
  samplerName: string,
  scheduler?: string,
  fields: { sampler: "sampler_name" | "hr_sampler_name"; scheduler: "scheduler" | "hr_scheduler" } = {
    sampler: "sampler_name",
    scheduler: "scheduler",
  },
): ResolvedSamplerChoice {
  let resolved;
  try {
    resolved = resolveCatalogSampler(samplerName, scheduler ?? "", fields);
  } catch (error) {
    if (error instanceof UnknownNameError) throw new InvalidSamplingParameter(error.field, error.message);
    throw error;
  }
  const { sampler } = resolved;
  const effective = sampler.timestepSampler ? undefined : resolved.effectiveScheduler;
  const scheduleType = effective === undefined || effective === "automatic" ? undefined : effective;
  const label = scheduleType !== undefined ? SCHEDULE_LABELS[scheduleType] : schedulerLabel(resolved.scheduler);
  return { sampler, scheduler: resolved.scheduler, scheduleType, label };
}

function schedulerLabel(id: SchedulerId): string {
  return SCHEDULERS.find((s) => s.id === id)?.label ?? id;
}

export interface SamplerListing {
  name: string;
  aliases: string[];
  options: Record<string, string | boolean>;
}

/** GET /sdapi/v1/samplers. */
export function listSamplers(): SamplerListing[] {
  return SAMPLERS.map((s) => {
    const options: Record<string, string | boolean> = {};
    if (s.defaultScheduler !== undefined) options["scheduler"] = s.defaultScheduler;
    if (s.secondOrder) options["second_order"] = true;
    if (s.discardNextToLastSigma) options["discard_next_to_last_sigma"] = true;
    if (s.usesEnsd) options["uses_ensd"] = true;
    if (s.brownianNoise) options["brownian_noise"] = true;
    if (s.name === "DPM++ 2M SDE Heun") options["solver_type"] = "heun";
    return { name: s.name, aliases: [...s.aliases], options };
  });
}

export interface SchedulerListing {
  name: string;
  label: string;
  aliases: string[] | null;
  default_rho: number;
  need_inner_model: boolean;
}

const NEEDS_INNER_MODEL = new Set<SchedulerId>(["uniform", "sgm_uniform", "simple", "normal", "ddim", "beta"]);

/** GET /sdapi/v1/schedulers. */
export function listSchedulers(): SchedulerListing[] {
  return SCHEDULERS.map((s) => ({
    name: s.id,
    label: s.label,
    aliases: s.aliases.length > 0 ? [...s.aliases] : null,
    default_rho: s.id === "automatic" ? -1 : (DEFAULT_RHO[s.id] ?? -1),
    need_inner_model: NEEDS_INNER_MODEL.has(s.id),
  }));
}

/** Steps prompt schedules are built for: doubled for second-order samplers (A1111 total_steps). */
export function promptScheduleSteps(sampler: SamplerEntry, steps: number): number {
  return sampler.secondOrder ? steps * 2 : steps;
}

/** setup_img2img_steps (shared img2imgStepPlan), with the steps and strength checked first. */
export function img2imgSteps(steps: number, denoisingStrength: number, fixSteps = false): Img2imgStepPlan {
  if (!Number.isSafeInteger(steps) || steps < 1)
    throw new InvalidSamplingParameter("steps", `steps must be a positive integer, got ${steps}`);
  if (!(denoisingStrength >= 0 && denoisingStrength <= 1)) {
    throw new InvalidSamplingParameter("denoising_strength", `denoising_strength must be within 0..1, got ${denoisingStrength}`);
  }
  return img2imgStepPlan(steps, denoisingStrength, fixSteps);
}

export interface SamplingSettings {
  /** The request's eta (A1111 p.eta); when absent the option below applies. */
  eta?: number;
  /** Option eta_ancestral (default 1) for k-diffusion samplers that take eta. */
  etaAncestral?: number;
  /** Option eta_ddim (default 0) for DDIM and DDIM CFG++. */
  etaDdim?: number;
  sChurn?: number;
  sTmin?: number;
  sTmax?: number;
  sNoise?: number;
  alwaysDiscardNextToLastSigma?: boolean;
  sigmaMin?: number;
  sigmaMax?: number;
  rho?: number;
  useOldKarrasSchedulerSigmas?: boolean;
  betaAlpha?: number;
  betaBeta?: number;
  betaQuantile?: BetaQuantile;
  /** Option sgm_noise_multiplier: txt2img start latent = noise·sqrt(1 + σ₀²). */
  sgmNoiseMultiplier?: boolean;
  /** Option img2img_extra_noise. */
  img2imgExtraNoise?: number;
  /** img2img `initial_noise_multiplier` (default 1): scales the noise before it is added. */
  initialNoiseMultiplier?: number;
  uniPcVariant?: UniPcVariant;
  uniPcSkipType?: UniPcSkipType;
  uniPcOrder?: number;
  uniPcLowerOrderFinal?: boolean;
  modelFamily?: "sd1" | "sdxl";
  /** Option sd_noise_schedule (the ᾱ the σ table comes from) when the input gives no schedule of its own. */
  noiseSchedule?: NoiseScheduleOption;
  /** Option use_downcasted_alpha_bar: ᾱ as float16, as every A1111 before 1.7.0-225 had it with an fp16 model. */
  downcastAlphasCumprod?: boolean;
  /** The request's s_min_uncond (NGMS): every other model call below this σ (timestep samplers: t) runs without the negative prompt. */
  sMinUncond?: number;
  /** Option s_min_uncond_all: NGMS on every call below s_min_uncond, not every other one. */
  sMinUncondAll?: boolean;
  /** Option skip_early_cond: the first fraction of model calls runs without the negative prompt. */
  skipEarlyCond?: number;
  /** Option refiner_switch_by_sample_steps: the refiner switch counts model calls instead of reading σ. */
  refinerSwitchBySampleSteps?: boolean;
}

export interface PrepareSamplingInput {
  samplerName: string;
  scheduler?: string;
  steps: number;
  /** `randn_like`: the next draw of the per-image generators (ImageRng.next()). */
  noise: () => Float32Array;
  /**
   * Brownian-tree noise for the SDE samplers, created over `brownianRange` (see BrownianTreeNoiseSampler).
   * Without it those samplers use `noise()` draws instead: deterministic, but not A1111's values.
   */
  noiseSampler?: NoiseSampler;
  /**
   * Builds A1111's Brownian-tree noise sampler for the SDE samplers (over the full σ list, one tree
   * per image seeded with the batch's plain seeds) unless `noiseSampler` is given.
   */
  brownian?: Omit<BrownianNoiseOptions, "sigmaMin" | "sigmaMax">;
  settings?: SamplingSettings;
  /** img2img / hires second pass: start from an encoded or upscaled latent. */
  img2img?: { denoisingStrength: number; fixSteps?: boolean };
  schedule?: DiscreteSchedule;
  fields?: { sampler: "sampler_name" | "hr_sampler_name"; scheduler: "scheduler" | "hr_scheduler" };
  /**
   * This pass may switch to a refiner checkpoint (A1111's refiner_switch_at; undefined = its None, the
   * first call). Without it, switchesToRefiner is always false.
   */
  refiner?: { switchAt: number | undefined };
}

export interface PreparedSampling {
  choice: ResolvedSamplerChoice;
  /** σ list the sampler walks (k-diffusion), or the σ equivalents of the timesteps (timestep samplers). */
  sigmas: Float32Array;
  /** Model timesteps for DDIM/PLMS/UniPC. */
  timesteps: Int32Array | undefined;
  /** Steps A1111 reports for progress (state.sampling_steps): steps, or t_enc + 1 for img2img. */
  steps: number;
  /** Steps prompt-editing schedules are built for (doubled for second-order samplers). */
  promptScheduleSteps: number;
  /** σmin/σmax the Brownian tree spans (A1111 create_noise_sampler uses the full σ list). */
  brownianRange: { sigmaMin: number; sigmaMax: number } | undefined;
  /**
   * Infotext entries the sampler setup adds (Schedule type, Eta, Discard penultimate sigma, …), and
   * those skipsUncond adds as the run goes (NGMS, Skip Early CFG).
   */
  infotext: Record<string, string | number | boolean>;
  /**
   * Whether the model call `request` runs without the negative prompt, CFG then combining the prompts'
   * outputs at scale 1 with the first prompt's output standing in for the negative's (A1111's
   * CFGDenoiser: skip_early_cond for the first calls, else NGMS). A call that skips records the
   * option in `infotext`, as A1111 records it when it first applies.
   */
  skipsUncond(request: ModelRequest): boolean;
  /**
   * Whether the pass switches to its refiner at model call `request` (A1111's apply_refiner, asked
   * before every call until it switches): the call's progress, (999 − t)/1000 for the model timestep t
   * nearest its σ (timestep samplers: its timestep) or calls made / total calls by sample steps, has
   * reached refiner_switch_at. By sample steps records "Refiner switch by sampling steps" in `infotext`
   * at every call it is asked about, as A1111 does.
   */
  switchesToRefiner(request: ModelRequest): boolean;
  /**
   * The sampler's start latent: txt2img → noise·σ₀ (noise for timestep samplers); img2img → the
   * init latent plus noise at the first scheduled level.
   */
  startLatent(noise: Float32Array, initLatent?: Float32Array): Float32Array;
  /**
   * The sampler's run from `x`, its latents resident in the kernels' memory (samplers/latent-pool.ts): a
   * request's arrays are valid until the run is resumed, its answer goes into the request's `into` when
   * there is one (or an array of the driver's own), the latent it returns is the caller's, and a driver
   * that stops early calls the run's return() so that its memory is reused.
   */
  run(x: Float32Array): SamplerRun;
  /**
   * Draws now the noise `request` announces (its `upcoming` field): call it while that request's model
   * evaluation runs elsewhere (the ORT worker), after the evaluation has been dispatched, so the draws
   * leave the critical path. Values and draw order are unchanged (see prefetch.ts); never throws.
   */
  drawAhead(request: ModelRequest, signal?: AbortSignal): void;
  /**
   * For a driver that awaits each model evaluation (the agent's denoise loop): drawing ahead with the
   * Brownian tree in a worker thread of this run's own (when the tree comes from `brownian`; otherwise
   * as drawAhead). Call it once per run, before the first request; the caller must close() it when
   * the run ends, fails or is cancelled. See noise-ahead.ts. With `brownian` (a pipeline's service) the
   * tree runs on that service's long-lived threads instead of threads started for this run alone.
   */
  openNoiseAhead(options?: OpenNoiseAheadOptions): NoiseAhead;
  /**
   * The Brownian-tree queries (σ, σ_next) a run makes, in the order the sampler announces them (what
   * openNoiseAhead's threads draw ahead for); undefined without a tree built from `brownian`.
   */
  brownianQueries?(): BrownianQueryList | undefined;
}

export function prepareSampling(input: PrepareSamplingInput): PreparedSampling {
  const choice = resolveSampler(input.samplerName, input.scheduler, input.fields);
  const s = input.settings ?? {};
  const { sampler } = choice;
  const noiseSchedule = s.noiseSchedule ?? "Default";
  const downcast = input.schedule === undefined && (s.downcastAlphasCumprod ?? false);
  const isLcm = sampler.name === "LCM";
  // UniPC takes log ᾱ of the float16 table (samplers/timesteps.ts VpSchedule); LCM copies the float16 ᾱ it
  // picks into a float32 table of its own and works in float32 from there (lcm.ts), as A1111's LCM denoiser does.
  const baseSchedule = input.schedule ?? sd1ScheduleWith(noiseSchedule, downcast ? "float16" : "float32");
  const lcm = isLcm ? new LcmSchedule(baseSchedule) : undefined;
  const sigmaModel: SigmaModel = lcm ?? baseSchedule;
  // A1111 sets the ᾱ entries before the sampler is made (downcast first), so they come first.
  const infotext: Record<string, string | number | boolean> = {};
  if (downcast) infotext["Downcast alphas_cumprod"] = true;
  if (input.schedule === undefined && noiseSchedule !== "Default") infotext["Noise Schedule"] = noiseSchedule;

  const mapping = input.img2img ? img2imgSteps(input.steps, input.img2img.denoisingStrength, input.img2img.fixSteps ?? false) : undefined;
  const scheduleSteps = mapping ? mapping.scheduleSteps : input.steps;
  if (!Number.isSafeInteger(input.steps) || input.steps < 1) {
    throw new InvalidSamplingParameter("steps", `steps must be a positive integer, got ${input.steps}`);
  }
  if (scheduleSteps < 1) throw new InvalidSamplingParameter("denoising_strength", "denoising_strength 0 leaves nothing to sample");
  const reportedSteps = mapping ? mapping.tEnc + 1 : input.steps;

  noiseMultiplierInfotext(s, mapping !== undefined, infotext);
  const skipsUncond = uncondSkipRule(s, promptScheduleSteps(sampler, reportedSteps), sampler.timestepSampler ?? false, infotext);
  const switchesToRefiner = refinerSwitchRule(
    input.refiner,
    s,
    promptScheduleSteps(sampler, reportedSteps),
    sampler.timestepSampler ? undefined : baseSchedule,
    infotext,
  );
  if (sampler.timestepSampler) {
    return {
      ...prepareTimestepSampler(input, choice, baseSchedule, scheduleSteps, mapping?.tEnc, reportedSteps, infotext, skipsUncond),
      switchesToRefiner,
    };
  }

  const eta = s.eta ?? s.etaAncestral ?? 1;
  const usesEta = sampler.usesEnsd || sampler.brownianNoise || sampler.name === "DPM fast" || sampler.name === "DPM adaptive";

  const built = samplerSigmas({
    steps: scheduleSteps,
    scheduleType: choice.scheduleType,
    discardNextToLastSigma: sampler.discardNextToLastSigma ?? false,
    alwaysDiscardNextToLastSigma: s.alwaysDiscardNextToLastSigma ?? false,
    model: sigmaModel,
    ...(s.modelFamily !== undefined && { modelFamily: s.modelFamily }),
    ...(s.sigmaMin !== undefined && { sigmaMinOverride: s.sigmaMin }),
    ...(s.sigmaMax !== undefined && { sigmaMaxOverride: s.sigmaMax }),
    ...(s.rho !== undefined && { rhoOverride: s.rho }),
    ...(s.useOldKarrasSchedulerSigmas !== undefined && { useOldKarrasSchedulerSigmas: s.useOldKarrasSchedulerSigmas }),
    ...(s.betaAlpha !== undefined && { betaAlpha: s.betaAlpha }),
    ...(s.betaBeta !== undefined && { betaBeta: s.betaBeta }),
    ...(s.betaQuantile !== undefined && { betaQuantile: s.betaQuantile }),
  });
  Object.assign(infotext, built.infotext);
  const fullSigmas = built.sigmas;
  checkSigmaList(fullSigmas, s);
  // A1111 makes the σ list, then the start latent (SGM noise multiplier, Extra noise), then initialize()
  // (Eta, Sigma churn, …): the infotext keeps that order.
  if (!mapping && s.sgmNoiseMultiplier) infotext["SGM noise multiplier"] = true;
  if (mapping && (s.img2imgExtraNoise ?? 0) > 0) infotext["Extra noise"] = s.img2imgExtraNoise!;
  if (usesEta && eta !== 1) infotext["Eta"] = eta;
  const churn = churnSettings(sampler.name, s, infotext);
  const sigmas = mapping ? fullSigmas.slice(Math.max(scheduleSteps - mapping.tEnc - 1, 0)) : fullSigmas;
  if (sigmas.length < 2) throw new InvalidSamplingParameter("denoising_strength", "the img2img schedule has no steps left");

  let brownianRange: PreparedSampling["brownianRange"];
  if (sampler.brownianNoise) {
    let sigmaMin = Infinity;
    let sigmaMax = -Infinity;
    for (const v of fullSigmas) {
      if (v > 0) sigmaMin = Math.min(sigmaMin, v);
      sigmaMax = Math.max(sigmaMax, v);
    }
    brownianRange = { sigmaMin, sigmaMax };
  }
  const tree =
    input.noiseSampler === undefined && brownianRange !== undefined && input.brownian !== undefined
      ? { ...input.brownian, ...brownianRange }
      : undefined;
  // Built at the first query made on this thread: when a worker answers them all, the tree here never costs a draw.
  let localTree: BrownianTreeNoiseSampler | undefined;
  const querySource =
    input.noiseSampler ??
    (tree !== undefined
      ? (sigma: number, sigmaNext: number) => (localTree ??= new BrownianTreeNoiseSampler(tree)).sample(sigma, sigmaNext)
      : undefined);
  const prefetcher = new NoisePrefetcher(input.noise, querySource);
  const noiseSampler = querySource === undefined ? undefined : prefetcher.query;

  const options: SamplerOptions = {
    sigmas,
    noise: prefetcher.noise,
    schedule: baseSchedule,
    eta,
    ...churn,
    ...(noiseSampler !== undefined && { noiseSampler }),
  };

  const startLatent = (noise: Float32Array, initLatent?: Float32Array): Float32Array => {
    const out = new Float32Array(noise.length);
    if (mapping) {
      if (initLatent === undefined || initLatent.length !== noise.length) {
        throw new RangeError("img2img needs an init latent of the noise's length");
      }
      const sigma0 = sigmas[0]!;
      const extra = f32(s.img2imgExtraNoise ?? 0);
      const scaled = scaleInitialNoise(noise, s.initialNoiseMultiplier);
      for (let k = 0; k < out.length; k++) {
        let v = f32(initLatent[k]! + f32(scaled[k]! * sigma0));
        if (extra > 0) v = f32(v + f32(scaled[k]! * extra));
        out[k] = v;
      }
      return out;
    }
    const sigma0 = sigmas[0]!;
    const scale = s.sgmNoiseMultiplier ? f32(Math.sqrt(f32(1 + f32(sigma0 * sigma0)))) : sigma0;
    for (let k = 0; k < out.length; k++) out[k] = noise[k]! * scale;
    return out;
  };

  const runWith = (x: Float32Array, options: SamplerOptions): SamplerRun => {
    switch (sampler.name) {
      case "Euler a":
        return sampleEulerAncestral(x, options);
      case "Euler":
        return sampleEuler(x, options);
      case "LMS":
        return sampleLms(x, options);
      case "Heun":
        return sampleHeun(x, options);
      case "DPM2":
        return sampleDpm2(x, options);
      case "DPM2 a":
        return sampleDpm2Ancestral(x, options);
      case "DPM++ 2S a":
        return sampleDpmppSecondOrderAncestral(x, options);
      case "DPM++ 2M":
        return sampleDpmpp2m(x, options);
      case "DPM++ SDE":
        return sampleDpmppSde(x, options);
      case "DPM++ 2M SDE":
        return sampleDpmpp2mSde(x, options, "midpoint");
      case "DPM++ 2M SDE Heun":
        return sampleDpmpp2mSde(x, options, "heun");
      case "DPM++ 3M SDE":
        return sampleDpmpp3mSde(x, options);
      case "Restart":
        return sampleRestart(x, options);
      case "LCM":
        return sampleLcm(x, { ...options, lcm: lcm! });
      case "DPM fast":
      case "DPM adaptive": {
        // txt2img: the model's σ range and n = steps; img2img: sched[−2], sched[0], n = len − 1.
        const sigmaMin = mapping ? sigmas[sigmas.length - 2]! : sigmaModel.sigmaMin;
        const sigmaMax = mapping ? sigmas[0]! : sigmaModel.sigmaMax;
        const common = { sigmaMin, sigmaMax, noise: prefetcher.noise, schedule: baseSchedule, eta, sNoise: churn.sNoise ?? 1 };
        return sampler.name === "DPM fast"
          ? sampleDpmFast(x, mapping ? sigmas.length - 1 : input.steps, common)
          : sampleDpmAdaptive(x, common);
      }
      default:
        throw new InvalidSamplingParameter(input.fields?.sampler ?? "sampler_name", `sampler "${sampler.name}" has no implementation`);
    }
  };
  const run = (x: Float32Array): SamplerRun => inLatentScope(runWith(x, options));

  /**
   * The run's tree queries in the order the sampler announces them, found by running the sampler on a
   * one-element latent with a stand-in model and noise: the queries depend on the σ list only, never
   * on the latent. Undefined if the dry run fails (the tree then draws on request, as without it).
   */
  const plannedQueries = (): BrownianQueryList | undefined => {
    const queries: Array<readonly [number, number]> = [];
    const seen = new Set<string>();
    const one = (): Float32Array => new Float32Array(1);
    try {
      const dry = runWith(one(), { ...options, noise: one, noiseSampler: one });
      for (let r = dry.next(); !r.done;) {
        const request = r.value;
        for (const [sigma, sigmaNext] of request.upcoming?.queries ?? []) {
          const key = `${sigma} ${sigmaNext}`;
          if (!seen.has(key)) queries.push([sigma, sigmaNext]);
          seen.add(key);
        }
        const out = one();
        r = dry.next(request.kind === "eps" && request.needUncond ? { output: out, uncond: one() } : out);
      }
    } catch {
      return undefined;
    }
    return queries;
  };

  return {
    choice,
    sigmas,
    timesteps: undefined,
    steps: reportedSteps,
    promptScheduleSteps: promptScheduleSteps(sampler, input.steps),
    brownianRange,
    infotext,
    skipsUncond,
    switchesToRefiner,
    startLatent,
    run,
    drawAhead: (request, signal) => prefetcher.drawAhead(request.upcoming, signal),
    openNoiseAhead: (options) =>
      tree !== undefined
        ? new WorkerNoiseAhead(prefetcher, tree, {
            queries: plannedQueries,
            ...(options?.brownian !== undefined && { service: options.brownian }),
          })
        : new InThreadNoiseAhead(prefetcher),
    brownianQueries: () => (tree !== undefined ? plannedQueries() : undefined),
  };
}

/** img2img's noise multiplier: A1111's processing records it before the sampler is set up. */
function noiseMultiplierInfotext(s: SamplingSettings, img2img: boolean, infotext: Record<string, string | number | boolean>): void {
  if (img2img && s.initialNoiseMultiplier !== undefined && s.initialNoiseMultiplier !== 1) {
    infotext["Noise multiplier"] = s.initialNoiseMultiplier;
  }
}

type ChurnSetting = "sChurn" | "sTmin" | "sTmax" | "sNoise";
const CHURN_AND_NOISE: readonly ChurnSetting[] = ["sChurn", "sTmin", "sTmax", "sNoise"];
const NOISE_ONLY: readonly ChurnSetting[] = ["sNoise"];

/**
 * A1111's sampler_extra_params: the samplers it passes s_churn, s_tmin, s_tmax and s_noise to. The others
 * run with k-diffusion's defaults whatever the settings say (Euler a's s_noise included), as in A1111.
 */
const A1111_EXTRA_PARAMS: Readonly<Record<string, readonly ChurnSetting[]>> = {
  Euler: CHURN_AND_NOISE,
  Heun: CHURN_AND_NOISE,
  DPM2: CHURN_AND_NOISE,
  "DPM fast": NOISE_ONLY,
  "DPM2 a": NOISE_ONLY,
  "DPM++ 2S a": NOISE_ONLY,
  "DPM++ SDE": NOISE_ONLY,
  "DPM++ 2M SDE": NOISE_ONLY,
  "DPM++ 2M SDE Heun": NOISE_ONLY,
  "DPM++ 3M SDE": NOISE_ONLY,
};

const CHURN_INFOTEXT: Record<ChurnSetting, { key: string; default: number }> = {
  sChurn: { key: "Sigma churn", default: 0 },
  sTmin: { key: "Sigma tmin", default: 0 },
  sTmax: { key: "Sigma tmax", default: Infinity },
  sNoise: { key: "Sigma noise", default: 1 },
};

/** The churn settings the sampler takes, recorded in the infotext when not the default (A1111's initialize()). */
function churnSettings(
  samplerName: string,
  s: SamplingSettings,
  infotext: Record<string, string | number | boolean>,
): Partial<Record<ChurnSetting, number>> {
  const taken: Partial<Record<ChurnSetting, number>> = {};
  for (const name of A1111_EXTRA_PARAMS[samplerName] ?? []) {
    // s_tmax 0 means no upper bound.
    const value = name === "sTmax" && s.sTmax === 0 ? Infinity : s[name];
    if (value === undefined) continue;
    taken[name] = value;
    if (value !== CHURN_INFOTEXT[name].default) infotext[CHURN_INFOTEXT[name].key] = value;
  }
  return taken;
}

/** The infotext keys a run adds as it goes (PreparedSampling.skipsUncond), rather than its setup. */
export const RUN_INFOTEXT_KEYS: readonly string[] = [
  "Skip Early CFG",
  "NGMS",
  "NGMS all steps",
  // The refiner switch (the agent's denoise records the first three when it switches).
  "Hires refiner",
  "Refiner",
  "Refiner switch at",
  "Refiner switch by sampling steps",
];

/**
 * Overrides can make a σ list A1111 would run anyway, to a NaN or noisier image: a rho that overflows
 * the Karras ramp in float32, or a sigma_min above the model's σ_max. Refused here, naming the setting.
 */
function checkSigmaList(sigmas: Float32Array, s: SamplingSettings): void {
  if (!sigmas.every(Number.isFinite)) {
    const field = s.rho ? "override_settings.rho" : s.sigmaMin || s.sigmaMax ? "override_settings.sigma_min" : "scheduler";
    throw new InvalidSamplingParameter(field, "the schedule's sigmas are not finite with these settings");
  }
  for (let i = 1; i < sigmas.length; i++) {
    if (!(sigmas[i]! <= sigmas[i - 1]!)) {
      const field = s.sigmaMin ? "override_settings.sigma_min" : s.sigmaMax ? "override_settings.sigma_max" : "scheduler";
      throw new InvalidSamplingParameter(
        field,
        `the schedule's sigmas rise from ${sigmas[i - 1]} to ${sigmas[i]}: sigma_min must be below sigma_max`,
      );
    }
  }
}

/**
 * A1111's CFGDenoiser rule for running a call without the negative prompt. `totalCalls` is its
 * `total_steps` (the run's steps, doubled for second-order samplers); a timestep sampler's denoiser
 * compares its timestep, not σ, with s_min_uncond, as A1111's does.
 */
function uncondSkipRule(
  s: SamplingSettings,
  totalCalls: number,
  timestepSampler: boolean,
  infotext: Record<string, string | number | boolean>,
): PreparedSampling["skipsUncond"] {
  const early = s.skipEarlyCond ?? 0;
  const minUncond = s.sMinUncond ?? 0;
  if (early === 0 && !(minUncond > 0)) return () => false;
  // torch compares the float32 σ tensor with the option in float32.
  const below = f32(minUncond);
  const everyCall = s.sMinUncondAll ?? false;
  return (request) => {
    if (early !== 0 && request.call / totalCalls <= early) {
      infotext["Skip Early CFG"] = early;
      return true;
    }
    if ((request.call % 2 === 1 || everyCall) && minUncond > 0 && (timestepSampler ? request.timestep : request.sigma) < below) {
      infotext["NGMS"] = minUncond;
      if (everyCall) infotext["NGMS all steps"] = true;
      return true;
    }
    return false;
  };
}

/**
 * A1111's apply_refiner switch test. By σ it finds the model timestep nearest the call's σ in the model's
 * σ table (the first of equals, as torch.argmin; the difference taken in the table's precision) and
 * compares (999 − t)/1000, a float32 tensor, with the fraction in float32; timestep samplers hand it
 * their timestep. By sample steps it compares calls made / total calls in double.
 */
function refinerSwitchRule(
  refiner: PrepareSamplingInput["refiner"],
  s: SamplingSettings,
  totalCalls: number,
  table: DiscreteSchedule | undefined,
  infotext: Record<string, string | number | boolean>,
): PreparedSampling["switchesToRefiner"] {
  if (refiner === undefined) return () => false;
  const at = refiner.switchAt;
  if (s.refinerSwitchBySampleSteps ?? false) {
    return (request) => {
      infotext["Refiner switch by sampling steps"] = true;
      return at === undefined || request.call / totalCalls >= at;
    };
  }
  const atF32 = at === undefined ? undefined : f32(at);
  return (request) => {
    if (atF32 === undefined) return true;
    const t = table === undefined ? Math.max(0, Math.trunc(request.timestep)) : nearestTimestep(table, request.sigma);
    return f32((999 - t) / 1000) >= atF32;
  };
}

function nearestTimestep(table: DiscreteSchedule, sigma: number): number {
  const sigmas = table.sigmas;
  const x = table.round(f32(sigma));
  let best = 0;
  let bestDist = Infinity;
  for (let i = 0; i < sigmas.length; i++) {
    const d = Math.abs(table.round(sigmas[i]! - x));
    if (d < bestDist) {
      bestDist = d;
      best = i;
    }
  }
  return best;
}

/** img2img: A1111 multiplies the first noise draw by initial_noise_multiplier before using it. */
function scaleInitialNoise(noise: Float32Array, multiplier: number | undefined): Float32Array {
  if (multiplier === undefined || multiplier === 1) return noise;
  const m = f32(multiplier);
  return noise.map((v) => v * m);
}

function prepareTimestepSampler(
  input: PrepareSamplingInput,
  choice: ResolvedSamplerChoice,
  schedule: DiscreteSchedule,
  scheduleSteps: number,
  tEnc: number | undefined,
  reportedSteps: number,
  infotext: Record<string, string | number | boolean>,
  skipsUncond: PreparedSampling["skipsUncond"],
): Omit<PreparedSampling, "switchesToRefiner"> {
  const s = input.settings ?? {};
  const { sampler } = choice;
  let discard = sampler.discardNextToLastSigma ?? false;
  if (s.alwaysDiscardNextToLastSigma && !discard) {
    discard = true;
    infotext["Discard penultimate sigma"] = true;
  }
  const all = ddimTimesteps(scheduleSteps + (discard ? 1 : 0), schedule.alphasCumprod.length);
  const timesteps = tEnc === undefined ? all : all.slice(0, tEnc);
  if (timesteps.length < 1) throw new InvalidSamplingParameter("denoising_strength", "the img2img schedule has no steps left");
  const isDdim = sampler.name === "DDIM" || sampler.name === "DDIM CFG++";
  const eta = isDdim ? (s.eta ?? s.etaDdim ?? 0) : 0;
  // A1111's order: timesteps, the img2img start latent, then initialize().
  if (tEnc !== undefined && (s.img2imgExtraNoise ?? 0) > 0) infotext["Extra noise"] = s.img2imgExtraNoise!;
  if (isDdim && eta !== 0) infotext["Eta DDIM"] = eta;
  const sigmas = Float32Array.from(timesteps, (t) => schedule.sigmas[t]!).reverse();
  const prefetcher = new NoisePrefetcher(input.noise);

  const startLatent = (noise: Float32Array, initLatent?: Float32Array): Float32Array => {
    if (tEnc === undefined) return noise.slice();
    if (initLatent === undefined || initLatent.length !== noise.length)
      throw new RangeError("img2img needs an init latent of the noise's length");
    // torch.sqrt on ᾱ's own tensor (float16 when it was downcast); x and noise stay float32.
    const round = schedule.round;
    const a = schedule.alphasCumprod[all[tEnc]!]!;
    const sqrtA = round(f32(Math.sqrt(a)));
    const sqrtOneMinusA = round(f32(Math.sqrt(round(1 - a))));
    const extra = f32(s.img2imgExtraNoise ?? 0);
    const scaled = scaleInitialNoise(noise, s.initialNoiseMultiplier);
    const out = new Float32Array(noise.length);
    for (let k = 0; k < out.length; k++) {
      let v = f32(initLatent[k]! * sqrtA) + f32(scaled[k]! * sqrtOneMinusA);
      if (extra > 0) v = f32(v + f32(f32(scaled[k]! * extra) * sqrtA));
      out[k] = v;
    }
    return out;
  };

  // UniPC's coefficients depend on the times alone: worked out here, once for every run of this sampling
  // (planUniPc also refuses fewer steps than the order, naming `steps`).
  const uniPcPlan =
    sampler.name === "UniPC"
      ? planUniPc({
          timesteps,
          schedule,
          isImg2img: tEnc !== undefined,
          ...(s.uniPcVariant !== undefined && { variant: s.uniPcVariant }),
          ...(s.uniPcSkipType !== undefined && { skipType: s.uniPcSkipType }),
          ...(s.uniPcOrder !== undefined && { order: s.uniPcOrder }),
          ...(s.uniPcLowerOrderFinal !== undefined && { lowerOrderFinal: s.uniPcLowerOrderFinal }),
        })
      : undefined;
  const run = (x: Float32Array): SamplerRun => inLatentScope(runTimesteps(x));
  const runTimesteps = (x: Float32Array): SamplerRun => {
    switch (sampler.name) {
      case "DDIM":
        return sampleDdim(x, { timesteps, noise: prefetcher.noise, schedule, eta });
      case "DDIM CFG++":
        return sampleDdimCfgpp(x, { timesteps, noise: prefetcher.noise, schedule, eta });
      case "PLMS":
        return samplePlms(x, { timesteps, noise: prefetcher.noise, schedule });
      case "UniPC":
        return runUniPc(x, uniPcPlan!);
      default:
        throw new InvalidSamplingParameter(input.fields?.sampler ?? "sampler_name", `sampler "${sampler.name}" has no implementation`);
    }
  };

  return {
    choice,
    sigmas,
    timesteps,
    steps: reportedSteps,
    promptScheduleSteps: promptScheduleSteps(sampler, input.steps),
    brownianRange: undefined,
    infotext,
    skipsUncond,
    startLatent,
    run,
    drawAhead: (request, signal) => prefetcher.drawAhead(request.upcoming, signal),
    openNoiseAhead: () => new InThreadNoiseAhead(prefetcher),
  };
}
