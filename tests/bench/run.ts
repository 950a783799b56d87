// `npm run bench`: every benchmark, printing measured numbers and ratios side by side.
// `npm run bench -- NAME…` runs only those (agent-overhead, coordinator-dispatch, placement, heartbeats, speed-split, tiled-hires, conditioning, embeddings, samplers, model-io, unet-call).
import { availableParallelism, cpus } from "node:os";
import { benchAgentOverhead } from "./agent-overhead.js";
import { benchConditioningCost } from "./conditioning.js";
import { benchEmbeddings } from "./embeddings.js";
import { benchHeartbeats } from "./heartbeats.js";
import { benchModelIo } from "./model-io.js";
import { benchCoordinatorDispatch } from "./coordinator-dispatch.js";
import { benchPlacementBoth } from "./placement.js";
import { benchSamplerOverhead } from "./samplers.js";
import { benchSpeedSplit } from "./speed-split.js";
import { benchTiledHires } from "./tiled-hires.js";
import { benchUnetCall } from "./unet-call.js";

const only = process.argv.slice(2);
const want = (name: string): boolean => only.length === 0 || only.includes(name);
const fmt = (o: Record<string, number> | undefined): string =>
  o === undefined
    ? "skipped (fixtures absent)"
    : Object.entries(o)
        .map(([k, v]) => `${k}=${Number.isInteger(v) ? v : v.toFixed(3)}`)
        .join("  ");

process.stdout.write(`machine: ${cpus()[0]?.model ?? "?"} × ${availableParallelism()}, node ${process.version}\n`);
if (want("agent-overhead")) process.stdout.write(`agent-overhead (target ≤ 5%): ${fmt(await benchAgentOverhead())}\n`);
if (want("coordinator-dispatch"))
  process.stdout.write(`coordinator-dispatch (target ≥ 500 tasks/s): ${fmt(await benchCoordinatorDispatch())}\n`);
if (want("placement")) process.stdout.write(`placement, 256 agents (target ≥ 2,000/s, p99 ≤ 5 ms): ${fmt(await benchPlacementBoth())}\n`);
if (want("heartbeats"))
  process.stdout.write(
    `heartbeats, one agent with 1,000 LoRAs, 200 embeddings, 40 models, 1/s, over a minute (whole inventory every beat vs digests): ${fmt(benchHeartbeats())}\n`,
  );
if (want("speed-split")) process.stdout.write(`speed-split 1×/2×/4× (target makespan ≤ 1.15 × ideal): ${fmt(await benchSpeedSplit())}\n`);
if (want("conditioning"))
  process.stdout.write(
    `conditioning, ~300-token prompt with edits, encoder excluded (target ≤ 2 ms cold): ${fmt(await benchConditioningCost())}\n`,
  );
if (want("embeddings"))
  process.stdout.write(
    `embeddings, text encoder of SD1.5's width, 2×77 tokens, CPU, 1 thread (with token overrides vs as built): ${fmt(await benchEmbeddings())}\n`,
  );
if (want("samplers"))
  process.stdout.write(
    `samplers, 4×128×128 latent, model excluded (target b_in_sampler ≤ 0.3 ms per step, or per model call): ${fmt(await benchSamplerOverhead())}\n`,
  );
if (want("model-io"))
  process.stdout.write(
    `model-io, UNet input + CFG answer per call, 4×128×128, one prompt (kernels vs scalar loops): ${fmt(benchModelIo())}\n`,
  );
if (want("unet-call"))
  process.stdout.write(
    `unet-call, the pipeline thread's work around a UNet call, 4×128×128, CFG, SD1.5 context, run() excluded (kept vs fresh buffers): ${fmt(await benchUnetCall())}\n`,
  );
if (want("tiled-hires"))
  process.stdout.write(`tiled-hires 2048², 4 vs 1 agent (target second pass ≤ 0.35×): ${fmt(await benchTiledHires())}\n`);
