// `npm run bench`: every benchmark, printing measured numbers and ratios side by side.
import { availableParallelism, cpus } from "node:os";
import { benchAgentOverhead } from "./agent-overhead.js";
import { benchCoordinatorDispatch } from "./coordinator-dispatch.js";
import { benchStepBatching } from "./step-batching.js";

const only = process.argv.slice(2);
const want = (name: string): boolean => only.length === 0 || only.includes(name);
const fmt = (o: Record<string, number> | undefined): string =>
  o === undefined ? "skipped (fixtures absent)" : Object.entries(o).map(([k, v]) => `${k}=${Number.isInteger(v) ? v : v.toFixed(3)}`).join("  ");

process.stdout.write(`machine: ${cpus()[0]?.model ?? "?"} × ${availableParallelism()}, node ${process.version}\n`);
if (want("agent-overhead")) process.stdout.write(`agent-overhead (target ≤ 5%): ${fmt(await benchAgentOverhead())}\n`);
if (want("coordinator-dispatch")) process.stdout.write(`coordinator-dispatch (target ≥ 500 tasks/s): ${fmt(await benchCoordinatorDispatch())}\n`);
if (want("step-batching")) process.stdout.write(`step-batching, 8 concurrent vs 8 sequential jobs, one CPU agent: ${fmt(await benchStepBatching())}\n`);
