// A farm for fault injection: nats-server on a fixed port and store directory (so it can be killed
// and restarted), a coordinator process on a fixed port (killed and restarted the same way), and
// agents as their own processes: simulated ones (sim-agents-main.ts) or real ones. Plus the
// invariant checks every fault test applies to what clients saw.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { FarmError, RenderService, createClient, type Image, type JobEvent, type ServiceClient } from "@latentfarm/shared";
import { freePort, startNatsServer, type NatsServerHandle } from "@latentfarm/coordinator";
import { REPO, startAgentProcess, startService, type ServiceProcess } from "./farm.js";

export type RenderClient = ServiceClient<typeof RenderService extends { method: infer M } ? M : never>;

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface TaskLogLine {
  event: "start" | "done" | "aborted" | "failed" | "attach";
  agent: string;
  taskId: string;
  attempt: number;
  /** Wall-clock ms with sub-ms precision, comparable across processes. */
  t: number;
}

/** Simulated agents in one child process. */
export interface SimProcess {
  readonly child: ChildProcess;
  readonly ids: string[];
  /** Task starts and ends, when started with logTasks. */
  readonly log: TaskLogLine[];
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export interface SimAgentsSpec {
  count: number;
  slots?: number;
  stepMs?: number;
  prefix?: string;
  speeds?: number[];
  heartbeatMs?: number;
  progress?: boolean;
  poisonSeeds?: bigint[];
  drainMs?: number;
  logTasks?: boolean;
  /** Steps scale with a task's pixels: stepMs is a step at this many pixels. */
  refPixels?: number;
  /** The models the agents offer (default ["sim"]). */
  models?: string[];
}

/** Resolves once the coordinator lists at least `n` agents (it may still be starting). */
export async function waitForAgentCount(client: RenderClient, n: number, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const { agents } = await client.listAgents({}, { timeoutMs: 2000 });
      if (agents.length >= n) return;
    } catch {
      // coordinator still starting
    }
    if (Date.now() > deadline) throw new Error(`coordinator did not see ${n} agents`);
    await sleep(50);
  }
}

export function startSimAgents(natsUrl: string, s: SimAgentsSpec): Promise<SimProcess> {
  const args = [
    "--import",
    "tsx",
    "tests/harness/sim-agents-main.ts",
    natsUrl,
    String(s.count),
    String(s.slots ?? 2),
    String(s.stepMs ?? 0),
    "--id-prefix",
    s.prefix ?? "sim-",
    "--speeds",
    (s.speeds ?? [1]).join(","),
    "--heartbeat-ms",
    String(s.heartbeatMs ?? 200),
    "--drain-ms",
    String(s.drainMs ?? 0),
  ];
  if (s.progress) args.push("--progress");
  if (s.logTasks) args.push("--log-tasks");
  if (s.refPixels) args.push("--ref-pixels", String(s.refPixels));
  if (s.models) args.push("--models", s.models.join(","));
  if (s.poisonSeeds?.length) args.push("--poison-seeds", s.poisonSeeds.join(","));
  const child = spawn(process.execPath, args, { cwd: REPO, stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-8000)));
  const log: TaskLogLine[] = [];
  return new Promise((resolve, reject) => {
    let buf = "";
    let ready = false;
    child.stdout!.on("data", (d: Buffer) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue;
        }
        if (msg["ready"] && !ready) {
          ready = true;
          resolve({
            child,
            ids: msg["agents"] as string[],
            log,
            kill: (signal = "SIGTERM") =>
              new Promise<void>((r) => {
                if (child.exitCode !== null || child.signalCode !== null) return r();
                child.once("exit", () => r());
                child.kill(signal);
                setTimeout(() => child.kill("SIGKILL"), 10_000).unref();
              }),
          });
        } else if (msg["event"]) log.push(msg as unknown as TaskLogLine);
      }
    });
    child.once("exit", (code) => {
      if (!ready) reject(new Error(`simulated agents exited with ${code}: ${err}`));
    });
  });
}

export interface FaultFarm {
  readonly natsUrl: string;
  readonly address: string;
  readonly client: RenderClient;
  nats: NatsServerHandle;
  coordinator: ServiceProcess | undefined;
  readonly sims: SimProcess[];
  readonly agents: ServiceProcess[];
  startCoordinator(extra?: string[]): Promise<void>;
  /** Stops the coordinator with a signal (SIGKILL: a crash; SIGTERM: a graceful drain). */
  stopCoordinator(signal: NodeJS.Signals): Promise<void>;
  /** Kills nats-server (-9, or a clean stop) and starts it again on the same port and store. */
  restartNats(signal: NodeJS.Signals, downMs?: number): Promise<void>;
  startSims(spec: SimAgentsSpec): Promise<SimProcess>;
  startRealAgent(id: string, modelsDir: string, extra?: string[]): Promise<ServiceProcess>;
  waitForAgents(n: number, timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

// LATENTFARM_TEST_LOGS=DIR keeps the coordinator's log of each run there (for a failed fault test).
let logCount = 0;
function keepLog(name: string, p: ServiceProcess | undefined): void {
  const dir = process.env["LATENTFARM_TEST_LOGS"];
  if (dir && p) writeFileSync(join(dir, `${process.pid}-${name}-${logCount++}.log`), p.stderr());
}

export async function startFaultFarm(opts: { coordinatorArgs?: string[] } = {}): Promise<FaultFarm> {
  const dir = mkdtempSync(join(tmpdir(), "latentfarm-faults-"));
  const storeDir = join(dir, "js");
  const natsPort = await freePort();
  const coordPort = await freePort();
  let nats = await startNatsServer({ port: natsPort, storeDir });
  const address = `127.0.0.1:${coordPort}`;
  const client = createClient(RenderService, address) as RenderClient;
  const farm: FaultFarm = {
    natsUrl: nats.url,
    address,
    client,
    nats,
    coordinator: undefined,
    sims: [],
    agents: [],
    startCoordinator: async (extra = []) => {
      farm.coordinator = await startService(
        [
          "coordinator",
          "--port",
          String(coordPort),
          "--host",
          "127.0.0.1",
          "--nats",
          nats.url,
          "--metrics-port",
          "0",
          "--agent-timeout-ms",
          "1500",
          ...(opts.coordinatorArgs ?? []),
          ...extra,
        ],
        { LATENTFARM_LOG_LEVEL: process.env["LATENTFARM_TEST_LOG_LEVEL"] ?? "warn" },
      );
    },
    stopCoordinator: async (signal) => {
      keepLog("coordinator", farm.coordinator);
      await farm.coordinator?.kill(signal);
      farm.coordinator = undefined;
    },
    restartNats: async (signal, downMs = 300) => {
      const exited = new Promise((r) => nats.process.once("exit", r));
      nats.process.kill(signal);
      await exited;
      await sleep(downMs);
      nats = await startNatsServer({ port: natsPort, storeDir });
      farm.nats = nats;
    },
    startSims: async (spec) => {
      const s = await startSimAgents(nats.url, spec);
      farm.sims.push(s);
      return s;
    },
    startRealAgent: async (id, modelsDir, extra = []) => {
      const a = await startAgentProcess({ natsUrl: nats.url, modelsDir, id, slots: 1, heartbeatMs: 200, extra });
      farm.agents.push(a);
      return a;
    },
    waitForAgents: (n, timeoutMs) => waitForAgentCount(client, n, timeoutMs),
    close: async () => {
      keepLog("coordinator", farm.coordinator);
      client.close();
      await Promise.all([...farm.sims.map((s) => s.kill("SIGKILL")), ...farm.agents.map((a) => a.kill("SIGKILL"))]);
      await farm.coordinator?.kill("SIGKILL");
      await nats.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return farm;
}

const RECONNECTABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.CANCELLED,
  grpc.status.INTERNAL,
  grpc.status.UNKNOWN,
  grpc.status.DEADLINE_EXCEEDED,
]);

/**
 * Watches a job to its end the way a careful client does: when the stream breaks (coordinator
 * restart, network), it watches again from the last sequence number it saw.
 */
export async function watchToEnd(
  client: RenderClient,
  jobId: string,
  opts: { timeoutMs?: number; onEvent?: (e: JobEvent) => void | Promise<void>; metadata?: Record<string, string> } = {},
): Promise<{ events: JobEvent[]; reconnects: number }> {
  const events: JobEvent[] = [];
  const deadline = Date.now() + (opts.timeoutMs ?? 60_000);
  let reconnects = 0;
  // The limit holds even while a stream is open and silent.
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), Math.max(0, deadline - Date.now()));
  try {
    for (;;) {
      try {
        const after = events.at(-1)?.sequence ?? 0n;
        for await (const { event } of client.watch(
          { jobId, afterSequence: after },
          { signal: ac.signal, ...(opts.metadata ? { metadata: opts.metadata } : {}) },
        )) {
          if (!event) continue;
          events.push(event);
          await opts.onEvent?.(event);
        }
        if (["done", "failed", "cancelled"].includes(events.at(-1)?.event.case ?? "")) return { events, reconnects };
      } catch (err) {
        if (!ac.signal.aborted && !RECONNECTABLE.has(FarmError.from(err).code)) throw err;
      }
      if (Date.now() > deadline || ac.signal.aborted) {
        const tail = events
          .slice(-4)
          .map((e) => `${e.sequence}:${e.event.case}`)
          .join(" ");
        throw new Error(`job ${jobId} did not end within the time limit (${events.length} events seen, last: ${tail})`);
      }
      reconnects++;
      await sleep(100);
    }
  } finally {
    clearTimeout(timer);
  }
}

export interface JobOutcome {
  terminal: "done" | "failed" | "cancelled";
  images: Map<number, Image>;
  failed: Map<number, { code: string; message: string; attempts: number }>;
  cancelled: Set<number>;
}

/**
 * The client-visible invariants of one job: sequence numbers 1..n with no gap or repeat, exactly one
 * terminal event and it is the last, at most one image (or image failure/cancellation) per index,
 * and when the job is done, an image for every index that was not cancelled.
 */
export function checkJob(events: readonly JobEvent[], imageCount: number): JobOutcome {
  const seqs = events.map((e) => Number(e.sequence));
  assert.deepEqual(
    seqs,
    seqs.map((_, i) => i + 1),
    "event sequence numbers are 1..n, each once",
  );
  const terminals = events.filter((e) => ["done", "failed", "cancelled"].includes(e.event.case ?? ""));
  assert.equal(terminals.length, 1, `exactly one terminal event (got ${terminals.map((e) => e.event.case).join(",") || "none"})`);
  assert.equal(terminals[0], events.at(-1), "the terminal event is the last one");
  const images = new Map<number, Image>();
  const failed = new Map<number, { code: string; message: string; attempts: number }>();
  const cancelled = new Set<number>();
  const seen = (i: number): void => {
    assert.ok(i >= 0 && i < imageCount, `image index ${i} is within the job`);
    assert.ok(!images.has(i) && !failed.has(i) && !cancelled.has(i), `image ${i} ended once`);
  };
  for (const e of events) {
    if (e.event.case === "image") {
      const img = e.event.value.image!;
      seen(img.index);
      images.set(img.index, img);
    } else if (e.event.case === "imageFailed") {
      seen(e.event.value.imageIndex);
      failed.set(e.event.value.imageIndex, e.event.value);
    } else if (e.event.case === "imageCancelled") {
      seen(e.event.value.imageIndex);
      cancelled.add(e.event.value.imageIndex);
    }
  }
  const terminal = terminals[0]!.event.case as JobOutcome["terminal"];
  if (terminal === "done") {
    assert.equal(images.size + cancelled.size, imageCount, "a done job has every image that was not cancelled");
    assert.equal(failed.size, 0);
  }
  if (terminal === "failed")
    assert.ok(failed.size > 0 || images.size + cancelled.size < imageCount, "a failed job says which images failed");
  return { terminal, images, failed, cancelled };
}
