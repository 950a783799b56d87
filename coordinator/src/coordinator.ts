import * as grpc from "@grpc/grpc-js";
import { randomUUID } from "node:crypto";
import { create, fromBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import {
  COORDINATOR_METRICS,
  FarmError,
  ImageSchema,
  JobState,
  RenderService,
  SAMPLERS,
  SCHEDULERS,
  TaskProgressSchema,
  TaskStage,
  addHealthAndReflection,
  addService,
  bindServer,
  createMetrics,
  serverOptions,
  setServing,
  shutdownServer,
  startMetricsServer,
  subjects,
  hiresCheckpoint,
  refinerCheckpoint,
  imageWork,
  passWork,
  samplerApiOptions,
  secondPassModel,
  namedVae,
  secondPassSamplerName,
  channelCredentials,
  serverCredentials,
  type GenerationParams,
  type HandlerContext,
  type Handover,
  type Image,
  type Logger,
  type TlsFiles,
  type TokenAuth,
  EXTRAS_MODEL,
  auxiliaryNeeds,
  BUILTIN_UPSCALERS,
  AttemptOutcome,
  ImageProvenanceSchema,
  type ImageProvenance,
  type TaskAttempt,
} from "@latentfarm/shared";
import { AgentRegistry, type AgentState } from "./agent-registry.js";
import { StyleLibrary } from "./styles.js";
import { modelsFromInfotext } from "./infotext-models.js";
import { DEFAULT_DURABLE_CONFIG, DurableStore, type DurableStoreConfig } from "./durable-store.js";
import { DEFAULT_TENANT_POLICY, type TenantPolicy } from "./fair-queue.js";
import { Job, JobStore, type JobSpec } from "./job-store.js";
import { Scheduler, checkStagesPlaceable, offersModel, type Task } from "./scheduler.js";
import {
  DEFAULT_HIRES_TILING,
  HiresImage,
  checkTiling,
  equivalentModelCalls,
  planHires,
  type HiresPlan,
  type HiresTiling,
} from "./hires-stages.js";
import { SpeedModel, type SpeedKey } from "./speed-model.js";
import { DEFAULT_LIMITS, imageSeeds, resolveSeed, validateJob, type Limits, type SamplerSupport } from "./validate.js";

/**
 * Checkpoints every 5 sampling steps by default: a retry then loses at most 5 steps, for the answers
 * of the running tasks' passes in the coordinator's memory (capped; see SchedulerOptions).
 */
export const DEFAULT_CHECKPOINT_EVERY_STEPS = 5;

export interface CoordinatorConfig {
  /** gRPC listen address, e.g. "0.0.0.0:50051"; port 0 picks a free one. */
  listen: string;
  natsUrl: string;
  /** An agent silent this long is dropped and its tasks re-placed. */
  agentTimeoutMs?: number;
  /**
   * After a restart, how long a task that was running waits for its agent to be seen again, so the
   * render still going there is re-attached instead of started over (default 2 × agentTimeoutMs).
   */
  adoptWaitMs?: number;
  /** Failed attempts after which an image fails (a poison task); default 3. */
  maxAttempts?: number;
  metricsPort?: number;
  metricsHost?: string;
  defaultModel?: string;
  limits?: Partial<Limits>;
  samplerSupported?: SamplerSupport;
  /** A1111 styles files (name, prompt, negative_prompt CSV), read in order; a job's `styles` name their rows. */
  stylesFiles?: readonly string[];
  /** TLS for clients and mTLS towards agents; plaintext when absent. */
  tls?: TlsFiles;
  /** Tenant API tokens; when set, every RenderService call needs a bearer token. */
  auth?: TokenAuth;
  /** Plaintext grpc.health.v1 port for kubelet probes (needed when the main port uses TLS). */
  healthPort?: number;
  /** JetStream settings; false keeps jobs in memory only (nothing survives a restart). */
  durable?: Partial<DurableStoreConfig> | false;
  /** Per-tenant weights and limits; the "*" entry is the default for tenants not listed. */
  tenants?: Record<string, Partial<TenantPolicy>>;
  /** Backup copies of slow or stalled attempts on idle agents (default on). */
  speculate?: boolean;
  /** Finished jobs kept in memory; older ones are read back from JetStream on demand. */
  maxFinishedInMemory?: number;
  imageCacheBytes?: number;
  /** Agents below this free memory get a model they have not loaded only when no other agent can. */
  minFreeMemoryBytes?: bigint;
  /** Checkpoints of each task's sampling pass every this many steps, which a retry resumes from (default 5; 0: none). */
  checkpointEverySteps?: number;
  /** The most checkpoint bytes held at once (default 1 GiB). */
  checkpointMaxBytes?: number;
  /** When a Hires.fix second pass is tiled, and the tiles' size and overlap. */
  hires?: Partial<HiresTiling>;
  logger: Logger;
}

const SERVICE = RenderService.typeName;
const TENANT_HEADER = "x-tenant";

/** JetStream trouble (NATS down, a timeout) is UNAVAILABLE to clients: they may retry. */
async function storeCall<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof FarmError && err.code !== grpc.status.INTERNAL) throw err;
    throw new FarmError(grpc.status.UNAVAILABLE, `job store unavailable: ${err instanceof Error ? err.message : String(err)}`, {
      cause: err,
    });
  }
}

/** RESOURCE_EXHAUSTED with a hint, in trailers, of when a retry can succeed (gRPC's pushback header). */
export class RetryLaterError extends FarmError {
  constructor(
    message: string,
    readonly retryAfterMs: number,
  ) {
    super(grpc.status.RESOURCE_EXHAUSTED, `${message}; retry in ${(retryAfterMs / 1000).toFixed(1)} s`, { retryable: true });
  }

  override toStatus(): Partial<grpc.StatusObject> {
    const s = super.toStatus();
    s.metadata?.set("grpc-retry-pushback-ms", String(Math.round(this.retryAfterMs)));
    return s;
  }
}

/**
 * What the agents report of their folders (embeddings, VAE files, upscalers), one entry per key, each with the
 * agents that reported it (sorted): folders that disagree show as separate entries.
 */
function gatherFromAgents<T, R extends object>(
  agents: readonly AgentState[],
  entriesOf: (a: AgentState) => readonly T[],
  keyOf: (t: T) => string,
  entryOf: (t: T) => R,
): Array<R & { agents: string[] }> {
  const out = new Map<string, R & { agents: string[] }>();
  for (const a of agents) {
    for (const t of entriesOf(a)) {
      const key = keyOf(t);
      let e = out.get(key);
      if (e === undefined) out.set(key, (e = { ...entryOf(t), agents: [] }));
      e.agents.push(a.id);
    }
  }
  for (const e of out.values()) e.agents.sort();
  return [...out.values()];
}

/** The coordinator: RenderService for clients, durable job state on JetStream, the scheduler, and the agent registry. */
export class Coordinator {
  private readonly server = new grpc.Server(serverOptions);
  private readonly m = createMetrics(COORDINATOR_METRICS);
  private store: JobStore;
  private readonly registry: AgentRegistry;
  private readonly scheduler: Scheduler;
  readonly speed: SpeedModel;
  private readonly limits: Limits;
  private readonly tiling: HiresTiling;
  private readonly tenantPolicies: Map<string, TenantPolicy>;
  private readonly defaultPolicy: TenantPolicy;
  private readonly styles: StyleLibrary;
  /** Unfinished images per tenant (queued or running): what the queued-images limit counts. */
  private readonly outstanding = new Map<string, number>();
  private readonly deadlines = new Map<string, NodeJS.Timeout>();
  private nc: NatsConnection | undefined;
  private progressSub: Subscription | undefined;
  private health: ReturnType<typeof addHealthAndReflection> | undefined;
  private healthServer: grpc.Server | undefined;
  private metricsServer: { url: string; close(): Promise<void> } | undefined;
  private accepting = true;
  private closed = false;
  port = 0;

  constructor(private readonly cfg: CoordinatorConfig) {
    this.limits = { ...DEFAULT_LIMITS, ...cfg.limits };
    this.styles = new StyleLibrary(cfg.stylesFiles ?? [], cfg.logger);
    this.tiling = { ...DEFAULT_HIRES_TILING, ...cfg.hires };
    checkTiling(this.tiling);
    this.defaultPolicy = { ...DEFAULT_TENANT_POLICY, ...cfg.tenants?.["*"] };
    this.tenantPolicies = new Map(Object.entries(cfg.tenants ?? {}).map(([t, p]) => [t, { ...this.defaultPolicy, ...p }]));
    this.speed = new SpeedModel();
    this.store = new JobStore(undefined, this.storeOptions());
    this.registry = new AgentRegistry({
      timeoutMs: cfg.agentTimeoutMs ?? 5000,
      logger: cfg.logger,
      ...(cfg.tls ? { credentials: channelCredentials(cfg.tls) } : {}),
      onJoin: () => {
        this.updateAgentGauge();
        this.scheduler.agentsChanged();
      },
      onUpdate: (_a, changed) => {
        if (!changed) return;
        this.updateAgentGauge();
        this.scheduler.agentsChanged();
      },
      onLost: (a, reason) => {
        this.m.metrics.agentsLost.inc();
        this.updateAgentGauge();
        this.scheduler.agentLost(a, reason);
      },
    });
    this.scheduler = new Scheduler(
      this.registry,
      {
        onPlaced: (task, run) => {
          const job = task.job;
          // A split image counts the attempts of its stages each; the record keeps the most.
          job.attempts[task.imageIndex] = task.stage ? Math.max(job.attempts[task.imageIndex] ?? 0, run.attempt) : run.attempt;
          job.agents[task.imageIndex] = run.agent.id;
          job.images[task.imageIndex] = "r";
          if (job.state === JobState.QUEUED) job.state = JobState.RUNNING;
          this.store.emit(job, {
            case: "placed",
            value: { taskId: task.id, imageIndex: task.imageIndex, agentId: run.agent.id, attempt: run.attempt },
          });
          // Not written on its own: a placement rides along with the job's next state write. Lost
          // in a crash it only means the image is placed afresh, which a restart does anyway.
          this.updateTenantGauges(job.spec.tenant);
        },
        onStep: (task, step) => {
          if (!task.stage) {
            this.store.emit(task.job, { case: "step", value: step });
            return;
          }
          // Stages count their own steps; the image's progress adds the passes up (A1111's total).
          const hi = task.job.hires[task.imageIndex];
          const v = hi?.progress(task.stage.request.stage, task.stage.request.tileIndex ?? 0, step.step);
          if (hi && v !== undefined) {
            this.store.emit(task.job, {
              case: "step",
              value: { taskId: task.id, imageIndex: task.imageIndex, step: v, totalSteps: hi.totalSteps, previewPng: step.previewPng },
            });
          }
        },
        onWarning: (task, message) => this.store.emit(task.job, { case: "warning", value: { message } }),
        onAttemptEnded: (task, attempt) => {
          const job = task.job;
          const i = task.imageIndex;
          // Attempts ending after their image was made (a backup's, a late result) are counted in the metric only.
          if (job.images[i] !== "q" && job.images[i] !== "r") return;
          let list = job.provenance.get(i);
          if (list === undefined) job.provenance.set(i, (list = []));
          list.push(attempt);
        },
        onResult: (task, image, run) => void this.onImage(task, image, run.agent.id),
        onHandover: (task, handover) => void this.onHandover(task, handover),
        onRetry: (task, err) => {
          const job = task.job;
          const hi = job.hires[task.imageIndex];
          // An image with other stages still running stays running.
          if (!hi || ![...hi.tasks].some((t) => t !== task && t.state === "running")) job.images[task.imageIndex] = "q";
          job.failures[task.imageIndex] = task.stage ? Math.max(job.failures[task.imageIndex] ?? 0, task.failures) : task.failures;
          this.store.emit(job, {
            case: "retried",
            value: { taskId: task.id, imageIndex: task.imageIndex, reason: `${err.codeName}: ${err.message}` },
          });
          this.persistLater(job);
          this.updateTenantGauges(job.spec.tenant);
        },
        onFailed: (task, err) => void this.onImageFailed(task, err),
      },
      {
        logger: cfg.logger,
        maxAttempts: cfg.maxAttempts ?? 3,
        speculate: cfg.speculate ?? true,
        tenantPolicy: (t) => this.policy(t),
        speed: this.speed,
        metrics: this.m.metrics,
        ...(cfg.minFreeMemoryBytes !== undefined ? { minFreeMemoryBytes: cfg.minFreeMemoryBytes } : {}),
        checkpointEverySteps: cfg.checkpointEverySteps ?? DEFAULT_CHECKPOINT_EVERY_STEPS,
        ...(cfg.checkpointMaxBytes !== undefined ? { checkpointMaxBytes: cfg.checkpointMaxBytes } : {}),
      },
    );
    for (const state of ["ready", "draining"]) this.m.metrics.agents.set({ state }, 0);
    for (const outcome of ["succeeded", "failed", "cancelled"]) this.m.metrics.imagesFinished.inc({ outcome }, 0);
    for (const reason of ["slow", "stalled"]) this.m.metrics.taskBackups.inc({ reason }, 0);
    for (const reason of ["duplicate", "late"]) this.m.metrics.resultsDiscarded.inc({ reason }, 0);
    for (const reason of ["state", "events", "image"]) this.m.metrics.storeRetries.inc({ reason }, 0);
    this.m.metrics.jobsResumed.inc(0);
    this.m.metrics.jobsInMemory.set(0);
  }

  private storeOptions() {
    return {
      logger: this.cfg.logger,
      ...(this.cfg.maxFinishedInMemory !== undefined ? { maxFinishedInMemory: this.cfg.maxFinishedInMemory } : {}),
      ...(this.cfg.imageCacheBytes !== undefined ? { imageCacheBytes: this.cfg.imageCacheBytes } : {}),
      onRemoteFinal: (job: Job) => this.onRemoteFinal(job),
      onStoreRetry: (reason: "state" | "events" | "image") => this.m.metrics.storeRetries.inc({ reason }),
    };
  }

  get registryMetrics() {
    return this.m.registry;
  }

  get metricsUrl(): string | undefined {
    return this.metricsServer?.url;
  }

  /** Placement statistics (passes, placed, held, backups, pass times), for benchmarks. */
  get schedulerStats() {
    return this.scheduler.stats;
  }

  policy(tenant: string): TenantPolicy {
    return this.tenantPolicies.get(tenant) ?? this.defaultPolicy;
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
    // noAsyncTraces: without it every request builds an Error up front for its stack trace, a
    // measurable share of the coordinator's CPU at hundreds of JetStream writes per second.
    this.nc = await connect({
      servers: this.cfg.natsUrl,
      name: "latentfarm-coordinator",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
      noAsyncTraces: true,
    });
    void this.watchConnection(this.nc);
    if (this.cfg.durable !== false) {
      const durable = await DurableStore.open(this.nc, { ...DEFAULT_DURABLE_CONFIG, ...this.cfg.durable }, this.cfg.logger);
      this.store = new JobStore(durable, this.storeOptions());
    }
    this.registry.start(this.nc);
    this.progressSub = this.nc.subscribe(subjects.allTaskProgress, {
      callback: (err, msg) => {
        if (!err) this.onProgress(msg.data);
      },
    });
    await this.resume();
    this.health = addHealthAndReflection(this.server, [SERVICE]);
    addService(
      this.server,
      RenderService,
      {
        submit: async (req, ctx) => {
          const tenant = this.tenantOf(ctx);
          const end = this.m.metrics.submitDuration.startTimer();
          try {
            return await this.submit(req.params, req.requestId, tenant, {
              deadlineUnixMs: Number(req.deadlineUnixMs),
              priority: req.priority,
            });
          } catch (err) {
            this.m.metrics.submitRejections.inc({ tenant, code: FarmError.from(err).codeName });
            throw err;
          } finally {
            end();
          }
        },
        watch: (req, ctx) => {
          this.tenantOf(ctx);
          return this.watch(req.jobId, req.afterSequence, ctx.signal);
        },
        get: async (req, ctx) => {
          this.tenantOf(ctx);
          const job = await this.job(req.jobId);
          const images: Image[] = [];
          const failed: number[] = [];
          const cancelled: number[] = [];
          for (let i = 0; i < job.images.length; i++) {
            const s = job.images[i];
            if (s === "d") {
              const img = await this.store.image(job.id, i);
              if (img) images.push(img);
            } else if (s === "f") failed.push(i);
            else if (s === "c") cancelled.push(i);
          }
          return {
            jobId: job.id,
            state: job.state,
            params: job.spec.params,
            images,
            imageCount: job.spec.imageCount,
            errorCode: job.error?.code ?? "",
            errorMessage: job.error?.message ?? "",
            failedImages: failed,
            cancelledImages: cancelled,
          };
        },
        cancel: async (req, ctx) => {
          this.tenantOf(ctx);
          return this.cancel(req.jobId, req.imageIndices, req.taskIds);
        },
        listAgents: async (_req, ctx) => ({
          ...this.authorized(ctx),
          agents: this.registry.list().map((a) => ({ ...a.info, busySlots: a.inFlight })),
        }),
        listModels: async (_req, ctx) => {
          this.tenantOf(ctx);
          const models = new Map<string, { format: string; modelHash: string; family: string; loadedOn: string[] }>();
          for (const a of this.registry.list()) {
            for (const name of a.available) {
              const info = a.models.get(name);
              const m = models.get(name) ?? { format: info?.format ?? "", modelHash: "", family: "", loadedOn: [] };
              m.modelHash ||= info?.modelHash ?? "";
              m.family ||= info?.family ?? "";
              if (a.info.loadedModels.includes(name)) m.loadedOn.push(a.id);
              models.set(name, m);
            }
          }
          const defaultModel = this.defaultModel(this.registry.list());
          return {
            models: [...models.entries()]
              .sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0))
              .map(([name, m]) => ({
                name,
                format: m.format,
                modelHash: m.modelHash,
                family: m.family,
                loadedOn: m.loadedOn,
                isDefault: name === defaultModel,
              })),
          };
        },
        listSamplers: async (_req, ctx) => {
          this.tenantOf(ctx);
          return { samplers: SAMPLERS.map((e) => ({ name: e.name, aliases: [...e.aliases], options: samplerApiOptions(e) })) };
        },
        listSchedulers: async (_req, ctx) => {
          this.tenantOf(ctx);
          return { schedulers: SCHEDULERS.map((e) => ({ name: e.id, label: e.label, aliases: [...e.aliases] })) };
        },
        listEmbeddings: async (_req, ctx) => {
          this.tenantOf(ctx);
          // One entry per file (name and hash): agents whose folders disagree show as two entries.
          const agents = this.registry.list();
          const embeddings = gatherFromAgents(
            agents,
            (a) => a.embeddings,
            (e) => `${e.name}\u0000${e.width}\u0000${e.hash}`,
            (e) => ({ name: e.name, vectors: e.vectors, width: e.width, hash: e.hash }),
          );
          const skipped = gatherFromAgents(
            agents,
            (a) => a.skippedEmbeddings,
            (s) => `${s.file}\u0000${s.reason}`,
            (s) => ({ file: s.file, reason: s.reason }),
          );
          return {
            embeddings: embeddings.sort((x, y) => (x.name === y.name ? x.width - y.width : x.name < y.name ? -1 : 1)),
            skipped: skipped.sort((x, y) => (x.file < y.file ? -1 : x.file > y.file ? 1 : 0)),
          };
        },
        listStyles: async (_req, ctx) => {
          this.tenantOf(ctx);
          return { styles: [...(await this.styles.current()).values()] };
        },
        listUpscalers: async (_req, ctx) => {
          this.tenantOf(ctx);
          const agents = this.registry.list();
          const withFiles = (of: (a: AgentState) => ReadonlySet<string>) =>
            gatherFromAgents(
              agents,
              (a) => [...of(a)],
              (name) => name,
              (name) => ({ name }),
            ).sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
          return {
            upscalers: [...[...BUILTIN_UPSCALERS].map((name) => ({ name, builtin: true })), ...withFiles((a) => a.upscalers)],
            faceRestorers: withFiles((a) => a.faceRestorers),
          };
        },
        listVaes: async (_req, ctx) => {
          this.tenantOf(ctx);
          const vaes = gatherFromAgents(
            this.registry.list(),
            (a) => a.vaes,
            (v) => `${v.name}\u0000${v.sizeBytes}`,
            (v) => ({ name: v.name, sizeBytes: v.sizeBytes }),
          );
          return { vaes: vaes.sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : Number(x.sizeBytes - y.sizeBytes))) };
        },
        listLoras: async (req, ctx) => {
          this.tenantOf(ctx);
          const loras = gatherFromAgents(
            this.registry.list(),
            (a) => a.loras,
            (l) => `${l.name}\u0000${l.sizeBytes}\u0000${l.alias}`,
            (l) => ({ name: l.name, sizeBytes: l.sizeBytes, alias: l.alias }),
          );
          loras.sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : Number(x.sizeBytes - y.sizeBytes)));
          if (!req.metadata) return { loras };
          const metadata = await this.loraMetadata(loras, ctx.signal);
          return { loras: loras.map((l) => ({ ...l, metadataJson: metadata.get(`${l.agents[0]}\u0000${l.name}`) ?? "" })) };
        },
      },
      (method, err) => {
        if (err.code === grpc.status.INTERNAL) this.cfg.logger.error("rpc failed", { method, error: err.message });
      },
    );
    this.port = await bindServer(this.server, this.cfg.listen, serverCredentials(this.cfg.tls));
    if (this.cfg.healthPort !== undefined) {
      this.healthServer = new grpc.Server();
      const probe = addHealthAndReflection(this.healthServer, [SERVICE]);
      const main = this.health;
      const orig = main.setStatus.bind(main);
      main.setStatus = (service, status) => {
        orig(service, status);
        probe.setStatus(service, status);
      };
      await bindServer(this.healthServer, `0.0.0.0:${this.cfg.healthPort}`);
    }
    if (this.cfg.metricsPort !== undefined) {
      this.metricsServer = await startMetricsServer(this.m.registry, this.cfg.metricsPort, this.cfg.metricsHost ?? "0.0.0.0");
    }
    setServing(this.health, [SERVICE], true);
    this.cfg.logger.info("coordinator started", {
      port: this.port,
      metrics: this.metricsServer?.url,
      durable: this.store.durable !== undefined,
    });
  }

  private async watchConnection(nc: NatsConnection): Promise<void> {
    for await (const s of nc.status()) {
      if (s.type === "disconnect") {
        this.cfg.logger.warn("NATS connection lost", { server: s.server });
        this.registry.setConnected(false);
      } else if (s.type !== "reconnect") {
        this.cfg.logger.debug("NATS status", { type: s.type });
      } else {
        this.cfg.logger.info("NATS connection back", { server: s.server });
        this.registry.setConnected(true);
      }
    }
  }

  /**
   * Reads every unfinished job back from JetStream and queues its unfinished images: finished
   * images are not rendered again; images that were running are placed again, preferring the agent
   * they ran on.
   */
  private async resume(): Promise<void> {
    const durable = this.store.durable;
    if (!durable) return;
    let resumed = 0;
    for await (const { id, job: stored, revision } of durable.scanJobs()) {
      if (["succeeded", "failed", "cancelled"].includes(stored.state)) continue;
      const job = Job.fromStored(id, stored, revision);
      job.live = true;
      await this.store.restoreEvents(job);
      // Images finish in the object store first; the record may not have caught up before the crash.
      const announced = new Set(
        job.events.flatMap((e) => (e.event.case === "image" && e.event.value.image ? [e.event.value.image.index] : [])),
      );
      for (let i = 0; i < job.images.length; i++) {
        if (job.images[i] !== "q" && job.images[i] !== "r") continue;
        if (announced.has(i) || (await durable.hasImage(job.id, i))) job.images[i] = "d";
      }
      // A placement is written with the job's next state write, so the record can lag behind; the
      // event stream says where each task went last, unless it came back for a retry after that.
      const placedOn = new Map<string, { agentId: string; attempt: number; imageIndex: number }>();
      for (const e of job.events) {
        const ev = e.event;
        if (ev.case === "placed")
          placedOn.set(ev.value.taskId, { agentId: ev.value.agentId, attempt: ev.value.attempt, imageIndex: ev.value.imageIndex });
        else if (ev.case === "retried") placedOn.delete(ev.value.taskId);
      }
      for (const last of placedOn.values()) {
        const i = last.imageIndex;
        if (last.attempt >= (job.attempts[i] ?? 0)) {
          job.agents[i] = last.agentId;
          job.attempts[i] = last.attempt;
        }
      }
      this.store.add(job);
      const lost = await this.store.repairEvents(job);
      for (const i of lost) job.images[i] = "q";
      const tasks: Task[] = [];
      const p = job.spec.params;
      const seeds = imageSeeds(p.seed ?? 0n, p.subseed ?? 0n, p.subseedStrength, job.spec.imageCount);
      let openImages = 0;
      let plan: HiresPlan | undefined;
      try {
        plan = planHires(p, this.tiling);
      } catch {
        // Refused at Submit; a record that has it anyway runs as one task and fails on the agent.
      }
      for (let i = 0; i < job.images.length; i++) {
        const s = job.images[i];
        if (s !== "q" && s !== "r") continue;
        const resumed = plan ? await this.resumeStages(job, i, plan, seeds[i]!) : [this.makeTask(job, i, seeds)];
        for (const t of resumed) {
          t.failures = job.failures[i] ?? 0;
          // A task whose render may still be going on its agent waits a little for that agent to
          // show up, and re-attaches to it.
          const last = placedOn.get(t.id) ?? (s === "r" && resumed.length === 1 && job.agents[i] ? { agentId: job.agents[i]! } : undefined);
          if (last) {
            t.preferAgent = last.agentId;
            t.adoptUntil = Date.now() + (this.cfg.adoptWaitMs ?? 2 * (this.cfg.agentTimeoutMs ?? 5000));
          } else if (s === "r") t.preferAgent = job.agents[i];
        }
        job.images[i] = "q";
        openImages++;
        tasks.push(...resumed);
      }
      this.addOutstanding(job.spec.tenant, openImages);
      this.armDeadline(job);
      this.m.metrics.jobsResumed.inc();
      resumed++;
      if (tasks.length > 0) this.scheduler.enqueueJob(job, tasks);
      else this.completeIfDone(job);
    }
    if (resumed > 0) this.cfg.logger.info("resumed unfinished jobs", { jobs: resumed });
    this.m.metrics.jobsInMemory.set(this.store.size);
  }

  /**
   * The metadata of the listed LoRAs, each asked of the first agent that lists it (one call per agent, at
   * once), by "agent\u0000name". An agent that does not answer leaves its LoRAs without (logged).
   */
  private async loraMetadata(
    loras: ReadonlyArray<{ name: string; agents: readonly string[] }>,
    signal: AbortSignal,
  ): Promise<Map<string, string>> {
    const byAgent = new Map<string, string[]>();
    for (const l of loras) {
      const id = l.agents[0];
      if (id === undefined) continue;
      let names = byAgent.get(id);
      if (names === undefined) byAgent.set(id, (names = []));
      names.push(l.name);
    }
    const out = new Map<string, string>();
    await Promise.all(
      [...byAgent].map(async ([id, names]) => {
        const agent = this.registry.get(id);
        if (agent === undefined) return;
        try {
          const { metadataJson } = await agent.client.loraMetadata({ names }, { timeoutMs: 30_000, signal });
          for (const [name, json] of Object.entries(metadataJson)) out.set(`${id}\u0000${name}`, json);
        } catch (err) {
          this.cfg.logger.warn("cannot read LoRA metadata from an agent", { agentId: id, error: String(err) });
        }
      }),
    );
    return out;
  }

  /** The caller's tenant: from its API token when tokens are configured, else the x-tenant header. */
  private tenantOf(ctx: HandlerContext): string {
    if (this.cfg.auth) return this.cfg.auth.tenantOf(ctx.metadata);
    return ctx.metadata.get(TENANT_HEADER)[0]?.toString() || "default";
  }

  private authorized(ctx: HandlerContext): Record<string, never> {
    this.tenantOf(ctx);
    return {};
  }

  private async job(id: string): Promise<Job> {
    const job = await storeCall(() => this.store.open(id));
    if (!job) throw FarmError.notFound(`job "${id}" is unknown`, "job_id");
    return job;
  }

  private updateAgentGauge(): void {
    let ready = 0;
    let draining = 0;
    for (const a of this.registry.list()) {
      if (a.info.draining) draining++;
      else ready++;
    }
    this.m.metrics.agents.set({ state: "ready" }, ready);
    this.m.metrics.agents.set({ state: "draining" }, draining);
  }

  private addOutstanding(tenant: string, n: number): void {
    const v = (this.outstanding.get(tenant) ?? 0) + n;
    if (v <= 0) this.outstanding.delete(tenant);
    else this.outstanding.set(tenant, v);
    this.updateTenantGauges(tenant);
  }

  private updateTenantGauges(tenant: string): void {
    this.m.metrics.tenantQueuedImages.set({ tenant }, this.outstanding.get(tenant) ?? 0);
    this.m.metrics.tenantRunningImages.set({ tenant }, this.scheduler.tenantRunning(tenant));
  }

  /**
   * A Hires.fix image after a restart: the hand-overs stored before the crash are read back, and
   * only the stages after them are queued.
   */
  private async resumeStages(job: Job, i: number, plan: HiresPlan, seeds: { seed: bigint; subseed: bigint }): Promise<Task[]> {
    const hi = new HiresImage<Task>(plan, seeds.seed, seeds.subseed);
    job.hires[i] = hi;
    for (const { name, object } of hi.storedNames()) {
      // Later hand-overs are only useful on top of earlier ones.
      if (name === "up" && !hi.outputs.has("first")) break;
      if (name.startsWith("t") && !hi.outputs.has("up")) break;
      const h = await this.store.handover(job.id, i, object).catch(() => undefined);
      if (!h) continue;
      try {
        hi.check(name, h);
        hi.outputs.set(name, h);
      } catch (err) {
        this.cfg.logger.warn("stored hand-over ignored", { jobId: job.id, index: i, name, error: String(err) });
      }
    }
    return this.readyStages(job, i);
  }

  /** Tasks of an image: one, or the first stages of a Hires.fix image split across agents. */
  private imageTasks(job: Job, i: number, plan: HiresPlan | undefined, seeds: Array<{ seed: bigint; subseed: bigint }>): Task[] {
    if (!plan) return [this.makeTask(job, i, seeds)];
    job.hires[i] = new HiresImage<Task>(plan, seeds[i]!.seed, seeds[i]!.subseed);
    return this.readyStages(job, i);
  }

  /** Tasks for the stages of an image whose inputs have all arrived (not yet queued). */
  private readyStages(job: Job, i: number): Task[] {
    const hi = job.hires[i];
    if (!hi) return [];
    const p = job.spec.params;
    return hi.ready().map((spec) => {
      // The second pass's stages run where its checkpoint is (the first pass's model unless it names one).
      const first = spec.stage === TaskStage.FIRST_PASS;
      const model = first ? p.model : secondPassModel(p);
      const key: SpeedKey = { model, width: spec.width, height: spec.height };
      const work = passWork(spec.steps, first ? p.samplerName : secondPassSamplerName(p));
      const t: Task = {
        id: `${job.id}-${i}.${spec.name}`,
        job,
        imageIndex: i,
        seed: hi.seed,
        subseed: hi.subseed,
        tenant: job.spec.tenant,
        key,
        steps: work.steps,
        modelCalls: work.modelCalls,
        cost: (Math.max(1, work.modelCalls) * key.width * key.height) / (512 * 512),
        state: "queued",
        failures: 0,
        failedOn: new Set(),
        runs: [],
        preferAgent: undefined,
        lastStep: 0,
        stage: { name: spec.name, request: hi.request(spec), attempts: 0 },
      };
      hi.started.add(spec.name);
      hi.tasks.add(t);
      return t;
    });
  }

  /** An image ended (done, failed, cancelled): its open stages stop and its hand-overs go. */
  private endStages(job: Job, i: number, reason: string): void {
    const hi = job.hires[i];
    if (!hi) return;
    job.hires[i] = undefined;
    const open = [...hi.tasks].filter((t) => t.state === "queued" || t.state === "running");
    if (open.length > 0) this.scheduler.cancel(open, reason);
    this.store.dropHandovers(
      job.id,
      i,
      hi.storedNames().map((n) => n.object),
    );
  }

  /**
   * A stage handed over: kept durably first (a restart then resumes after it), then the stages it
   * completes the inputs of are queued, keeping the job's place in its tenant's queue.
   */
  private async onHandover(task: Task, handover: Handover): Promise<void> {
    const job = task.job;
    const i = task.imageIndex;
    const hi = job.hires[i];
    const name = task.stage?.name;
    if (!hi || name === undefined) return;
    hi.tasks.delete(task);
    const open = (): boolean => !job.final && job.hires[i] === hi && (job.images[i] === "q" || job.images[i] === "r");
    if (!open()) return;
    try {
      hi.check(name, handover);
    } catch (err) {
      await this.onImageFailed(task, FarmError.from(err));
      return;
    }
    const object = hi.storedNames().find((n) => n.name === name)?.object ?? name;
    try {
      await this.store.storeHandover(job, i, object, handover);
    } catch (err) {
      // Only when shutting down: the stage runs again after the restart.
      this.cfg.logger.warn("hand-over not stored", { jobId: job.id, index: i, stage: name, error: String(err) });
      return;
    }
    if (!open()) return;
    hi.outputs.set(name, handover);
    const next = this.readyStages(job, i);
    if (next.length > 0) this.scheduler.enqueueJob(job, next);
  }

  private makeTask(job: Job, i: number, all?: Array<{ seed: bigint; subseed: bigint }>): Task {
    const p = job.spec.params;
    const seeds = (all ?? imageSeeds(p.seed ?? 0n, p.subseed ?? 0n, p.subseedStrength, job.spec.imageCount))[i]!;
    const key: SpeedKey = { model: p.model, width: p.width ?? 512, height: p.height ?? 512 };
    const work = imageWork(p);
    const t: Task = {
      id: `${job.id}-${i}`,
      job,
      imageIndex: i,
      seed: seeds.seed,
      subseed: seeds.subseed,
      tenant: job.spec.tenant,
      key,
      steps: work.steps,
      modelCalls: work.modelCalls,
      // Fair-share cost: model calls × megapixels, so a tenant of big images does not get more for its share.
      cost: (work.modelCalls * key.width * key.height) / (512 * 512),
      state: "queued",
      failures: 0,
      failedOn: new Set(),
      runs: [],
      preferAgent: undefined,
      lastStep: 0,
    };
    job.tasks[i] = t;
    return t;
  }

  /**
   * The speed model's view of how long `count` images of this kind take to finish for a tenant,
   * with the work already queued ahead: the tenant's own backlog at its fair share of the farm, or
   * the whole backlog in order, whichever is sooner. Undefined when no agent offering the model
   * has been measured.
   */
  estimateMs(tenant: string, key: SpeedKey, modelCalls: number, count: number): { ms: number; measured: boolean } | undefined {
    let rate = 0; // images per second
    let measured = false;
    let fastest = Infinity;
    for (const a of this.registry.list()) {
      if (a.info.draining || !offersModel(a, key.model)) continue;
      const e = this.speed.taskSeconds(a.id, key, modelCalls, a.info.loadedModels.includes(key.model));
      measured ||= e.measured;
      rate += a.info.slots / Math.max(1e-6, e.seconds);
      fastest = Math.min(fastest, e.seconds);
    }
    if (rate === 0) return undefined;
    let total = 0;
    for (const n of this.outstanding.values()) total += n;
    const mine = this.outstanding.get(tenant) ?? 0;
    const w = this.policy(tenant).weight;
    let others = 0;
    for (const t of this.outstanding.keys()) if (t !== tenant) others += this.policy(t).weight;
    const share = w / (w + others);
    const cap = this.policy(tenant).maxRunningImages;
    const tenantRate = Math.min(rate * share, cap > 0 ? cap / fastest : Infinity);
    const fifo = (total + count) / rate;
    const fair = (mine + count) / tenantRate;
    return { ms: Math.max(fastest, Math.min(fifo, fair)) * 1000, measured };
  }

  async submit(
    params: GenerationParams | undefined,
    requestId: string,
    tenant: string,
    opts: { deadlineUnixMs?: number; priority?: number } = {},
  ): Promise<{ jobId: string; imageCount: number }> {
    if (!this.accepting) throw new FarmError(grpc.status.UNAVAILABLE, "coordinator is draining; submit to another coordinator or retry");
    if (!params) throw FarmError.invalid("params", "missing");
    if (requestId) {
      // A retry of a recent Submit is answered from memory; an older one is found by the claim in
      // store.create, after admission (one round trip less for every Submit with a request id).
      const existing = this.store.byRequest(tenant, requestId);
      if (existing) return { jobId: existing.id, imageCount: existing.spec.imageCount };
    }
    const agents = this.registry.list();
    const defaultModel = this.defaultModel(agents);
    // As the request asked (validateJob fills a copy in, from the infotext too).
    const asked = { model: params.model, infotext: params.infotext, sdVae: params.overrideSettings?.sdVae ?? "" };
    const v = validateJob(params, {
      limits: this.limits,
      ...(params.styles.length > 0 && { styles: await this.styles.current() }),
      ...(this.cfg.samplerSupported ? { samplerSupported: this.cfg.samplerSupported } : {}),
      ...(defaultModel ? { defaultModel } : {}),
    });
    if (agents.length === 0) throw new FarmError(grpc.status.UNAVAILABLE, "no agents are connected to the farm");
    modelsFromInfotext(v, agents);
    if (v.params.model !== EXTRAS_MODEL && !agents.some((a) => a.available.has(v.params.model))) {
      const known = [...new Set(agents.flatMap((a) => [...a.available]))].sort();
      const fromInfotext =
        asked.model === "" && asked.infotext !== "" ? "; it comes from the infotext: name a model to render with another" : "";
      throw FarmError.notFound(
        `model "${v.params.model}" is not offered by any agent (known: ${known.join(", ") || "none"})${fromInfotext}`,
        "model",
      );
    }
    const checkpoint = hiresCheckpoint(v.params);
    if (checkpoint !== undefined && !agents.some((a) => a.available.has(checkpoint))) {
      const known = [...new Set(agents.flatMap((a) => [...a.available]))].sort();
      throw FarmError.notFound(
        `hires checkpoint "${checkpoint}" is not offered by any agent (known: ${known.join(", ") || "none"})`,
        "hr_checkpoint_name",
      );
    }
    // A pass switches where it runs when that agent offers the refiner too; elsewhere the switch is
    // handed back and the pass carries on where the refiner is (Scheduler.onRefinerSwitch).
    const refiner = refinerCheckpoint(v.params);
    if (refiner !== undefined && !agents.some((a) => a.available.has(refiner))) {
      const known = [...new Set(agents.flatMap((a) => [...a.available]))].sort();
      throw FarmError.notFound(
        `refiner "${refiner}" is not offered by any agent (known: ${known.join(", ") || "none"})`,
        "refiner_checkpoint",
      );
    }
    const vae = namedVae(v.params.overrideSettings?.sdVae);
    if (vae !== undefined && !agents.some((a) => a.vaes.some((f) => f.name === vae))) {
      const known = [...new Set(agents.flatMap((a) => a.vaes.map((f) => f.name)))].sort();
      const fromInfotext =
        asked.sdVae === "" && asked.infotext !== ""
          ? "; it comes from the infotext's VAE: set override_settings.sd_vae to render with another"
          : "";
      throw FarmError.notFound(
        `VAE "${vae}" is not in any agent's VAE list (known: ${known.join(", ") || "none"}; or "Automatic", "None")${fromInfotext}`,
        "override_settings.sd_vae",
      );
    }
    // Upscalers and face restorers run from the agents' model files: one an agent lacks fails the image there.
    const needs = auxiliaryNeeds(v.params);
    for (const u of needs.upscalers) {
      if (!agents.some((a) => a.upscalers.has(u.name))) {
        const known = [...new Set(agents.flatMap((a) => [...a.upscalers]))].sort();
        throw FarmError.notFound(
          `upscaler "${u.name}" has no model file on any agent (known: ${known.join(", ") || "none"}; or a latent mode, Lanczos, Nearest, None)`,
          u.field,
        );
      }
    }
    for (const f of needs.faceRestorers) {
      if (!agents.some((a) => a.faceRestorers.has(f.name))) {
        throw FarmError.notFound(`face restorer ${f.name} has no model files on any agent (--face-models)`, f.field);
      }
    }
    const key: SpeedKey = { model: v.params.model, width: v.params.width ?? 512, height: v.params.height ?? 512 };
    const plan = planHires(v.params, this.tiling);
    checkStagesPlaceable(v.params, plan, agents);
    const modelCalls = plan ? equivalentModelCalls(plan, v.params) : imageWork(v.params).modelCalls;
    this.admit(tenant, key, modelCalls, v.imageCount, opts.deadlineUnixMs ?? 0);
    v.params.seed = resolveSeed(v.params.seed);
    v.params.subseed = resolveSeed(v.params.subseed);
    const spec: JobSpec = {
      id: randomUUID(),
      params: v.params,
      requestId,
      tenant,
      imageCount: v.imageCount,
      createdAt: Date.now(),
      deadlineUnixMs: opts.deadlineUnixMs ?? 0,
      priority: opts.priority ?? 0,
    };
    const { job, created } = await storeCall(() => this.store.create(spec));
    if (!created) return { jobId: job.id, imageCount: job.spec.imageCount };
    this.m.metrics.jobsSubmitted.inc({ tenant });
    this.m.metrics.tenantImages.inc({ tenant }, v.imageCount);
    this.m.metrics.jobsInMemory.set(this.store.size);
    this.store.emit(job, { case: "queued", value: { imageCount: v.imageCount } });
    for (const message of v.warnings) this.store.emit(job, { case: "warning", value: { message } });
    const seeds = imageSeeds(v.params.seed, v.params.subseed, v.params.subseedStrength, v.imageCount);
    const tasks = Array.from({ length: v.imageCount }, (_, i) => this.imageTasks(job, i, plan, seeds)).flat();
    this.addOutstanding(tenant, v.imageCount);
    this.armDeadline(job);
    this.scheduler.enqueueJob(job, tasks);
    return { jobId: job.id, imageCount: v.imageCount };
  }

  /** Tenant limits and deadlines, checked before anything is stored. */
  private admit(tenant: string, key: SpeedKey, modelCalls: number, count: number, deadlineUnixMs: number): void {
    const policy = this.policy(tenant);
    const queued = this.outstanding.get(tenant) ?? 0;
    if (policy.maxQueuedImages > 0 && queued + count > policy.maxQueuedImages) {
      if (count > policy.maxQueuedImages) {
        throw new FarmError(
          grpc.status.RESOURCE_EXHAUSTED,
          `a job of ${count} images exceeds tenant "${tenant}"'s limit of ${policy.maxQueuedImages} queued images`,
          {
            retryable: false,
          },
        );
      }
      // Time until enough of the tenant's own images finish to make room.
      const excess = queued + count - policy.maxQueuedImages;
      const e = this.estimateMs(tenant, key, modelCalls, 0);
      const perImage = e && queued > 0 ? e.ms / queued : 1000;
      const retryAfter = Math.min(600_000, Math.max(250, excess * perImage));
      throw new RetryLaterError(`tenant "${tenant}" has ${queued} images queued or running (limit ${policy.maxQueuedImages})`, retryAfter);
    }
    if (deadlineUnixMs > 0) {
      const now = Date.now();
      if (deadlineUnixMs <= now)
        throw new FarmError(grpc.status.FAILED_PRECONDITION, `is ${now - deadlineUnixMs} ms in the past`, { field: "deadline_unix_ms" });
      const e = this.estimateMs(tenant, key, modelCalls, count);
      if (e?.measured && now + e.ms > deadlineUnixMs) {
        throw new FarmError(
          grpc.status.FAILED_PRECONDITION,
          `cannot be met: the farm's speed model estimates the job needs ${(e.ms / 1000).toFixed(1)} s with the work queued ahead, ` +
            `${((now + e.ms - deadlineUnixMs) / 1000).toFixed(1)} s past the deadline`,
          { field: "deadline_unix_ms" },
        );
      }
    }
  }

  private armDeadline(job: Job): void {
    const d = job.spec.deadlineUnixMs;
    if (d <= 0 || job.final) return;
    const t = setTimeout(
      () => {
        this.deadlines.delete(job.id);
        if (!job.final) {
          void this.finish(
            job,
            JobState.FAILED,
            new FarmError(
              grpc.status.DEADLINE_EXCEEDED,
              `the job's deadline passed with ${job.open} of ${job.spec.imageCount} images unfinished`,
            ),
            "f",
          );
        }
      },
      Math.max(0, d - Date.now()),
    );
    t.unref();
    this.deadlines.set(job.id, t);
  }

  private onProgress(data: Uint8Array): void {
    let p;
    try {
      p = fromBinary(TaskProgressSchema, data);
    } catch {
      return;
    }
    if (p.step) this.scheduler.onNatsProgress(p.taskId, p.agentId, p.step);
  }

  private persistLater(job: Job): void {
    this.store.persist(job).catch((err: unknown) => this.cfg.logger.warn("job state not stored", { jobId: job.id, error: String(err) }));
  }

  /** A state write within ~100 ms, carrying every change of the job made until then. */
  private persistSoon(job: Job): void {
    if (job.persistTimer) return;
    job.persistTimer = setTimeout(() => {
      job.persistTimer = undefined;
      if (!job.final) this.persistLater(job);
    }, 100);
  }

  /** The model a job that names none renders with: --default-model, else the first the agents offer by name. */
  private defaultModel(agents: readonly AgentState[]): string | undefined {
    return this.cfg.defaultModel ?? [...new Set(agents.flatMap((a) => [...a.available]))].sort()[0];
  }

  /** A finished image: stored in the object store, then announced; the job record follows shortly. */
  private async onImage(task: Task, image: Image, agentId: string): Promise<void> {
    const job = task.job;
    const i = task.imageIndex;
    const hi = job.hires[i];
    if (hi) {
      hi.tasks.delete(task);
      hi.finishing = true;
    }
    try {
      const full = create(ImageSchema, { ...image, agentId, index: i, provenance: provenanceOf(job.provenance.get(i) ?? []) });
      job.provenance.delete(i);
      await this.store.storeImage(job, full);
      if (job.images[i] !== "q" && job.images[i] !== "r") return;
      this.endStages(job, i, "image finished");
      // The stored object is what makes the image done (a restart looks for it); the job record
      // catches up with a write shortly after, shared with the job's other images.
      job.images[i] = "d";
      job.agents[i] = agentId;
      this.persistSoon(job);
      this.m.metrics.imagesFinished.inc({ outcome: "succeeded" });
      this.store.emit(job, { case: "image", value: { image: full } });
      this.addOutstanding(job.spec.tenant, -1);
      this.completeIfDone(job);
    } catch (err) {
      // Only when shutting down: the image is recomputed after the restart.
      this.cfg.logger.warn("finished image not stored", { jobId: job.id, index: i, error: String(err) });
    }
  }

  private async onImageFailed(task: Task, err: FarmError): Promise<void> {
    const job = task.job;
    const i = task.imageIndex;
    if (job.images[i] !== "q" && job.images[i] !== "r") return;
    job.images[i] = "f";
    job.provenance.delete(i);
    job.failures[i] = Math.max(task.stage ? (job.failures[i] ?? 0) : 0, task.failures);
    job.imageErrors.set(i, { code: err.codeName, message: err.message });
    this.endStages(job, i, "image failed");
    job.error = { code: err.codeName, message: err.message, imageIndex: i };
    job.announcing++;
    try {
      await this.store.persist(job);
    } catch (e) {
      this.cfg.logger.warn("image failure not stored", { jobId: job.id, index: i, error: String(e) });
      return;
    } finally {
      job.announcing--;
    }
    this.m.metrics.imagesFinished.inc({ outcome: "failed" });
    this.store.emit(job, {
      case: "imageFailed",
      value: { imageIndex: i, code: err.codeName, message: err.message, attempts: job.attempts[i] ?? 0 },
    });
    this.addOutstanding(job.spec.tenant, -1);
    this.completeIfDone(job);
  }

  /** Every image reached an end: the job ends failed if any image failed, succeeded if any was made, else cancelled. */
  private completeIfDone(job: Job): void {
    // An image stored but not yet announced ends first; its announcer calls back here.
    if (job.final || job.open > 0 || job.announcing > 0) return;
    const state = job.count("f") > 0 ? JobState.FAILED : job.count("d") > 0 ? JobState.SUCCEEDED : JobState.CANCELLED;
    void this.finish(job, state, undefined, "c");
  }

  /**
   * Ends a job: its state is written with CAS before the terminal event, so exactly one final state
   * is ever stored. Unfinished images become `rest` (cancelled, or failed at a deadline).
   */
  private async finish(job: Job, state: JobState, err: FarmError | undefined, rest: "c" | "f"): Promise<void> {
    if (job.final) return;
    job.state = state;
    // Records of images that will not be made (cancelled, failed at a deadline) are of no further use.
    job.provenance.clear();
    job.finishedAt = Date.now();
    if (err) job.error = { code: err.codeName, message: err.message, imageIndex: -1 };
    const open: Task[] = [];
    let openImages = 0;
    const reason = state === JobState.CANCELLED ? "job cancelled" : `job ${JobState[state].toLowerCase()}`;
    for (let i = 0; i < job.images.length; i++) {
      if (job.images[i] !== "q" && job.images[i] !== "r") continue;
      job.images[i] = rest;
      openImages++;
      const t = job.tasks[i];
      if (t) open.push(t);
      this.endStages(job, i, reason);
    }
    if (open.length > 0) this.scheduler.cancel(open, reason);
    if (openImages > 0) {
      this.m.metrics.imagesFinished.inc({ outcome: rest === "c" ? "cancelled" : "failed" }, openImages);
      this.addOutstanding(job.spec.tenant, -openImages);
    }
    const timer = this.deadlines.get(job.id);
    if (timer) clearTimeout(timer);
    this.deadlines.delete(job.id);
    if (job.persistTimer) clearTimeout(job.persistTimer);
    job.persistTimer = undefined;
    try {
      await this.store.persist(job);
    } catch (e) {
      this.cfg.logger.warn("final job state not stored", { jobId: job.id, error: String(e) });
      return;
    }
    // Images that finished just before the end are announced before the terminal event.
    while (job.announcing > 0) await new Promise((r) => setTimeout(r, 2));
    if (job.state !== state) return;
    const outcome = state === JobState.SUCCEEDED ? "succeeded" : state === JobState.FAILED ? "failed" : "cancelled";
    this.m.metrics.jobsFinished.inc({ outcome, reason: state === JobState.FAILED ? (job.error?.code ?? "UNKNOWN") : "none" });
    this.m.metrics.jobDuration.observe({ outcome }, (job.finishedAt - job.spec.createdAt) / 1000);
    this.store.emitTerminal(job);
    job.tasks.fill(undefined);
    job.hires.fill(undefined);
    this.store.markFinished(job);
    this.m.metrics.jobsInMemory.set(this.store.size);
  }

  /** Another coordinator finished the job first: stop working on it. */
  private onRemoteFinal(job: Job): void {
    const open = job.tasks.filter((t): t is Task => t !== undefined && (t.state === "queued" || t.state === "running"));
    const images = new Set(open.map((t) => t.imageIndex));
    for (let i = 0; i < job.hires.length; i++) {
      if (!job.hires[i]) continue;
      images.add(i);
      this.endStages(job, i, "job finished by another coordinator");
    }
    this.scheduler.cancel(open, "job finished by another coordinator");
    this.addOutstanding(job.spec.tenant, -images.size);
    if (!job.events.some((e) => ["done", "failed", "cancelled"].includes(e.event.case ?? ""))) this.store.emitTerminal(job);
    this.store.markFinished(job);
  }

  /**
   * Cancels a whole job, or only some of its images (by index or task id). Returns once the
   * cancellation is stored; the agents running those images are cancelled at their next model call.
   */
  async cancel(
    jobId: string,
    imageIndices: readonly number[] = [],
    taskIds: readonly string[] = [],
  ): Promise<{ state: JobState; cancelledImages: number[] }> {
    const job = await this.job(jobId);
    if (job.final) {
      throw new FarmError(grpc.status.FAILED_PRECONDITION, `job "${jobId}" already ended as ${JobState[job.state]}`, { field: "job_id" });
    }
    const indices = new Set<number>();
    for (const i of imageIndices) {
      if (!Number.isInteger(i) || i < 0 || i >= job.spec.imageCount)
        throw FarmError.invalid("image_indices", `${i} is not an image of this job (0..${job.spec.imageCount - 1})`);
      indices.add(i);
    }
    for (const id of taskIds) {
      // A stage task (`<job>-<image>.<stage>`) names its image: the image is cancelled.
      const prefix = `${job.id}-`;
      const m = id.startsWith(prefix) ? /^(\d+)(?:\.[a-z0-9]+)?$/.exec(id.slice(prefix.length)) : null;
      const i = m ? Number(m[1]) : NaN;
      if (!Number.isInteger(i) || i < 0 || i >= job.spec.imageCount)
        throw FarmError.invalid("task_ids", `"${id}" is not a task of this job`);
      indices.add(i);
    }
    const openBefore = job.images.map((s, i) => (s === "q" || s === "r" ? i : -1)).filter((i) => i >= 0);
    if (indices.size === 0) {
      await this.finish(job, JobState.CANCELLED, undefined, "c");
      return { state: job.state, cancelledImages: openBefore };
    }
    const cancelled: number[] = [];
    const tasks: Task[] = [];
    for (const i of [...indices].sort((a, b) => a - b)) {
      const t = job.tasks[i];
      if ((job.images[i] !== "q" && job.images[i] !== "r") || t?.state === "done" || job.hires[i]?.finishing) continue;
      job.images[i] = "c";
      cancelled.push(i);
      if (t) tasks.push(t);
      this.endStages(job, i, "image cancelled");
    }
    this.scheduler.cancel(tasks, "image cancelled");
    job.announcing++;
    try {
      await this.store.persist(job);
    } finally {
      job.announcing--;
    }
    for (const i of cancelled) this.store.emit(job, { case: "imageCancelled", value: { imageIndex: i } });
    if (cancelled.length > 0) {
      this.m.metrics.imagesFinished.inc({ outcome: "cancelled" }, cancelled.length);
      this.addOutstanding(job.spec.tenant, -cancelled.length);
    }
    this.completeIfDone(job);
    return { state: job.state, cancelledImages: cancelled };
  }

  private async *watch(jobId: string, after: bigint, signal: AbortSignal) {
    const job = await this.job(jobId);
    for await (const event of this.store.watch(job, after, signal)) yield { event };
  }

  /**
   * Graceful drain: stop admitting (Submit answers UNAVAILABLE, health NOT_SERVING), place nothing
   * new, let running tasks finish for up to `graceMs`, then store everything. Tasks still running
   * at the end stay unfinished in JetStream and the next coordinator places them again.
   */
  async drain(graceMs: number): Promise<void> {
    this.accepting = false;
    if (this.health) setServing(this.health, [SERVICE], false);
    this.scheduler.pause();
    const deadline = Date.now() + graceMs;
    while (this.scheduler.running > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    this.scheduler.abortAll("coordinator shutting down");
    await this.store.flush(Math.max(1000, deadline - Date.now()));
  }

  /** Stops admitting jobs, then closes everything it started. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.accepting = false;
    if (this.health) setServing(this.health, [SERVICE], false);
    this.scheduler.abortAll("coordinator shutting down");
    await this.store.flush(2000);
    this.store.close();
    this.scheduler.close();
    for (const t of this.deadlines.values()) clearTimeout(t);
    await shutdownServer(this.server);
    if (this.healthServer) await shutdownServer(this.healthServer);
    this.progressSub?.unsubscribe();
    this.registry.close();
    await this.metricsServer?.close();
    await this.nc?.drain().catch(() => undefined);
  }
}

/** An image's record from its attempts: their device time, and the part whose work did not reach the image. */
function provenanceOf(attempts: TaskAttempt[]): ImageProvenance {
  let deviceSeconds = 0;
  let wastedDeviceSeconds = 0;
  for (const a of attempts) {
    deviceSeconds += a.seconds;
    if (a.outcome !== AttemptOutcome.USED && a.outcome !== AttemptOutcome.HANDED_BACK) wastedDeviceSeconds += a.seconds;
  }
  return create(ImageProvenanceSchema, { attempts, deviceSeconds, wastedDeviceSeconds });
}
