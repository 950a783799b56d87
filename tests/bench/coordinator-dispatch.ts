// Coordinator dispatch throughput through the full gRPC path: a real coordinator and NATS, and
// simulated agents (no model evaluation), so what is measured is the farm's own overhead.
import { RenderService, createClient } from "@latentfarm/shared";
import { startNatsServer } from "@latentfarm/coordinator";
import { startService } from "../harness/farm.js";
import { startSimAgents, waitForAgentCount } from "../harness/sim-agent-farm.js";

export async function benchCoordinatorDispatch(
  opts: { agents?: number; slots?: number; jobs?: number; imagesPerJob?: number } = {},
): Promise<Record<string, number>> {
  const agentsN = opts.agents ?? 4;
  const jobs = opts.jobs ?? 40;
  const per = opts.imagesPerJob ?? 50;
  const nats = await startNatsServer();
  // Client (this process), coordinator and agents each get their own process and event loop.
  const coordinator = await startService(["coordinator", "--port", "0", "--host", "127.0.0.1", "--nats", nats.url, "--metrics-port", "0"]);
  const agents = await startSimAgents(nats.url, { count: agentsN, slots: opts.slots ?? 8, stepMs: 0 });
  const client = createClient(RenderService, `127.0.0.1:${coordinator.ready["port"] as number}`);
  try {
    await waitForAgentCount(client, agentsN);
    // Latency per task: from the "placed" event to the "image" event, minus nothing (zero compute).
    const latencies: number[] = [];
    const started = performance.now();
    await Promise.all(
      Array.from({ length: jobs }, async (_, j) => {
        const { jobId } = await client.submit({
          params: { prompt: "p", model: "sim", width: 64, height: 64, steps: 1, batchSize: per, seed: BigInt(j) },
        });
        const placedAt = new Map<number, number>();
        for await (const { event } of client.watch({ jobId })) {
          const e = event?.event;
          if (e?.case === "placed") placedAt.set(e.value.imageIndex, performance.now());
          if (e?.case === "image") latencies.push(performance.now() - placedAt.get(e.value.image!.index)!);
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    latencies.sort((a, b) => a - b);
    const tasks = jobs * per;
    return {
      tasks,
      tasks_per_second: tasks / seconds,
      p50_task_ms: latencies[Math.floor(latencies.length * 0.5)]!,
      p99_task_ms: latencies[Math.floor(latencies.length * 0.99)]!,
    };
  } finally {
    client.close();
    await agents.kill();
    await coordinator.kill();
    await nats.stop();
  }
}
