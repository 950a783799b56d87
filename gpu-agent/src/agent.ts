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
  ModelInfoSchema,
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
} from "@latentfarm/shared";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { RunTaskResponseSchema } from "@latentfarm/shared";
import { ModelCatalog } from "./models/catalog.js";
import { PipelineCache } from "./models/pipeline-cache.js";
import { loadModel, parsePipelineKey, pipelineKey, type LoraUse } from "./models/model-loader.js";
import { extractExtraNetworks } from "./conditioning/index.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LoadedPipeline } from "./pipeline/loaded-pipeline.js";
import { DEFAULT_RESOURCES, runTask } from "./pipeline/txt2img.js";
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
  /** ESRGAN-family upscaler models (hires fix). */
  upscalersDir?: string;
  /** Face restoration models (CodeFormer and a face detector). */
  faceModelsDir?: string;
  /** Limits on decoded input images. */
  maxInputPixels?: number;
  maxInputBytes?: number;
  /** mTLS on the AgentService port: only holders of a certificate from this CA (the coordinator) get in. */
  tls?: TlsFiles;
  logger: Logger;
}

const SERVICE = AgentService.typeName;

/** A GPU agent: serves AgentService, runs tasks on loaded pipelines, heart-beats on NATS. */
export class Agent {
  readonly id: string;
  private readonly server = new grpc.Server(serverOptions);
  private healthServer: grpc.Server | undefined;
  private readonly catalog: ModelCatalog;
  private readonly cache: PipelineCache<LoadedPipeline>;
  private readonly m = createMetrics(AGENT_METRICS);
  private nc: NatsConnection | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private metricsServer: { url: string; close(): Promise<void> } | undefined;
  private health: ReturnType<typeof addHealthAndReflection> | undefined;
  private running = new Map<string, AbortController>();
  private busySince: number | undefined;
  private draining = false;
  private closed = false;
  port = 0;
  healthPort = 0;
  address = "";

  constructor(private readonly cfg: AgentConfig) {
    this.id = cfg.agentId ?? `${hostname()}-${randomUUID().slice(0, 8)}`;
    this.catalog = new ModelCatalog(cfg.modelsDir);
    const loaderOpts = {
      ep: cfg.ep,
      logger: cfg.logger,
      cacheDir: cfg.cacheDir ?? join(tmpdir(), "latentfarm-model-cache"),
      ...(cfg.intraOpNumThreads ? { intraOpNumThreads: cfg.intraOpNumThreads } : {}),
      ...(cfg.tokenizerDir ? { tokenizerDir: cfg.tokenizerDir } : {}),
      ...(cfg.lorasDir ? { lorasDir: cfg.lorasDir } : {}),
    };
    this.cache = new PipelineCache<LoadedPipeline>(
      cfg.maxLoadedModels ?? 2,
      async (keyString, signal) => {
        const key = parsePipelineKey(keyString);
        const name = key.model;
        const end = this.m.metrics.modelLoad.startTimer({ model: name });
        try {
          const loaded = await loadModel(this.catalog, key, loaderOpts, signal);
          end();
          return new LoadedPipeline(loaded.model, {
            maxBatchRows: cfg.maxBatchRows ?? 16,
            modelHash: loaded.modelHash,
            loraHashes: loaded.loraHashes,
            loadWarnings: loaded.warnings,
            onUnetCall: (_rows, seconds) => {
              this.m.metrics.unetSteps.inc({ model: name });
              this.m.metrics.unetStepDuration.observe({ model: name }, seconds);
            },
          });
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
    addService(this.server, AgentService, {
      runTask: (req, ctx) => this.runTask(req, ctx.signal),
      status: async () => ({ agent: this.info(), models: (await this.catalog.list()).map((e) => e.name) }),
    }, (method, err) => {
      if (err.code === grpc.status.INTERNAL) this.cfg.logger.error("rpc failed", { method, error: err.message });
    });
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
      busySlots: this.running.size,
      loadedModels: [...new Set(this.cache.names.map((k) => parsePipelineKey(k).model))],
      lastHeartbeatUnixMs: BigInt(Date.now()),
      draining: this.draining,
    });
  }

  private publishHeartbeat(): void {
    if (!this.nc || this.nc.isClosed()) return;
    void this.catalog.list().then(
      (models) => {
        if (!this.nc || this.nc.isClosed()) return;
        const hb = create(HeartbeatSchema, {
          agent: this.info(),
          availableModels: models.map((e) => create(ModelInfoSchema, { name: e.name, format: e.format })),
          freeMemoryBytes: BigInt(freemem()),
        });
        this.nc.publish(subjects.agentHeartbeat(this.id), toBinary(HeartbeatSchema, hb));
      },
      (err: unknown) => this.cfg.logger.warn("cannot list models", { error: String(err) }),
    );
  }

  private markBusy(delta: number): void {
    const now = performance.now();
    if (this.busySince !== undefined) this.m.metrics.busySeconds.inc((now - this.busySince) / 1000);
    this.busySince = this.running.size + delta > 0 ? now : undefined;
    this.m.metrics.busySlots.set(this.running.size + delta);
  }

  private async *runTask(req: RunTaskRequest, callSignal: AbortSignal): AsyncGenerator<MessageInitShape<typeof RunTaskResponseSchema>> {
    if (this.draining || this.closed) throw new FarmError(grpc.status.UNAVAILABLE, `agent ${this.id} is draining`);
    if (this.running.size >= this.slots) throw new FarmError(grpc.status.RESOURCE_EXHAUSTED, `agent ${this.id} has no free slot`);
    if (!req.params) throw FarmError.invalid("params", "missing");
    if (this.running.has(req.taskId)) throw new FarmError(grpc.status.ALREADY_EXISTS, `task ${req.taskId} is already running here`);
    const ac = new AbortController();
    const onAbort = (): void => ac.abort(callSignal.reason);
    callSignal.addEventListener("abort", onAbort, { once: true });
    this.markBusy(1);
    this.running.set(req.taskId, ac);
    const started = performance.now();
    let outcome: "succeeded" | "failed" | "cancelled" = "failed";
    const events: Array<MessageInitShape<typeof RunTaskResponseSchema>> = [];
    let wake: (() => void) | undefined;
    let finished = false;
    const push = (e: MessageInitShape<typeof RunTaskResponseSchema>): void => {
      events.push(e);
      wake?.();
    };
    const params = req.params;
    const work = (async () => {
      // The LoRAs a task names decide which merged pipeline it runs on.
      const loras: LoraUse[] = extractExtraNetworks(params.prompt).networks.map((n) => ({ name: n.name, teWeight: n.teWeight, unetWeight: n.unetWeight }));
      for (const l of params.loras) loras.push({ name: l.name, teWeight: l.teWeight, unetWeight: l.unetWeight });
      const loaded = await this.cache.acquire(pipelineKey(params.model, loras), ac.signal);
      for (const w of loaded.value.loadWarnings) push({ kind: { case: "warning", value: { message: w } } });
      try {
        return await runTask(loaded.value, req, {
          signal: ac.signal,
          agentId: this.id,
          onStep: (step, total) => {
            const progress = { taskId: req.taskId, imageIndex: req.imageIndex, step, totalSteps: total };
            push({ kind: { case: "progress", value: progress } });
            this.nc?.publish(
              subjects.taskProgress(req.taskId),
              toBinary(TaskProgressSchema, create(TaskProgressSchema, { taskId: req.taskId, jobId: req.jobId, agentId: this.id, step: progress })),
            );
          },
          onWarning: (message) => push({ kind: { case: "warning", value: { message } } }),
          resources: {
            maxInputPixels: this.cfg.maxInputPixels ?? DEFAULT_RESOURCES.maxInputPixels,
            maxInputBytes: this.cfg.maxInputBytes ?? DEFAULT_RESOURCES.maxInputBytes,
            ...(this.cfg.upscalersDir ? { upscalersDir: this.cfg.upscalersDir } : {}),
            ...(this.cfg.faceModelsDir ? { faceModelsDir: this.cfg.faceModelsDir } : {}),
          },
        });
      } finally {
        loaded.release();
      }
    })();
    work.then(
      () => {
        finished = true;
        wake?.();
      },
      () => {
        finished = true;
        wake?.();
      },
    );
    try {
      for (;;) {
        while (events.length > 0) yield events.shift()!;
        if (finished) break;
        await new Promise<void>((r) => (wake = r));
        wake = undefined;
      }
      const output = await work;
      outcome = "succeeded";
      yield { kind: output };
    } catch (err) {
      const fe = FarmError.from(err);
      if (fe.code === grpc.status.CANCELLED || ac.signal.aborted) outcome = "cancelled";
      throw fe;
    } finally {
      ac.abort();
      callSignal.removeEventListener("abort", onAbort);
      this.markBusy(-1);
      this.running.delete(req.taskId);
      this.m.metrics.tasks.inc({ outcome });
      this.m.metrics.taskDuration.observe({ outcome }, (performance.now() - started) / 1000);
    }
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
    while (this.running.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    for (const ac of this.running.values()) ac.abort(new FarmError(grpc.status.UNAVAILABLE, `agent ${this.id} is shutting down`));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.draining = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    for (const ac of this.running.values()) ac.abort(new FarmError(grpc.status.UNAVAILABLE, `agent ${this.id} is shutting down`));
    await shutdownServer(this.server);
    if (this.healthServer) await shutdownServer(this.healthServer);
    await this.metricsServer?.close();
    await this.nc?.drain().catch(() => undefined);
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
