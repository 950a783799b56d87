import { test } from "node:test";
import { Worker } from "node:worker_threads";
import assert from "node:assert/strict";
import { BrownianTreeNoiseSampler, seededNormals, type BrownianNoiseOptions } from "./brownian.js";
import { PooledNormals, createDrawRing, failRing, planDraws, type BrownianQueryList } from "./brownian-pool.js";
import { BrownianThread } from "./brownian-thread.js";
import { ImageRng, type LatentShape } from "./image-rng.js";
import { prepareSampling, type SamplingSettings } from "./plan.js";
import { standInModel } from "./test-support.js";

interface Run {
  name: string;
  steps: number;
  scheduler?: string;
  settings?: SamplingSettings;
  img2img?: { denoisingStrength: number };
}

const RUNS: Run[] = [
  { name: "DPM++ SDE", steps: 8 },
  { name: "DPM++ SDE", steps: 5, scheduler: "exponential" },
  { name: "DPM++ 2M SDE", steps: 12 },
  { name: "DPM++ 2M SDE", steps: 7, scheduler: "beta", img2img: { denoisingStrength: 0.6 } },
  { name: "DPM++ 2M SDE Heun", steps: 9, scheduler: "sgm_uniform" },
  { name: "DPM++ 3M SDE", steps: 10, settings: { eta: 0.5, sNoise: 1.01 } },
];

/** A run's tree, the queries the sampler really makes (in order), and what the plan predicted. */
function record(
  run: Run,
  seeds: number[],
  shape: LatentShape,
): { tree: BrownianNoiseOptions; asked: Array<[number, number]>; planned: BrownianQueryList } {
  const rng = new ImageRng({ shape, seeds, source: "NV" });
  const asked: Array<[number, number]> = [];
  const input = {
    samplerName: run.name,
    steps: run.steps,
    noise: () => rng.next(),
    brownian: { seeds, shape, source: "NV" as const },
    ...(run.scheduler !== undefined && { scheduler: run.scheduler }),
    ...(run.settings !== undefined && { settings: run.settings }),
    ...(run.img2img !== undefined && { img2img: run.img2img }),
  };
  const prepared = prepareSampling(input);
  const tree = { ...input.brownian, ...prepared.brownianRange! };
  const sampler = new BrownianTreeNoiseSampler(tree);
  const recording = prepareSampling({ ...input, noiseSampler: (s, n) => (asked.push([s, n]), sampler.sample(s, n)) });
  const first = rng.first();
  const gen = recording.run(recording.startLatent(first, run.img2img && first.map((v) => v * 0.5)));
  for (let r = gen.next(); !r.done;) r = gen.next(standInModel(r.value));
  return { tree, asked, planned: prepared.brownianQueries!()! };
}

test("the planned queries are the ones each SDE sampler asks, in order (DPM++ SDE's midpoints included)", () => {
  for (const run of RUNS) {
    const { asked, planned } = record(run, [7], [4, 2, 2]);
    assert.ok(asked.length > 0, run.name);
    assert.deepEqual(planned, asked, `${run.name} ${run.scheduler ?? ""}`);
  }
  // DPM++ SDE asks two queries per step but the last: (σ, σ_mid) and (σ, σ_next).
  const sde = record(RUNS[0]!, [7], [4, 2, 2]);
  assert.equal(sde.asked.length, 2 * (RUNS[0]!.steps - 1));
  // Without a tree built from `brownian` options there is nothing to plan.
  assert.equal(prepareSampling({ samplerName: "Euler a", steps: 4, noise: () => new Float32Array(4) }).brownianQueries?.(), undefined);
});

/** Asks `queries` of a tree fed from a ring of `slots`, filled here by drawIdle after every `fillEvery` answers. */
function pooledAnswers(tree: BrownianNoiseOptions, queries: BrownianQueryList, slots: number, fillEvery: number) {
  const [c, h, w] = tree.shape;
  const ring = createDrawRing(c * h * w, slots);
  const pooled = new PooledNormals(ring, planDraws(tree, queries), seededNormals(tree));
  const sampler = new BrownianTreeNoiseSampler(tree, pooled.randnFor);
  const answers = queries.map(([s, n], i) => {
    if (i % fillEvery === 0) while (pooled.drawIdle());
    return sampler.sample(s, n);
  });
  return { answers, pooled };
}

test("trees fed from the planned draws give the single-thread tree's answers bit for bit, with no draw unplanned", () => {
  for (const run of RUNS) {
    const seeds = run.name === "DPM++ 3M SDE" ? [5, 6] : [31];
    const { tree, asked } = record(run, seeds, [4, 3, 2]);
    const plain = new BrownianTreeNoiseSampler(tree);
    const expected = asked.map(([s, n]) => plain.sample(s, n));
    // A small ring wraps many times; a large one holds draws made far ahead; 1000 = no draw made ahead.
    for (const [slots, fillEvery] of [
      [4, 1],
      [64, 3],
      [8, 1000],
    ] as const) {
      const { answers, pooled } = pooledAnswers(tree, asked, slots, fillEvery);
      assert.deepEqual(answers, expected, `${run.name} ${run.scheduler ?? ""} ring ${slots}`);
      assert.equal(pooled.unplannedDraws, 0);
    }
  }
});

test("a draw the plan did not foresee, or one a failed helper claimed, is made by the tree's thread with the same values", () => {
  const { tree, asked } = record(RUNS[2]!, [3], [4, 2, 3]);
  const plain = new BrownianTreeNoiseSampler(tree);
  const expected = asked.map(([s, n]) => plain.sample(s, n));
  // Planned for other queries: every draw past the shared top of the tree is unplanned.
  const ring = createDrawRing(24, 8);
  const wrongPlan = new PooledNormals(ring, planDraws(tree, [[5, 1]]), seededNormals(tree));
  const wrong = new BrownianTreeNoiseSampler(tree, wrongPlan.randnFor);
  assert.deepEqual(
    asked.map(([s, n]) => wrong.sample(s, n)),
    expected,
  );
  assert.ok(wrongPlan.unplannedDraws > 0);
  // A helper claimed the next draws and died without filling them.
  const failed = createDrawRing(24, 8);
  const pooled = new PooledNormals(failed, planDraws(tree, asked), seededNormals(tree));
  const sampler = new BrownianTreeNoiseSampler(tree, pooled.randnFor);
  Atomics.add(new Int32Array(failed.control), 0, 5);
  failRing(failed);
  assert.deepEqual(
    asked.map(([s, n]) => sampler.sample(s, n)),
    expected,
  );
  assert.equal(pooled.unplannedDraws, 0);
});

test("a worker with draw helpers answers every query as the single-thread tree does, and close() ends every thread", async () => {
  for (const run of [RUNS[0]!, RUNS[3]!, RUNS[5]!]) {
    const { tree, asked } = record(run, [12, 13], [4, 8, 8]);
    const plain = new BrownianTreeNoiseSampler(tree);
    const expected = asked.map(([s, n]) => plain.sample(s, n));
    for (const helpers of [1, 3]) {
      const thread = new BrownianThread(tree, { queries: asked, helpers });
      try {
        assert.equal(await thread.ready, true);
        // Queries overlap as they would with the agent posting one step ahead.
        const answers = await Promise.all(asked.map(([s, n]) => thread.query(s, n)));
        assert.deepEqual(answers, expected, `${run.name} with ${helpers} helpers`);
      } finally {
        await thread.close();
      }
      assert.equal(thread.running, false);
      assert.equal(thread.runningHelpers, 0);
    }
  }
});

test("closing mid-run stops helpers that are waiting for room in the ring", async () => {
  const { tree, asked } = record(RUNS[2]!, [4], [4, 64, 64]);
  const thread = new BrownianThread(tree, { queries: asked, helpers: 2 });
  assert.equal(await thread.ready, true);
  assert.ok(thread.runningHelpers > 0);
  // Nothing is asked: the ring fills up and the helpers wait.
  await new Promise((resolve) => setTimeout(resolve, 300));
  await thread.close();
  assert.equal(thread.running, false);
  assert.equal(thread.runningHelpers, 0);
});

test("the pool works when the tree's owner is itself a worker thread (the sampler loop may run in the ORT worker)", async () => {
  const { tree, asked } = record(RUNS[4]!, [21], [4, 6, 6]);
  const plain = new BrownianTreeNoiseSampler(tree);
  const expected = asked.map(([s, n]) => plain.sample(s, n));
  const threadModule = new URL("./brownian-thread.ts", import.meta.url).href;
  const source = `
    const { parentPort, workerData } = require("node:worker_threads");
    import("tsx/esm/api").then(async (m) => {
      m.register();
      const { BrownianThread } = await import(${JSON.stringify(threadModule)});
      const thread = new BrownianThread(workerData.tree, { queries: workerData.asked, helpers: 2 });
      const answers = await Promise.all(workerData.asked.map(([s, n]) => thread.query(s, n)));
      await thread.close();
      parentPort.postMessage({ answers, running: thread.running });
    });`;
  const owner = new Worker(source, { eval: true, workerData: { tree, asked } });
  try {
    const reply = await new Promise<{ answers: Float32Array[]; running: boolean }>((resolve, reject) => {
      owner.once("message", resolve);
      owner.once("error", reject);
    });
    assert.deepEqual(reply.answers, expected);
    assert.equal(reply.running, false);
  } finally {
    await owner.terminate();
  }
});
