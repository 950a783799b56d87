import { test } from "node:test";
import assert from "node:assert/strict";
import { benchSamplers } from "./bench.js";

test("benchSamplers reports per-sampler timings (small latent, injected clock)", () => {
  let clock = 0;
  const results = benchSamplers({ samplers: ["Euler a", "Heun", "DPM++ 2M SDE", "DDIM"], steps: 4, shape: [4, 2, 2], now: () => (clock += 5) });
  assert.deepEqual(results.map((r) => r.sampler), ["Euler a", "Heun", "DPM++ 2M SDE", "DDIM"]);
  assert.deepEqual(results.map((r) => r.modelCalls), [4, 7, 4, 3]);
  for (const r of results) {
    assert.equal(r.totalMs, 5);
    assert.equal(r.msPerStep, 5 / r.steps);
  }
});
