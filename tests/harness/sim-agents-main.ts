// Runs simulated agents in their own process:
//   node --import tsx tests/harness/sim-agents-main.ts NATS_URL COUNT SLOTS STEP_MS [options]
// Options: --id-prefix P (ids P0, P1, …; default "sim-"), --speeds 1,2,4 (per agent, cycled),
// --heartbeat-ms N, --progress, --poison-seeds 5,9, --drain-ms N (grace on SIGTERM), --log-tasks
// (one JSON line per task start/end on stdout, for tests that count executions), --ref-pixels N
// (STEP_MS is a step at N pixels; steps scale with each task's pixels), --models a,b (default "sim").
import { parseArgs } from "node:util";
import { SimAgent } from "./sim-agent.js";

const { values: o, positionals } = parseArgs({
  args: process.argv.slice(2),
  allowPositionals: true,
  options: {
    "id-prefix": { type: "string", default: "sim-" },
    speeds: { type: "string", default: "1" },
    "heartbeat-ms": { type: "string", default: "500" },
    progress: { type: "boolean", default: false },
    "poison-seeds": { type: "string", default: "" },
    "drain-ms": { type: "string", default: "0" },
    "log-tasks": { type: "boolean", default: false },
    "ref-pixels": { type: "string", default: "0" },
    models: { type: "string", default: "sim" },
  },
});
const [natsUrl, count = "4", slots = "8", stepMs = "0"] = positionals;
const speeds = o.speeds.split(",").map(Number);
const poisonSeeds = o["poison-seeds"] ? o["poison-seeds"].split(",").map((s) => BigInt(s)) : [];
const agents = Array.from(
  { length: Number(count) },
  (_, i) =>
    new SimAgent({
      id: `${o["id-prefix"]}${i}`,
      natsUrl: natsUrl!,
      slots: Number(slots),
      stepMs: Number(stepMs),
      speed: speeds[i % speeds.length]!,
      heartbeatMs: Number(o["heartbeat-ms"]),
      progress: o.progress,
      poisonSeeds,
      models: o.models.split(","),
      refPixels: Number(o["ref-pixels"]),
      ...(o["log-tasks"]
        ? {
            onTask: (event, req) =>
              process.stdout.write(
                JSON.stringify({
                  event,
                  agent: `${o["id-prefix"]}${i}`,
                  taskId: req.taskId,
                  attempt: req.attempt,
                  t: performance.timeOrigin + performance.now(),
                }) + "\n",
              ),
          }
        : {}),
    }),
);
await Promise.all(agents.map((a) => a.start()));
process.stdout.write(JSON.stringify({ ready: true, agents: agents.map((a) => a.id) }) + "\n");
const stop = async (): Promise<void> => {
  const grace = Number(o["drain-ms"]);
  if (grace > 0) await Promise.all(agents.map((a) => a.drain(grace)));
  await Promise.all(agents.map((a) => a.close()));
  process.exit(0);
};
process.once("SIGTERM", () => void stop());
process.once("SIGINT", () => void stop());
