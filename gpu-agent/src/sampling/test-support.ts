/** Helpers shared by this folder's tests (fixture paths, float32 file reading, tolerance checks). */
import { readFileSync } from "node:fs";
import assert from "node:assert/strict";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";

export const FIXTURES_DIR = KIT_FIXTURES;
export const fixturesAbsent = kitSkip();
export const INTERMEDIATE_DIR = `${FIXTURES_DIR}/reference/txt2img/intermediate`;

export function readJson<T>(path: string): T {
  return JSON.parse(readFileSync(path, "utf8")) as T;
}

export function readF32(path: string): Float32Array {
  const bytes = readFileSync(path);
  return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, what = "values"): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    if (!(Math.abs(a - e) <= tolerance)) assert.fail(`${what}[${i}]: ${a} vs expected ${e} (tolerance ${tolerance})`);
  }
}

export function assertRelClose(actual: ArrayLike<number>, expected: ArrayLike<number>, relTolerance: number, what = "values"): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    const tol = relTolerance * Math.max(Math.abs(e), 1e-30);
    if (!(Math.abs(a - e) <= tol)) assert.fail(`${what}[${i}]: ${a} vs expected ${e} (relative tolerance ${relTolerance})`);
  }
}
