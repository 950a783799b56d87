import { test } from "node:test";
import assert from "node:assert/strict";
import { BrownianInterval, BrownianTreeNoiseSampler, SeedSequence, roundTol } from "./brownian.js";
import { createGenerator } from "./generator.js";
import { assertClose } from "./test-support.js";

// Reference words from numpy 2.4.6: np.random.SeedSequence(entropy, spawn_key=…, pool_size=…).generate_state(n).
test("SeedSequence matches numpy's entropy hashing and state generation", () => {
  assert.deepEqual(Array.from(new SeedSequence(42, [], 24).generateState(3)), [387750627, 2536650517, 4078839648]);
  assert.deepEqual(Array.from(new SeedSequence(42, [1, 1], 24).generateState(4)), [1058881542, 1039740124, 2218853409, 2234354429]);
  assert.deepEqual(
    Array.from(new SeedSequence(4294967295, [2n ** 40n + 5n, 41], 24).generateState(4)),
    [3113592697, 1170192354, 87410326, 2433146073],
  );
  assert.deepEqual(Array.from(new SeedSequence(0).generateState(4)), [2968811710, 3677149159, 745650761, 2884920346]);
});

const randn = (seed: number, length: number): Float32Array => createGenerator("NV", seed).next(length);

test("the whole-interval increment is the first draw for SeedSequence(seed).generate_state(3)[0], times sqrt(t1 − t0)", () => {
  const t0 = 0.0291675;
  const t1 = 14.614642;
  const tree = new BrownianInterval(t0, t1, 8, 1234, randn);
  const seed = new SeedSequence(1234, [], 24).generateState(3)[0]!;
  const expected = Array.from(randn(seed, 8), (v) => Math.fround(v * Math.fround(Math.sqrt(t1 - t0))));
  assert.deepEqual(Array.from(tree.increment(t0, t1)), expected);
});

test("one split is a Brownian bridge: left = (m−t0)/h·W + sqrt((m−t0)(t1−m)/h)·N(W_seed of the root)", () => {
  const t0 = 1;
  const t1 = 3;
  const tree = new BrownianInterval(t0, t1, 6, 77, randn);
  const whole = tree.increment(t0, t1);
  const left = tree.increment(t0, 2);
  const right = tree.increment(2, t1);
  const rootSeed = new SeedSequence(77, [0, 0], 24).generateState(4)[0]!;
  const n = randn(rootSeed, 6);
  const expectedLeft = Array.from(whole, (w, k) => 0.5 * w + Math.sqrt(0.5) * n[k]!);
  assertClose(left, expectedLeft, 1e-6, "left");
  assertClose(
    right,
    Array.from(whole, (w, k) => w - expectedLeft[k]!),
    1e-6,
    "right",
  );
});

test("halfway tree: values do not depend on the order of queries; increments add up", () => {
  const points = [0.5, 0.812345, 1.7, 2.25, 3.999999];
  const a = new BrownianInterval(0.1, 4, 5, 9, randn);
  const b = new BrownianInterval(0.1, 4, 5, 9, randn);
  const forward = points.slice(1).map((p, i) => a.increment(points[i]!, p));
  const backward = points
    .slice(1)
    .map((p, i) => [points[i]!, p] as const)
    .reverse()
    .map(([lo, hi]) => b.increment(lo, hi))
    .reverse();
  forward.forEach((w, i) => assert.deepEqual(Array.from(w), Array.from(backward[i]!), `interval ${i}`));
  const total = a.increment(points[0]!, points[points.length - 1]!);
  const summed = forward.reduce((acc, w) => acc.map((v, k) => v + w[k]!), new Array<number>(5).fill(0));
  assertClose(total, summed, 1e-5, "additivity");
});

test("noise sampler output is (W(σnext) − W(σ))/sqrt|σnext − σ|: standard normal over many seeds, one tree per image", () => {
  const seeds = Array.from({ length: 64 }, (_, i) => 1000 + i);
  const sampler = new BrownianTreeNoiseSampler({ sigmaMin: 0.03, sigmaMax: 14.6, seeds, shape: [1, 4, 4], source: "NV" });
  const out = sampler.sample(6.2, 4.85);
  assert.equal(out.length, 64 * 16);
  const mean = out.reduce((a, b) => a + b, 0) / out.length;
  const variance = out.reduce((a, b) => a + (b - mean) ** 2, 0) / out.length;
  assert.ok(Math.abs(mean) < 0.1, `mean ${mean}`);
  assert.ok(Math.abs(variance - 1) < 0.15, `variance ${variance}`);
  // Image 3 equals a sampler built for that seed alone; the increment direction follows the query order.
  const single = new BrownianTreeNoiseSampler({ sigmaMin: 0.03, sigmaMax: 14.6, seeds: [1003], shape: [1, 4, 4], source: "NV" });
  assert.deepEqual(Array.from(single.sample(6.2, 4.85)), Array.from(out.subarray(3 * 16, 4 * 16)));
  const reverse = new BrownianTreeNoiseSampler({ sigmaMin: 0.03, sigmaMax: 14.6, seeds: [1003], shape: [1, 4, 4], source: "NV" });
  assertClose(
    reverse.sample(4.85, 6.2),
    Array.from(out.subarray(3 * 16, 4 * 16), (v) => -v),
    1e-6,
    "reversed",
  );
});

test("times are rounded like Python's round(x, 6), ties to even (they occur at odd multiples of 2^-7)", () => {
  // Values from CPython 3: round(0.0078125, 6), round(0.0234375, 6), round(1.5078125, 6), round(14.614642, 6), round(0.0291675123, 6).
  assert.deepEqual(
    [0.0078125, 0.0234375, 1.5078125, 14.614642, 0.0291675123].map(roundTol),
    [0.007812, 0.023438, 1.507812, 14.614642, 0.029168],
  );
});
