// Tiled Hires.fix second pass: a 1024² first pass upscaled ×2 to 2048², whose second pass the
// coordinator cuts into overlapping tiles (default layout: 512 px tiles, ≥ 64 px overlap), run by
// simulated agents whose model time is proportional to latent pixels × steps (stepMs per step of a
// 512² tile; 40 ms ≈ SD1.5 with CFG on a mid-range GPU), with real-sized hand-overs (latents, 8-bit tiles) through a real coordinator, NATS and
// JetStream, and the farm's own blender in ASSEMBLE. The same job runs on 1 agent, then on 4 (one
// slot each, a fresh farm each time). Reported: wall time of the second pass (from the upscale
// stage's placement to the finished image) and of the whole job, their 4-vs-1 ratios (target for
// the second pass: ≤ 0.35), the ideal ratio for that many tiles, the tile overhead (extra pixels
// the overlaps make the tiles process, in % of the image), and whether both runs gave the same bytes.
//   node --import tsx tests/bench/tiled-hires.ts
import { loadavg } from "node:os";
import { fileURLToPath } from "node:url";
import { create } from "@bufbuild/protobuf";
import { GenerationParamsSchema, RenderService, createClient, tileOverheadPercent, type JobEvent } from "@latentfarm/shared";
import { DEFAULT_HIRES_TILING, planHires, startNatsServer } from "@latentfarm/coordinator";
import { startService } from "../harness/farm.js";
import { startSimAgents, waitForAgentCount } from "../harness/sim-agent-farm.js";

// A1111's defaults for the passes: 20 steps, and the second pass as many (hr_second_pass_steps 0).
const PARAMS = {
  prompt: "tiled",
  model: "sim",
  width: 1024,
  height: 1024,
  steps: 20,
  samplerName: "Euler",
  seed: 7n,
  subseed: 3n,
  enableHr: true,
  hrScale: 2,
  hrSecondPassSteps: 0,
  denoisingStrength: 0.5,
};

interface RunResult {
  jobSeconds: number;
  secondPassSeconds: number;
  tilesPerAgent: Map<string, number>;
  png: Uint8Array;
}

async function runOn(agentCount: number, stepMs: number): Promise<RunResult> {
  const nats = await startNatsServer();
  const coordinator = await startService(["coordinator", "--port", "0", "--host", "127.0.0.1", "--nats", nats.url, "--metrics-port", "0"]);
  const agents = await startSimAgents(nats.url, {
    count: agentCount,
    slots: 1,
    stepMs,
    refPixels: 512 * 512,
    prefix: "tile-",
    heartbeatMs: 200,
    progress: true,
  });
  const client = createClient(RenderService, `127.0.0.1:${coordinator.ready["port"] as number}`);
  try {
    await waitForAgentCount(client, agentCount);
    const t0 = Date.now();
    const { jobId } = await client.submit({ params: PARAMS });
    const events: JobEvent[] = [];
    for await (const { event } of client.watch({ jobId })) if (event) events.push(event);
    const end = events.at(-1);
    if (end?.event.case !== "done") throw new Error(`job ended ${end?.event.case}: ${JSON.stringify(end?.event.value)}`);
    const image = events.find((e) => e.event.case === "image");
    const up = events.find((e) => e.event.case === "placed" && e.event.value.taskId.endsWith(".up"));
    if (!image || image.event.case !== "image" || !up) throw new Error("no image or no upscale stage");
    const tilesPerAgent = new Map<string, number>();
    for (const e of events) {
      if (e.event.case === "placed" && /\.t\d+$/.test(e.event.value.taskId))
        tilesPerAgent.set(e.event.value.agentId, (tilesPerAgent.get(e.event.value.agentId) ?? 0) + 1);
    }
    return {
      jobSeconds: (Number(image.timeUnixMs) - t0) / 1000,
      secondPassSeconds: Number(image.timeUnixMs - up.timeUnixMs) / 1000,
      tilesPerAgent,
      png: image.event.value.image!.png,
    };
  } finally {
    client.close();
    await agents.kill();
    await coordinator.kill();
    await nats.stop();
  }
}

export async function benchTiledHires(opts: { stepMs?: number; agents?: number } = {}): Promise<Record<string, number>> {
  const stepMs = opts.stepMs ?? 40;
  const n = opts.agents ?? 4;
  const plan = planHires(create(GenerationParamsSchema, PARAMS), DEFAULT_HIRES_TILING);
  if (!plan?.layout) throw new Error("the benchmark job is not tiled");
  const load = loadavg()[0]!;
  const one = await runOn(1, stepMs);
  const many = await runOn(n, stepMs);
  const tiles = plan.layout.tiles.length;
  return {
    tiles,
    tile_px: plan.layout.tileWidth,
    tile_overhead_pct: tileOverheadPercent(plan.layout),
    second_pass_1_agent_s: one.secondPassSeconds,
    [`second_pass_${n}_agents_s`]: many.secondPassSeconds,
    second_pass_ratio: many.secondPassSeconds / one.secondPassSeconds,
    ideal_ratio: Math.ceil(tiles / n) / tiles,
    job_1_agent_s: one.jobSeconds,
    [`job_${n}_agents_s`]: many.jobSeconds,
    job_ratio: many.jobSeconds / one.jobSeconds,
    agents_running_tiles: many.tilesPerAgent.size,
    most_tiles_on_one_agent: Math.max(...many.tilesPerAgent.values()),
    same_image: Buffer.from(one.png).equals(Buffer.from(many.png)) ? 1 : 0,
    load_avg_1m: load,
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.stdout.write(JSON.stringify(await benchTiledHires()) + "\n");
}
