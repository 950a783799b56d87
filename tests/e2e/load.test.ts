// Load: 1,000 jobs from 20 concurrent clients against 4 simulated agents (real processes, real
// gRPC, NATS and JetStream; only the model is simulated). Every job must complete with its images
// (checked event by event), the coordinator's memory must stay bounded (finished jobs leave memory
// beyond --max-finished-in-memory, and the heap does not grow with the number of jobs served), and
// the p99 Submit latency is reported.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { findNatsServer } from "@latentfarm/coordinator";
import { REPO } from "../harness/farm.js";
import { simImageBytes } from "../harness/sim-agent.js";
import { checkJob, startFaultFarm, watchToEnd, type FaultFarm } from "../harness/sim-agent-farm.js";

const skip = !findNatsServer()
  ? "nats-server not installed (apt-get install nats-server)"
  : !existsSync(join(REPO, "coordinator", "dist", "cli", "main.js"))
    ? "project not built (run npm run build)"
    : false;

const JOBS = 1000;
const CLIENTS = 20;
const KEEP = 100;

async function scrape(url: string): Promise<Map<string, number>> {
  const text = await fetch(url).then((r) => r.text());
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    const m = /^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$/.exec(line);
    if (m) out.set(m[1]!, Number(m[2]));
  }
  return out;
}

describe("load: 1,000 jobs, 20 clients, 4 simulated agents", { skip, timeout: 300_000 }, () => {
  let farm: FaultFarm;
  before(async () => {
    farm = await startFaultFarm({ coordinatorArgs: ["--max-finished-in-memory", String(KEEP), "--agent-timeout-ms", "5000"] });
    await farm.startCoordinator();
    await farm.startSims({ count: 4, slots: 4, stepMs: 2, prefix: "load-" });
    await farm.waitForAgents(4);
  });
  after(async () => {
    await farm?.close();
  });

  test("every job completes with its images; memory stays bounded; p99 Submit latency is reported", async (t) => {
    const metricsUrl = farm.coordinator!.ready["metrics"] as string;
    const submitMs: number[] = [];
    let next = 0;
    let finished = 0;
    let images = 0;
    const heapAt: Array<{ jobs: number; heap: number; rss: number; inMemory: number; majorGcs: number }> = [];
    let sampling = Promise.resolve();
    const sample = (): void => {
      sampling = sampling.then(async () => {
        const m = await scrape(metricsUrl);
        heapAt.push({
          jobs: finished,
          heap: m.get("nodejs_heap_size_used_bytes")!,
          rss: m.get("process_resident_memory_bytes")!,
          inMemory: m.get("latentfarm_jobs_in_memory")!,
          majorGcs: m.get('nodejs_gc_duration_seconds_count{kind="major"}') ?? 0,
        });
      });
    };
    const started = performance.now();
    await Promise.all(
      Array.from({ length: CLIENTS }, async (_, c) => {
        const tenant = `tenant-${c % 5}`;
        for (;;) {
          const j = next++;
          if (j >= JOBS) return;
          const batchSize = 1 + (j % 3);
          const params = { prompt: `load ${j}`, model: "sim", width: 64, height: 64, steps: 2, batchSize, seed: BigInt(j * 10) };
          const t0 = performance.now();
          const { jobId } = await farm.client.submit({ params, requestId: `load-${j}` }, { metadata: { "x-tenant": tenant } });
          submitMs.push(performance.now() - t0);
          const out = checkJob((await watchToEnd(farm.client, jobId)).events, batchSize);
          assert.equal(out.terminal, "done", `job ${j}`);
          for (const [i, img] of out.images)
            assert.deepEqual(Buffer.from(img.png), Buffer.from(simImageBytes(params, BigInt(j * 10 + i), img.subseed)));
          images += out.images.size;
          finished++;
          if (finished % 25 === 0) sample();
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    await sampling;
    assert.equal(finished, JOBS);
    const m = await scrape(metricsUrl);
    assert.equal(m.get('latentfarm_jobs_finished_total{outcome="succeeded",reason="none"}'), JOBS);
    assert.equal(m.get("latentfarm_queue_depth"), 0, "nothing left queued");
    assert.equal(m.get("latentfarm_tasks_running"), 0, "nothing left running");
    // Bounded: only unfinished jobs and the most recent finished ones stay in memory…
    for (const s of heapAt) assert.ok(s.inMemory <= KEEP + CLIENTS, `jobs in memory after ${s.jobs} jobs: ${s.inMemory}`);
    // …and the heap does not climb with the jobs served. The used heap is a saw-tooth (it grows
    // until a major collection), so a sample says little unless it follows a major collection:
    // those (the first sample after the major-GC count went up, 25 jobs apart) are what is compared.
    const afterGc = heapAt.filter((s, i) => i > 0 && s.majorGcs > heapAt[i - 1]!.majorGcs);
    const low = (from: number, to: number): number => {
      const xs = (afterGc.some((s) => s.jobs >= from && s.jobs <= to) ? afterGc : heapAt).filter((s) => s.jobs >= from && s.jobs <= to);
      return Math.min(...xs.map((s) => s.heap));
    };
    const mid = low(0, JOBS / 2);
    const late = low(JOBS / 2, JOBS);
    assert.ok(
      late < mid + 16 * 1024 * 1024,
      `heap after major collections ${(mid / 2 ** 20).toFixed(0)} MiB over the first 500 jobs, ${(late / 2 ** 20).toFixed(0)} MiB over the last 500`,
    );
    submitMs.sort((a, b) => a - b);
    const p = (q: number): number => submitMs[Math.min(submitMs.length - 1, Math.floor(submitMs.length * q))]!;
    const report = {
      jobs: JOBS,
      images,
      seconds: Number(seconds.toFixed(2)),
      jobs_per_second: Number((JOBS / seconds).toFixed(1)),
      submit_p50_ms: Number(p(0.5).toFixed(2)),
      submit_p99_ms: Number(p(0.99).toFixed(2)),
      heap_mib_every_200_jobs: heapAt.filter((_, i) => i % 8 === 7).map((s) => Number((s.heap / 2 ** 20).toFixed(1))),
      heap_after_major_gc_mib_first_half: Number((mid / 2 ** 20).toFixed(1)),
      heap_after_major_gc_mib_second_half: Number((late / 2 ** 20).toFixed(1)),
      major_gcs: heapAt.at(-1)!.majorGcs - heapAt[0]!.majorGcs,
      rss_mib_every_200_jobs: heapAt.filter((_, i) => i % 8 === 7).map((s) => Number((s.rss / 2 ** 20).toFixed(1))),
      max_jobs_in_memory: Math.max(...heapAt.map((s) => s.inMemory)),
    };
    t.diagnostic(`load: ${JSON.stringify(report)}`);
  });
});
