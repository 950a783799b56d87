import { test } from "node:test";
import assert from "node:assert/strict";
import { ImageRng } from "./image-rng.js";
import { listSamplers, prepareSampling } from "./plan.js";
import { NoisePrefetcher } from "./prefetch.js";
import { standInModel } from "./test-support.js";

const counter = (): (() => Float32Array) => {
  let k = 0;
  return () => Float32Array.of(++k);
};

test("draws made ahead are handed out oldest first, so the sequence the sampler sees is the source's", () => {
  const p = new NoisePrefetcher(counter());
  p.drawAhead({ draws: 2 });
  assert.equal(p.readyDraws, 2);
  p.drawAhead({ draws: 1 }); // already there: nothing more is drawn
  assert.equal(p.readyDraws, 2);
  assert.deepEqual([p.noise()[0], p.noise()[0], p.noise()[0]], [1, 2, 3]);
  p.drawAhead(undefined);
  assert.equal(p.readyDraws, 0);
});

test("noise-sampler answers made ahead serve exactly their own arguments", () => {
  const asked: Array<[number, number]> = [];
  const p = new NoisePrefetcher(counter(), (a, b) => (asked.push([a, b]), Float32Array.of(a - b)));
  p.drawAhead({
    queries: [
      [3, 2],
      [2, 1],
    ],
  });
  assert.deepEqual(asked, [
    [3, 2],
    [2, 1],
  ]);
  assert.deepEqual(p.query(2, 1), Float32Array.of(1));
  assert.deepEqual(p.query(2.5, 1), Float32Array.of(1.5)); // not announced: computed now
  assert.deepEqual(p.query(3, 2), Float32Array.of(1));
  assert.deepEqual(p.query(3, 2), Float32Array.of(1)); // taken already: computed again
  assert.equal(asked.length, 4);
  for (let k = 0; k < 10; k++) p.drawAhead({ queries: [[k, 0]] });
  assert.equal(asked.length, 14);
});

test("drawAhead never throws and stops when aborted; the sampler's own draw then meets the error", () => {
  let fail = true;
  const p = new NoisePrefetcher(() => {
    if (fail) throw new Error("boom");
    return new Float32Array(1);
  });
  p.drawAhead({ draws: 1 });
  assert.equal(p.readyDraws, 0);
  assert.throws(() => p.noise(), /boom/);
  fail = false;
  const controller = new AbortController();
  controller.abort();
  p.drawAhead({ draws: 3 }, controller.signal);
  assert.equal(p.readyDraws, 0);
});

test("every sampler gives the same latents with noise drawn ahead (twice, even) as without", () => {
  const shape = [4, 5, 3] as const;
  for (const { name } of listSamplers()) {
    const results: Float32Array[] = [];
    for (const ahead of [0, 1, 2]) {
      const rng = new ImageRng({ shape, seeds: [11], source: "NV" });
      const prepared = prepareSampling({
        samplerName: name,
        steps: 6,
        noise: () => rng.next(),
        brownian: { seeds: [11], shape, source: "NV" },
        settings: { sChurn: 0.5 },
      });
      const run = prepared.run(prepared.startLatent(rng.first()));
      let r = run.next();
      while (!r.done) {
        for (let k = 0; k < ahead; k++) prepared.drawAhead(r.value);
        r = run.next(standInModel(r.value));
      }
      results.push(r.value);
    }
    assert.deepEqual(results[1], results[0], `${name}: drawn ahead once`);
    assert.deepEqual(results[2], results[0], `${name}: drawn ahead twice`);
  }
});
