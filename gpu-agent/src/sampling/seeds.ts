/** Seed bookkeeping of a job (A1111 processing.py: get_fixed_seed, all_seeds, all_subseeds). */
import { randomInt } from "node:crypto";
import { InvalidSamplingParameter } from "./errors.js";

/** A1111 draws random seeds with `random.randrange(4294967294)`: 0 … 4294967293. */
export const RANDOM_SEED_LIMIT = 4294967294;

export type SeedInput = number | string | null | undefined;

export interface SeedsForJobInput {
  seed: SeedInput;
  subseed?: SeedInput;
  subseedStrength?: number;
  /** Images in the job: batch_size × n_iter. */
  count: number;
  /** Source of random seeds (default: crypto); returns an integer in [0, limit). */
  random?: (limit: number) => number;
}

export interface JobSeeds {
  /** The resolved seed (a random one when the request had −1), to report back. */
  seed: number;
  subseed: number;
  /** Per image: seed + i, or the same seed for every image when a variation strength is set. */
  seeds: number[];
  /** Per image: subseed + i. */
  subseeds: number[];
}

/**
 * `get_fixed_seed`: −1, "", null, undefined and unparsable strings become a random seed; every other
 * integer (negative ones included) is kept as is. Non-integral numbers are truncated the way the
 * A1111 API's int coercion does.
 */
export function resolveSeed(field: string, value: SeedInput, random: (limit: number) => number): number {
  let seed: number;
  if (value === null || value === undefined || value === "") seed = -1;
  else if (typeof value === "string") seed = parsePythonInt(value) ?? -1;
  else if (Number.isFinite(value)) seed = Math.trunc(value);
  else throw new InvalidSamplingParameter(field, `${field} must be a finite integer`);
  if (!Number.isSafeInteger(seed)) throw new InvalidSamplingParameter(field, `${field} ${String(value)} is out of range`);
  if (seed === -1) return random(RANDOM_SEED_LIMIT);
  return seed;
}

/** Python `int(str)` for decimal strings: surrounding whitespace, a sign and `_` digit separators. */
function parsePythonInt(text: string): number | undefined {
  const trimmed = text.trim();
  if (!/^[+-]?\d+(?:_\d+)*$/.test(trimmed)) return undefined;
  return Number(trimmed.replaceAll("_", ""));
}

function defaultRandom(limit: number): number {
  return randomInt(0, limit);
}

export function seedsForJob(input: SeedsForJobInput): JobSeeds {
  const { count } = input;
  if (!Number.isSafeInteger(count) || count < 1)
    throw new InvalidSamplingParameter("batch_size", `image count must be a positive integer, got ${count}`);
  const strength = input.subseedStrength ?? 0;
  if (!Number.isFinite(strength)) throw new InvalidSamplingParameter("subseed_strength", "subseed_strength must be a finite number");
  const random = input.random ?? defaultRandom;
  const seed = resolveSeed("seed", input.seed, random);
  const subseed = resolveSeed("subseed", input.subseed ?? -1, random);
  const seeds: number[] = [];
  const subseeds: number[] = [];
  for (let i = 0; i < count; i++) {
    seeds.push(seed + (strength === 0 ? i : 0));
    subseeds.push(subseed + i);
  }
  return { seed, subseed, seeds, subseeds };
}
