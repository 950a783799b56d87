// Runs simulated agents in their own process: `node --import tsx tests/harness/sim-agents-main.ts NATS_URL COUNT SLOTS STEP_MS`.
import { SimAgent } from "./sim-agent.js";

const [natsUrl, count = "4", slots = "8", stepMs = "0"] = process.argv.slice(2);
const agents = Array.from({ length: Number(count) }, (_, i) => new SimAgent({ id: `sim-${i}`, natsUrl: natsUrl!, slots: Number(slots), stepMs: Number(stepMs), models: ["sim"] }));
await Promise.all(agents.map((a) => a.start()));
process.stdout.write(JSON.stringify({ ready: true }) + "\n");
const stop = async (): Promise<void> => {
  await Promise.all(agents.map((a) => a.close()));
  process.exit(0);
};
process.once("SIGTERM", () => void stop());
process.once("SIGINT", () => void stop());
