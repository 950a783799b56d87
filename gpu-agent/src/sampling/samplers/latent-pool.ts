/**
 * Fresh latent arrays for the samplers' step results, allocated while the model runs instead of on the
 * sampler's critical path.
 *
 * A sampler cannot reuse its output arrays: each one is yielded to the driver (or returned), and a
 * yielded array is never written again. So every step needs a new 4×128×128 array, and allocating one
 * costs far more than the step's arithmetic: a 256 KB zeroed backing store is fresh memory whose pages
 * fault in on first write, and the garbage it leaves drives GC. Before a sampler yields a model
 * request it asks for the arrays it will need once the answer arrives; they are allocated and paged in
 * from a setImmediate callback, which runs while the driver waits for the model. A synchronous driver
 * never lets that callback run in time, and then `freshLatent` simply allocates, as before.
 *
 * Every array handed out is new (zero-filled, never given out before), so this changes no value and no
 * ownership rule.
 */

/**
 * Spares kept per length, and lengths kept: bounds what the pool holds between runs (at most 16 × 256 KB
 * per length at 1024²; a single image leaves 2–3). Requests made in the same turn add up, so a batch of
 * images that all post their model calls before the model runs gets arrays for each.
 */
const MAX_SPARES = 16;
const MAX_LENGTHS = 4;

const spares = new Map<number, Float32Array[]>();
const wanted = new Map<number, number>();
let scheduled = false;

/** A new zero-filled Float32Array of `length` values, from the pool when one is ready. */
export function freshLatent(length: number): Float32Array {
  return spares.get(length)?.pop() ?? new Float32Array(length);
}

/** Asks for `count` fresh arrays of `length` to be ready the next time the sampler runs. */
export function allocateAhead(length: number, count: number): void {
  if (length < MIN_POOLED) return;
  wanted.set(length, Math.min(MAX_SPARES, (wanted.get(length) ?? 0) + count));
  if (scheduled) return;
  scheduled = true;
  setImmediate(fill).unref();
}

/** Small latents are cheap to allocate on the spot (below the allocator's separate mapping of large blocks). */
const MIN_POOLED = 16384;

function fill(): void {
  scheduled = false;
  for (const [length, count] of wanted) {
    let list = spares.get(length);
    if (list === undefined) {
      if (spares.size >= MAX_LENGTHS) spares.delete(spares.keys().next().value!);
      list = [];
      spares.set(length, list);
    }
    while (list.length < count) {
      const array = new Float32Array(length);
      // Writing pages them in now; a zero fill keeps the array exactly what `new` gives.
      array.fill(0);
      list.push(array);
    }
  }
  wanted.clear();
}

/** Drops the spares (tests; or to give the memory back). */
export function clearLatentPool(): void {
  spares.clear();
  wanted.clear();
}
