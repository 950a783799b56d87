import { test } from "node:test";
import assert from "node:assert/strict";
import { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import type { SdModel } from "../models/sd-model.js";
import { BrownianTreeNoiseSampler, type BrownianNoiseOptions } from "./brownian.js";
import type { BrownianQueryList } from "./brownian-pool.js";
import { BrownianWorkers } from "./brownian-thread.js";
import { ImageRng, type LatentShape } from "./image-rng.js";
import type { NoiseAhead, WorkerNoiseAhead } from "./noise-ahead.js";
import { prepareSampling, type PreparedSampling } from "./plan.js";
import { runSynchronously, driveWithNoiseAhead, standInModel } from "./test-support.js";

interface Setup {
  name: string;
  steps: number;
  seeds: number[];
  shape: LatentShape;
}

function prepare(s: Setup): { prepared: PreparedSampling; start: Float32Array; tree: BrownianNoiseOptions; queries: BrownianQueryList } {
  const rng = new ImageRng({ shape: s.shape, seeds: s.seeds, source: "NV" });
  const prepared = prepareSampling({
    samplerName: s.name,
    steps: s.steps,
    noise: () => rng.next(),
    brownian: { seeds: s.seeds, shape: s.shape, source: "NV" },
  });
  const tree: BrownianNoiseOptions = { ...prepared.brownianRange!, seeds: s.seeds, shape: s.shape, source: "NV" };
  return { prepared, start: prepared.startLatent(rng.first()), tree, queries: prepared.brownianQueries!()! };
}

/** The single-thread tree's answers to a run's queries. */
function expectedAnswers(tree: BrownianNoiseOptions, queries: BrownianQueryList): Float32Array[] {
  const plain = new BrownianTreeNoiseSampler(tree);
  return queries.map(([s, n]) => plain.sample(s, n));
}

function inThread(s: Setup): Float32Array {
  const { prepared, start } = prepare(s);
  return runSynchronously(prepared, start);
}

const driven = async (prepared: PreparedSampling, start: Float32Array, ahead: NoiseAhead, afterFirst?: () => Promise<void>) =>
  (await driveWithNoiseAhead(prepared, start, ahead, afterFirst === undefined ? {} : { afterFirst })).x;

const A: Setup = { name: "DPM++ 2M SDE", steps: 12, seeds: [12, 13], shape: [4, 8, 8] };
const B: Setup = { name: "DPM++ SDE", steps: 8, seeds: [777], shape: [4, 6, 10] };

test("two concurrent runs with different seeds and shapes on one service get what two single-thread trees give", async () => {
  for (const helpers of [0, 2]) {
    const service = new BrownianWorkers({ helpers });
    try {
      const a = prepare(A);
      const b = prepare(B);
      const runA = service.open(a.tree, { queries: a.queries });
      const runB = service.open(b.tree, { queries: b.queries });
      assert.equal(service.openRuns, 2);
      assert.deepEqual(await Promise.all([runA.ready, runB.ready]), [true, true]);
      // Interleaved, as two renders' steps would be.
      const [gotA, gotB] = await Promise.all([
        Promise.all(a.queries.map(([s, n]) => runA.query(s, n))),
        Promise.all(b.queries.map(([s, n]) => runB.query(s, n))),
      ]);
      assert.deepEqual(gotA, expectedAnswers(a.tree, a.queries), `A with ${helpers} helpers`);
      assert.deepEqual(gotB, expectedAnswers(b.tree, b.queries), `B with ${helpers} helpers`);
      await Promise.all([runA.close(), runB.close()]);
      assert.equal(service.openRuns, 0);
      assert.equal(service.treeThreadStarts, 1, "both runs on one tree thread");
      assert.equal(service.runningHelpers, helpers);

      // A later run reuses the threads.
      const again = service.open(b.tree, { queries: b.queries });
      assert.equal(await again.ready, true);
      assert.deepEqual(await Promise.all(b.queries.map(([s, n]) => again.query(s, n))), expectedAnswers(b.tree, b.queries));
      await again.close();
      assert.equal(service.treeThreadStarts, 1);
    } finally {
      await service.close();
    }
    assert.equal(service.running, false);
    assert.equal(service.runningHelpers, 0);
  }
});

test("closing one run mid-way drops its state and leaves the other run's answers correct", async () => {
  const service = new BrownianWorkers({ helpers: 2 });
  try {
    // A large ring for the run that is abandoned, so helpers are busy with it when it closes.
    const big: Setup = { name: "DPM++ 3M SDE", steps: 20, seeds: [5], shape: [4, 64, 64] };
    const a = prepare(big);
    const b = prepare(B);
    const runA = service.open(a.tree, { queries: a.queries });
    const runB = service.open(b.tree, { queries: b.queries });
    const firstA = await runA.query(...a.queries[0]!);
    assert.deepEqual(firstA, expectedAnswers(a.tree, a.queries.slice(0, 1))[0]);
    const half = Math.floor(b.queries.length / 2);
    const gotB = await Promise.all(b.queries.slice(0, half).map(([s, n]) => runB.query(s, n)));
    const pendingA = runA.query(...a.queries[1]!);
    await runA.close();
    assert.equal(await pendingA, undefined, "a closed run's waiting query answers nothing");
    assert.equal(await runA.query(...a.queries[2]!), undefined);
    assert.equal(runA.running, false);
    assert.equal(service.openRuns, 1);
    gotB.push(...(await Promise.all(b.queries.slice(half).map(([s, n]) => runB.query(s, n)))));
    assert.deepEqual(gotB, expectedAnswers(b.tree, b.queries));
    await runB.close();
  } finally {
    await service.close();
  }
  assert.equal(service.running, false);
});

test("runs through openNoiseAhead on one service give the in-thread latents, concurrently, and a run's close leaves the threads", async () => {
  const service = new BrownianWorkers({ helpers: 2 });
  try {
    const setups = [A, B, { ...A, name: "DPM++ 2M SDE Heun", seeds: [3] }, { ...B, name: "DPM++ 3M SDE" }];
    const results = await Promise.all(
      setups.map(async (s) => {
        const { prepared, start } = prepare(s);
        const ahead = prepared.openNoiseAhead({ brownian: service }) as WorkerNoiseAhead;
        try {
          const x = await driven(prepared, start, ahead);
          return { x, state: ahead.threadState };
        } finally {
          await ahead.close();
          assert.equal(ahead.threadState, "ended");
        }
      }),
    );
    results.forEach((r, k) => {
      assert.deepEqual(r.x, inThread(setups[k]!), setups[k]!.name);
      assert.equal(r.state, "running");
    });
    assert.equal(service.treeThreadStarts, 1);
    assert.equal(service.openRuns, 0);
    assert.equal(service.running, true, "the service's threads outlive its runs");
  } finally {
    await service.close();
  }
  assert.equal(service.running, false);
});

test("when the tree thread dies, its runs fall back to the sampler's thread and the next run starts a new one", async () => {
  const service = new BrownianWorkers({ helpers: 1 });
  try {
    const { prepared, start } = prepare(A);
    const ahead = prepared.openNoiseAhead({ brownian: service }) as WorkerNoiseAhead;
    let died = false;
    try {
      const x = await driven(prepared, start, ahead, async () => {
        await service.killTreeThread();
        died = true;
      });
      assert.ok(died);
      assert.deepEqual(x, inThread(A), "the run that lost its thread still gives the same latents");
      assert.equal(ahead.threadState, "ended");
      assert.ok(ahead.queriesOnCall > 0, "the rest of its queries were computed on its own thread");
    } finally {
      await ahead.close();
    }

    const next = prepare(B);
    const second = next.prepared.openNoiseAhead({ brownian: service }) as WorkerNoiseAhead;
    try {
      assert.equal(await second.start(), true);
      assert.deepEqual(await driven(next.prepared, next.start, second), inThread(B));
      assert.equal(second.queriesOnCall, 0);
      assert.ok(second.answeredByWorker > 0);
    } finally {
      await second.close();
    }
    assert.equal(service.treeThreadStarts, 2);
  } finally {
    await service.close();
  }
  assert.equal(service.running, false);
});

test("a run whose trees cannot be built fails alone; the service's other runs go on", async () => {
  const service = new BrownianWorkers({ helpers: 1 });
  try {
    const good = prepare(B);
    const bogus = { ...good.tree, source: "bogus" as BrownianNoiseOptions["source"] };
    const bad = service.open(bogus, { queries: good.queries });
    const fine = service.open(good.tree, { queries: good.queries });
    assert.equal(await bad.ready, false);
    assert.match(String(bad.error), /unknown RNG source/);
    assert.equal(await bad.query(...good.queries[0]!), undefined);
    assert.deepEqual(await Promise.all(good.queries.map(([s, n]) => fine.query(s, n))), expectedAnswers(good.tree, good.queries));
    await Promise.all([bad.close(), fine.close()]);
    assert.equal(service.runningHelpers, 1);
  } finally {
    await service.close();
  }
});

test("a closed service opens no run, and the run's openNoiseAhead falls back to its own thread", async () => {
  const service = new BrownianWorkers({ helpers: 0 });
  assert.equal(await service.start(), true);
  await service.close();
  assert.throws(() => service.open(prepare(B).tree));
  const { prepared, start } = prepare(B);
  const ahead = prepared.openNoiseAhead({ brownian: service }) as WorkerNoiseAhead;
  assert.deepEqual(await driven(prepared, start, ahead), inThread(B));
  assert.equal(ahead.threadState, "none");
  await ahead.close();
});

test("LoadedPipeline owns the Brownian service: its SDE runs share it and close() leaves no thread running", async () => {
  const stub = { name: "stub", config: { latentChannels: 4 }, textEncoder: { hiddenSize: 8 }, close: async () => {} } as unknown as SdModel;
  const pipe = new LoadedPipeline(stub, { maxBatchRows: 1 });
  assert.equal(pipe.brownian.running, false, "nothing started before the first SDE run");
  const runs = [A, B].map(async (s) => {
    const { prepared, start } = prepare(s);
    // What denoise() does.
    const ahead = prepared.openNoiseAhead({ brownian: pipe.brownian });
    try {
      return await driven(prepared, start, ahead);
    } finally {
      await ahead.close();
    }
  });
  assert.deepEqual(await Promise.all(runs), [inThread(A), inThread(B)]);
  assert.equal(pipe.brownian.running, true);
  assert.equal(pipe.brownian.treeThreadStarts, 1);
  await pipe.close();
  assert.equal(pipe.brownian.running, false);
  assert.equal(pipe.brownian.runningHelpers, 0);
});

test("answers posted while this thread was blocked (as by a UNet call) settle at takeArrived, without an event-loop turn", async () => {
  const service = new BrownianWorkers({ helpers: 0 });
  try {
    const a = prepare(A);
    const run = service.open(a.tree, { queries: a.queries });
    assert.equal(await run.ready, true);
    const want = expectedAnswers(a.tree, a.queries.slice(0, 1))[0]!;
    let answer: Float32Array | undefined;
    const [sigma, sigmaNext] = a.queries[0]!;
    void run.query(sigma, sigmaNext).then((noise) => (answer = noise));
    const blocker = new Int32Array(new SharedArrayBuffer(4));
    const deadline = performance.now() + 10_000;
    let turned = false;
    setImmediate(() => (turned = true));
    while (answer === undefined && performance.now() < deadline) {
      Atomics.wait(blocker, 0, 0, 20);
      run.takeArrived();
      await Promise.resolve(); // microtasks only: the query's promise settles here
    }
    assert.equal(turned, false, "no turn of the event loop was needed");
    assert.deepEqual(answer, want);
    await run.close();
  } finally {
    await service.close();
  }
});

test("ensureReady takes tree answers that arrived during a blocking model call without an event-loop turn", async () => {
  const service = new BrownianWorkers({ helpers: 0 });
  const a = prepare(A);
  const ahead = a.prepared.openNoiseAhead({ brownian: service });
  try {
    const run = a.prepared.run(a.start);
    let r = run.next();
    assert.ok(!r.done);
    ahead.drawAhead(r.value);
    await ahead.ensureReady(r.value); // the run's trees are up and answering
    r = run.next(standInModel(r.value));
    assert.ok(!r.done && (r.value.upcoming?.queries?.length ?? 0) > 0, "the second request announces tree queries");
    ahead.drawAhead(r.value);
    // A model call that blocks this thread far longer than a tree answer for this small latent takes.
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1500);
    let settled = false;
    void ahead.ensureReady(r.value).then(() => (settled = true));
    for (let i = 0; i < 10; i++) await Promise.resolve();
    assert.equal(settled, true, "ready after microtasks only");
  } finally {
    await ahead.close();
    await service.close();
  }
});
