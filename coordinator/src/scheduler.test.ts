import { test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import {
  AgentInfoSchema,
  AttemptOutcome,
  COORDINATOR_METRICS,
  EXTRAS_MODEL,
  TaskUsageSchema,
  createMetrics,
  type MetricSet,
  type TaskAttempt,
  FarmError,
  GenerationParamsSchema,
  ImageSchema,
  PassCheckpointSchema,
  RefinerResumeSchema,
  VaeInfoSchema,
  LoraInfoSchema,
  silentLogger,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { loraNamesOf, type AgentState } from "./agent-registry.js";
import { DEFAULT_TENANT_POLICY } from "./fair-queue.js";
import { Job } from "./job-store.js";
import { Scheduler, checkStagesPlaceable, type SchedulerHooks, type Task } from "./scheduler.js";
import { DEFAULT_HIRES_TILING, planHires } from "./hires-stages.js";
import { SpeedModel } from "./speed-model.js";

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const concurrency = new Map<string, { now: number; max: number }>();

interface FakeBehaviour {
  stepMs: number;
  /** Fails the attempt at its first step with this error. */
  fail?: (req: RunTaskRequest) => FarmError | undefined;
  /** Stops making progress after the first step, until cancelled. */
  stall?: boolean;
  /**
   * A job's refiner this agent does not offer: after this step of a task that has not switched yet, the
   * agent hands the switch back, as an agent without the refiner does.
   */
  refinerSwitchAfter?: number;
  /** Fails attempt k (1-based) with UNAVAILABLE, as a lost agent's stream breaks, after step failAfter[k − 1]. */
  failAfter?: number[];
  /** Sends RunTaskResponse.usage with these seconds before its result. */
  usageSeconds?: number;
}

/** An agent whose RunTask stream is simulated in-process: steps are timers, results are empty images. */
function fakeAgent(id: string, slots: number, b: FakeBehaviour, log: string[]): AgentState {
  const client = {
    runTask: (req: RunTaskRequest, opts?: { signal?: AbortSignal }) => ({
      async *[Symbol.asyncIterator]() {
        const signal = opts?.signal;
        const wait = async (ms: number): Promise<void> => {
          await new Promise<void>((resolve, reject) => {
            const t = setTimeout(resolve, ms);
            signal?.addEventListener(
              "abort",
              () => {
                clearTimeout(t);
                reject(new FarmError(grpc.status.CANCELLED, "cancelled"));
              },
              { once: true },
            );
          });
        };
        log.push(
          `start ${id} ${req.taskId}${req.refinerResume ? ` resumed after ${req.refinerResume.answers.length}` : ""}` +
            (req.resumeFrom ? ` from checkpoint ${req.resumeFrom.answers.map((a) => a[0]).join(",")}` : ""),
        );
        const c = concurrency.get(id) ?? { now: 0, max: 0 };
        concurrency.set(id, c);
        c.now++;
        c.max = Math.max(c.max, c.now);
        try {
          const steps = req.params?.steps ?? 1;
          // One "answer" a step, its byte the step's number; a resumed attempt starts after its checkpoint's.
          const from = req.resumeFrom?.answers.length ?? 0;
          for (let s = from + 1; s <= steps; s++) {
            await wait(b.stepMs);
            const err = b.fail?.(req);
            if (err) throw err;
            yield {
              kind: { case: "progress" as const, value: { taskId: req.taskId, imageIndex: req.imageIndex, step: s, totalSteps: steps } },
            };
            if (b.stall) await wait(3_600_000);
            const every = req.checkpointEverySteps;
            if (every > 0 && s % every === 0) {
              const answers = Array.from({ length: every }, (_, k) => Uint8Array.of(s - every + 1 + k));
              yield {
                kind: {
                  case: "checkpoint" as const,
                  value: create(PassCheckpointSchema, { firstCall: s - every, answers, ...(s === every && { start: Uint8Array.of(0) }) }),
                },
              };
            }
            if (b.failAfter?.[req.attempt - 1] === s) throw new FarmError(grpc.status.UNAVAILABLE, "agent lost");
            if (b.refinerSwitchAfter === s && req.params?.refinerCheckpoint && !req.refinerResume) {
              const answers = Array.from({ length: s }, () => new Uint8Array(4));
              yield { kind: { case: "refinerSwitch" as const, value: create(RefinerResumeSchema, { answers }) } };
              return;
            }
          }
          if (b.usageSeconds !== undefined) {
            yield { kind: { case: "usage" as const, value: create(TaskUsageSchema, { seconds: b.usageSeconds, loadSeconds: 0.25 }) } };
          }
          yield { kind: { case: "result" as const, value: create(ImageSchema, { index: req.imageIndex, seed: req.seed }) } };
        } finally {
          c.now--;
        }
      },
    }),
    cancelTask: async (req: { taskId: string }) => {
      log.push(`cancel ${id} ${req.taskId}`);
      return { stopped: true };
    },
  };
  return {
    id,
    info: create(AgentInfoSchema, { agentId: id, address: id, slots, loadedModels: ["m"] }),
    available: new Set(["m"]),
    embeddings: [],
    skippedEmbeddings: [],
    upscalers: new Set<string>(),
    faceRestorers: new Set<string>(),
    loras: [],
    loraNames: new Set<string>(),
    lorasUnlisted: false,
    inventoryDigest: "",
    vaes: [],
    models: new Map(),
    freeMemoryBytes: 0n,
    lastSeen: Date.now(),
    inFlight: 0,
    client: client as unknown as AgentState["client"],
  };
}

function harness(
  agents: AgentState[],
  opts: {
    maxAttempts?: number;
    speculate?: boolean;
    checkpointEverySteps?: number;
    checkpointMaxBytes?: number;
    metrics?: MetricSet<typeof COORDINATOR_METRICS>;
  } = {},
) {
  const done: Array<{ task: Task; agent: string; attemptsEnded: number }> = [];
  const ended: Array<{ task: Task; attempt: TaskAttempt }> = [];
  const failed: Array<{ task: Task; err: FarmError }> = [];
  const retried: Array<{ task: Task; err: FarmError }> = [];
  let waiters: Array<() => void> = [];
  const wake = (): void => {
    for (const w of waiters) w();
    waiters = [];
  };
  const hooks: SchedulerHooks = {
    onPlaced: (task, run) => {
      task.job.attempts[task.imageIndex] = run.attempt;
    },
    onStep: () => undefined,
    onWarning: () => undefined,
    onResult: (task, _image, run) => {
      done.push({ task, agent: run.agent.id, attemptsEnded: ended.filter((e) => e.task === task).length });
      wake();
    },
    onAttemptEnded: (task, attempt) => ended.push({ task, attempt }),
    onRetry: (task, err) => retried.push({ task, err }),
    onFailed: (task, err) => {
      failed.push({ task, err });
      wake();
    },
  };
  const speed = new SpeedModel();
  const scheduler = new Scheduler({ list: () => agents }, hooks, {
    logger: silentLogger,
    maxAttempts: opts.maxAttempts ?? 3,
    speculate: opts.speculate ?? false,
    ...(opts.checkpointEverySteps !== undefined && { checkpointEverySteps: opts.checkpointEverySteps }),
    ...(opts.checkpointMaxBytes !== undefined && { checkpointMaxBytes: opts.checkpointMaxBytes }),
    ...(opts.metrics !== undefined && { metrics: opts.metrics }),
    tenantPolicy: () => DEFAULT_TENANT_POLICY,
    speed,
  });
  let jobs = 0;
  const submit = (
    n: number,
    steps: number,
    resume?: { agent: string; until: number; attempt: number },
    callsPerStep = 1,
    sdVae = "",
    params: {
      refinerCheckpoint?: string;
      refinerSwitchAt?: number;
      enableHr?: boolean;
      hrUpscaler?: string;
      denoisingStrength?: number;
      restoreFaces?: boolean;
      overrideSettings?: { faceRestorationModel?: string };
      prompt?: string;
      loras?: { name: string; teWeight: number; unetWeight: number }[];
    } = {},
  ): Task[] => {
    const job = new Job({
      id: `job${jobs++}`,
      params: create(GenerationParamsSchema, {
        model: "m",
        steps,
        width: 64,
        height: 64,
        ...params,
        overrideSettings: { sdVae, ...params.overrideSettings },
      }),
      tenant: "t",
      requestId: "",
      imageCount: n,
      createdAt: Date.now(),
      deadlineUnixMs: 0,
      priority: 0,
    });
    const tasks: Task[] = Array.from({ length: n }, (_, i) => ({
      id: `${job.id}-${i}`,
      job,
      imageIndex: i,
      seed: BigInt(i),
      subseed: 0n,
      tenant: "t",
      key: { model: "m", width: 64, height: 64 },
      steps,
      modelCalls: steps * callsPerStep,
      cost: steps,
      state: "queued",
      failures: 0,
      failedOn: new Set<string>(),
      runs: [],
      preferAgent: resume?.agent,
      ...(resume && { adoptUntil: resume.until }),
      lastStep: 0,
    }));
    if (resume) for (let i = 0; i < n; i++) job.attempts[i] = resume.attempt;
    scheduler.enqueueJob(job, tasks);
    return tasks;
  };
  const settled = async (count: number, timeoutMs = 20_000): Promise<void> => {
    const deadline = Date.now() + timeoutMs;
    while (done.length + failed.length < count) {
      assert.ok(Date.now() < deadline, `only ${done.length + failed.length} of ${count} tasks settled`);
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 100);
      });
    }
  };
  return { scheduler, speed, submit, settled, done, failed, retried, ended };
}

test("with measured speeds 1×, 2×, 4× a batch splits about 1:2:4, and the fastest agent takes the most", async () => {
  const log: string[] = [];
  const agents = [fakeAgent("x1", 1, { stepMs: 24 }, log), fakeAgent("x2", 1, { stepMs: 12 }, log), fakeAgent("x4", 1, { stepMs: 6 }, log)];
  const h = harness(agents);
  h.submit(6, 4);
  await h.settled(6);
  h.done.length = 0;
  h.submit(28, 4);
  await h.settled(28);
  const count = (id: string): number => h.done.filter((d) => d.agent === id).length;
  assert.ok(count("x4") > count("x2") && count("x2") > count("x1"), `split ${count("x1")}:${count("x2")}:${count("x4")}`);
  assert.ok(count("x4") >= 12, `the 4× agent did ${count("x4")} of 28 (ideal 16)`);
  h.scheduler.close();
});

test("a job that names a VAE file runs only on agents that list it; Automatic and None run anywhere", async () => {
  const log: string[] = [];
  const withVae = fakeAgent("with-vae", 2, { stepMs: 5 }, log);
  withVae.vaes = [create(VaeInfoSchema, { name: "anime.vae.pt", sizeBytes: 10n })];
  const h = harness([fakeAgent("plain", 2, { stepMs: 5 }, log), withVae]);
  h.submit(6, 2, undefined, 1, "anime.vae.pt");
  await h.settled(6);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["with-vae"]));
  h.done.length = 0;
  h.submit(4, 2, undefined, 1, "None");
  h.submit(4, 2, undefined, 1, "Automatic");
  await h.settled(8);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["plain", "with-vae"]));
  h.scheduler.close();
});

test("a task waits for a measured fast agent rather than start on a much slower free one", async () => {
  const log: string[] = [];
  const agents = [fakeAgent("fast", 1, { stepMs: 5 }, log), fakeAgent("slow", 1, { stepMs: 150 }, log)];
  const h = harness(agents);
  h.speed.observe("fast", { model: "m", width: 64, height: 64 }, { secondsPerCall: 0.005, overheadSeconds: 0 });
  h.speed.observe("slow", { model: "m", width: 64, height: 64 }, { secondsPerCall: 0.15, overheadSeconds: 0 });
  h.submit(4, 2);
  await h.settled(4);
  assert.deepEqual(
    new Set(h.done.map((d) => d.agent)),
    new Set(["fast"]),
    "four 10 ms tasks on the fast agent end before one 300 ms task on the slow one",
  );
  h.scheduler.close();
});

test("the speed model learns seconds per model call: a step of a two-call sampler (Heun) counts twice", async () => {
  const key = { model: "m", width: 64, height: 64 };
  const perCall = async (callsPerStep: number): Promise<number> => {
    const h = harness([fakeAgent("a", 1, { stepMs: 40 }, [])]);
    h.submit(1, 6, undefined, callsPerStep);
    await h.settled(1);
    h.scheduler.close();
    return h.speed.agentCallSeconds("a", key)!;
  };
  const one = await perCall(1);
  const two = await perCall(2);
  // Same steps, same time per step: half the time per call. Timers only run late, so the bounds are loose.
  assert.ok(two > 0.3 * one && two < 0.7 * one, `${two} s per call with two calls a step, ${one} s with one`);
});

test("a poison task fails after maxAttempts, each attempt on a different agent, with the last error", async () => {
  const log: string[] = [];
  const poison = (id: string) => (req: RunTaskRequest) =>
    req.seed === 1n ? new FarmError(grpc.status.INTERNAL, `crash on ${id}`) : undefined;
  const agents = ["p", "q", "r", "s"].map((id) => fakeAgent(id, 1, { stepMs: 2, fail: poison(id) }, log));
  const h = harness(agents, { maxAttempts: 3 });
  h.submit(3, 2);
  await h.settled(3);
  assert.equal(h.done.length, 2);
  assert.equal(h.failed.length, 1);
  const f = h.failed[0]!;
  assert.equal(f.task.imageIndex, 1);
  assert.equal(f.task.failures, 3);
  assert.equal(f.task.failedOn.size, 3, "three different agents");
  const starts = log.filter((l) => l.endsWith("job0-1")).map((l) => l.split(" ")[1]);
  assert.equal(new Set(starts).size, 3);
  assert.equal(f.err.message, `crash on ${starts.at(-1)}`, "the image fails with the last attempt's error");
  h.scheduler.close();
});

test("a hand-back (draining agent) is placed again without counting as a failed attempt", async () => {
  const log: string[] = [];
  const drainingAgent = fakeAgent(
    "d",
    1,
    { stepMs: 60, fail: () => new FarmError(grpc.status.UNAVAILABLE, "agent d is shutting down") },
    log,
  );
  const h = harness([drainingAgent], { maxAttempts: 1 });
  h.submit(1, 2);
  await sleep(10);
  assert.equal(drainingAgent.inFlight, 1);
  // Heartbeat says draining now; a healthy agent joins.
  drainingAgent.info = create(AgentInfoSchema, { ...drainingAgent.info, draining: true });
  const healthy = fakeAgent("h", 1, { stepMs: 2 }, log);
  const agents = [drainingAgent, healthy];
  (h.scheduler as unknown as { registry: { list: () => AgentState[] } }).registry.list = () => agents;
  h.scheduler.agentsChanged();
  await h.settled(1);
  assert.equal(h.failed.length, 0);
  assert.equal(h.done[0]!.agent, "h");
  assert.equal(h.done[0]!.task.failures, 0);
  assert.equal(h.retried.length, 1);
  h.scheduler.close();
});

test("a stalled attempt gets a backup copy on an idle agent; the first result wins and the stalled copy is cancelled", async () => {
  const log: string[] = [];
  const stuck = fakeAgent("stuck", 1, { stepMs: 5, stall: true }, log);
  const idle = fakeAgent("idle", 1, { stepMs: 5 }, log);
  const agents = [stuck];
  const h = harness([], { speculate: true });
  (h.scheduler as unknown as { registry: { list: () => AgentState[] } }).registry.list = () => agents;
  h.speed.observe("idle", { model: "m", width: 64, height: 64 }, { secondsPerCall: 0.005 });
  const [task] = h.submit(1, 3);
  await sleep(50);
  agents.push(idle);
  h.scheduler.agentsChanged();
  await h.settled(1, 10_000);
  await sleep(20);
  assert.equal(h.done[0]!.agent, "idle");
  assert.equal(task!.runs.length, 0, "the stalled copy was cancelled");
  assert.ok(log.includes(`cancel stuck ${task!.id}`), "the stalled render was stopped on its agent, not just its stream");
  assert.equal(h.scheduler.stats.backups, 1);
  // The winner's record is in when the image is; the stalled copy's ends after it, superseded.
  assert.equal(h.done[0]!.attemptsEnded, 1);
  assert.deepEqual(
    h.ended.map((e) => [e.attempt.agentId, e.attempt.outcome]),
    [
      ["idle", AttemptOutcome.USED],
      ["stuck", AttemptOutcome.SUPERSEDED],
    ],
  );
  h.scheduler.close();
});

test("an agent never gets more attempts than its slots, even when attempts overrun their estimates", async () => {
  const log: string[] = [];
  const agents = [fakeAgent("o1", 2, { stepMs: 15 }, log), fakeAgent("o2", 3, { stepMs: 10 }, log)];
  const h = harness(agents, { speculate: true });
  // The model believes these agents are 10× faster than they are: every attempt runs past its estimate.
  for (const a of agents) h.speed.observe(a.id, { model: "m", width: 64, height: 64 }, { secondsPerCall: 0.001, overheadSeconds: 0 });
  h.submit(40, 3);
  await h.settled(40);
  assert.ok(concurrency.get("o1")!.max <= 2, `o1 ran ${concurrency.get("o1")!.max} at once`);
  assert.ok(concurrency.get("o2")!.max <= 3, `o2 ran ${concurrency.get("o2")!.max} at once`);
  h.scheduler.close();
});

test("after a restart, running tasks wait for their agent and are re-attached there with the same attempt; unseen agents fall back to placement", async () => {
  const log: string[] = [];
  const other = fakeAgent("other", 4, { stepMs: 5 }, log);
  const late = fakeAgent("late", 1, { stepMs: 5 }, log);
  const agents = [other];
  const h = harness(agents);
  const placed: Array<{ agent: string; attempt: number }> = [];
  const hooks = (h.scheduler as unknown as { hooks: SchedulerHooks }).hooks;
  const onPlaced = hooks.onPlaced;
  hooks.onPlaced = (task, run) => {
    placed.push({ agent: run.agent.id, attempt: run.attempt });
    onPlaced(task, run);
  };
  // Two tasks were running on "late" (one slot each side of the restart does not matter: the
  // renders already hold the agent's slots), and their agent has not heart-beaten yet.
  h.submit(2, 2, { agent: "late", until: Date.now() + 5_000, attempt: 3 });
  await sleep(60);
  assert.equal(placed.length, 0, "nothing is started elsewhere while the agent may still come back");
  agents.push(late);
  h.scheduler.agentsChanged();
  await h.settled(2);
  assert.deepEqual(placed, [
    { agent: "late", attempt: 3 },
    { agent: "late", attempt: 3 },
  ]);
  assert.equal(h.scheduler.stats.adopted, 2);

  // An agent that never shows up: placement takes over when the wait ends.
  placed.length = 0;
  h.submit(1, 2, { agent: "gone", until: Date.now() + 80, attempt: 1 });
  await h.settled(3);
  assert.equal(placed[0]?.agent !== "gone", true);
  assert.equal(placed[0]?.attempt, 2);
  h.scheduler.close();
});

test("a refiner: an agent without it hands the switch back and the task carries on where the refiner is; one with both is preferred", async () => {
  const log: string[] = [];
  const baseOnly = fakeAgent("base-only", 1, { stepMs: 5, refinerSwitchAfter: 2 }, log);
  const refinerOnly = fakeAgent("refiner-only", 1, { stepMs: 5 }, log);
  refinerOnly.available = new Set(["r"]);
  refinerOnly.info.loadedModels = ["r"];
  const h = harness([baseOnly, refinerOnly]);
  const [task] = h.submit(1, 4, undefined, 1, "", { refinerCheckpoint: "r", refinerSwitchAt: 0.5 });
  await h.settled(1);
  assert.deepEqual(
    h.done.map((d) => d.agent),
    ["refiner-only"],
  );
  assert.deepEqual(
    log.filter((l) => l.startsWith("start")),
    [`start base-only ${task!.id}`, `start refiner-only ${task!.id} resumed after 2`],
  );
  assert.equal(task!.failures, 0, "a switch is not a failed attempt");
  assert.equal(h.retried.length, 0);
  // Both attempts' work is in the image: the first's model calls are replayed by the second.
  assert.deepEqual(
    h.ended.map((e) => [e.attempt.agentId, e.attempt.outcome]),
    [
      ["base-only", AttemptOutcome.HANDED_BACK],
      ["refiner-only", AttemptOutcome.USED],
    ],
  );
  // An agent that offers both takes the task over one that would hand the switch back.
  const both = fakeAgent("both", 1, { stepMs: 5 }, log);
  both.available = new Set(["m", "r"]);
  const h2 = harness([fakeAgent("base-only-2", 1, { stepMs: 5, refinerSwitchAfter: 2 }, log), both]);
  h2.submit(1, 4, undefined, 1, "", { refinerCheckpoint: "r", refinerSwitchAt: 0.5 });
  await h2.settled(1);
  assert.deepEqual(
    h2.done.map((d) => d.agent),
    ["both"],
  );
  // Without a refiner the same agents take tasks as before.
  h2.submit(2, 2);
  await h2.settled(3);
  assert.deepEqual(new Set(h2.done.slice(1).map((d) => d.agent)), new Set(["base-only-2", "both"]));
  h.scheduler.close();
  h2.scheduler.close();
});

test("a task that runs an upscaler or a face restorer goes only to agents with its model files", async () => {
  const log: string[] = [];
  const plain = fakeAgent("plain", 2, { stepMs: 5 }, log);
  const withFiles = fakeAgent("with-files", 1, { stepMs: 5 }, log);
  withFiles.upscalers = new Set(["R-ESRGAN 4x+"]);
  withFiles.faceRestorers = new Set(["GFPGAN"]);
  const h = harness([plain, withFiles]);
  h.submit(3, 2, undefined, 1, "", { enableHr: true, hrUpscaler: "R-ESRGAN 4x+", denoisingStrength: 0.5 });
  h.submit(2, 2, undefined, 1, "", { restoreFaces: true, overrideSettings: { faceRestorationModel: "GFPGAN" } });
  await h.settled(5);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["with-files"]));
  // A latent upscaler and no face restoration need no file: both agents take those.
  h.done.length = 0;
  h.submit(6, 2, undefined, 1, "", { enableHr: true, hrUpscaler: "Latent", denoisingStrength: 0.5 });
  await h.settled(6);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["plain", "with-files"]));
  h.scheduler.close();
});

test("a task that merges a LoRA goes only to agents with its file, by name (any case) or alias; weight 0 needs none", async () => {
  const log: string[] = [];
  const plain = fakeAgent("plain", 2, { stepMs: 5 }, log);
  const withLora = fakeAgent("with-lora", 1, { stepMs: 5 }, log);
  withLora.loras = [create(LoraInfoSchema, { name: "Detail_Tweaker", sizeBytes: 100n, alias: "add_detail" })];
  withLora.loraNames = loraNamesOf(withLora.loras);
  const h = harness([plain, withLora]);
  h.submit(3, 2, undefined, 1, "", { prompt: "a cat <lora:detail_tweaker:0.7>" });
  h.submit(2, 2, undefined, 1, "", { loras: [{ name: "DETAIL_TWEAKER.safetensors", teWeight: 1, unetWeight: 1 }] });
  // By the name it was trained under, as prompts shared with images name it.
  h.submit(1, 2, undefined, 1, "", { prompt: "a cat <lora:add_detail:1>" });
  await h.settled(6);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["with-lora"]));
  h.done.length = 0;
  h.submit(6, 2, undefined, 1, "", { prompt: "a cat <lora:detail_tweaker:0>" });
  await h.settled(6);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["plain", "with-lora"]));
  // An agent whose list did not fit in its heartbeat may have any LoRA, as before agents listed them.
  h.done.length = 0;
  plain.lorasUnlisted = true;
  h.submit(6, 2, undefined, 1, "", { prompt: "a cat <lora:detail_tweaker:0.7>" });
  await h.settled(6);
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["plain", "with-lora"]));
  h.scheduler.close();
});

test("checkpoints: a retry after a lost attempt resumes from the attempt's last checkpoint, and carries the checkpoints on", async () => {
  const log: string[] = [];
  const lost = fakeAgent("lost", 1, { stepMs: 5, failAfter: [5, 7] }, log);
  const h = harness([lost], { checkpointEverySteps: 2, maxAttempts: 3 });
  const [task] = h.submit(1, 8);
  // The first attempt checkpointed steps 1–2 and 3–4, then was lost after step 5; the second (the agent is
  // back) replayed 1–4, made and checkpointed 5–6, and was lost after step 7; the third replays 1–6.
  await h.settled(1);
  const starts = log.filter((l) => l.startsWith("start"));
  assert.deepEqual(starts, [
    `start lost ${task!.id}`,
    `start lost ${task!.id} from checkpoint 1,2,3,4`,
    `start lost ${task!.id} from checkpoint 1,2,3,4,5,6`,
  ]);
  assert.equal(h.retried.length, 2);
  assert.equal(h.done.length, 1);
  // A finished task's checkpoints are let go (its job keeps the task while it is in memory).
  assert.equal(task!.checkpoint, undefined);
  h.scheduler.close();
  // Under a byte cap of 3 (the first checkpoint's start and two answers), the second checkpoint is dropped:
  // the retry resumes from steps 1–2.
  const log3: string[] = [];
  const h3 = harness([fakeAgent("capped", 1, { stepMs: 5, failAfter: [5] }, log3)], { checkpointEverySteps: 2, checkpointMaxBytes: 3 });
  const [t3] = h3.submit(1, 6);
  await h3.settled(1);
  assert.deepEqual(
    log3.filter((l) => l.startsWith("start")),
    [`start capped ${t3!.id}`, `start capped ${t3!.id} from checkpoint 1,2`],
  );
  h3.scheduler.close();
  // Without --checkpoint-every the retry starts over.
  const log2: string[] = [];
  const h2 = harness([fakeAgent("lost-2", 1, { stepMs: 5, failAfter: [5, 5, 5] }, log2)]);
  const [t2] = h2.submit(1, 6);
  await new Promise((r) => setTimeout(r, 300));
  const starts2 = log2.filter((l) => l.startsWith("start"));
  assert.ok(starts2.length >= 2 && starts2.every((l) => l === `start lost-2 ${t2!.id}`), log2.join("; "));
  assert.equal(t2!.checkpoint, undefined);
  h2.scheduler.close();
});

test("a refiner task does not wait for a busy agent with both checkpoints while one without the refiner is free: it hands the switch back", async () => {
  const log: string[] = [];
  const both = fakeAgent("both", 1, { stepMs: 20 }, log);
  both.available = new Set(["m", "r"]);
  both.info.loadedModels = ["m", "r"];
  const baseOnly = fakeAgent("base-only", 1, { stepMs: 20, refinerSwitchAfter: 2 }, log);
  const h = harness([both, baseOnly]);
  const [first, second] = h.submit(2, 4, undefined, 1, "", { refinerCheckpoint: "r", refinerSwitchAt: 0.5 });
  await h.settled(2);
  const starts = log.filter((l) => l.startsWith("start"));
  // The first takes the free agent with both; the second starts at once where the refiner is not, and
  // carries on on "both" once that is free, instead of waiting for it to run the whole task.
  assert.deepEqual(starts.slice(0, 2), [`start both ${first!.id}`, `start base-only ${second!.id}`]);
  assert.ok(starts.includes(`start both ${second!.id} resumed after 2`), starts.join("; "));
  assert.deepEqual(new Set(h.done.map((d) => d.agent)), new Set(["both"]));
  h.scheduler.close();
});

test("a refiner task's estimate counts the refiner's load on an agent that would switch to it unloaded", async () => {
  const log: string[] = [];
  // Listed first and equally fast: without the refiner's load in its estimate, it would win the tie.
  const cold = fakeAgent("cold", 1, { stepMs: 5 }, log);
  cold.available = new Set(["m", "r"]);
  const warm = fakeAgent("warm", 1, { stepMs: 5 }, log);
  warm.available = new Set(["m", "r"]);
  warm.info.loadedModels = ["m", "r"];
  const h = harness([cold, warm]);
  for (const id of ["cold", "warm"]) h.speed.observe(id, { model: "m", width: 64, height: 64 }, { secondsPerCall: 0.005 });
  h.speed.observe("warm", { model: "r", width: 64, height: 64 }, { secondsPerCall: 0.005, loadSeconds: 30 });
  h.submit(1, 4, undefined, 1, "", { refinerCheckpoint: "r", refinerSwitchAt: 0.5 });
  await h.settled(1);
  assert.deepEqual(
    h.done.map((d) => d.agent),
    ["warm"],
  );
  h.scheduler.close();
});

test("a job is refused at submit when no one agent has a stage's checkpoint and files together, each existing somewhere", () => {
  const log: string[] = [];
  const agent = (
    id: string,
    models: string[],
    files: { upscalers?: string[]; faces?: string[]; vaes?: string[]; loras?: string[] },
  ): AgentState => {
    const a = fakeAgent(id, 1, { stepMs: 1 }, log);
    a.available = new Set(models);
    a.upscalers = new Set(files.upscalers ?? []);
    a.faceRestorers = new Set(files.faces ?? []);
    a.vaes = (files.vaes ?? []).map((name) => create(VaeInfoSchema, { name }));
    a.loras = (files.loras ?? []).map((name) => create(LoraInfoSchema, { name }));
    a.loraNames = loraNamesOf(a.loras);
    return a;
  };
  const refused = (p: Parameters<typeof create<typeof GenerationParamsSchema>>[1], agents: AgentState[]): FarmError | undefined => {
    const params = create(GenerationParamsSchema, { prompt: "x", steps: 4, width: 512, height: 512, ...p });
    try {
      checkStagesPlaceable(params, planHires(params, DEFAULT_HIRES_TILING), agents);
      return undefined;
    } catch (err) {
      assert.ok(err instanceof FarmError);
      return err;
    }
  };
  const hires = { model: "m", enableHr: true, hrScale: 2, hrUpscaler: "4x-Up" };
  // The upscaler is on the agent without the model: the second pass (which upscales) has nowhere to run.
  const split = [agent("a0", ["m"], {}), agent("a1", ["other"], { upscalers: ["4x-Up"] })];
  const err = refused(hires, split);
  assert.equal(err?.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(err?.field, "hr_upscaler");
  assert.equal(err?.retryable, false);
  assert.match(err!.message, /checkpoint "m" \(on a0\) and upscaler "4x-Up".*on a1/);
  assert.equal(refused(hires, [...split, agent("a2", ["m"], { upscalers: ["4x-Up"] })]), undefined, "a2 has both");
  // Tiled (2048²): the upscale stage needs it too; a built-in upscaler needs no file.
  assert.equal(refused({ ...hires, width: 1024, height: 1024 }, split)?.field, "hr_upscaler");
  assert.equal(refused({ ...hires, hrUpscaler: "Lanczos" }, split), undefined);
  // The second pass runs on hr_checkpoint_name's agents.
  const second = [agent("a0", ["m"], { upscalers: ["4x-Up"] }), agent("a1", ["m2"], {})];
  assert.equal(refused({ ...hires, hrCheckpointName: "m2" }, second)?.field, "hr_upscaler");
  assert.equal(refused(hires, second), undefined);
  // Face restoration with a refiner: the pass may finish where the refiner is, so its agents need the files too.
  const faces = [agent("a0", ["m"], { faces: ["CodeFormer"] }), agent("a1", ["r"], {})];
  const withRefiner = { model: "m", restoreFaces: true, refinerCheckpoint: "r", refinerSwitchAt: 0.5 };
  assert.equal(refused(withRefiner, faces)?.field, "restore_faces");
  assert.equal(refused({ ...withRefiner, refinerCheckpoint: "" }, faces), undefined);
  // The job's VAE.
  const vae = [agent("a0", ["m"], {}), agent("a1", ["m2"], { vaes: ["v.safetensors"] })];
  assert.equal(refused({ model: "m", overrideSettings: { sdVae: "v.safetensors" } }, vae)?.field, "override_settings.sd_vae");
  // Extras run on any agent, but on one: its upscaler and face restorer must be on the same agent.
  const extras = { model: EXTRAS_MODEL, initImages: [new Uint8Array(1)], extras: { upscaler1: "4x-Up", gfpganVisibility: 0.5 } };
  const apart = [agent("a0", ["m"], { upscalers: ["4x-Up"] }), agent("a1", ["m"], { faces: ["GFPGAN"] })];
  assert.equal(refused(extras, apart)?.field, "extras.gfpgan_visibility");
  assert.match(
    refused(extras, apart)!.message,
    /no agent has every file this Extras job runs: none with the others has face restorer GFPGAN/,
  );
  assert.equal(refused(extras, [...apart, agent("a2", [], { upscalers: ["4x-Up"], faces: ["GFPGAN"] })]), undefined);
  // LoRAs: each pass's, by the field that names them; a weight-0 tag needs no file.
  const loras = [agent("a0", ["m"], {}), agent("a1", ["other"], { loras: ["Style", "hr"] })];
  const tagged = refused({ model: "m", prompt: "x <lora:style:0.8>" }, loras);
  assert.equal(tagged?.field, "prompt");
  assert.match(tagged!.message, /checkpoint "m" \(on a0\) and LoRA "style".*on a1/);
  assert.equal(refused({ model: "m", prompt: "x <lora:style:0>" }, loras), undefined);
  assert.equal(refused({ model: "m", loras: [{ name: "style", teWeight: 1, unetWeight: 1 }] }, loras)?.field, "loras[0].name");
  const withLoras = [...loras, agent("a2", ["m"], { loras: ["STYLE"] })];
  assert.equal(refused({ model: "m", prompt: "x <lora:style:0.8>" }, withLoras), undefined, "a2 has both");
  assert.equal(
    refused({ model: "m", prompt: "x <lora:style:0.8>", enableHr: true, hrScale: 2, hrPrompt: "<lora:hr:1>" }, withLoras)?.field,
    "hr_prompt",
  );
  // A model that is an ONNX folder wherever it is takes no LoRA (they merge into checkpoints' named weights).
  for (const a of withLoras) a.models.set("m", { format: "diffusers-onnx", modelHash: "", family: "sd1" });
  const onnx = refused({ model: "m", prompt: "x <lora:style:0.8>" }, withLoras);
  assert.equal(onnx?.field, "model");
  assert.match(onnx!.message, /"m" is an ONNX folder on every agent that has it/);
  assert.equal(refused({ model: "m", prompt: "x <lora:style:0>" }, withLoras), undefined, "weight 0 merges nothing");
  withLoras[0]!.models.set("m", { format: "safetensors", modelHash: "", family: "sd1" });
  withLoras[0]!.loras = [create(LoraInfoSchema, { name: "ink" })];
  withLoras[0]!.loraNames = loraNamesOf(withLoras[0]!.loras);
  // a0 has the checkpoint but not the LoRA; a2 the LoRA but the ONNX folder: no agent can merge it.
  assert.match(refused({ model: "m", prompt: "x <lora:style:0.8>" }, withLoras)!.message, /checkpoint "m" \(on a0\) and LoRA "style"/);
  withLoras[2]!.models.set("m", { format: "safetensors", modelHash: "", family: "sd1" });
  assert.equal(refused({ model: "m", prompt: "x <lora:style:0.8>" }, withLoras), undefined, "a2 has both as files");
});

test("every attempt leaves a record: the agent's own time when it sent one, the coordinator's otherwise; tenants are charged by outcome", async () => {
  const log: string[] = [];
  const agent = fakeAgent("gpu0", 1, { stepMs: 5, failAfter: [2], usageSeconds: 1.5 }, log);
  agent.info.executionProvider = "webgpu";
  agent.info.device = "Test GPU";
  agent.info.runtime = "onnxruntime-node 1.30.0";
  const m = createMetrics(COORDINATOR_METRICS);
  const h = harness([agent], { metrics: m.metrics });
  const started = Date.now();
  const [task] = h.submit(1, 4);
  await h.settled(1);
  const elapsed = (Date.now() - started) / 1000;
  const records = h.ended.filter((e) => e.task === task).map((e) => e.attempt);
  assert.deepEqual(
    records.map((r) => [r.attempt, r.outcome, r.agentMeasured]),
    [
      [1, AttemptOutcome.FAILED, false],
      [2, AttemptOutcome.USED, true],
    ],
  );
  const [lost, used] = records as [TaskAttempt, TaskAttempt];
  // The lost attempt streamed no usage: the coordinator's dispatch-to-end time stands in.
  assert.ok(lost.seconds > 0 && lost.seconds <= elapsed, `lost attempt ${lost.seconds} s of ${elapsed} s`);
  assert.equal(lost.error, "agent lost");
  assert.deepEqual(
    [used.seconds, used.loadSeconds, used.agentId, used.executionProvider, used.device, used.runtime, used.stage],
    [1.5, 0.25, "gpu0", "webgpu", "Test GPU", "onnxruntime-node 1.30.0", ""],
  );
  // The used attempt's record is in before its result is handed on, so the image can carry it.
  assert.equal(h.done[0]!.attemptsEnded, 2);
  const charged = await m.registry.getSingleMetric("latentfarm_tenant_device_seconds_total")!.get();
  const byOutcome = Object.fromEntries(charged.values.map((v) => [v.labels["outcome"], v.value]));
  assert.equal(byOutcome["used"], 1.5);
  assert.equal(byOutcome["wasted"], lost.seconds);
  h.scheduler.close();
});
