// The agent's latent-sized arithmetic around each UNet call at 4×128×128 (1024×1024 px), on the pipeline
// thread's critical path: the UNet input (x·c_in) and the request's answer (eps → denoised for uncond and
// one prompt, then A1111's CFG combine), as the float32 kernels the denoise loop uses (scaleLatent, cfgCombine) and as
// the scalar loops they replace (sigmas.ts and conditioning/cfg.ts, each making its own arrays), side by
// side, alternating call by call. Medians in ms per call.
import { combineDenoised } from "../../gpu-agent/src/conditioning/cfg.js";
import { allocateResident, freeResident } from "../../gpu-agent/src/sampling/kernels.js";
import { cfgCombine } from "../../gpu-agent/src/sampling/cfg-combine.js";
import { cIn, epsToDenoised, scaleLatent } from "../../gpu-agent/src/sampling/sigmas.js";
import { median } from "./stats.js";

export function benchModelIo(opts: { calls?: number } = {}): Record<string, number> {
  const calls = opts.calls ?? 300;
  const plane = 4 * 128 * 128;
  const sigma = 3.2;
  // The sampler's latent and answer slot live in the kernels' memory, as in a run.
  const x = allocateResident(plane)!;
  const into = allocateResident(plane)!;
  try {
    for (let i = 0; i < plane; i++) x[i] = Math.sin(i) * 2;
    // The batch's UNet output: uncond and cond rows.
    const out = Float32Array.from({ length: 2 * plane }, (_, i) => Math.cos(i) * 0.8);
    const scaled = new Float32Array(plane);
    const times = { loops: [] as number[], kernels: [] as number[] };
    for (let r = 0; r < calls * 2 + 20; r++) {
      const t = performance.now();
      if (r % 2 === 0) {
        const s = cIn(sigma);
        const input = new Float32Array(plane);
        for (let i = 0; i < plane; i++) input[i] = x[i]! * s;
        // Views of the batch's rows on both sides: only the arithmetic differs.
        const dU = epsToDenoised(x, out.subarray(0, plane), sigma);
        const dC = epsToDenoised(x, out.subarray(plane), sigma);
        combineDenoised([{ denoised: dC, weight: 1 }], dU, 7);
      } else {
        scaleLatent(x, cIn(sigma), scaled);
        cfgCombine(out.subarray(0, plane), [{ output: out.subarray(plane), weight: 1 }], 7, { x, sigma, prediction: "eps" }, into);
      }
      const ms = performance.now() - t;
      if (r >= 20) (r % 2 === 0 ? times.loops : times.kernels).push(ms);
    }
    const loops = median(times.loops);
    const kernels = median(times.kernels);
    return { scalar_loops_ms_per_call: loops, kernels_ms_per_call: kernels, loops_over_kernels: loops / kernels };
  } finally {
    freeResident(x);
    freeResident(into);
  }
}
