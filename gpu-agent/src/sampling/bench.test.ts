import { test } from "node:test";
import assert from "node:assert/strict";
import { benchSamplers, pageTouchMicros } from "./bench.js";
import { residentArraysOut } from "./kernels.js";
import { listSamplers } from "./plan.js";

test("benchSamplers (a): per-sampler timings from the injected clock, and the noise each run draws", async () => {
  let clock = 0;
  const results = await benchSamplers({
    samplers: ["Euler a", "Heun", "DPM++ 2M SDE", "DDIM"],
    steps: 4,
    shape: [4, 2, 2],
    now: () => (clock += 5),
    repeats: 1,
    warmup: false,
  });
  assert.deepEqual(
    results.map((r) => r.sampler),
    ["Euler a", "Heun", "DPM++ 2M SDE", "DDIM"],
  );
  assert.deepEqual(
    results.map((r) => r.modelCalls),
    [4, 7, 4, 3],
  );
  // Euler a: a draw after every step but the last; Heun: none (s_churn = 0, so no churn draw is read);
  // 2M SDE: a tree query after every step but the last; DDIM: a draw after every model call.
  assert.deepEqual(
    results.map((r) => r.noiseCalls),
    [3, 0, 3, 3],
  );
  for (const r of results) {
    assert.equal(r.setupMs, 5);
    // Every resumption of the generator (model calls + the start) is timed by two clock reads 5 apart.
    assert.equal(r.syncMsPerStep, (5 * (r.modelCalls + 1)) / r.steps);
    assert.equal(r.criticalMsPerStep, undefined);
  }
});

test("benchSamplers (b): with an off-thread model every draw after the first request happens ahead", async () => {
  const results = await benchSamplers({ steps: 4, shape: [4, 4, 4], modelMs: 2, repeats: 1, withoutPrefetch: false });
  assert.deepEqual(
    results.map((r) => r.sampler),
    listSamplers().map((s) => s.name),
  );
  for (const r of results) {
    assert.equal(r.criticalNoiseCalls, 0, `${r.sampler}: draws left on the critical path`);
    for (const v of [r.criticalMsPerStep, r.floorMsPerStep, r.passFloorMsPerCall, r.hotInSamplerMsPerStep])
      assert.ok(v !== undefined && Number.isFinite(v) && v >= 0, `${r.sampler}: ${v}`);
  }
  // Every run, the bare passes' included, gave its latents back.
  assert.equal(residentArraysOut(), 0);
  // One service serves every run of the bench: its start-up is measured once, the same for each SDE sampler.
  const boots = new Set(results.filter((r) => r.workerBootMs !== undefined).map((r) => r.workerBootMs));
  assert.equal(boots.size, 1);
  assert.ok([...boots][0]! > 0);
  const noisy = results.filter((r) => r.noiseCalls > 0).map((r) => r.sampler);
  for (const name of ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "LCM", "DPM fast", "DPM adaptive"])
    assert.ok(noisy.includes(name), name);
});

test("pageTouchMicros: a positive time per page, with and without a pause", () => {
  for (const pause of [0, 1]) {
    const us = pageTouchMicros(pause, 3);
    assert.ok(Number.isFinite(us) && us > 0, `${pause} ms: ${us}`);
  }
});
