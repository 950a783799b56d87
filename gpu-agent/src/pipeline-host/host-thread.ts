// Runs inside a pipeline host thread: loads one pipeline with its ONNX Runtime sessions on this
// thread and renders tasks here, so a denoising step goes sampler → UNet → sampler without leaving
// the thread. The agent's event loop only sends tasks and receives progress and results.
import { parentPort, workerData } from "node:worker_threads";
import { EXTRAS_MODEL, TaskStage, type Logger } from "@latentfarm/shared";
import { AuxiliarySessions } from "../models/auxiliary-sessions.js";
import { InThreadOrtSessions } from "../runtime/ort-sessions.js";
import { runExtras } from "../pipeline/extras.js";
import { ModelCatalog } from "../models/catalog.js";
import { loadModel, parsePipelineKey, unmergedLoraHashes } from "../models/model-loader.js";
import { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { runTask } from "../pipeline/txt2img.js";
import { toWireError, type FromHost, type HostInit, type LogLevel, type ToHost } from "./protocol.js";

const init = workerData as HostInit;
const WRITES_INFOTEXT: ReadonlySet<TaskStage> = new Set([TaskStage.FULL, TaskStage.SECOND_PASS, TaskStage.ASSEMBLE]);
const port = parentPort!;
const post = (m: FromHost): void => port.postMessage(m);

function forwardingLogger(base: Record<string, unknown>): Logger {
  const log =
    (level: LogLevel) =>
    (msg: string, fields?: Record<string, unknown>): void => {
      const all = { ...base, ...fields };
      try {
        post({ type: "log", level, msg, fields: all });
      } catch {
        // Fields that cannot be cloned travel as text.
        post({
          type: "log",
          level,
          msg,
          fields: { fields: String(JSON.stringify(all, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))) },
        });
      }
    };
  return {
    debug: log("debug"),
    info: log("info"),
    warn: log("warn"),
    error: log("error"),
    child: (f) => forwardingLogger({ ...base, ...f }),
  };
}

const logger = forwardingLogger({});
const loading = new AbortController();
/** Renders in progress: their abort, and their end (settles, never rejects). */
const running = new Map<number, { abort: AbortController; ended: Promise<void> }>();
let pipe: LoadedPipeline | undefined;
/** An Extras host's sessions: it loads no Stable Diffusion model, only the upscalers and face models its tasks name. */
let extras: AuxiliarySessions | undefined;
let closing: Promise<void> | undefined;

async function start(): Promise<void> {
  try {
    const key = parsePipelineKey(init.key);
    if (key.model === EXTRAS_MODEL) {
      const threads = init.intraOpNumThreads ? { intraOpNumThreads: init.intraOpNumThreads } : {};
      extras = new AuxiliarySessions(new InThreadOrtSessions({ ep: init.ep, ...threads }));
      if (!closing) post({ type: "ready", modelHash: undefined, loraHashes: [], warnings: [] });
      return;
    }
    const loaded = await loadModel(
      new ModelCatalog(init.modelsDir),
      key,
      {
        ep: init.ep,
        logger,
        cacheDir: init.cacheDir,
        sessions: "this-thread",
        ...(init.intraOpNumThreads ? { intraOpNumThreads: init.intraOpNumThreads } : {}),
        ...(init.tokenizerDir ? { tokenizerDir: init.tokenizerDir } : {}),
        ...(init.lorasDir ? { lorasDir: init.lorasDir } : {}),
        ...(init.embeddingsDir ? { tokenOverrides: true } : {}),
      },
      loading.signal,
    );
    pipe = new LoadedPipeline(loaded.model, {
      maxBatchRows: init.maxBatchRows,
      modelHash: loaded.modelHash,
      loraHashes: loaded.loraHashes,
      vae: loaded.vae,
      loras: key.loras,
      baseTextEncoder: loaded.baseTextEncoder,
      loadWarnings: loaded.warnings,
      bundledEmbeddings: loaded.bundledEmbeddings,
      logger,
      ...(init.embeddingsDir ? { embeddingsDir: init.embeddingsDir } : {}),
      onUnetCall: (rows, seconds) => post({ type: "unetCall", rows, seconds }),
    });
    if (closing) return;
    post({ type: "ready", modelHash: loaded.modelHash, loraHashes: loaded.loraHashes, warnings: loaded.warnings });
  } catch (err) {
    post({ type: "loadFailed", error: toWireError(err) });
  }
}

function render(m: Extract<ToHost, { op: "run" }>): void {
  const abort = new AbortController();
  running.set(m.id, { abort, ended: renderOn(m, abort) });
}

async function renderOn(m: Extract<ToHost, { op: "run" }>, abort: AbortController): Promise<void> {
  try {
    const onWarning = (message: string): void => post({ type: "warning", id: m.id, message });
    if (extras !== undefined) {
      const image = await runExtras(extras, m.req, {
        signal: abort.signal,
        agentId: m.agentId,
        onStep: () => {},
        onWarning,
        ...(m.resources ? { resources: m.resources } : {}),
      });
      post({ type: "done", id: m.id, output: { case: "result", value: image } });
      return;
    }
    if (!pipe) throw new Error("the pipeline is not loaded");
    const p = pipe;
    // Only the stages that write the infotext look the weight-0 LoRAs up (one warning per image, not per tile).
    const unmerged =
      m.req.params === undefined || !WRITES_INFOTEXT.has(m.req.stage)
        ? undefined
        : await unmergedLoraHashes(m.req.params, init.lorasDir, (name) =>
            onWarning(`lora "${name}" (weight 0) is not in this agent's LoRA folder: left out of "Lora hashes"`),
          );
    const output = await runTask(p, m.req, {
      signal: abort.signal,
      agentId: m.agentId,
      onStep: (step, total, previewPng) =>
        post({
          type: "step",
          id: m.id,
          step,
          total,
          at: performance.timeOrigin + performance.now(),
          unetRunMs: p.model.ortRunStats("unet").ms,
          ...(previewPng !== undefined && { previewPng }),
        }),
      onWarning,
      onCheckpoint: (checkpoint) => post({ type: "checkpoint", id: m.id, checkpoint }),
      ...(m.resources ? { resources: m.resources } : {}),
      ...(unmerged !== undefined && { unmergedLoraHashes: unmerged }),
    });
    post({ type: "done", id: m.id, output });
  } catch (err) {
    post({ type: "failed", id: m.id, error: toWireError(err) });
  } finally {
    running.delete(m.id);
  }
}

async function close(): Promise<void> {
  loading.abort();
  await started;
  // Renders stop at their next model call; the sessions close once none can use them.
  for (const r of running.values()) r.abort.abort();
  await Promise.all([...running.values()].map((r) => r.ended));
  await pipe?.close();
  await extras?.close();
  post({ type: "closed" });
  port.close();
}

port.on("message", (m: ToHost) => {
  switch (m.op) {
    case "run":
      render(m);
      break;
    case "cancel":
      running.get(m.id)?.abort.abort();
      break;
    case "close":
      closing ??= close();
      break;
  }
});

const started = start();
