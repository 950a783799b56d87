import { test } from "node:test";
import assert from "node:assert/strict";
import { createBrownianNoiseSampler } from "./brownian.js";
import { ImageRng } from "./image-rng.js";
import { isResident, residentArraysOut } from "./kernels.js";
import { listSamplers, prepareSampling } from "./plan.js";
import { NoisePrefetcher } from "./prefetch.js";
import { withPoisonedResidency } from "./samplers/test-harness.js";
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

test("staged, draws and answers made ahead are lent from the kernels' memory until the next take, and unstage() gives everything back", () => {
  const before = residentArraysOut();
  withPoisonedResidency(() => {
    const p = new NoisePrefetcher(counter(), (a, b) => Float32Array.of(a - b));
    p.drawAhead({ draws: 1 }); // not staged yet: an ordinary array
    p.stageInKernelMemory();
    p.drawAhead({ draws: 3, queries: [[5, 3]] });
    assert.equal(residentArraysOut() - before, 3, "the two new draws and the answer");
    const first = p.noise();
    assert.ok(!isResident(first) && first[0] === 1);
    const second = p.noise();
    assert.ok(isResident(second) && second[0] === 2, "a staged draw, in the source's order");
    const answer = p.query(5, 3);
    assert.ok(isResident(answer) && answer[0] === 2);
    assert.ok(Number.isNaN(second[0]), "the draw lent before is given back (poisoned) at the next take");
    assert.equal(p.stagedTakes, 2);
    // Answers past the four kept are dropped, and their copies given back.
    for (let k = 0; k < 6; k++) p.drawAhead({ queries: [[10 + k, 1]] });
    assert.equal(residentArraysOut() - before, 1 + 1 + 4, "the lent answer, draw 3 and four answers");
    p.unstage();
    assert.equal(residentArraysOut(), before, "unstage() gives every copy back");
    const third = p.noise();
    assert.ok(!isResident(third) && third[0] === 3, "a draw still waiting is kept, as an ordinary array");
    assert.deepEqual(p.query(15, 1), Float32Array.of(14));
    p.drawAhead({ draws: 1 });
    assert.equal(residentArraysOut(), before, "no staging after unstage()");
  });
});

test("every sampler gives the same bits with its noise staged in the kernels' memory, freed slots poisoned, and gives every slot back", () => {
  const shape = [4, 6, 5] as const;
  const cases = [
    ...listSamplers().map(({ name }) => ({ name, steps: 7, settings: { sChurn: 0.5 } })),
    // Restart jumps back up (and draws) from 20 steps on.
    { name: "Restart", steps: 20, settings: {} },
    { name: "DPM adaptive", steps: 7, settings: { eta: 1 } },
    { name: "DPM++ 2M SDE", steps: 7, settings: { eta: 0.5 } },
  ];
  for (const c of cases) {
    const render = (ahead: boolean): { requests: Float32Array[]; x: Float32Array; stagedPeak: number; draws: number } => {
      const rng = new ImageRng({ shape, seeds: [7], source: "NV" });
      let draws = 0;
      const options = { samplerName: c.name, steps: c.steps, noise: () => (draws++, rng.next()), settings: c.settings };
      const range = prepareSampling(options).brownianRange;
      // The tree in this thread: its answers are made ahead by drawAhead, as the plain draws are.
      const tree = range && createBrownianNoiseSampler({ ...range, seeds: [7], shape: [...shape], source: "NV" });
      const sampling = prepareSampling({ ...options, ...(tree !== undefined && { noiseSampler: tree }) });
      const noiseAhead = ahead ? sampling.openNoiseAhead() : undefined;
      const run = sampling.run(sampling.startLatent(rng.first()));
      const requests: Float32Array[] = [];
      let stagedPeak = 0;
      for (let r = run.next(); !r.done;) {
        const held = residentArraysOut();
        noiseAhead?.drawAhead(r.value);
        stagedPeak = Math.max(stagedPeak, residentArraysOut() - held);
        requests.push(r.value.x.slice());
        r = run.next(standInModel(r.value));
        if (r.done) {
          void noiseAhead?.close();
          return { requests, x: r.value, stagedPeak, draws };
        }
      }
      throw new Error("unreachable");
    };
    const before = residentArraysOut();
    const plain = render(false);
    const staged = withPoisonedResidency(() => render(true));
    const label = `${c.name} ${JSON.stringify(c.settings)}`;
    assert.equal(residentArraysOut(), before, `${label}: every slot given back`);
    assert.equal(staged.requests.length, plain.requests.length, label);
    staged.requests.forEach((x, k) => assert.deepEqual(x, plain.requests[k], `${label}: request ${k}`));
    assert.deepEqual(staged.x, plain.x, `${label}: result`);
    assert.ok(staged.x.every(Number.isFinite), label);
    // Plain draws counted (the tree's are not: a sampler that takes either has its noise staged).
    const noisy =
      plain.draws > 0 || prepareSampling({ samplerName: c.name, steps: c.steps, noise: () => new Float32Array(0) }).brownianRange;
    assert.equal(staged.stagedPeak > 0, Boolean(noisy), `${label}: noise staged ahead (${plain.draws} plain draws)`);
  }
});
