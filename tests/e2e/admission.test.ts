// Admission, sharing and lifecycle control, end to end over real processes with simulated agents:
// per-tenant limits (RESOURCE_EXHAUSTED with a retry-after hint in the trailers), weighted fair
// share and priorities, deadlines refused at admission from the speed model (and enforced while
// running), image- and task-level cancellation, the coordinator's graceful drain, and an agent's
// drain hand-back (which must not count as a failed attempt).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { FarmError, JobState, isServiceError, type JobEvent } from "@latentfarm/shared";
import { findNatsServer } from "@latentfarm/coordinator";
import { REPO } from "../harness/farm.js";
import { checkJob, sleep, startFaultFarm, watchToEnd, type FaultFarm, type SimProcess } from "../harness/sim-agent-farm.js";

const skip = !findNatsServer()
  ? "nats-server not installed (apt-get install nats-server)"
  : !existsSync(join(REPO, "coordinator", "dist", "cli", "main.js"))
    ? "project not built (run npm run build)"
    : false;

const base = { prompt: "sim", model: "sim", width: 64, height: 64, samplerName: "Euler" };
const as = (tenant: string) => ({ metadata: { "x-tenant": tenant } });

async function rejection(p: Promise<unknown>): Promise<FarmError> {
  try {
    await p;
  } catch (err) {
    return FarmError.from(err);
  }
  assert.fail("expected the call to be refused");
}

describe("admission, fair share, deadlines, cancellation and drains", { skip, concurrency: false, timeout: 180_000 }, () => {
  let farm: FaultFarm;
  let sims: SimProcess;
  let leaving: SimProcess;
  let dir: string;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "latentfarm-tenants-"));
    const tenants = join(dir, "tenants.json");
    writeFileSync(
      tenants,
      JSON.stringify({
        "*": { weight: 1 },
        capped: { maxQueuedImages: 4 },
        narrow: { maxRunningImages: 1 },
        bulk: { weight: 1 },
        interactive: { weight: 3 },
      }),
    );
    // One attempt only: a hand-back that counted as a failure would fail the image.
    // A long agent timeout: on a busy machine a late heartbeat must not cost an attempt.
    farm = await startFaultFarm({
      coordinatorArgs: [
        "--tenants-file",
        tenants,
        "--max-attempts",
        "1",
        "--drain-seconds",
        "5",
        "--no-speculate",
        "--agent-timeout-ms",
        "5000",
      ],
    });
    await farm.startCoordinator();
    sims = await farm.startSims({ count: 2, slots: 1, stepMs: 10, prefix: "a-", logTasks: true });
    leaving = await farm.startSims({ count: 1, slots: 1, stepMs: 10, prefix: "b-", drainMs: 100, logTasks: true });
    await farm.waitForAgents(3);
  });
  after(async () => {
    await farm?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test(
    "over its queued-images limit a tenant gets RESOURCE_EXHAUSTED with a retry-after hint; other tenants are unaffected",
    { timeout: 45_000 },
    async () => {
      const first = await farm.client.submit({ params: { ...base, steps: 20, batchSize: 3, seed: 1n } }, as("capped"));
      const over = await rejection(farm.client.submit({ params: { ...base, steps: 20, batchSize: 2, seed: 2n } }, as("capped")));
      assert.equal(over.code, grpc.status.RESOURCE_EXHAUSTED);
      assert.match(over.message, /limit 4/);
      const md = isServiceError(over.cause) ? over.cause.metadata : undefined;
      const pushback = Number(md?.get("grpc-retry-pushback-ms")[0]);
      assert.ok(pushback > 0 && pushback <= 600_000, `retry-after hint in the trailers (got ${pushback})`);
      assert.equal(md?.get("x-retryable")[0], "true");
      const never = await rejection(farm.client.submit({ params: { ...base, steps: 1, batchSize: 5, seed: 3n } }, as("capped")));
      assert.equal(never.code, grpc.status.RESOURCE_EXHAUSTED);
      assert.equal(
        isServiceError(never.cause) ? never.cause.metadata.get("x-retryable")[0] : "",
        "false",
        "a job larger than the limit can never fit",
      );
      const other = await farm.client.submit({ params: { ...base, steps: 1, batchSize: 2, seed: 4n } }, as("someone"));
      await watchToEnd(farm.client, other.jobId);
      await watchToEnd(farm.client, first.jobId);
      const later = await farm.client.submit({ params: { ...base, steps: 1, batchSize: 2, seed: 2n } }, as("capped"));
      assert.equal(checkJob((await watchToEnd(farm.client, later.jobId)).events, 2).terminal, "done");
    },
  );

  test("a tenant's running-images limit keeps it to one image at a time", { timeout: 45_000 }, async () => {
    const { jobId } = await farm.client.submit({ params: { ...base, steps: 3, batchSize: 4, seed: 10n } }, as("narrow"));
    const { events } = await watchToEnd(farm.client, jobId);
    assert.equal(checkJob(events, 4).terminal, "done");
    // From the agents' own logs: never two of the job's tasks between start and end at once.
    const log = [...sims.log, ...leaving.log]
      .filter((l) => l.taskId.startsWith(jobId))
      .sort((a, b) => a.t - b.t || (a.event === "start" ? 1 : -1));
    assert.equal(log.filter((l) => l.event === "start").length, 4);
    let running = 0;
    for (const l of log) {
      running += l.event === "start" ? 1 : -1;
      assert.ok(running <= 1, "two images of the tenant ran at once");
    }
  });

  test(
    "weighted fair share: a weight-3 tenant arriving behind a weight-1 tenant's backlog gets about 3 of every 4 images; priority orders a tenant's own jobs",
    { timeout: 45_000 },
    async () => {
      const low = await farm.client.submit({ params: { ...base, steps: 2, batchSize: 30, seed: 100n } }, as("bulk"));
      const inter = await farm.client.submit({ params: { ...base, steps: 2, batchSize: 24, seed: 200n } }, as("interactive"));
      const urgent = await farm.client.submit({ params: { ...base, steps: 2, batchSize: 3, seed: 300n }, priority: 5 }, as("bulk"));
      let bulkDoneWhenInteractiveDone = -1;
      let bulkDone = 0;
      const w1 = watchToEnd(farm.client, low.jobId, { onEvent: (e) => void (e.event.case === "image" && bulkDone++) });
      const w2 = watchToEnd(farm.client, inter.jobId, {
        onEvent: (e) => void (e.event.case === "done" && (bulkDoneWhenInteractiveDone = bulkDone)),
      });
      const w3 = watchToEnd(farm.client, urgent.jobId);
      const [r1, , r3] = await Promise.all([w1, w2, w3]);
      const lowDoneAt = Number(r1.events.at(-1)!.timeUnixMs);
      const urgentDoneAt = Number(r3.events.at(-1)!.timeUnixMs);
      // 24 interactive images at 3:1 take about 8 bulk images alongside (plus what started before).
      assert.ok(
        bulkDoneWhenInteractiveDone >= 3 && bulkDoneWhenInteractiveDone <= 16,
        `bulk images done when interactive finished: ${bulkDoneWhenInteractiveDone}`,
      );
      assert.ok(urgentDoneAt > 0 && urgentDoneAt < lowDoneAt, "the tenant's high-priority job finished before its older low-priority one");
    },
  );

  test(
    "deadlines: refused at admission when the speed model says they cannot be met; a job past its deadline fails DEADLINE_EXCEEDED",
    { timeout: 45_000 },
    async () => {
      // Measure the agents first (the estimate needs measured speeds).
      await watchToEnd(farm.client, (await farm.client.submit({ params: { ...base, steps: 10, batchSize: 6, seed: 20n } })).jobId);
      const refused = await rejection(
        farm.client.submit({ params: { ...base, steps: 10, batchSize: 60, seed: 21n }, deadlineUnixMs: BigInt(Date.now() + 400) }),
      );
      assert.equal(refused.code, grpc.status.FAILED_PRECONDITION);
      assert.match(refused.message, /deadline_unix_ms: cannot be met: .* estimates the job needs \d+\.\d s/);
      const past = await rejection(
        farm.client.submit({ params: { ...base, steps: 1, seed: 22n }, deadlineUnixMs: BigInt(Date.now() - 1000) }),
      );
      assert.equal(past.code, grpc.status.FAILED_PRECONDITION);
      const ok = await farm.client.submit({
        params: { ...base, steps: 10, batchSize: 2, seed: 23n },
        deadlineUnixMs: BigInt(Date.now() + 10_000),
      });
      assert.equal(checkJob((await watchToEnd(farm.client, ok.jobId)).events, 2).terminal, "done");
      // Frozen agents make a feasible job miss its deadline.
      const late = await farm.client.submit({
        params: { ...base, steps: 30, batchSize: 2, seed: 24n },
        deadlineUnixMs: BigInt(Date.now() + 900),
      });
      sims.child.kill("SIGSTOP");
      leaving.child.kill("SIGSTOP");
      try {
        const { events } = await watchToEnd(farm.client, late.jobId);
        const out = checkJob(events, 2);
        assert.equal(out.terminal, "failed");
        const f = events.at(-1)!.event.value as { code: string; message: string };
        assert.equal(f.code, "DEADLINE_EXCEEDED");
      } finally {
        sims.child.kill("SIGCONT");
        leaving.child.kill("SIGCONT");
      }
      await farm.waitForAgents(3);
    },
  );

  test(
    "cancelling single images (by index and by task id) leaves the rest of the job, and other jobs, running",
    { timeout: 45_000 },
    async () => {
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 30, batchSize: 6, seed: 30n } });
      const other = await farm.client.submit({ params: { ...base, steps: 30, batchSize: 3, seed: 31n } }, as("someone"));
      const bad = await rejection(farm.client.cancel({ jobId, imageIndices: [6] }));
      assert.equal(bad.code, grpc.status.INVALID_ARGUMENT);
      const r = await farm.client.cancel({ jobId, imageIndices: [1, 4], taskIds: [`${jobId}-5`] });
      assert.deepEqual(r.cancelledImages, [1, 4, 5]);
      const { events } = await watchToEnd(farm.client, jobId);
      const out = checkJob(events, 6);
      assert.equal(out.terminal, "done");
      assert.deepEqual([...out.images.keys()].sort(), [0, 2, 3]);
      assert.deepEqual([...out.cancelled].sort(), [1, 4, 5]);
      const got = await farm.client.get({ jobId });
      assert.equal(got.state, JobState.SUCCEEDED);
      assert.deepEqual(got.cancelledImages, [1, 4, 5]);
      // Another tenant's job running alongside is untouched.
      const o = checkJob((await watchToEnd(farm.client, other.jobId)).events, 3);
      assert.equal(o.terminal, "done");
      assert.equal(o.images.size, 3);
    },
  );

  test(
    "coordinator SIGTERM drains: Submit is refused, running images finish, the rest resumes after the restart",
    { timeout: 45_000 },
    async () => {
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 25, batchSize: 6, seed: 40n } });
      const seen: JobEvent[] = [];
      const it = farm.client.watch({ jobId })[Symbol.asyncIterator]();
      for (;;) {
        const { value, done } = await it.next();
        assert.ok(!done);
        if (value.event) seen.push(value.event);
        if (value.event?.event.case === "step") break;
      }
      const coordinator = farm.coordinator!;
      const exited = new Promise((r) => coordinator.child.once("exit", r));
      coordinator.child.kill("SIGTERM");
      let refused: FarmError | undefined;
      for (let i = 0; i < 50 && !refused; i++) {
        try {
          const extra = await farm.client.submit({ params: { ...base, steps: 1, seed: 41n } }, { timeoutMs: 2000 });
          await farm.client.cancel({ jobId: extra.jobId }).catch(() => undefined);
        } catch (err) {
          refused = FarmError.from(err);
        }
        await sleep(20);
      }
      assert.equal(refused?.code, grpc.status.UNAVAILABLE, "Submit is refused while draining");
      await exited;
      farm.coordinator = undefined;
      await farm.startCoordinator();
      const { events } = await watchToEnd(farm.client, jobId);
      const out = checkJob(events, 6);
      assert.equal(out.terminal, "done");
      const placedPerImage = new Map<number, number>();
      for (const e of events)
        if (e.event.case === "placed")
          placedPerImage.set(e.event.value.imageIndex, (placedPerImage.get(e.event.value.imageIndex) ?? 0) + 1);
      assert.ok(
        [...placedPerImage.values()].every((n) => n === 1),
        `images that ran before the drain finished during it, not again (${[...placedPerImage.entries()].join(" ")})`,
      );
      await farm.waitForAgents(3);
    },
  );

  test(
    "an agent's SIGTERM hands its tasks back; the hand-back is not a failed attempt (max attempts is 1 here)",
    { timeout: 45_000 },
    async () => {
      const { jobId } = await farm.client.submit({ params: { ...base, steps: 60, batchSize: 3, seed: 50n } });
      let sent = false;
      const { events } = await watchToEnd(farm.client, jobId, {
        onEvent: (e) => {
          if (!sent && e.event.case === "step" && e.event.value.step >= 2) {
            sent = true;
            leaving.child.kill("SIGTERM");
          }
        },
      });
      const out = checkJob(events, 3);
      assert.equal(out.terminal, "done", "no image failed although max attempts is 1");
      assert.ok(
        events.some((e) => e.event.case === "retried" && /shutting down|draining/.test(e.event.value.reason)),
        "the draining agent's task was handed back",
      );
      for (const img of out.images.values()) assert.notEqual(img.agentId, "b-0");
      const metrics = await fetch(farm.coordinator!.ready["metrics"] as string).then((r) => r.text());
      assert.match(metrics, /latentfarm_task_retries_total\{reason="HANDED_BACK"\} [1-9]/);
    },
  );
});
