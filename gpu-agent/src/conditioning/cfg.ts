/**
 * A1111's combine_denoised for one image (§2.6):
 *   denoised = uncond + Σ_j (cond_j − uncond) · (w_j · cfgScale)
 * evaluated in float32 the way torch does it (each difference and product rounded to float32, the
 * scale w_j·cfgScale formed in float64 first, as Python multiplies the two floats). The agent's denoise
 * loop uses the kernel form with the same bits (sampling's cfgCombine); this scalar loop is its reference.
 */
export function combineDenoised(
  conds: ReadonlyArray<{ denoised: Float32Array; weight: number }>,
  denoisedUncond: Float32Array,
  cfgScale: number,
  out: Float32Array = new Float32Array(denoisedUncond.length),
): Float32Array {
  for (const c of conds) {
    if (c.denoised.length !== denoisedUncond.length) {
      throw new RangeError(`cond output has ${c.denoised.length} values, uncond ${denoisedUncond.length}`);
    }
  }
  if (out.length !== denoisedUncond.length) throw new RangeError("output length differs from the uncond output");
  // Writing into the uncond buffer itself is allowed; keep an unmodified copy to subtract.
  const uncond = out === denoisedUncond ? denoisedUncond.slice() : denoisedUncond;
  out.set(uncond);
  for (const { denoised, weight } of conds) {
    const scale = Math.fround(weight * cfgScale);
    for (let i = 0; i < out.length; i++) {
      out[i] = out[i]! + Math.fround(Math.fround(denoised[i]! - uncond[i]!) * scale);
    }
  }
  return out;
}
