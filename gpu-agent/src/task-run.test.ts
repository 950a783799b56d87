import { test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { FarmError, ImageSchema } from "@latentfarm/shared";
import { TaskRun, type RunTaskMessage } from "./task-run.js";

const step = (n: number): RunTaskMessage => ({
  kind: { case: "progress", value: { taskId: "t", imageIndex: 0, step: n, totalSteps: 10 } },
});
const image = create(ImageSchema, { index: 0, seed: 1n, png: new Uint8Array([1, 2, 3]) });

async function collect(gen: AsyncGenerator<RunTaskMessage>, upTo = Infinity): Promise<RunTaskMessage[]> {
  const out: RunTaskMessage[] = [];
  for await (const m of gen) {
    out.push(m);
    if (out.length >= upTo) break;
  }
  return out;
}

function newRun(graceMs: number, expired: TaskRun[] = []): TaskRun {
  return new TaskRun({ taskId: "t", attempt: 1, orphanGraceMs: graceMs, onExpired: (r) => expired.push(r) });
}

test("a caller that re-attaches after its stream broke gets the warnings and checkpoints, the latest step, the rest live, then the result", async () => {
  const run = newRun(10_000);
  const first = new AbortController();
  const a = run.attach(first.signal, 1);
  run.warning({ kind: { case: "warning", value: { message: "w" } } });
  run.progress(step(1));
  assert.deepEqual(
    (await collect(a, 2)).map((m) => m.kind?.case),
    ["warning", "progress"],
  );
  first.abort();
  run.progress(step(2));
  // Checkpoints add up: a coordinator that re-attaches needs every one, from the first.
  run.checkpoint({ kind: { case: "checkpoint", value: { firstCall: 0, answers: [new Uint8Array(4), new Uint8Array(4)] } } });
  run.progress(step(3));
  assert.equal(run.abort.signal.aborted, false, "the render goes on with nobody attached");
  const b = collect(run.attach(new AbortController().signal, 1));
  run.progress(step(4));
  run.finish({ output: { case: "result", value: image }, usage: { seconds: 2.5, loadSeconds: 1 } });
  const got = await b;
  assert.deepEqual(
    got.map((m) => (m.kind?.case === "progress" ? m.kind.value?.step : m.kind?.case)),
    ["warning", "checkpoint", 3, 4, "usage", "result"],
  );
  // The agent's time for the task comes just before its output, to every caller.
  const usage = got.find((m) => m.kind?.case === "usage")?.kind?.value;
  assert.deepEqual(usage, { seconds: 2.5, loadSeconds: 1 });
  const late = await collect(run.attach(new AbortController().signal, 1));
  assert.deepEqual(
    late.map((m) => m.kind?.case),
    ["warning", "checkpoint", "progress", "usage", "result"],
  );
  run.dispose();
});

test("an orphaned run is cancelled after the grace period; a finished one is forgotten after it", async () => {
  const run = newRun(30);
  const ac = new AbortController();
  const gen = run.attach(ac.signal, 1);
  const first = gen.next();
  ac.abort();
  await assert.rejects(first, (e: unknown) => FarmError.from(e).code === grpc.status.CANCELLED);
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(run.abort.signal.aborted, true);
  assert.match(String((run.abort.signal.reason as Error | undefined)?.message), /no coordinator re-attached/);

  const expired: TaskRun[] = [];
  const done = newRun(30, expired);
  done.finish({ output: { case: "result", value: image } });
  // A late attach within the retention still gets the result.
  const late = await collect(done.attach(new AbortController().signal, 1));
  assert.equal(late.at(-1)?.kind?.case, "result");
  await new Promise((r) => setTimeout(r, 60));
  assert.deepEqual(expired, [done]);
});

test("every attached caller sees the run's error, and a newer attempt is recorded", async () => {
  const run = newRun(10_000);
  const a = collect(run.attach(new AbortController().signal, 1));
  const b = collect(run.attach(new AbortController().signal, 2));
  assert.equal(run.attempt, 2);
  run.finish({ error: new FarmError(grpc.status.UNAVAILABLE, "draining", { handBack: true }) });
  for (const p of [a, b])
    await assert.rejects(p, (e: unknown) => e instanceof FarmError && e.handBack && e.toStatus().metadata?.get("x-handback")[0] === "true");
  run.dispose();
});
