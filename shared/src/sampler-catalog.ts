// A1111 v1.10's sampler and schedule-type names, aliases and options, as data. Both the coordinator
// (to validate a job at Submit) and the agent (to run it) resolve names through this one table.

export interface SamplerEntry {
  /** The display name A1111 writes into the infotext ("Sampler: …"). */
  readonly name: string;
  readonly aliases: readonly string[];
  /** The schedule type "Automatic" resolves to; undefined = the model's uniform discrete schedule. */
  readonly defaultScheduler?: SchedulerId;
  readonly secondOrder?: boolean;
  readonly discardNextToLastSigma?: boolean;
  readonly usesEnsd?: boolean;
  readonly brownianNoise?: boolean;
  /** DDIM/PLMS/UniPC/DDIM CFG++ walk timesteps instead of a sigma schedule. */
  readonly timestepSampler?: boolean;
  /**
   * UNet evaluations a sampling step takes, about (default 1): the second-order samplers evaluate twice
   * (their last step, or PLMS's first, one more or less); DPM adaptive's count is its own, near 2.
   */
  readonly modelCallsPerStep?: number;
}

export type SchedulerId =
  | "automatic"
  | "uniform"
  | "karras"
  | "exponential"
  | "polyexponential"
  | "sgm_uniform"
  | "kl_optimal"
  | "align_your_steps"
  | "simple"
  | "normal"
  | "ddim"
  | "beta";

export interface SchedulerEntry {
  readonly id: SchedulerId;
  readonly label: string;
  readonly aliases: readonly string[];
}

// In A1111's UI order (§4.2 of the behaviour spec).
export const SAMPLERS: readonly SamplerEntry[] = [
  { name: "DPM++ 2M", aliases: ["k_dpmpp_2m"], defaultScheduler: "karras" },
  { name: "DPM++ SDE", aliases: ["k_dpmpp_sde"], defaultScheduler: "karras", secondOrder: true, brownianNoise: true, modelCallsPerStep: 2 },
  { name: "DPM++ 2M SDE", aliases: ["k_dpmpp_2m_sde"], defaultScheduler: "exponential", brownianNoise: true },
  { name: "DPM++ 2M SDE Heun", aliases: ["k_dpmpp_2m_sde_heun"], defaultScheduler: "exponential", brownianNoise: true },
  { name: "DPM++ 2S a", aliases: ["k_dpmpp_2s_a"], defaultScheduler: "karras", usesEnsd: true, secondOrder: true, modelCallsPerStep: 2 },
  {
    name: "DPM++ 3M SDE",
    aliases: ["k_dpmpp_3m_sde"],
    defaultScheduler: "exponential",
    discardNextToLastSigma: true,
    brownianNoise: true,
  },
  { name: "Euler a", aliases: ["k_euler_a", "k_euler_ancestral"], usesEnsd: true },
  { name: "Euler", aliases: ["k_euler"] },
  { name: "LMS", aliases: ["k_lms"] },
  { name: "Heun", aliases: ["k_heun"], secondOrder: true, modelCallsPerStep: 2 },
  { name: "DPM2", aliases: ["k_dpm_2"], defaultScheduler: "karras", discardNextToLastSigma: true, secondOrder: true, modelCallsPerStep: 2 },
  {
    name: "DPM2 a",
    aliases: ["k_dpm_2_a"],
    defaultScheduler: "karras",
    discardNextToLastSigma: true,
    usesEnsd: true,
    secondOrder: true,
    modelCallsPerStep: 2,
  },
  { name: "DPM fast", aliases: ["k_dpm_fast"], usesEnsd: true },
  { name: "DPM adaptive", aliases: ["k_dpm_ad"], usesEnsd: true, modelCallsPerStep: 2 },
  { name: "Restart", aliases: ["restart"], defaultScheduler: "karras", secondOrder: true, modelCallsPerStep: 2 },
  { name: "DDIM", aliases: ["ddim"], timestepSampler: true },
  { name: "DDIM CFG++", aliases: ["ddim_cfgpp"], timestepSampler: true },
  { name: "PLMS", aliases: ["plms"], timestepSampler: true },
  { name: "UniPC", aliases: ["unipc"], timestepSampler: true },
  { name: "LCM", aliases: ["k_lcm"] },
];

export const SCHEDULERS: readonly SchedulerEntry[] = [
  { id: "automatic", label: "Automatic", aliases: [] },
  { id: "uniform", label: "Uniform", aliases: [] },
  { id: "karras", label: "Karras", aliases: [] },
  { id: "exponential", label: "Exponential", aliases: [] },
  { id: "polyexponential", label: "Polyexponential", aliases: [] },
  { id: "sgm_uniform", label: "SGM Uniform", aliases: ["SGMUniform"] },
  { id: "kl_optimal", label: "KL Optimal", aliases: [] },
  { id: "align_your_steps", label: "Align Your Steps", aliases: [] },
  { id: "simple", label: "Simple", aliases: [] },
  { id: "normal", label: "Normal", aliases: [] },
  { id: "ddim", label: "DDIM", aliases: [] },
  { id: "beta", label: "Beta", aliases: [] },
];

/** The A1111 API's default sampler when none is named. */
export const DEFAULT_SAMPLER_NAME = "Euler";

export interface ResolvedSampler {
  readonly sampler: SamplerEntry;
  /** The schedule type chosen by the user, "automatic" when none was named. */
  readonly scheduler: SchedulerId;
  /** What "Automatic" became: the sampler's default, or undefined for the uniform discrete schedule. */
  readonly effectiveScheduler: SchedulerId | undefined;
}

export class UnknownNameError extends Error {
  constructor(
    readonly field: "sampler_name" | "scheduler" | "hr_sampler_name" | "hr_scheduler",
    readonly value: string,
  ) {
    super(`${field}: unknown ${field.includes("sampler_name") ? "sampler" : "schedule type"} "${value}"`);
    this.name = "UnknownNameError";
  }
}

const norm = (s: string): string => s.trim().toLowerCase();

export function findSampler(name: string): SamplerEntry | undefined {
  const n = norm(name);
  return SAMPLERS.find((s) => norm(s.name) === n || s.aliases.some((a) => norm(a) === n));
}

export function findScheduler(name: string): SchedulerEntry | undefined {
  const n = norm(name);
  return SCHEDULERS.find((s) => s.id === n || norm(s.label) === n || s.aliases.some((a) => norm(a) === n));
}

/**
 * A1111's get_sampler_and_scheduler: a legacy combined name such as "DPM++ 2M Karras" is split into
 * sampler + schedule type; a schedule equal to the sampler's default becomes "Automatic".
 */
export function resolveSampler(
  samplerName: string,
  schedulerName = "",
  fields: { sampler: "sampler_name" | "hr_sampler_name"; scheduler: "scheduler" | "hr_scheduler" } = {
    sampler: "sampler_name",
    scheduler: "scheduler",
  },
): ResolvedSampler {
  const raw = samplerName.trim() === "" ? DEFAULT_SAMPLER_NAME : samplerName;
  let sampler = findSampler(raw);
  let scheduler: SchedulerId = "automatic";
  if (schedulerName.trim() !== "") {
    const s = findScheduler(schedulerName);
    if (!s) throw new UnknownNameError(fields.scheduler, schedulerName);
    scheduler = s.id;
  }
  if (!sampler) {
    // Try "<sampler> <schedule label|name|alias>", longest sampler prefix first.
    for (const sch of SCHEDULERS) {
      for (const suffix of [sch.label, sch.id, ...sch.aliases]) {
        if (norm(raw).endsWith(" " + norm(suffix))) {
          const base = findSampler(raw.slice(0, raw.length - suffix.length - 1));
          if (base) {
            sampler = base;
            if (schedulerName.trim() === "") scheduler = sch.id;
          }
        }
      }
      if (sampler) break;
    }
  }
  if (!sampler) throw new UnknownNameError(fields.sampler, samplerName);
  if (scheduler !== "automatic" && scheduler === sampler.defaultScheduler) scheduler = "automatic";
  const effectiveScheduler = scheduler === "automatic" ? sampler.defaultScheduler : scheduler;
  return { sampler, scheduler, effectiveScheduler };
}

export function schedulerLabel(id: SchedulerId): string {
  return SCHEDULERS.find((s) => s.id === id)?.label ?? id;
}

/** A sampler's options as A1111's /sdapi/v1/samplers reports them (string values, set flags only). */
export function samplerApiOptions(e: SamplerEntry): Record<string, string> {
  const o: Record<string, string> = {};
  if (e.defaultScheduler !== undefined) o["scheduler"] = e.defaultScheduler;
  if (e.secondOrder) o["second_order"] = "True";
  if (e.discardNextToLastSigma) o["discard_next_to_last_sigma"] = "True";
  if (e.brownianNoise) o["brownian_noise"] = "True";
  if (e.usesEnsd) o["uses_ensd"] = "True";
  if (e.timestepSampler) o["timestep_sampler"] = "True";
  return o;
}
