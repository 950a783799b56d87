import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { GenerationParamsSchema } from "@latentfarm/shared";
import { FarmError, RngSource, RunTaskRequestSchema, silentLogger, type RunTaskRequest } from "@latentfarm/shared";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";
import { pipelineKey } from "../models/model-loader.js";
import { loraAddnetHash, writeSafetensors } from "../model-graph/index.js";
import { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { renderTask } from "../pipeline/txt2img.js";
import { PipelineHost } from "./pipeline-host.js";
import { loadTinyModel } from "../test-support/tiny-pipeline.js";

const skip = kitSkip("tiny-sd15");

const start = (model = "tiny-sd15"): Promise<PipelineHost> =>
  PipelineHost.start({
    modelsDir: KIT_FIXTURES,
    key: pipelineKey(model, []),
    ep: { name: "cpu" },
    intraOpNumThreads: 1,
    cacheDir: join(tmpdir(), "latentfarm-test-cache"),
    maxBatchRows: 16,
    logger: silentLogger,
  });

function request(params: MessageInitShape<typeof GenerationParamsSchema> = {}, seed = 7n): RunTaskRequest {
  return create(RunTaskRequestSchema, {
    taskId: "t",
    jobId: "j",
    seed,
    params: {
      prompt: "a red (apple:1.2) on a table",
      negativePrompt: "blurry",
      samplerName: "Euler a",
      steps: 6,
      cfgScale: 7,
      width: 64,
      height: 64,
      rng: RngSource.NV,
      model: "tiny-sd15",
      ...params,
    },
  });
}

const ctx = (onStep: (s: number, n: number) => void = () => {}, signal = new AbortController().signal) => ({
  signal,
  agentId: "test",
  onStep,
  onWarning: () => {},
});

test("a task rendered in a pipeline host thread equals the same task rendered in process, byte for byte", { skip }, async () => {
  const host = await start();
  const model = await loadTinyModel();
  const pipe = new LoadedPipeline(model, { maxBatchRows: 16 });
  try {
    for (const req of [request(), request({ samplerName: "DPM++ 2M SDE", scheduler: "Karras" }, 123n)]) {
      const steps: number[] = [];
      // Two at once on the host: they share its step batcher, as concurrent tasks on an agent do.
      const [viaHost, alsoViaHost] = await Promise.all([
        host.runTask(
          req,
          ctx((s) => steps.push(s)),
        ),
        host.runTask(request({}, 8n), ctx()),
      ]);
      const inProcess = await renderTask(pipe, req, ctx());
      assert.equal(viaHost.case, "result");
      assert.equal(alsoViaHost.case, "result");
      assert.deepEqual(Buffer.from(viaHost.value.png as Uint8Array), Buffer.from(inProcess.png));
      assert.equal(viaHost.value.infotext, inProcess.infotext);
      assert.deepEqual(
        steps,
        [...Array(req.params!.steps).keys()].map((i) => i + 1),
      );
    }
    assert.ok(host.lastStep.unetRunMs > 0, "step events carry the host's ORT run time");
  } finally {
    await pipe.close();
    await host.close();
  }
  assert.equal(PipelineHost.threadsAlive, 0, "close() ended the pipeline thread");
});

test(
  "bad input crosses the thread as the same status and field; cancelling stops a render and the host keeps serving",
  { skip },
  async () => {
    const host = await start();
    try {
      await assert.rejects(
        host.runTask(request({ samplerName: "Euler z" }), ctx()),
        (e: unknown) => e instanceof FarmError && e.code === grpc.status.INVALID_ARGUMENT && e.field === "sampler_name",
      );
      const abort = new AbortController();
      let last = 0;
      const running = host.runTask(
        request({ steps: 400 }),
        ctx((s) => {
          last = s;
          if (s === 2) abort.abort(new FarmError(grpc.status.CANCELLED, "stop"));
        }, abort.signal),
      );
      await assert.rejects(running, (e: unknown) => e instanceof FarmError && e.code === grpc.status.CANCELLED);
      // Stopped at the next model call: the step events in flight when it aborted are at most one more.
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(last <= 3, `stopped within a step (last step event ${last})`);
      const after = await host.runTask(request({ steps: 2 }), ctx());
      assert.equal(after.case, "result");
    } finally {
      await host.close();
    }
    await assert.rejects(host.runTask(request(), ctx()), (e: unknown) => e instanceof FarmError && e.code === grpc.status.UNAVAILABLE);
    assert.equal(PipelineHost.threadsAlive, 0, "close() ended the pipeline thread");
  },
);

test("a pipeline that cannot load fails start() with the loader's status, and its thread ends", { skip }, async () => {
  await assert.rejects(start("no-such-model"), (e: unknown) => e instanceof FarmError && e.code === grpc.status.NOT_FOUND);
  assert.equal(PipelineHost.threadsAlive, 0, "the failed pipeline's thread ended");
});

test("a host thread lists a weight-0 LoRA of its folder in Lora hashes, and warns of one it lacks", { skip }, async () => {
  const lorasDir = mkdtempSync(join(tmpdir(), "lf-host-loras-"));
  await writeSafetensors(join(lorasDir, "grain.safetensors"), {
    "lora_unet_x.lora_up.weight": { dtype: "F32", shape: [2, 1], data: Float32Array.from([0.5, -0.5]) },
  });
  const host = await PipelineHost.start({
    modelsDir: KIT_FIXTURES,
    key: pipelineKey("tiny-sd15", []),
    ep: { name: "cpu" },
    intraOpNumThreads: 1,
    cacheDir: join(tmpdir(), "latentfarm-test-cache"),
    maxBatchRows: 16,
    logger: silentLogger,
    lorasDir,
  });
  try {
    const warnings: string[] = [];
    const out = await host.runTask(request({ prompt: "a red apple <lora:grain:0> <lora:absent:0>", steps: 2 }), {
      ...ctx(),
      onWarning: (m: string) => warnings.push(m),
    });
    assert.equal(out.case, "result");
    const hash = await loraAddnetHash(join(lorasDir, "grain.safetensors"));
    assert.match(out.value.infotext as string, new RegExp(`Lora hashes: "grain: ${hash}"`));
    assert.deepEqual(warnings, [`lora "absent" (weight 0) is not in this agent's LoRA folder: left out of "Lora hashes"`]);
  } finally {
    await host.close();
    rmSync(lorasDir, { recursive: true, force: true });
  }
});
