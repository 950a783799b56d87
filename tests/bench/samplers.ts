// Sampler + schedule + RNG cost per step for a 4×128×128 latent (1024×1024 px), model evaluation
// excluded, for each of the 20 samplers (issue 4; target ≤ 0.3 ms, 1% of a 30 ms UNet step):
//   "<sampler> a_sync":       CPU ms per step with every noise draw and Brownian-tree query made
//                             synchronously when the sampler asks for it;
//   "<sampler> b_critical":   ms per step on the critical path (wall time minus the simulated model
//                             time) with a 30 ms model in a worker thread and the noise drawn ahead
//                             during it, including the harness's own copies and messages;
//   "<sampler> b_in_sampler": the part of b_critical spent inside the sampler itself — what the target
//                             applies to (samplers_in_sampler_within_0.3ms_per_step / _per_call count them);
//   "<sampler> b_in_sampler_per_call": b_in_sampler per model call rather than per step, since the target is
//                             framed against one UNet evaluation and Heun-style samplers make two per step;
//   "<sampler> b_pass_floor_per_call": measured in the same rounds as b_in_sampler: the same model calls
//                             with one bare pass after each answer (read x and the answer, write the next
//                             x over x, resident, as Euler's step: no schedule, no noise), the least a sampler
//                             update costs on this machine right after a model call;
//   "<sampler> b_in_sampler_over_floor": b_in_sampler_per_call over b_pass_floor_per_call: how many bare
//                             passes' worth the sampler costs per model call, which carries from machine
//                             to machine, and through a machine's slower and faster minutes, where
//                             milliseconds do not (this VM's floor doubled halfway through one run). A
//                             step of a sampler making two model calls costs at least two passes;
//   "pass_floor_ms_per_call_median": the median of the samplers' b_pass_floor_per_call over the run (the upper
//                             middle one for an even count);
//   "<sampler> b_in_sampler_hot": b_in_sampler with a model that answers at once instead of after 30 ms,
//                             measured in the same rounds: the sampler's work with its latents, code and
//                             tables still in the caches (samplers_hot_within_0.3ms_per_step counts them);
//   "page_touch_us_hot" / "page_touch_us_after_30ms_idle": what the machine charges per 4 KB page for the
//                             first read of each page of three latents, right after reading them and after the
//                             thread waited idle for 30 ms, as it waits for the model. Where the second is
//                             many times the first, the pause itself, not the code, sets b_in_sampler: a
//                             step reading two latents touches 128 pages;
//   "<sampler> b_in_sampler_copying": b_in_sampler with latent residency off, side by side: every kernel
//                             copies its operands into WebAssembly memory and its results out;
//   "<sampler> b_no_prefetch": b_critical without drawing ahead, measured side by side;
//   "<sampler> b_tree_in_thread": SDE samplers only: b_critical with the Brownian tree drawn ahead on the
//                             JS thread instead of in its own worker thread (b_critical), side by side;
//   "<sampler> b_longest_block" / "b_longest_block_tree_in_thread": the longest synchronous stretch of
//                             the driver's JS thread (how long the agent's event loop is held up);
//   "<sampler> b_first_wait": SDE samplers: the wait for the tree's first answer of a run; the tree's
//                             threads are one long-lived service for the whole bench (as a pipeline's),
//                             already running, so this is the run's own start (its trees, first draws);
//   "<sampler> b_critical_after_start": SDE samplers: b_critical without b_first_wait;
//   "<sampler> b_worker_boot": SDE samplers: the service's start-up (tree thread + helpers; under tsx it
//                             registers tsx and compiles the sources), measured once per bench and paid
//                             by a pipeline's first SDE run only;
//   "<sampler> c_critical":   the agent's arrangement since renders run in their pipeline's thread: the
//                             30 ms model blocks the sampler's own thread, so everything done between
//                             model calls on that thread is on the critical path; plain noise comes from
//                             a noise thread and the tree from the same service, drawn during the model call;
//   "<sampler> c_first_wait" / "c_after_start": the first wait for noise made elsewhere (on threads
//                             already running), and c_critical without it.
// b_critical and b_no_prefetch include the harness's own latent copies and messages (harness_floor_ms per
// step, measured with a do-nothing sampler) and, on a loaded machine, thread wake-up delays. Each number is
// the fastest of `repeats` runs; load_1min is the machine's load when the run started.
import { loadavg } from "node:os";
import { benchSamplers, pageTouchMicros } from "../../gpu-agent/src/sampling/bench.js";
import { median } from "./stats.js";

export async function benchSamplerOverhead(
  opts: { steps?: number; modelMs?: number; samplers?: string[]; repeats?: number } = {},
): Promise<Record<string, number>> {
  const out: Record<string, number> = { load_1min: loadavg()[0] ?? 0 };
  const results = await benchSamplers({
    steps: opts.steps ?? 20,
    modelMs: opts.modelMs ?? 30,
    repeats: opts.repeats ?? 2,
    ...(opts.samplers !== undefined && { samplers: opts.samplers }),
  });
  let floor = 0;
  let setup = 0;
  let meetingPerStep = 0;
  let meetingPerCall = 0;
  let meetingInPipeline = 0;
  let meetingHot = 0;
  for (const r of results) {
    out[`${r.sampler} a_sync`] = r.syncMsPerStep;
    out[`${r.sampler} b_critical`] = r.criticalMsPerStep!;
    out[`${r.sampler} b_in_sampler`] = r.criticalInSamplerMsPerStep!;
    const perCall = (r.criticalInSamplerMsPerStep! * r.steps) / r.modelCalls;
    out[`${r.sampler} b_in_sampler_per_call`] = perCall;
    out[`${r.sampler} b_pass_floor_per_call`] = r.passFloorMsPerCall!;
    out[`${r.sampler} b_in_sampler_over_floor`] = perCall / r.passFloorMsPerCall!;
    out[`${r.sampler} b_in_sampler_hot`] = r.hotInSamplerMsPerStep!;
    if (r.hotInSamplerMsPerStep! <= 0.3) meetingHot++;
    out[`${r.sampler} b_in_sampler_copying`] = r.criticalInSamplerCopyingMsPerStep!;
    out[`${r.sampler} b_no_prefetch`] = r.criticalNoPrefetchMsPerStep!;
    out[`${r.sampler} b_longest_block`] = r.longestBlockMs!;
    if (r.criticalInThreadMsPerStep !== undefined) {
      out[`${r.sampler} b_tree_in_thread`] = r.criticalInThreadMsPerStep;
      out[`${r.sampler} b_longest_block_tree_in_thread`] = r.longestBlockInThreadMs!;
      out[`${r.sampler} b_first_wait`] = r.firstWaitMs!;
      out[`${r.sampler} b_critical_after_start`] = r.criticalAfterStartMsPerStep!;
      out[`${r.sampler} b_worker_boot`] = r.workerBootMs!;
    }
    out[`${r.sampler} c_critical`] = r.pipelineCriticalMsPerStep!;
    if (r.pipelineFirstWaitMs! > 1 || r.workerBootMs !== undefined) {
      out[`${r.sampler} c_first_wait`] = r.pipelineFirstWaitMs!;
      out[`${r.sampler} c_after_start`] = r.pipelineAfterStartMsPerStep!;
    }
    if (r.pipelineCriticalMsPerStep! <= 0.3) meetingInPipeline++;
    floor = Math.max(floor, r.floorMsPerStep!);
    setup = Math.max(setup, r.setupMs);
    if (r.criticalInSamplerMsPerStep! <= 0.3) meetingPerStep++;
    if (perCall <= 0.3) meetingPerCall++;
  }
  out["harness_floor_ms"] = floor;
  out["pass_floor_ms_per_call_median"] = median(results.map((r) => r.passFloorMsPerCall!));
  out["setup_ms_max"] = setup;
  // b_in_sampler, not b_critical: b_critical also holds the harness's own copies and messages (harness_floor_ms).
  out["samplers_in_sampler_within_0.3ms_per_step"] = meetingPerStep;
  out["samplers_in_sampler_within_0.3ms_per_call"] = meetingPerCall;
  out["samplers_c_within_0.3ms"] = meetingInPipeline;
  out["samplers_hot_within_0.3ms_per_step"] = meetingHot;
  // After the samplers, so that the bench's threads are idle; each is the median of 21 rounds.
  out["page_touch_us_hot"] = pageTouchMicros(0);
  out["page_touch_us_after_30ms_idle"] = pageTouchMicros(30);
  out["samplers"] = results.length;
  return out;
}
