/**
 * A model request's answer from the UNet's outputs in one kernel pass: A1111's CFG combine
 * (combine_denoised: uncond + Σ_j (cond_j − uncond)·(w_j·cfgScale)) of the outputs, each first turned
 * into a denoised latent for k-diffusion requests (eps: x − σ·eps; v: v·c_out + x·c_skip). The same float32
 * roundings as the scalar loops (epsToDenoised / vToDenoised, then conditioning's combineDenoised), so the
 * same bits, without their intermediate arrays: at 4×128×128 with one prompt those loops made three
 * latent-sized arrays and five passes per call on the pipeline thread.
 */
import { e, Kernel, type Expr } from "./kernels.js";
import { vScalings } from "./sigmas.js";

const f32 = Math.fround;

/** How a k-diffusion request's outputs become denoised latents (absent for eps requests, combined as they are). */
export interface ToDenoised {
  /** The request's latent (unscaled). */
  x: Float32Array;
  sigma: number;
  prediction: "eps" | "v";
}

const kernels = new Map<string, Kernel>();

function combineKernel(conds: number, prediction: ToDenoised["prediction"] | undefined): Kernel {
  const key = `${prediction ?? "raw"}/${conds}`;
  let kernel = kernels.get(key);
  if (kernel !== undefined) return kernel;
  // Operands: [x,] uncond, cond₁…; params: [c_out[, c_skip],] w₁·cfg….
  const first = prediction === undefined ? 0 : 1;
  const scalesAt = prediction === undefined ? 0 : prediction === "eps" ? 1 : 2;
  const x = e.in(0);
  const denoised = (k: number): Expr => {
    const output = e.in(first + k);
    if (prediction === undefined) return output;
    return prediction === "eps" ? e.add(x, e.mul(output, e.param(0))) : e.add(e.mul(output, e.param(0)), e.mul(x, e.param(1)));
  };
  const uncond = denoised(0);
  let combined = uncond;
  for (let j = 0; j < conds; j++) combined = e.add(combined, e.mul(e.sub(denoised(1 + j), uncond), e.param(scalesAt + j)));
  kernel = new Kernel({ inputs: first + 1 + conds, params: scalesAt + conds, outputs: [combined] });
  kernels.set(key, kernel);
  return kernel;
}

/**
 * uncond + Σ_j (cond_j − uncond)·f32(w_j·cfgScale) into `out` (which may be the sampler's slot,
 * ModelRequest.into), each output first made denoised when `toDenoised` is given.
 */
export function cfgCombine(
  uncond: Float32Array,
  conds: ReadonlyArray<{ output: Float32Array; weight: number }>,
  cfgScale: number,
  toDenoised?: ToDenoised,
  out: Float32Array = new Float32Array(uncond.length),
): Float32Array {
  const n = uncond.length;
  for (const c of conds) {
    if (c.output.length !== n) throw new RangeError(`cond output has ${c.output.length} values, uncond ${n}`);
  }
  if (out.length !== n) throw new RangeError("output length differs from the uncond output");
  // The scale as Python forms it (float64 product), then float32 as torch multiplies by it.
  const scales = conds.map((c) => f32(c.weight * cfgScale));
  if (toDenoised === undefined) {
    combineKernel(conds.length, undefined).run([out], [uncond, ...conds.map((c) => c.output)], scales);
    return out;
  }
  const { x, sigma, prediction } = toDenoised;
  if (x.length !== n) throw new RangeError(`latent has ${x.length} values, the outputs ${n}`);
  let params: number[];
  if (prediction === "eps") {
    params = [-f32(sigma), ...scales];
  } else {
    const { cOut, cSkip } = vScalings(sigma);
    params = [cOut, cSkip, ...scales];
  }
  combineKernel(conds.length, prediction).run([out], [x, uncond, ...conds.map((c) => c.output)], params);
  return out;
}
