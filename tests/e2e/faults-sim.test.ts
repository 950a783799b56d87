// Fault injection with simulated agents (real processes, real gRPC and NATS, JetStream on a real
// nats-server; only the model is simulated). Every test checks the client-visible invariants:
// each accepted job ends exactly once with a reason, no image is lost or delivered twice, and the
// images are the bytes a fault-free run gives (the simulated "PNG" is a digest of the seed and
// parameters, as deterministic as a real render).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { FarmError, JobState, type JobEvent } from "@latentfarm/shared";
import { findNatsServer } from "@latentfarm/coordinator";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { REPO } from "../harness/farm.js";
import { simImageBytes } from "../harness/sim-agent.js";
import { checkJob, sleep, startFaultFarm, watchToEnd, type FaultFarm, type SimProcess } from "../harness/sim-agent-farm.js";

const skip = !findNatsServer()
  ? "nats-server not installed (apt-get install nats-server)"
  : !existsSync(join(REPO, "coordinator", "dist", "cli", "main.js"))
    ? "project not built (run npm run build)"
    : false;

const POISON_SEED = 777_001n;
const base = { prompt: "sim", model: "sim", width: 64, height: 64, samplerName: "Euler" };

function expectBytes(outcome: ReturnType<typeof checkJob>, params: { steps: number; prompt?: string }, seed0: bigint): void {
  for (const [i, img] of outcome.images) {
    const want = simImageBytes({ ...base, ...params }, seed0 + BigInt(i), img.subseed);
    assert.deepEqual(Buffer.from(img.png), Buffer.from(want), `image ${i} equals the fault-free render`);
    assert.equal(img.seed, seed0 + BigInt(i));
  }
}

describe("fault injection with simulated agents", { skip, concurrency: false, timeout: 180_000 }, () => {
  let farm: FaultFarm;
  let sims: SimProcess;
  let frozen: SimProcess;
  before(async () => {
    farm = await startFaultFarm({ coordinatorArgs: ["--max-attempts", "3"] });
    await farm.startCoordinator();
    sims = await farm.startSims({
      count: 3,
      slots: 2,
      stepMs: 15,
      prefix: "sim-",
      progress: true,
      logTasks: true,
      poisonSeeds: [POISON_SEED],
    });
    frozen = await farm.startSims({ count: 1, slots: 1, stepMs: 15, prefix: "frz-", logTasks: true, poisonSeeds: [POISON_SEED] });
    await farm.waitForAgents(4);
  });
  after(async () => {
    await farm?.close();
  });

  const dupParams = { ...base, steps: 3, batchSize: 3, seed: 5000n };
  let dupJobId = "";

  test("duplicate Submits with one request_id (concurrent, and a retry later) make one job", { timeout: 45_000 }, async () => {
    const params = dupParams;
    const submits = await Promise.all(Array.from({ length: 5 }, () => farm.client.submit({ params, requestId: "req-dup-1" })));
    const ids = new Set(submits.map((s) => s.jobId));
    assert.equal(ids.size, 1, "every concurrent Submit got the same job");
    const [jobId] = ids;
    dupJobId = jobId!;
    const { events } = await watchToEnd(farm.client, jobId!);
    const again = await farm.client.submit({ params, requestId: "req-dup-1" });
    assert.equal(again.jobId, jobId, "a retry after the job finished returns it too");
    const other = await farm.client.submit({ params, requestId: "req-dup-1" }, { metadata: { "x-tenant": "someone-else" } });
    assert.notEqual(other.jobId, jobId, "request ids are per tenant");
    await watchToEnd(farm.client, other.jobId);
    const out = checkJob(events, 3);
    assert.equal(out.terminal, "done");
    expectBytes(out, { steps: 3 }, 5000n);
    const ran = new Set(
      [...sims.log, ...frozen.log]
        .filter((l) => l.event === "start" && !l.taskId.startsWith(other.jobId))
        .map((l) => l.taskId.slice(0, 36)),
    );
    assert.ok(![...ran].some((j) => j !== jobId && submits.some((s) => s.jobId === j)), "no second job was run");
  });

  test(
    "a client that disconnects and watches again from its last sequence number misses nothing and sees nothing twice",
    { timeout: 45_000 },
    async () => {
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 8, batchSize: 4, seed: 6000n } });
      const first: JobEvent[] = [];
      const ac = new AbortController();
      await assert.rejects(
        (async () => {
          for await (const { event } of farm.client.watch({ jobId }, { signal: ac.signal })) {
            if (event) first.push(event);
            if (first.length === 6) ac.abort();
          }
        })(),
      );
      await sleep(150);
      const rest: JobEvent[] = [];
      for await (const { event } of farm.client.watch({ jobId, afterSequence: first.at(-1)!.sequence })) if (event) rest.push(event);
      const full: JobEvent[] = [];
      for await (const { event } of farm.client.watch({ jobId })) if (event) full.push(event);
      assert.deepEqual(
        [...first, ...rest].map((e) => [e.sequence, e.event.case]),
        full.map((e) => [e.sequence, e.event.case]),
      );
      const out = checkJob([...first, ...rest], 4);
      assert.equal(out.terminal, "done");
      expectBytes(out, { steps: 8 }, 6000n);
    },
  );

  test(
    "a poison task fails its image with the last error after 3 attempts on different agents; the other images complete",
    { timeout: 45_000 },
    async () => {
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 4, batchSize: 3, seed: POISON_SEED - 1n } });
      const { events } = await watchToEnd(farm.client, jobId);
      const out = checkJob(events, 3);
      assert.equal(out.terminal, "failed");
      assert.deepEqual([...out.images.keys()].sort(), [0, 2], "the healthy images were delivered");
      expectBytes(out, { steps: 4 }, POISON_SEED - 1n);
      const f = out.failed.get(1);
      assert.ok(f, "image 1 failed");
      assert.equal(f.code, "INTERNAL");
      assert.match(f.message, /simulated crash rendering seed 777001/);
      assert.equal(f.attempts, 3);
      const placedOn = events
        .filter((e) => e.event.case === "placed" && e.event.value.imageIndex === 1)
        .map((e) => (e.event.value as { agentId: string }).agentId);
      assert.equal(placedOn.length, 3);
      assert.equal(new Set(placedOn).size, 3, `each attempt ran on a different agent (${placedOn.join(", ")})`);
      const terminal = events.at(-1)!.event;
      assert.equal(terminal.case, "failed");
      assert.match((terminal.value as { message: string }).message, /simulated crash/);
      const got = await farm.client.get({ jobId });
      assert.equal(got.state, JobState.FAILED);
      assert.deepEqual(got.failedImages, [1]);
      assert.equal(got.images.length, 2);
    },
  );

  test(
    "an agent frozen (SIGSTOP) past its heartbeat timeout loses its task to another agent; after SIGCONT its late work is ignored",
    { timeout: 45_000 },
    async () => {
      // Seven slots in all, seven images: one lands on the agent about to freeze.
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 40, batchSize: 7, seed: 7000n } });
      let victimImage = -1;
      let frozenAt = 0;
      const { events } = await watchToEnd(farm.client, jobId, {
        onEvent: (e) => {
          if (victimImage < 0 && e.event.case === "placed" && e.event.value.agentId === "frz-0") victimImage = e.event.value.imageIndex;
          if (
            !frozenAt &&
            victimImage >= 0 &&
            e.event.case === "step" &&
            e.event.value.imageIndex === victimImage &&
            e.event.value.step >= 2
          ) {
            frozen.child.kill("SIGSTOP");
            frozenAt = Date.now();
          }
        },
      });
      assert.ok(frozenAt > 0, "the agent was frozen mid-task");
      const out = checkJob(events, 7);
      assert.equal(out.terminal, "done");
      expectBytes(out, { steps: 40 }, 7000n);
      assert.notEqual(out.images.get(victimImage)!.agentId, "frz-0", "the frozen agent's image came from another agent");
      const retried = events.find((e) => e.event.case === "retried" && e.event.value.imageIndex === victimImage);
      assert.ok(retried, "the frozen agent's task was placed again");
      frozen.child.kill("SIGCONT");
      await sleep(800);
      // The resumed agent's attempt ended without a delivered result, and the job is unchanged.
      const victimTask = `${jobId}-${victimImage}`;
      assert.ok(
        frozen.log.some((l) => l.taskId === victimTask && l.event !== "start"),
        "the frozen attempt ended after SIGCONT",
      );
      const replay: JobEvent[] = [];
      for await (const { event } of farm.client.watch({ jobId })) if (event) replay.push(event);
      assert.equal(replay.length, events.length, "no event was added by the late agent");
      await farm.waitForAgents(4);
    },
  );

  test(
    "kill -9 of the coordinator mid-batch: after a restart every accepted job completes; finished images are not rendered again",
    { timeout: 45_000 },
    async () => {
      const jobs = await Promise.all(
        Array.from({ length: 6 }, (_, j) =>
          farm.client.submit({ params: { ...base, steps: 10, batchSize: 4, seed: BigInt(8000 + 100 * j) } }),
        ),
      );
      const deliveredBeforeKill = new Map<string, Set<number>>();
      let killed = false;
      let restarting: Promise<void> | undefined;
      const watchers = jobs.map(({ jobId }) =>
        watchToEnd(farm.client, jobId, {
          onEvent: (e) => {
            if (e.event.case === "image" && !killed) {
              let s = deliveredBeforeKill.get(jobId);
              if (!s) deliveredBeforeKill.set(jobId, (s = new Set()));
              s.add(e.event.value.image!.index);
            }
            const total = [...deliveredBeforeKill.values()].reduce((n, s) => n + s.size, 0);
            if (!killed && total >= 5) {
              killed = true;
              restarting = (async () => {
                await farm.stopCoordinator("SIGKILL");
                await sleep(200);
                await farm.startCoordinator();
              })();
            }
          },
        }),
      );
      const results = await Promise.all(watchers);
      await restarting;
      assert.ok(killed, "the coordinator was killed mid-batch");
      // Renders running at the kill went on, and the new coordinator re-attached to them instead of
      // starting them over: each re-attached task was started exactly once.
      const ours = new Set(jobs.flatMap(({ jobId }) => [0, 1, 2, 3].map((i) => `${jobId}-${i}`)));
      const attached = new Set(sims.log.filter((l) => l.event === "attach" && ours.has(l.taskId)).map((l) => l.taskId));
      assert.ok(attached.size > 0, "the restarted coordinator re-adopted running tasks");
      for (const id of attached)
        assert.equal(sims.log.filter((l) => l.event === "start" && l.taskId === id).length, 1, `task ${id} was rendered once`);
      assert.ok(
        results.some((r) => r.reconnects > 0),
        "watchers reconnected",
      );
      for (const [j, r] of results.entries()) {
        const out = checkJob(r.events, 4);
        assert.equal(out.terminal, "done");
        expectBytes(out, { steps: 10 }, BigInt(8000 + 100 * j));
        const before = deliveredBeforeKill.get(jobs[j]!.jobId) ?? new Set<number>();
        const killSeq = Math.max(
          0,
          ...r.events.filter((e) => e.event.case === "image" && before.has(e.event.value.image!.index)).map((e) => Number(e.sequence)),
        );
        for (const e of r.events) {
          if (e.event.case === "placed" && Number(e.sequence) > killSeq)
            assert.ok(!before.has(e.event.value.imageIndex), `image ${e.event.value.imageIndex} of job ${j} was rendered again`);
        }
      }
      // Idempotency survives the restart: the new coordinator never had the first test's job in
      // memory, and finds it by its request id in JetStream.
      assert.ok(dupJobId);
      const again = await farm.client.submit({ params: dupParams, requestId: "req-dup-1" });
      assert.equal(again.jobId, dupJobId);
      assert.equal((await farm.client.get({ jobId: dupJobId })).state, JobState.SUCCEEDED);
      await farm.waitForAgents(4);
    },
  );

  test("nats-server killed (-9) and restarted mid-batch: jobs complete and nothing stored is lost", { timeout: 45_000 }, async () => {
    const jobs = await Promise.all(
      Array.from({ length: 3 }, (_, j) =>
        farm.client.submit({ params: { ...base, steps: 20, batchSize: 3, seed: BigInt(9000 + 100 * j) } }),
      ),
    );
    let restarted: Promise<void> | undefined;
    const watchers = jobs.map(({ jobId }) =>
      watchToEnd(farm.client, jobId, {
        onEvent: (e) => {
          if (!restarted && e.event.case === "image") restarted = farm.restartNats("SIGKILL", 500);
        },
      }),
    );
    const results = await Promise.all(watchers);
    await restarted;
    assert.ok(restarted, "nats-server was restarted mid-batch");
    for (const [j, r] of results.entries()) {
      const out = checkJob(r.events, 3);
      assert.equal(out.terminal, "done");
      expectBytes(out, { steps: 20 }, BigInt(9000 + 100 * j));
    }
    // The restarted server still has every job: a fresh Watch replays each one whole.
    for (const [j, { jobId }] of jobs.entries()) {
      const replay: JobEvent[] = [];
      for await (const { event } of farm.client.watch({ jobId })) if (event) replay.push(event);
      expectBytes(checkJob(replay, 3), { steps: 20 }, BigInt(9000 + 100 * j));
    }
    // A Submit during an outage is either refused with a status or accepted and then completed; never lost.
    const down = farm.restartNats("SIGKILL", 1500);
    await sleep(200);
    try {
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 2, seed: 9900n } }, { timeoutMs: 20_000 });
      const out = checkJob((await watchToEnd(farm.client, jobId)).events, 1);
      assert.equal(out.terminal, "done");
    } catch (err) {
      assert.notEqual(FarmError.from(err).code, grpc.status.OK);
    }
    await down;
    await farm.waitForAgents(4);
  });
});
