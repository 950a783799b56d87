// Benchmark: one /metrics scrape of an agent that knows 10 models and has finished 1,000 tasks.
// Budget (deploy issue): ≤ 20 ms to render, ≤ 100 KB of text. Run:
//   node --import tsx tests/bench/metrics-scrape.ts
// The exposition's size depends on the label sets, not on the number of tasks: every series is a
// counter or a fixed set of histogram buckets. The run shows that by also filling 10× the tasks.
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { AGENT_METRICS, createMetrics } from "@latentfarm/shared";

export interface ScrapeResult {
  models: number;
  tasks: number;
  series: number;
  bytes: number;
  medianMs: number;
  p95Ms: number;
}

const OUTCOMES = ["succeeded", "failed", "cancelled"] as const;

/** Fills an agent's metric set as `tasks` tasks over `models` models would, then times metrics(). */
export async function measureAgentScrape(models = 10, tasks = 1_000, runs = 50): Promise<ScrapeResult> {
  const { registry, metrics: m } = createMetrics(AGENT_METRICS);
  const names = Array.from({ length: models }, (_, i) => `model-${i}`);
  m.slots.set(2);
  m.modelsLoaded.set(models);
  for (const model of names) m.modelLoad.observe({ model }, 2 + Math.random() * 20);
  m.modelLoadFailures.inc({ model: names[0] as string });
  for (let t = 0; t < tasks; t++) {
    const model = names[t % models] as string;
    // Mostly successes, some failures and cancellations: every outcome label value appears.
    const outcome = OUTCOMES[t % 50 === 0 ? 1 : t % 70 === 0 ? 2 : 0];
    const steps = 20 + (t % 31);
    m.unetSteps.inc({ model }, steps);
    for (let s = 0; s < steps; s++) m.unetStepDuration.observe({ model }, 0.02 + Math.random() * 0.3);
    const seconds = steps * 0.1 + Math.random();
    m.taskDuration.observe({ outcome }, seconds);
    m.tasks.inc({ outcome });
    m.busySeconds.inc(seconds);
  }
  m.busySlots.set(1);

  for (let i = 0; i < 5; i++) await registry.metrics(); // warm up the JIT
  const times: number[] = [];
  let text = "";
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    text = await registry.metrics();
    times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  return {
    models,
    tasks,
    series: text.split("\n").filter((l) => l && !l.startsWith("#")).length,
    bytes: Buffer.byteLength(text),
    medianMs: times[Math.floor(runs / 2)] as number,
    p95Ms: times[Math.min(runs - 1, Math.ceil(runs * 0.95) - 1)] as number,
  };
}

export const BUDGET = { ms: 20, bytes: 100_000 };

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const main = await measureAgentScrape(10, 1_000);
  const tenfold = await measureAgentScrape(10, 10_000);
  for (const r of [main, tenfold]) {
    console.log(
      `agent /metrics, ${r.models} models, ${r.tasks} tasks: median ${r.medianMs.toFixed(2)} ms, p95 ${r.p95Ms.toFixed(2)} ms, ` +
        `${(r.bytes / 1000).toFixed(1)} KB, ${r.series} series`,
    );
  }
  const ok = main.medianMs <= BUDGET.ms && main.bytes <= BUDGET.bytes;
  console.log(`budget ≤ ${BUDGET.ms} ms and ≤ ${BUDGET.bytes / 1000} KB: ${ok ? "met" : "MISSED"}`);
  if (!ok) process.exitCode = 1;
}
