import { test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { FarmError } from "@latentfarm/shared";
import { BrownianThread } from "./brownian-thread.js";
import type { RngSource } from "./generator.js";
import { ImageRng, type LatentShape } from "./image-rng.js";
import { InThreadNoiseAhead, WorkerNoiseAhead, type NoiseAhead } from "./noise-ahead.js";
import { listSamplers, prepareSampling, type PreparedSampling } from "./plan.js";
import { standInModel, runSynchronously, driveWithNoiseAhead } from "./test-support.js";

interface Setup {
  name: string;
  seeds: number[];
  shape: LatentShape;
  source: RngSource;
  eta?: number;
}

function prepare(s: Setup): { prepared: PreparedSampling; start: Float32Array } {
  const rng = new ImageRng({ shape: s.shape, seeds: s.seeds, source: s.source });
  const prepared = prepareSampling({
    samplerName: s.name,
    steps: 6,
    noise: () => rng.next(),
    brownian: { seeds: s.seeds, shape: s.shape, source: s.source },
    ...(s.eta !== undefined && { settings: { eta: s.eta } }),
  });
  return { prepared, start: prepared.startLatent(rng.first()) };
}

/** All synchronous, every tree query made on this thread when the sampler asks. */
function inThread(s: Setup): Float32Array {
  const { prepared, start } = prepare(s);
  return runSynchronously(prepared, start);
}

const driven = (prepared: PreparedSampling, start: Float32Array, ahead: NoiseAhead, signal?: AbortSignal) =>
  driveWithNoiseAhead(prepared, start, ahead, signal === undefined ? {} : { signal });

const brownianSamplers = listSamplers()
  .filter((s) => s.options["brownian_noise"] === true)
  .map((s) => s.name);

test("the Brownian samplers are the four SDE samplers", () => {
  assert.deepEqual(brownianSamplers, ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"]);
});

test("every Brownian sampler gives the same latents with its tree in a worker thread as in-thread", async () => {
  const setups: Setup[] = [
    ...brownianSamplers.map((name): Setup => ({ name, seeds: [11], shape: [4, 6, 5], source: "NV" })),
    // A batch (one tree per image) and the CPU generator.
    { name: "DPM++ 2M SDE", seeds: [3, 4], shape: [4, 5, 3], source: "CPU" },
  ];
  for (const s of setups) {
    const expected = inThread(s);
    const { prepared, start } = prepare(s);
    const ahead = prepared.openNoiseAhead();
    assert.ok(ahead instanceof WorkerNoiseAhead, s.name);
    try {
      // Started first, so that every query goes to the worker (before its start they are drawn here).
      assert.equal(await ahead.start(), true);
      const got = await driven(prepared, start, ahead);
      assert.deepEqual(got.x, expected, `${s.name} ${s.source} ×${s.seeds.length}`);
      assert.ok(got.queries > 0);
      assert.equal(ahead.answeredByWorker, got.queries, `${s.name}: every tree query was answered by the worker`);
      assert.equal(ahead.queriesOnCall, 0);
      assert.equal(ahead.threadState, "running");
    } finally {
      await ahead.close();
    }
    assert.equal(ahead.threadState, "ended", `${s.name}: the worker is gone after close()`);
  }
});

test("without start(), the first queries wait for the worker's start and the worker still answers them all", async () => {
  const s: Setup = { name: "DPM++ 3M SDE", seeds: [9], shape: [4, 4, 4], source: "NV" };
  const { prepared, start } = prepare(s);
  const ahead = prepared.openNoiseAhead() as WorkerNoiseAhead;
  try {
    assert.equal(ahead.threadState, "none");
    const got = await driven(prepared, start, ahead);
    assert.deepEqual(got.x, inThread(s));
    assert.equal(ahead.answeredByWorker, got.queries);
    assert.equal(ahead.queriesOnCall, 0);
  } finally {
    await ahead.close();
  }
  assert.equal(ahead.threadState, "ended");
});

test("without a Brownian tree (or without tree queries) no thread is started", async () => {
  assert.ok(
    prepare({ name: "Euler a", seeds: [1], shape: [4, 2, 2], source: "NV" }).prepared.openNoiseAhead() instanceof InThreadNoiseAhead,
  );
  const s: Setup = { name: "DPM++ 2M SDE", seeds: [1], shape: [4, 2, 2], source: "NV", eta: 0 };
  const { prepared, start } = prepare(s);
  const ahead = prepared.openNoiseAhead() as WorkerNoiseAhead;
  assert.deepEqual((await driven(prepared, start, ahead)).x, inThread(s));
  assert.equal(ahead.threadState, "none");
  await ahead.close();
});

test("cancelling while the worker computes rejects ensureReady with the abort, and close() ends the thread", async () => {
  const { prepared, start } = prepare({ name: "DPM++ SDE", seeds: [5], shape: [4, 64, 64], source: "NV" });
  const ahead = prepared.openNoiseAhead() as WorkerNoiseAhead;
  const controller = new AbortController();
  assert.equal(await ahead.start(), true);
  const run = prepared.run(start);
  const first = run.next();
  assert.ok(!first.done && first.value.upcoming?.queries !== undefined);
  ahead.drawAhead(first.value, controller.signal);
  assert.equal(ahead.threadState, "running");
  const waiting = ahead.ensureReady(first.value, controller.signal);
  controller.abort();
  await assert.rejects(waiting, (error: unknown) => error instanceof FarmError && error.code === grpc.status.CANCELLED);
  await assert.rejects(ahead.ensureReady(first.value, controller.signal));
  await ahead.close();
  assert.equal(ahead.threadState, "ended");
  await ahead.close(); // twice is fine
});

test("a worker that cannot answer leaves the query to the sampler, which meets the error itself", async () => {
  const bogus = { seeds: [1], shape: [4, 2, 2] as const, source: "bogus" as RngSource, sigmaMin: 0.1, sigmaMax: 10 };
  const thread = new BrownianThread(bogus);
  assert.equal(await thread.ready, false);
  assert.equal(await thread.query(10, 5), undefined);
  assert.match(String(thread.error), /unknown RNG source/);
  await thread.close();
  assert.equal(thread.running, false);

  const rng = new ImageRng({ shape: [4, 2, 2], seeds: [1], source: "NV" });
  const prepared = prepareSampling({
    samplerName: "DPM++ 2M SDE",
    steps: 4,
    noise: () => rng.next(),
    brownian: { seeds: [1], shape: [4, 2, 2], source: "bogus" as RngSource },
  });
  const ahead = prepared.openNoiseAhead();
  try {
    const run = prepared.run(prepared.startLatent(rng.first()));
    const first = run.next();
    assert.ok(!first.done);
    ahead.drawAhead(first.value);
    await ahead.ensureReady(first.value); // resolves: the worker failed, nothing to wait for
    assert.throws(() => run.next(standInModel(first.value)), /unknown RNG source/);
  } finally {
    await ahead.close();
  }
});

test("readyNow takes the answers that came while the thread was blocked, and tells the driver it need not await", async () => {
  const s: Setup = { name: "DPM++ 2M SDE", seeds: [4], shape: [4, 6, 5], source: "NV" };
  const { prepared, start } = prepare(s);
  const ahead = prepared.openNoiseAhead() as WorkerNoiseAhead;
  const blocked = new Int32Array(new SharedArrayBuffer(4));
  try {
    assert.equal(await ahead.start(), true);
    const run = prepared.run(start);
    let r = run.next();
    let sawPending = false;
    let resumedWithoutAwait = 0;
    while (!r.done) {
      const req = r.value;
      const announced = (req.upcoming?.queries?.length ?? 0) > 0;
      ahead.drawAhead(req);
      if (announced) {
        // Posted just now: the tree thread cannot have answered yet.
        sawPending ||= !ahead.readyNow(req);
        // The model blocks this thread (a pipeline thread's ONNX Runtime run); the answer arrives meanwhile.
        for (let k = 0; k < 200 && !ahead.readyNow(req); k++) Atomics.wait(blocked, 0, 0, 5);
        if (ahead.readyNow(req)) resumedWithoutAwait++;
      }
      if (!ahead.readyNow(req)) await ahead.ensureReady(req);
      r = run.next(standInModel(req));
    }
    assert.deepEqual(r.value, inThread(s));
    assert.ok(sawPending, "right after posting, a query is still on its way");
    assert.ok(resumedWithoutAwait > 0, "an answer taken synchronously lets the sampler resume without an await");
    assert.equal(ahead.queriesOnCall, 0, "the sampler computed no query itself");
  } finally {
    await ahead.close();
  }
});
