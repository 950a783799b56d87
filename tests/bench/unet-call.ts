// The pipeline thread's own work around each UNet call at 4×128×128 (1024×1024 px) with CFG (2 rows) and
// an SD1.5 context (77×768): packing the batch (StepBatcher), converting the feeds for an fp16 export,
// ONNX Runtime's binding on both sides of run(), and handing the output back, through the agent's own
// StepBatcher, SdModel.unet and in-thread sessions. The UNet is a one-op graph (out = sample·0.5) with
// the UNet's inputs, so that its run() costs little, and that run() time is subtracted; before each call
// the thread sleeps 30 ms, as it does through a real UNet's run(), so the work runs as cold as it does
// between real calls. Side by side, alternating call by call: the batcher keeping each shape's input
// buffers (the agent's arrangement) and allocating them per call. Medians in ms per call.
import { cpSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { silentLogger } from "@latentfarm/shared";
import { GraphBuilder, encodeModel } from "../../gpu-agent/src/model-graph/onnx.js";
import { SdModel } from "../../gpu-agent/src/models/sd-model.js";
import { StepBatcher } from "../../gpu-agent/src/pipeline/step-batcher.js";
import { TINY_SD15 } from "../harness/farm.js";
import { median } from "./stats.js";

const H = 128;
const W = 128;
const SEQ = 77;
const DIM = 768;

function oneOpUnet(type: "float32" | "float16"): Uint8Array {
  const g = new GraphBuilder("one-op-unet");
  const sample = g.input("sample", type, ["batch", 4, "height", "width"]);
  g.input("timestep", type, ["batch"]);
  g.input("encoder_hidden_states", type, ["batch", "sequence", DIM]);
  const half = g.op1("Cast", [g.constant("float32", [], [0.5])], { to: type === "float16" ? 10 : 1 });
  g.output(g.op1("Mul", [sample, half]), "out_sample", type, ["batch", 4, "height", "width"]);
  return encodeModel(g.toSpec()).toBytes();
}

/** The kit's tiny model with the one-op UNet in place of its own. */
function modelDir(root: string, type: "float32" | "float16"): string {
  const dir = join(root, type);
  cpSync(TINY_SD15, dir, { recursive: true });
  rmSync(join(dir, "unet"), { recursive: true });
  cpSync(join(TINY_SD15, "unet"), join(dir, "unet"), { recursive: true, filter: (p) => !p.endsWith(".pb") });
  writeFileSync(join(dir, "unet", "model.onnx"), oneOpUnet(type));
  return dir;
}

export async function benchUnetCall(opts: { calls?: number; modelMs?: number } = {}): Promise<Record<string, number> | undefined> {
  if (!existsSync(TINY_SD15)) return undefined;
  const calls = opts.calls ?? 60;
  const modelMs = opts.modelMs ?? 30;
  const root = mkdtempSync(join(tmpdir(), "latentfarm-unet-call-"));
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const out: Record<string, number> = {};
  try {
    for (const type of ["float32", "float16"] as const) {
      const model = await SdModel.load(
        { name: type, format: "diffusers-onnx", path: modelDir(root, type) },
        { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, sessions: "this-thread" },
      );
      try {
        const unet = model.unet.bind(model);
        const batchers = {
          kept: new StepBatcher(unet, 4, DIM, { maxRows: 16, reuseBuffers: true }),
          fresh: new StepBatcher(unet, 4, DIM, { maxRows: 16, reuseBuffers: false }),
        };
        // One image's request as the denoise loop makes it: its x·c_in buffer, uncond and cond contexts.
        const x = Float32Array.from({ length: 4 * H * W }, (_, i) => Math.sin(i));
        const contexts = [0, 1].map((k) => Float32Array.from({ length: SEQ * DIM }, (_, i) => Math.cos(i + k)));
        const times = { kept: [] as number[], fresh: [] as number[] };
        for (let c = 0; c < calls * 2 + 10; c++) {
          const which = c % 2 === 0 ? "kept" : "fresh";
          Atomics.wait(sleeper, 0, 0, modelMs);
          const runBefore = model.ortRunStats("unet").ms;
          const started = performance.now();
          const rows = await batchers[which].evaluate({ x, t: 500 - c, contexts, h: H, w: W, seq: SEQ });
          const ms = performance.now() - started - (model.ortRunStats("unet").ms - runBefore);
          if (rows.length !== 2) throw new Error("expected two rows");
          if (c >= 10) times[which].push(ms);
        }
        const prefix = type === "float32" ? "fp32" : "fp16";
        out[`${prefix}_ms_per_call`] = median(times.kept);
        out[`${prefix}_fresh_buffers_ms_per_call`] = median(times.fresh);
        out[`${prefix}_fresh_over_kept`] = median(times.fresh) / median(times.kept);
        out[`${prefix}_one_op_run_ms`] = model.ortRunStats("unet").ms / model.ortRunStats("unet").runs;
      } finally {
        await model.close();
      }
    }
    return out;
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}
