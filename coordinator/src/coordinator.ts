import * as grpc from "@grpc/grpc-js";
import { randomUUID } from "node:crypto";
import { fromBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import {
  COORDINATOR_METRICS,
  FarmError,
  JobState,
  RenderService,
  TaskProgressSchema,
  addHealthAndReflection,
  addService,
  bindServer,
  createMetrics,
  serverOptions,
  setServing,
  shutdownServer,
  startMetricsServer,
  statusName,
  subjects,
  channelCredentials,
  serverCredentials,
  type GenerationParams,
  type HandlerContext,
  type Logger,
  type TlsFiles,
  type TokenAuth,
} from "@latentfarm/shared";
import { AgentRegistry } from "./agent-registry.js";
import { JobStore, isFinal, type Job } from "./job-store.js";
import { Scheduler, type Task } from "./scheduler.js";
import { DEFAULT_LIMITS, imageSeeds, resolveSeed, validateJob, type Limits, type SamplerSupport } from "./validate.js";

export interface CoordinatorConfig {
  /** gRPC listen address, e.g. "0.0.0.0:50051"; port 0 picks a free one. */
  listen: string;
  natsUrl: string;
  /** An agent silent this long is dropped and its tasks re-placed. */
  agentTimeoutMs?: number;
  maxAttempts?: number;
  metricsPort?: number;
  metricsHost?: string;
  defaultModel?: string;
  limits?: Partial<Limits>;
  samplerSupported?: SamplerSupport;
  /** TLS for clients and mTLS towards agents; plaintext when absent. */
  tls?: TlsFiles;
  /** Tenant API tokens; when set, every RenderService call needs a bearer token. */
  auth?: TokenAuth;
  /** Plaintext grpc.health.v1 port for kubelet probes (needed when the main port uses TLS). */
  healthPort?: number;
  logger: Logger;
}

const SERVICE = RenderService.typeName;
const TENANT_HEADER = "x-tenant";

/** The coordinator: RenderService for clients, the scheduler, and the agent registry. */
export class Coordinator {
  private readonly server = new grpc.Server(serverOptions);
  private readonly m = createMetrics(COORDINATOR_METRICS);
  private readonly store = new JobStore();
  private readonly registry: AgentRegistry;
  private readonly scheduler: Scheduler;
  private readonly limits: Limits;
  private nc: NatsConnection | undefined;
  private progressSub: Subscription | undefined;
  private health: ReturnType<typeof addHealthAndReflection> | undefined;
  private healthServer: grpc.Server | undefined;
  private metricsServer: { url: string; close(): Promise<void> } | undefined;
  private accepting = true;
  port = 0;

  constructor(private readonly cfg: CoordinatorConfig) {
    this.limits = { ...DEFAULT_LIMITS, ...cfg.limits };
    this.registry = new AgentRegistry({
      timeoutMs: cfg.agentTimeoutMs ?? 5000,
      logger: cfg.logger,
      ...(cfg.tls ? { credentials: channelCredentials(cfg.tls) } : {}),
      onJoin: () => {
        this.updateAgentGauge();
        this.scheduler.pump();
      },
      onUpdate: () => {
        this.updateAgentGauge();
        this.scheduler.pump();
      },
      onLost: (a, reason) => {
        this.m.metrics.agentsLost.inc();
        this.updateAgentGauge();
        this.scheduler.agentLost(a, reason);
      },
    });
    this.scheduler = new Scheduler(this.registry, this.store, this.m.metrics, {
      logger: cfg.logger,
      maxAttempts: cfg.maxAttempts ?? 3,
      onImage: (t) => this.onImage(t),
      onTaskFailed: (t, err) => this.finish(t.job, JobState.FAILED, err, t.imageIndex),
    });
    for (const state of ["ready", "draining"]) this.m.metrics.agents.set({ state }, 0);
    for (const outcome of ["succeeded", "failed", "cancelled"]) this.m.metrics.imagesFinished.inc({ outcome }, 0);
  }

  get registryMetrics() {
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
    this.nc = await connect({ servers: this.cfg.natsUrl, name: "latentfarm-coordinator", maxReconnectAttempts: -1 });
    this.registry.start(this.nc);
    this.progressSub = this.nc.subscribe(subjects.allTaskProgress, {
      callback: (err, msg) => {
        if (!err) this.onProgress(msg.data);
      },
    });
    this.health = addHealthAndReflection(this.server, [SERVICE]);
    addService(
      this.server,
      RenderService,
      {
        submit: async (req, ctx) => {
          const tenant = this.tenantOf(ctx);
          try {
            return this.submit(req.params, req.requestId, tenant);
          } catch (err) {
            this.m.metrics.submitRejections.inc({ tenant, code: FarmError.from(err).codeName });
            throw err;
          }
        },
        watch: (req, ctx) => {
          this.tenantOf(ctx);
          return this.watch(req.jobId, req.afterSequence, ctx.signal);
        },
        get: async (req, ctx) => {
          this.tenantOf(ctx);
          const job = this.job(req.jobId);
          return {
            jobId: job.id,
            state: job.state,
            params: job.params,
            images: job.images.filter((i) => i !== undefined),
            imageCount: job.imageCount,
            errorCode: job.errorCode,
            errorMessage: job.errorMessage,
          };
        },
        cancel: async (req, ctx) => {
          this.tenantOf(ctx);
          return { state: this.cancel(req.jobId) };
        },
        listAgents: async (_req, ctx) => ({
          ...this.authorized(ctx), agents: this.registry.list().map((a) => ({ ...a.info, busySlots: a.inFlight })) }),
        listModels: async (_req, ctx) => {
          this.tenantOf(ctx);
          const models = new Map<string, { format: string; loadedOn: string[] }>();
          for (const a of this.registry.list()) {
            for (const name of a.available) {
              const m = models.get(name) ?? { format: "", loadedOn: [] };
              if (a.info.loadedModels.includes(name)) m.loadedOn.push(a.id);
              models.set(name, m);
            }
          }
          return { models: [...models.entries()].sort().map(([name, m]) => ({ name, format: m.format, loadedOn: m.loadedOn })) };
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
    this.cfg.logger.info("coordinator started", { port: this.port, metrics: this.metricsServer?.url });
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

  private job(id: string): Job {
    const job = this.store.get(id);
    if (!job) throw FarmError.notFound(`job "${id}" is unknown`, "job_id");
    return job;
  }

  private updateAgentGauge(): void {
    let ready = 0;
    let draining = 0;
    for (const a of this.registry.list()) a.info.draining ? draining++ : ready++;
    this.m.metrics.agents.set({ state: "ready" }, ready);
    this.m.metrics.agents.set({ state: "draining" }, draining);
  }

  submit(params: GenerationParams | undefined, requestId: string, tenant: string): { jobId: string; imageCount: number } {
    if (!this.accepting) throw new FarmError(grpc.status.UNAVAILABLE, "coordinator is shutting down");
    if (!params) throw FarmError.invalid("params", "missing");
    if (requestId) {
      const existing = this.store.byRequest(tenant, requestId);
      if (existing) return { jobId: existing.id, imageCount: existing.imageCount };
    }
    const agents = this.registry.list();
    const defaultModel = this.cfg.defaultModel ?? [...new Set(agents.flatMap((a) => [...a.available]))].sort()[0];
    const v = validateJob(params, {
      limits: this.limits,
      ...(this.cfg.samplerSupported ? { samplerSupported: this.cfg.samplerSupported } : {}),
      ...(defaultModel ? { defaultModel } : {}),
    });
    if (agents.length === 0) throw new FarmError(grpc.status.UNAVAILABLE, "no agents are connected to the farm");
    if (!agents.some((a) => a.available.has(v.params.model))) {
      const known = [...new Set(agents.flatMap((a) => [...a.available]))].sort();
      throw FarmError.notFound(`model "${v.params.model}" is not offered by any agent (known: ${known.join(", ") || "none"})`, "model");
    }
    const seed = resolveSeed(v.params.seed);
    const subseed = resolveSeed(v.params.subseed);
    v.params.seed = seed;
    v.params.subseed = subseed;
    const job = this.store.add({
      id: randomUUID(),
      params: v.params,
      requestId,
      tenant,
      imageCount: v.imageCount,
      createdAt: Date.now(),
    });
    this.m.metrics.jobsSubmitted.inc({ tenant });
    this.m.metrics.tenantImages.inc({ tenant }, v.imageCount);
    this.store.emit(job, { case: "queued", value: { imageCount: v.imageCount } });
    const seeds = imageSeeds(seed, subseed, v.params.subseedStrength, v.imageCount);
    const tasks: Task[] = seeds.map((s, i) => ({
      id: `${job.id}-${i}`,
      job,
      imageIndex: i,
      seed: s.seed,
      subseed: s.subseed,
      attempt: 0,
      agentId: undefined,
      failedOn: new Set(),
      abort: undefined,
      lastStep: 0,
      state: "queued",
    }));
    this.scheduler.enqueue(tasks);
    return { jobId: job.id, imageCount: v.imageCount };
  }

  private onProgress(data: Uint8Array): void {
    let p;
    try {
      p = fromBinary(TaskProgressSchema, data);
    } catch {
      return;
    }
    const task = this.scheduler.tasks.get(p.taskId);
    // Progress from an earlier attempt's agent, or out of order, is dropped.
    if (!task || task.state !== "running" || task.agentId !== p.agentId || !p.step) return;
    if (p.step.step <= task.lastStep) return;
    task.lastStep = p.step.step;
    this.store.emit(task.job, { case: "step", value: p.step });
  }

  private onImage(task: Task): void {
    const job = task.job;
    if (isFinal(job.state)) return;
    const image = job.images[task.imageIndex]!;
    this.m.metrics.imagesFinished.inc({ outcome: "succeeded" });
    this.store.emit(job, { case: "image", value: { image } });
    if (job.images.every((i) => i !== undefined)) this.finish(job, JobState.SUCCEEDED);
  }

  private finish(job: Job, state: JobState, err?: FarmError, imageIndex = -1): void {
    if (isFinal(job.state)) return;
    job.state = state;
    job.finishedAt = Date.now();
    const outcome = state === JobState.SUCCEEDED ? "succeeded" : state === JobState.FAILED ? "failed" : "cancelled";
    const pending = job.images.filter((i) => i === undefined).length;
    if (pending > 0 && state !== JobState.SUCCEEDED) this.m.metrics.imagesFinished.inc({ outcome }, pending);
    if (err) {
      job.errorCode = err.codeName;
      job.errorMessage = err.message;
    }
    this.m.metrics.jobsFinished.inc({ outcome, reason: err ? err.codeName : "none" });
    this.m.metrics.jobDuration.observe({ outcome }, (job.finishedAt - job.createdAt) / 1000);
    if (state === JobState.SUCCEEDED) this.store.emit(job, { case: "done", value: { imageCount: job.imageCount } });
    else if (state === JobState.CANCELLED) this.store.emit(job, { case: "cancelled", value: {} });
    else this.store.emit(job, { case: "failed", value: { code: err ? statusName(err.code) : "UNKNOWN", message: err?.message ?? "", imageIndex } });
    if (state !== JobState.SUCCEEDED) this.scheduler.cancelJob(job);
    this.scheduler.forgetJob(job);
  }

  cancel(jobId: string): JobState {
    const job = this.job(jobId);
    if (isFinal(job.state)) {
      throw new FarmError(grpc.status.FAILED_PRECONDITION, `job "${jobId}" already ended as ${JobState[job.state]}`, { field: "job_id" });
    }
    this.finish(job, JobState.CANCELLED);
    return job.state;
  }

  private async *watch(jobId: string, after: bigint, signal: AbortSignal) {
    const job = this.job(jobId);
    for await (const event of this.store.watch(job, after, signal)) yield { event };
  }

  /** Stops admitting jobs, then closes everything it started. */
  async close(): Promise<void> {
    this.accepting = false;
    if (this.health) setServing(this.health, [SERVICE], false);
    await shutdownServer(this.server);
    if (this.healthServer) await shutdownServer(this.healthServer);
    this.progressSub?.unsubscribe();
    this.registry.close();
    await this.metricsServer?.close();
    await this.nc?.drain().catch(() => undefined);
  }
}
