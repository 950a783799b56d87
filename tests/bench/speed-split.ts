// Speed-weighted splitting: one batch on three simulated agents of speeds 1×, 2× and 4× (one slot
// each), through a real coordinator, NATS and JetStream. The ideal makespan is when every agent
// works the whole time: N / Σ rate (70 images at 5 + 10 + 20 images/s = 2.0 s, which the discrete
// split 10 + 20 + 40 also reaches). Target: within 15% of it. A first, smaller batch lets the
// coordinator measure the agents (their speeds are unknown at start); it is reported too.
//   node --import tsx tests/bench/speed-split.ts
import { fileURLToPath } from "node:url";
import { RenderService, createClient } from "@latentfarm/shared";
import { startNatsServer } from "@latentfarm/coordinator";
import { startService } from "../harness/farm.js";
import { startSimAgents, waitForAgentCount } from "../harness/sim-agent-farm.js";

export async function benchSpeedSplit(
  opts: { images?: number; stepMs?: number; steps?: number; speculate?: boolean } = {},
): Promise<Record<string, number>> {
  const n = opts.images ?? 70;
  const stepMs = opts.stepMs ?? 40;
  const steps = opts.steps ?? 5;
  const speeds = [1, 2, 4];
  const nats = await startNatsServer();
  const coordinator = await startService([
    "coordinator",
    "--port",
    "0",
    "--host",
    "127.0.0.1",
    "--nats",
    nats.url,
    "--metrics-port",
    "0",
    ...(opts.speculate === false ? ["--no-speculate"] : []),
  ]);
  const agents = await startSimAgents(nats.url, { count: 3, slots: 1, stepMs, speeds, prefix: "x", heartbeatMs: 200 });
  const client = createClient(RenderService, `127.0.0.1:${coordinator.ready["port"] as number}`);
  try {
    await waitForAgentCount(client, 3);
    const run = async (count: number, seed: bigint): Promise<{ seconds: number; perAgent: Map<string, number> }> => {
      const t0 = performance.now();
      // batch_size is capped at 64: larger batches use n_iter.
      const nIter = Math.ceil(count / 64);
      if (count % nIter !== 0) throw new Error(`${count} images cannot be split into ${nIter} equal iterations`);
      const params = { prompt: "split", model: "sim", width: 64, height: 64, steps, batchSize: count / nIter, nIter, seed };
      const { jobId } = await client.submit({ params });
      const perAgent = new Map<string, number>();
      for await (const { event } of client.watch({ jobId })) {
        const e = event?.event;
        if (e?.case === "image") perAgent.set(e.value.image!.agentId, (perAgent.get(e.value.image!.agentId) ?? 0) + 1);
      }
      return { seconds: (performance.now() - t0) / 1000, perAgent };
    };
    const rates = speeds.map((s) => (1000 * s) / (stepMs * steps));
    const ideal = (count: number): number => count / rates.reduce((a, b) => a + b, 0);
    const warm = await run(14, 1n);
    const measured = await run(n, 1000n);
    return {
      images: n,
      ideal_s: ideal(n),
      makespan_s: measured.seconds,
      ratio_to_ideal: measured.seconds / ideal(n),
      split_1x: measured.perAgent.get("x0") ?? 0,
      split_2x: measured.perAgent.get("x1") ?? 0,
      split_4x: measured.perAgent.get("x2") ?? 0,
      first_batch_ratio_to_ideal: warm.seconds / ideal(14),
    };
  } finally {
    client.close();
    await agents.kill();
    await coordinator.kill();
    await nats.stop();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.stdout.write(JSON.stringify(await benchSpeedSplit()) + "\n");
  process.stdout.write(JSON.stringify({ speculation: "off", ...(await benchSpeedSplit({ speculate: false })) }) + "\n");
}
