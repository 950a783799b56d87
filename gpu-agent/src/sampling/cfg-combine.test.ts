import { test } from "node:test";
import assert from "node:assert/strict";
import { combineDenoised } from "../conditioning/cfg.js";
import { cfgCombine } from "./cfg-combine.js";
import { allocateResident, freeResident } from "./kernels.js";
import { epsToDenoised, scaleLatent, vToDenoised } from "./sigmas.js";

function values(seed: number, n: number): Float32Array {
  let s = seed >>> 0 || 1;
  const special = [0, -0, 1e-40, -3e38, 65504, Infinity, NaN];
  return Float32Array.from({ length: n }, (_, k) => {
    s = (Math.imul(s, 1_103_515_245) + 12_345) >>> 0;
    if (k % 211 === 0) return special[(k / 211) % special.length]!;
    return (s / 2 ** 32 - 0.5) * 10 ** ((k % 9) - 4);
  });
}

const sameBits = (a: Float32Array, b: Float32Array): boolean =>
  a.length === b.length && a.every((v, k) => Object.is(v, b[k]) || (Number.isNaN(v) && Number.isNaN(b[k])));

test("cfgCombine gives the bits of epsToDenoised / vToDenoised then combineDenoised, for 0–3 prompts, in one pass", () => {
  for (const n of [65_536 + 6, 1000, 5, 3]) {
    const x = values(1, n);
    const uncond = values(2, n);
    const outputs = [values(3, n), values(4, n), values(5, n)];
    const weights = [1, 0.6, 1.3];
    for (const count of [0, 1, 2, 3]) {
      const conds = outputs.slice(0, count).map((output, j) => ({ output, weight: weights[j]! }));
      for (const cfgScale of [7, 4.5]) {
        // eps requests: the outputs as they are.
        const wantRaw = combineDenoised(
          conds.map((c) => ({ denoised: c.output, weight: c.weight })),
          uncond,
          cfgScale,
        );
        assert.ok(sameBits(cfgCombine(uncond, conds, cfgScale), wantRaw), `raw, n ${n}, ${count} prompts`);
        for (const prediction of ["eps", "v"] as const) {
          const sigma = 3.7;
          const toDenoised = (o: Float32Array): Float32Array =>
            prediction === "eps" ? epsToDenoised(x, o, sigma) : vToDenoised(x, o, sigma);
          const want = combineDenoised(
            conds.map((c) => ({ denoised: toDenoised(c.output), weight: c.weight })),
            toDenoised(uncond),
            cfgScale,
          );
          const got = cfgCombine(uncond, conds, cfgScale, { x, sigma, prediction });
          assert.ok(sameBits(got, want), `${prediction}, n ${n}, ${count} prompts, scale ${cfgScale}`);
        }
      }
    }
  }
});

test("cfgCombine writes into a given array (the sampler's slot) and refuses mismatched lengths", () => {
  const n = 4 * 16 * 16;
  const x = values(6, n);
  const uncond = values(7, n);
  const conds = [{ output: values(8, n), weight: 1 }];
  const slot = allocateResident(n)!;
  try {
    slot.fill(NaN);
    assert.equal(cfgCombine(uncond, conds, 7, { x, sigma: 1.5, prediction: "eps" }, slot), slot);
    assert.ok(sameBits(slot, cfgCombine(uncond, conds, 7, { x, sigma: 1.5, prediction: "eps" })));
  } finally {
    freeResident(slot);
  }
  assert.throws(() => cfgCombine(uncond, [{ output: new Float32Array(n - 1), weight: 1 }], 7), /cond output has/);
  assert.throws(() => cfgCombine(uncond, conds, 7, { x: new Float32Array(n + 4), sigma: 1, prediction: "v" }), /latent has/);
  assert.throws(() => cfgCombine(uncond, conds, 7, undefined, new Float32Array(2)), /output length/);
});

test("scaleLatent gives the bits of the scalar loop, also for a scale that is not a float32 value", () => {
  for (const n of [65_536 + 6, 7, 2]) {
    const x = values(9, n);
    for (const scale of [Math.fround(0.2672612), 1, 0.1, Math.fround(1 / 3)]) {
      const want = new Float32Array(n);
      for (let i = 0; i < n; i++) want[i] = x[i]! * scale;
      assert.ok(sameBits(scaleLatent(x, scale), want), `n ${n}, scale ${scale}`);
    }
  }
  assert.throws(() => scaleLatent(new Float32Array(4), 1, new Float32Array(3)), /input has 4 values/);
});
