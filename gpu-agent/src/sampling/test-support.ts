/** Helpers shared by this folder's tests (fixture paths, float32 file reading, tolerance checks). */
import { readFileSync } from "node:fs";
import assert from "node:assert/strict";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";
import { abortError } from "@latentfarm/shared";
import type { NoiseAhead } from "./noise-ahead.js";
import type { PreparedSampling } from "./plan.js";
import type { ModelRequest, ModelResponse } from "./samplers/types.js";

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

/**
 * A deterministic stand-in for the UNet: shrinks x by the request's σ, plus a small term that depends
 * on the position and the call, so every step's answer differs.
 */
export function standInModel(r: ModelRequest): ModelResponse {
  const f = r.kind === "denoise" ? 1 / (1 + r.sigma * r.sigma) : r.sigma / (1 + r.sigma * r.sigma);
  const out = r.x.map((v, k) => v * f + 0.01 * Math.sin(k + r.call));
  return r.kind === "eps" && r.needUncond ? { output: out, uncond: out.map((v) => v * 0.9) } : out;
}

/** A run driven synchronously with standInModel: every noise draw and tree query made when the sampler asks. */
export function runSynchronously(prepared: PreparedSampling, start: Float32Array): Float32Array {
  const run = prepared.run(start);
  let r = run.next();
  while (!r.done) r = run.next(standInModel(r.value));
  return r.value;
}

/**
 * A run driven as the agent's denoise loop drives it: the model "runs" for a macrotask while the announced
 * noise is drawn ahead, then readyNow (ensureReady when it is not) before the sampler resumes. `afterFirst` runs once after the
 * first model call. Returns the latent and the tree queries the requests announced.
 */
export async function driveWithNoiseAhead(
  prepared: PreparedSampling,
  start: Float32Array,
  ahead: NoiseAhead,
  opts: { signal?: AbortSignal; afterFirst?: () => Promise<void> } = {},
): Promise<{ x: Float32Array; queries: number }> {
  const run = prepared.run(start);
  let r = run.next();
  let queries = 0;
  let first = true;
  while (!r.done) {
    const req = r.value;
    queries += req.upcoming?.queries?.length ?? 0;
    const evaluating = new Promise<ModelResponse>((resolve) => setTimeout(() => resolve(standInModel(req)), 1));
    setImmediate(() => ahead.drawAhead(req, opts.signal));
    const response = await evaluating;
    if (opts.signal?.aborted) throw abortError(opts.signal);
    if (!ahead.readyNow(req)) await ahead.ensureReady(req, opts.signal);
    if (first && opts.afterFirst !== undefined) await opts.afterFirst();
    first = false;
    r = run.next(response);
  }
  return { x: r.value, queries };
}
