/** Helpers that reproduce torch's float32 tensor arithmetic one rounding at a time. */

export const f32 = Math.fround;

/**
 * `torch.linspace(start, end, n)` in float32 as torch's CUDA kernel (and its scalar CPU path) computes it:
 * step = (end − start)/(n − 1) in float32; the first half counts up from start, the second half
 * counts down from end.
 */
export function linspaceF32(start: number, end: number, n: number): Float32Array {
  const out = new Float32Array(n);
  if (n === 0) return out;
  const a = f32(start);
  const b = f32(end);
  if (n === 1) {
    out[0] = a;
    return out;
  }
  const step = f32(f32(b - a) / (n - 1));
  const halfway = Math.floor(n / 2);
  for (let i = 0; i < n; i++) {
    out[i] = i < halfway ? f32(a + f32(step * i)) : f32(b - f32(step * (n - 1 - i)));
  }
  return out;
}

/** `numpy.linspace(start, stop, num)` in float64 (step form, last value pinned to stop). */
export function linspaceF64(start: number, stop: number, num: number): Float64Array {
  const out = new Float64Array(num);
  if (num === 0) return out;
  if (num === 1) {
    out[0] = start;
    return out;
  }
  const div = num - 1;
  const step = (stop - start) / div;
  for (let i = 0; i < num; i++) out[i] = start + i * step;
  out[num - 1] = stop;
  return out;
}

/** `numpy.interp` for increasing `xp`. */
export function interp(x: number, xp: ArrayLike<number>, fp: ArrayLike<number>): number {
  const n = xp.length;
  if (x <= xp[0]!) return fp[0]!;
  if (x >= xp[n - 1]!) return fp[n - 1]!;
  let hi = 1;
  while (xp[hi]! < x) hi++;
  const lo = hi - 1;
  if (x === xp[hi]) return fp[hi]!;
  const slope = (fp[hi]! - fp[lo]!) / (xp[hi]! - xp[lo]!);
  return slope * (x - xp[lo]!) + fp[lo]!;
}
