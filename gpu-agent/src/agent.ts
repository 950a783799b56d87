import * as grpc from "@grpc/grpc-js";
import { randomUUID } from "node:crypto";
import { freemem, hostname } from "node:os";
import { create, toBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  AGENT_METRICS,
  AgentInfoSchema,
  AgentService,
  FarmError,
  HeartbeatSchema,
  type Heartbeat,
  LoraInfoSchema,
  ModelInfoSchema,
  EmbeddingInfoSchema,
  SkippedEmbeddingSchema,
  VaeInfoSchema,
  TaskProgressSchema,
  addHealthAndReflection,
  addService,
  bindServer,
  createMetrics,
  serverOptions,
  setServing,
  shutdownServer,
  startMetricsServer,
  subjects,
  serverCredentials,
  type AgentInfo,
  type Logger,
  type TlsFiles,
  type RunTaskRequest,
  EXTRAS_MODEL,
} from "@latentfarm/shared";
import { DEFAULT_ORPHAN_GRACE_MS, TaskRun, type RunTaskMessage } from "./task-run.js";
import { ModelCatalog } from "./models/catalog.js";
import { EmbeddingsFolder } from "./models/embedding-files.js";
import { VaeList } from "./models/vae-files.js";
import { CheckpointHashes } from "./models/checkpoint-hashes.js";
import { ModelFamilies } from "./models/model-families.js";
import { PipelineCache } from "./models/pipeline-cache.js";
import { EXTRAS_PIPELINE_KEY, parsePipelineKey, passKeysWith } from "./models/model-loader.js";
import { loraMetadataByName, recentLoras } from "./models/lora-files.js";
import { fittedHeartbeat, HeartbeatEncoder } from "./heartbeat.js";
import { runTaskPasses, type RunOnPipeline } from "./task-passes.js";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { createRequire } from "node:module";
import { join, relative } from "node:path";
import { PipelineHost } from "./pipeline-host/pipeline-host.js";
import { DEFAULT_RESOURCES, type RenderContext } from "./pipeline/render-common.js";
import { listUpscalers } from "./pipeline/upscalers.js";
import { listFaceRestorers } from "./pipeline/face-restore.js";
import type { ExecutionProvider } from "./runtime/protocol.js";

export interface AgentConfig {
  agentId?: string;
  /** gRPC listen address, e.g. "0.0.0.0:50052"; port 0 picks a free one. */
  listen: string;
  /** host:port the coordinator dials; defaults to the bound address on 127.0.0.1. */
  advertiseAddress?: string;
  natsUrl: string;
  modelsDir: string;
  ep: ExecutionProvider;
  /** Tasks run at once; concurrent tasks share UNet calls through step-level batching. */
  slots?: number;
  heartbeatMs?: number;
  /** Port for /metrics; undefined = no metrics server, 0 = any free port. */
  metricsPort?: number;
  metricsHost?: string;
  /** Plaintext grpc.health.v1 port for kubelet probes; undefined = none. */
  healthPort?: number;
  maxLoadedModels?: number;
  intraOpNumThreads?: number;
  /** Rows per UNet call at most. */
  maxBatchRows?: number;
  /** Where .safetensors checkpoints are built into ONNX graphs (cached by sha256). */
  cacheDir?: string;
  /** CLIP tokenizer for checkpoints; defaults to the first ONNX model's tokenizer in the models folder. */
  tokenizerDir?: string;
  /** kohya/PEFT LoRA files, referenced as <lora:name:weight>. */
  lorasDir?: string;
  /** Textual-inversion embeddings (.pt, .bin, .safetensors), named in prompts by file stem. */
  embeddingsDir?: string;
  /** A1111's models/VAE: VAE files a job's sd_vae names (besides `*.vae.*` files in the models folder). */
  vaeDir?: string;
  /** A1111's --vae-path: the VAE file every render decodes with, whatever its sd_vae. */
  vaePath?: string;
  /** ESRGAN-family upscaler models (hires fix). */
  upscalersDir?: string;
  /** Face restoration models (CodeFormer and a face detector). */
  faceModelsDir?: string;
  /** Limits on decoded input images. */
  maxInputPixels?: number;
  maxInputBytes?: number;
  /**
   * How long a task goes on after its coordinator's stream breaks, waiting for a restarted
   * coordinator to re-attach (and how long a finished task's result is kept for it).
   */
  orphanGraceMs?: number;
  /** mTLS on the AgentService port: only holders of a certificate from this CA (the coordinator) get in. */
  tls?: TlsFiles;
  /** What the agent runs on, for AgentInfo.device and images' provenance; default: describeDevice(ep). */
  deviceName?: string;
  logger: Logger;
}

/** The ONNX Runtime package's version, read from its package.json (the native binding only loads in pipeline threads). */
export const RUNTIME = `onnxruntime-node ${(createRequire(import.meta.url)("onnxruntime-node/package.json") as { version: string }).version}`;

/**
 * A device's description when the operator gives none: the CPU's model for the CPU provider; for a GPU
 * provider its name and device index (ONNX Runtime does not say which GPU it found).
 */
export function describeDevice(ep: ExecutionProvider): string {
  if (ep.name === "cpu") return `${cpus()[0]?.model.trim() || "CPU"} × ${availableParallelism()}`;
  return ep.name === "cuda" ? `CUDA device ${ep.deviceId}` : "WebGPU adapter";
}

const SERVICE = AgentService.typeName;

/** A GPU agent: serves AgentService, runs tasks on loaded pipelines, heart-beats on NATS. */
export class Agent {
  readonly id: string;
  private readonly server = new grpc.Server(serverOptions);
  private healthServer: grpc.Server | undefined;
  private readonly catalog: ModelCatalog;
  /** For heartbeats: what the embeddings folder holds (pipelines read it themselves, in their threads). */
  private readonly embeddings: EmbeddingsFolder | undefined;
  private embeddingsError: string | undefined;
  /** A1111's VAE list, which a task's sd_vae resolves against before its pipeline is chosen. */
  private readonly vaes: VaeList;
  /** Whether the last heartbeat left the LoRA list out (warned once per stretch). */
  private lorasUnlistedWarned = false;
  /** Leaves the inventory out of heartbeats that would repeat it. */
  private readonly heartbeats = new HeartbeatEncoder();
  /** The checkpoints' "Model hash", hashed in the background, for heartbeats. */
  private readonly hashes: CheckpointHashes;
  private readonly families = new ModelFamilies();
  private readonly cache: PipelineCache<PipelineHost>;
  private readonly m = createMetrics(AGENT_METRICS);
  private nc: NatsConnection | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private metricsServer: { url: string; close(): Promise<void> } | undefined;
  private health: ReturnType<typeof addHealthAndReflection> | undefined;
  private readonly runs = new Map<string, TaskRun>();
  private busySince: number | undefined;
  private draining = false;
  private closed = false;
  port = 0;
  healthPort = 0;
  address = "";

  constructor(private readonly cfg: AgentConfig) {
    this.id = cfg.agentId ?? `${hostname()}-${randomUUID().slice(0, 8)}`;
    this.catalog = new ModelCatalog(cfg.modelsDir);
    this.embeddings = cfg.embeddingsDir ? new EmbeddingsFolder(cfg.embeddingsDir, cfg.logger) : undefined;
    this.vaes = new VaeList({
      modelsDir: cfg.modelsDir,
      ...(cfg.vaeDir !== undefined && { vaeDir: cfg.vaeDir }),
      ...(cfg.vaePath !== undefined && { forced: cfg.vaePath }),
    });
    const cacheDir = cfg.cacheDir ?? join(tmpdir(), "latentfarm-model-cache");
    this.hashes = new CheckpointHashes(cacheDir, cfg.logger);
    this.cache = new PipelineCache<PipelineHost>(
      cfg.maxLoadedModels ?? 2,
      async (keyString, signal) => {
        const name = parsePipelineKey(keyString).model;
        const end = this.m.metrics.modelLoad.startTimer({ model: name });
        try {
          // Each pipeline loads and renders in a thread of its own (see PipelineHost).
          const host = await PipelineHost.start(
            {
              modelsDir: cfg.modelsDir,
              key: keyString,
              ep: cfg.ep,
              cacheDir,
              maxBatchRows: cfg.maxBatchRows ?? 16,
              logger: cfg.logger,
              ...(cfg.intraOpNumThreads ? { intraOpNumThreads: cfg.intraOpNumThreads } : {}),
              ...(cfg.tokenizerDir ? { tokenizerDir: cfg.tokenizerDir } : {}),
              ...(cfg.lorasDir ? { lorasDir: cfg.lorasDir } : {}),
              ...(cfg.embeddingsDir ? { embeddingsDir: cfg.embeddingsDir } : {}),
              onUnetCall: (_rows, seconds) => {
                this.m.metrics.unetSteps.inc({ model: name });
                this.m.metrics.unetStepDuration.observe({ model: name }, seconds);
              },
            },
            signal,
          );
          end();
          return host;
        } catch (err) {
          this.m.metrics.modelLoadFailures.inc({ model: name });
          throw FarmError.from(err);
        }
      },
      (keys) => {
        this.m.metrics.modelsLoaded.set(keys.length);
        this.publishHeartbeat();
      },
    );
    this.m.metrics.slots.set(this.slots);
    this.m.metrics.busySlots.set(0);
    this.m.metrics.modelsLoaded.set(0);
    // Pre-create the labelled series the dashboards read, so they exist before the first task.
    for (const outcome of ["succeeded", "failed", "cancelled"]) this.m.metrics.tasks.inc({ outcome }, 0);
    this.m.metrics.busySeconds.inc(0);
    for (const where of ["local", "handed_back"]) this.m.metrics.refinerSwitches.inc({ outcome: where }, 0);
  }

  get slots(): number {
    return this.cfg.slots ?? 4;
  }

  get registry() {
    return this.m.registry;
  }

  get metricsUrl(): string | undefined {
    return this.metricsServer?.url;
  }

  async start(): Promise<void> {
    try {
      await this.startServices();
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  private async startServices(): Promise<void> {
    this.health = addHealthAndReflection(this.server, [SERVICE]);
    addService(
      this.server,
      AgentService,
      {
        runTask: (req, ctx) => this.runTask(req, ctx.signal),
        cancelTask: async (req) => ({ stopped: this.cancelTask(req.taskId, req.attempt, req.reason) }),
        loraMetadata: async (req) => {
          const found = await loraMetadataByName(this.cfg.lorasDir, req.names);
          return { metadataJson: Object.fromEntries([...found].map(([name, m]) => [name, JSON.stringify(m)])) };
        },
        status: async (req) => {
          if (req.inventory) this.heartbeats.allowOmission();
          // The inventory already lists the models: the catalog is read once.
          const heartbeat = req.inventory ? (await this.currentHeartbeat()).heartbeat : undefined;
          const models = heartbeat?.availableModels.map((m) => m.name) ?? (await this.catalog.list()).map((e) => e.name);
          return {
            ...(heartbeat !== undefined && { heartbeat }),
            agent: this.info(),
            models,
            runningTasks: [...this.runs.values()].filter((r) => !r.finished).map((r) => r.taskId),
          };
        },
      },
      (method, err) => {
        if (err.code === grpc.status.INTERNAL) this.cfg.logger.error("rpc failed", { method, error: err.message });
      },
    );
    this.port = await bindServer(this.server, this.cfg.listen, serverCredentials(this.cfg.tls, true));
    const host = this.cfg.listen.slice(0, this.cfg.listen.lastIndexOf(":"));
    this.address = this.cfg.advertiseAddress ?? `${host === "0.0.0.0" || host === "[::]" ? "127.0.0.1" : host}:${this.port}`;
    if (this.cfg.healthPort !== undefined) {
      this.healthServer = new grpc.Server();
      const h = addHealthAndReflection(this.healthServer, [SERVICE]);
      this.health = mirrorHealth(this.health, h);
      this.healthPort = await bindServer(this.healthServer, `0.0.0.0:${this.cfg.healthPort}`);
    }
    if (this.cfg.metricsPort !== undefined) {
      this.metricsServer = await startMetricsServer(this.m.registry, this.cfg.metricsPort, this.cfg.metricsHost ?? "0.0.0.0");
    }
    this.nc = await connect({ servers: this.cfg.natsUrl, name: `latentfarm-agent-${this.id}`, maxReconnectAttempts: -1 });
    setServing(this.health, [SERVICE], true);
    this.publishHeartbeat();
    this.heartbeat = setInterval(() => this.publishHeartbeat(), this.cfg.heartbeatMs ?? 1000);
    this.cfg.logger.info("agent started", { agentId: this.id, address: this.address, ep: this.cfg.ep.name, slots: this.slots });
  }

  info(): AgentInfo {
    return create(AgentInfoSchema, {
      agentId: this.id,
      address: this.address,
      executionProvider: this.cfg.ep.name,
      slots: this.slots,
      busySlots: this.active,
      loadedModels: [...new Set(this.cache.names.map((k) => parsePipelineKey(k).model))].filter((m) => m !== EXTRAS_MODEL),
      lastHeartbeatUnixMs: BigInt(Date.now()),
      draining: this.draining,
      device: this.cfg.deviceName || describeDevice(this.cfg.ep),
      runtime: RUNTIME,
    });
  }

  private publishHeartbeat(): void {
    if (!this.natsOpen()) return;
    this.currentHeartbeat().then(
      ({ heartbeat, lorasUnlisted }) => {
        // close() may have begun draining while the catalog was listed; publishing then throws.
        if (!this.nc || !this.natsOpen()) return;
        if (lorasUnlisted && !this.lorasUnlistedWarned) {
          this.cfg.logger.warn("the LoRA folder's list does not fit in a heartbeat: placement will not know which LoRAs are here", {
            files: heartbeat.loras.length,
          });
        }
        this.lorasUnlistedWarned = lorasUnlisted;
        try {
          this.nc.publish(subjects.agentHeartbeat(this.id), this.heartbeats.encode(heartbeat, Date.now()));
        } catch (err) {
          // A heartbeat lost is the next one's to make up; an exception here would end the process.
          this.cfg.logger.warn("heartbeat not published", { error: String(err) });
          this.heartbeats.forget();
        }
      },
      (err: unknown) => this.cfg.logger.warn("cannot list models", { error: String(err) }),
    );
  }

  /** A heartbeat with the whole inventory as it is now, fitted to NATS's max_payload (fittedHeartbeat). */
  private async currentHeartbeat(): Promise<{ heartbeat: Heartbeat; lorasUnlisted: boolean }> {
    // An unreadable embeddings folder leaves the heartbeat's list empty; the models still go out.
    const embeddings = this.embeddings?.current().then(
      (read) => {
        this.embeddingsError = undefined;
        return read;
      },
      (err: unknown) => {
        // Once per error, not once per heartbeat.
        if (this.embeddingsError !== String(err)) this.cfg.logger.warn("cannot read the embeddings folder", { error: String(err) });
        this.embeddingsError = String(err);
        return undefined;
      },
    );
    const vaes = this.vaes.current().catch(() => []);
    const upscalers = listUpscalers(this.cfg.upscalersDir);
    const faceRestorers = listFaceRestorers(this.cfg.faceModelsDir);
    const loras = recentLoras(this.cfg.lorasDir);
    const models = this.catalog
      .list()
      .then(async (entries) => ({ entries, hashes: await this.hashes.of(entries), families: await this.families.of(entries) }));
    const [{ entries, hashes, families }, read, vaeFiles, upscalerNames, faceRestorerNames, loraFiles] = await Promise.all([
      models,
      embeddings,
      vaes,
      upscalers,
      faceRestorers,
      loras,
    ]);
    const hb = create(HeartbeatSchema, {
      agent: this.info(),
      availableModels: entries.map((e) =>
        create(ModelInfoSchema, {
          name: e.name,
          format: e.format,
          modelHash: hashes.get(e.name) ?? "",
          family: families.get(e.name) ?? "",
        }),
      ),
      freeMemoryBytes: BigInt(freemem()),
      embeddings: (read?.embeddings ?? []).map((e) =>
        create(EmbeddingInfoSchema, { name: e.name, vectors: e.vectors, width: e.hidden, hash: (e.sha256 ?? "").slice(0, 12) }),
      ),
      skippedEmbeddings: (read?.skipped ?? []).map((s) =>
        create(SkippedEmbeddingSchema, { file: relative(this.embeddings!.dir, s.file), reason: s.reason }),
      ),
      vaes: vaeFiles.map((f) => create(VaeInfoSchema, { name: f.name, sizeBytes: BigInt(f.sizeBytes ?? 0) })),
      upscalers: upscalerNames,
      faceRestorers: faceRestorerNames,
      loras: loraFiles.map((f) => create(LoraInfoSchema, { name: f.name, alias: f.alias ?? "", sizeBytes: BigInt(f.sizeBytes) })),
    });
    return fittedHeartbeat(hb, this.nc?.info?.max_payload ?? 1024 * 1024);
  }

  /** Whether the NATS connection still takes publishes (not closed, not draining). */
  private natsOpen(): boolean {
    return this.nc !== undefined && !this.nc.isClosed() && !this.nc.isDraining();
  }

  /** Call after a run starts or finishes: busy time and the gauge follow the active count. */
  private markBusy(): void {
    const now = performance.now();
    if (this.busySince !== undefined) this.m.metrics.busySeconds.inc((now - this.busySince) / 1000);
    const after = this.active;
    this.busySince = after > 0 ? now : undefined;
    this.m.metrics.busySlots.set(after);
  }

  /** Renders in progress (finished runs stay in `runs` a while for late re-attaches). */
  private get active(): number {
    let n = 0;
    for (const r of this.runs.values()) if (!r.finished) n++;
    return n;
  }

  private runTask(req: RunTaskRequest, callSignal: AbortSignal): AsyncGenerator<RunTaskMessage> {
    let existing = this.runs.get(req.taskId);
    // A task resumed from a refiner switch is new work: never the finished run that handed the switch back.
    // (A re-attach without the resume, after a coordinator restart, may join the resumed run: its result is the task's.)
    if (existing?.finished && !existing.resumed && req.refinerResume !== undefined) {
      existing.dispose();
      this.runs.delete(req.taskId);
      existing = undefined;
    }
    if (existing) {
      this.m.metrics.tasksAttached.inc();
      this.cfg.logger.info("re-attached to a running task", { taskId: req.taskId, attempt: req.attempt, finished: existing.finished });
      return existing.attach(callSignal, req.attempt);
    }
    if (this.draining || this.closed) throw new FarmError(grpc.status.UNAVAILABLE, `agent ${this.id} is draining`, { handBack: true });
    if (this.active >= this.slots) throw new FarmError(grpc.status.RESOURCE_EXHAUSTED, `agent ${this.id} has no free slot`);
    if (!req.params) throw FarmError.invalid("params", "missing");
    const run = new TaskRun({
      taskId: req.taskId,
      attempt: req.attempt,
      resumed: req.refinerResume !== undefined,
      orphanGraceMs: this.cfg.orphanGraceMs ?? DEFAULT_ORPHAN_GRACE_MS,
      onExpired: (r) => {
        if (this.runs.get(r.taskId) === r) this.runs.delete(r.taskId);
      },
    });
    this.runs.set(req.taskId, run);
    this.markBusy();
    void this.render(run, req);
    return run.attach(callSignal, req.attempt);
  }

  private async render(run: TaskRun, req: RunTaskRequest): Promise<void> {
    const started = performance.now();
    const signal = run.abort.signal;
    let outcome: "succeeded" | "failed" | "cancelled" = "failed";
    let loadMs = 0;
    try {
      // The pass a task belongs to decides its pipeline: the checkpoint, the LoRAs merged into it, its VAE.
      const runOn: RunOnPipeline = async (key, stageReq, ctx) => {
        const asked = performance.now();
        const loaded = await this.cache.acquire(key, signal).finally(() => (loadMs += performance.now() - asked));
        try {
          for (const w of loaded.value.loadWarnings) run.warning({ kind: { case: "warning", value: { message: w } } });
          return await loaded.value.runTask(stageReq, ctx);
        } finally {
          loaded.release();
          // A pipeline whose thread died is reloaded by the next task that needs it.
          if (loaded.value.failed) this.cache.discard(key, loaded.value);
        }
      };
      const ctx: RenderContext = {
        signal,
        agentId: this.id,
        onStep: (step, total, previewPng) => {
          const progress = {
            taskId: req.taskId,
            imageIndex: req.imageIndex,
            step,
            totalSteps: total,
            ...(previewPng !== undefined && { previewPng }),
          };
          run.progress({ kind: { case: "progress", value: progress } });
          this.nc?.publish(
            subjects.taskProgress(req.taskId),
            toBinary(
              TaskProgressSchema,
              create(TaskProgressSchema, { taskId: req.taskId, jobId: req.jobId, agentId: this.id, step: progress }),
            ),
          );
        },
        onWarning: (message) => run.warning({ kind: { case: "warning", value: { message } } }),
        onCheckpoint: (checkpoint) => run.checkpoint({ kind: { case: "checkpoint", value: checkpoint } }),
        resources: {
          maxInputPixels: this.cfg.maxInputPixels ?? DEFAULT_RESOURCES.maxInputPixels,
          maxInputBytes: this.cfg.maxInputBytes ?? DEFAULT_RESOURCES.maxInputBytes,
          ...(this.cfg.upscalersDir ? { upscalersDir: this.cfg.upscalersDir } : {}),
          ...(this.cfg.faceModelsDir ? { faceModelsDir: this.cfg.faceModelsDir } : {}),
        },
      };
      // An Extras task runs on the Extras host, which loads no Stable Diffusion model.
      const output =
        req.params?.extras !== undefined
          ? await runOn(EXTRAS_PIPELINE_KEY, req, ctx)
          : await runTaskPasses(
              req,
              ctx,
              runOn,
              passKeysWith(this.vaes),
              async (name) => (await this.catalog.list()).some((e) => e.name === name),
              (where) => this.m.metrics.refinerSwitches.inc({ outcome: where }),
            );
      outcome = "succeeded";
      run.finish({ output, usage: { seconds: (performance.now() - started) / 1000, loadSeconds: loadMs / 1000 } });
    } catch (err) {
      // An abort carries its reason (a drain's hand-back, a CancelTask), which the caller must see.
      const reason: unknown = signal.aborted ? signal.reason : undefined;
      const fe = reason instanceof FarmError ? reason : FarmError.from(err);
      if (fe.code === grpc.status.CANCELLED || signal.aborted) outcome = "cancelled";
      run.finish({ error: fe });
    } finally {
      this.markBusy();
      this.m.metrics.tasks.inc({ outcome });
      this.m.metrics.taskDuration.observe({ outcome }, (performance.now() - started) / 1000);
    }
  }

  private cancelTask(taskId: string, attempt: number, reason: string): boolean {
    const run = this.runs.get(taskId);
    if (!run || run.finished || (attempt !== 0 && run.attempt !== attempt)) return false;
    run.cancel(new FarmError(grpc.status.CANCELLED, reason || `task ${taskId} cancelled by the coordinator`));
    return true;
  }

  /**
   * Stops taking tasks, lets running ones finish within the grace period, then cancels the rest
   * (the coordinator re-places cancelled-by-drain tasks elsewhere).
   */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    if (this.health) setServing(this.health, [SERVICE], false);
    this.publishHeartbeat();
    const deadline = Date.now() + graceMs;
    while (this.active > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    for (const run of this.runs.values())
      run.cancel(new FarmError(grpc.status.UNAVAILABLE, `agent ${this.id} is shutting down`, { handBack: true }));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.draining = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    for (const run of this.runs.values())
      run.cancel(new FarmError(grpc.status.UNAVAILABLE, `agent ${this.id} is shutting down`, { handBack: true }));
    await shutdownServer(this.server);
    for (const run of this.runs.values()) run.dispose();
    if (this.healthServer) await shutdownServer(this.healthServer);
    await this.metricsServer?.close();
    await this.nc?.drain().catch(() => undefined);
    await this.hashes.close();
    await this.cache.close();
  }
}

/** Keeps a second health service (the plaintext probe port) in step with the main one. */
function mirrorHealth(
  main: ReturnType<typeof addHealthAndReflection>,
  probe: ReturnType<typeof addHealthAndReflection>,
): ReturnType<typeof addHealthAndReflection> {
  const orig = main.setStatus.bind(main);
  main.setStatus = (service, status) => {
    orig(service, status);
    probe.setStatus(service, status);
  };
  return main;
}
