import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import {
  FarmError,
  PassCheckpointSchema,
  RunTaskRequestSchema,
  TaskStage,
  namedVae,
  type PassCheckpoint,
  type RefinerResume,
  refinerCheckpoint,
  refinerInPass,
  samplingPass,
  secondPassModel,
  statusName,
  type COORDINATOR_METRICS,
  type Handover,
  type Image,
  type Logger,
  type MetricSet,
  type StepProgress,
  EXTRAS_MODEL,
  auxiliaryNeeds,
  loraKey,
  type AuxiliaryNeeds,
  type GenerationParams,
  AttemptOutcome,
  TaskAttemptSchema,
  type TaskAttempt,
  type TaskUsage,
} from "@latentfarm/shared";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { AgentRegistry, AgentState } from "./agent-registry.js";
import { FairQueue, type FairItem, type TenantPolicy } from "./fair-queue.js";
import type { Job } from "./job-store.js";
import { stageKinds, type HiresPlan } from "./hires-stages.js";
import type { SpeedKey, SpeedModel } from "./speed-model.js";

export type TaskState = "queued" | "running" | "done" | "failed" | "cancelled";

/** One image of a job: the unit the scheduler queues, places and retries. */
export interface Task extends FairItem {
  readonly id: string;
  readonly job: Job;
  readonly imageIndex: number;
  readonly seed: bigint;
  readonly subseed: bigint;
  /** Its model (the refiner's once it carries on from a refiner switch), size: what it is placed and estimated by. */
  key: SpeedKey;
  /** Sampling steps the agent reports as progress (0 for stages that do not sample). */
  readonly steps: number;
  /** UNet evaluations those steps take (shared SamplingWork): what the speed model estimates the task by. */
  readonly modelCalls: number;
  state: TaskState;
  /** Attempts that failed in a way that counts toward the delivery limit. */
  failures: number;
  /** Agents this task failed on; avoided while others can take it. */
  readonly failedOn: Set<string>;
  /** Attempts running now: normally one; two while a backup copy races a slow or stalled one. */
  readonly runs: Run[];
  /** Agent of the attempt that was running when the coordinator restarted; preferred on resume. */
  preferAgent: string | undefined;
  /**
   * Until when (Date.now() ms) the task waits for `preferAgent` to be seen, so that it is re-attached
   * to the render still running there rather than started again elsewhere (after a coordinator restart).
   */
  adoptUntil?: number;
  lastStep: number;
  /** Set when the task is one stage of an image split across agents (Hires.fix); absent: the whole image. */
  readonly stage?: TaskStageSpec;
  /**
   * Set when its pass reached the refiner switch on an agent without the refiner: the task carries on
   * from there on an agent that offers it (RunTaskRequest.refiner_resume).
   */
  refinerResume?: RefinerResume;
  /**
   * Its sampling pass's progress, from the checkpoints of attempt `owner` (the newest attempt started
   * with it, or the first to send one): what a retry resumes from (RunTaskRequest.resume_from).
   */
  checkpoint?: { owner: number; start: Uint8Array; init: Uint8Array; answers: Uint8Array[]; uncondAnswers: Uint8Array[]; bytes: number };
  /** The upscalers and face restorers its stage runs, worked out at its first placement. */
  auxiliary?: AuxiliaryNeeds;
}

/** What a stage task sends beyond the job's params: the stage, its inputs, its tile. */
export type StageRequest = Pick<MessageInitShape<typeof RunTaskRequestSchema>, "stage" | "inputs" | "tileIndex" | "tiles">;

export interface TaskStageSpec {
  /** Short name, also the task id's suffix: "first", "second", "up", "t<n>", "asm". */
  readonly name: string;
  readonly request: StageRequest;
  /** Attempts of this stage (an image's stages count their attempts each). */
  attempts: number;
}

/** Whether an agent has the files a task names: its VAE, and the upscalers and face restorers its stage runs. */
function hasFilesFor(a: AgentState, task: Task): boolean {
  return (
    missingFile(a, task.job.spec.params, (task.auxiliary ??= auxiliaryNeeds(task.job.spec.params, task.stage?.request.stage))) === undefined
  );
}

/** A file of a job's stage (`needs`: its upscalers and face restorers; and the job's VAE) that an agent lacks. */
export function missingFile(a: AgentState, p: GenerationParams, needs: AuxiliaryNeeds): { what: string; field: string } | undefined {
  const vae = namedVae(p.overrideSettings?.sdVae);
  if (vae !== undefined && !a.vaes.some((f) => f.name === vae)) return { what: `VAE "${vae}"`, field: "override_settings.sd_vae" };
  const upscaler = needs.upscalers.find((u) => !a.upscalers.has(u.name));
  if (upscaler !== undefined) return { what: `upscaler "${upscaler.name}"`, field: upscaler.field };
  const restorer = needs.faceRestorers.find((f) => !a.faceRestorers.has(f.name));
  if (restorer !== undefined) return { what: `face restorer ${restorer.name}`, field: restorer.field };
  const lora = a.lorasUnlisted ? undefined : needs.loras.find((l) => !a.loraNames.has(loraKey(l.name)));
  if (lora !== undefined) return { what: `LoRA "${lora.name}"`, field: lora.field };
  return undefined;
}

/**
 * The refiner a task's pass may switch to, before it has: an agent that offers it too switches there and
 * then, where another hands the switch back for a second placement.
 */
function refinerToSwitchTo(task: Task): string | undefined {
  if (task.refinerResume !== undefined) return undefined;
  const refiner = refinerCheckpoint(task.job.spec.params);
  return refiner !== undefined && samplesWithRefiner(task) ? refiner : undefined;
}

/** Whether an agent can run a task of `model`: it offers the model, or the task is an Extras one (no model). */
export function offersModel(a: AgentState, model: string): boolean {
  return model === EXTRAS_MODEL || a.available.has(model);
}

/** An agent that would switch to the refiner itself, and has its pipeline to load for that. */
function loadsRefiner(a: AgentState, refiner: string): boolean {
  return a.available.has(refiner) && !a.info.loadedModels.includes(refiner);
}

/** Whether a pass the task samples may switch to the job's refiner. */
function samplesWithRefiner(task: Task): boolean {
  const p = task.job.spec.params;
  const stage = task.stage?.request.stage ?? TaskStage.FULL;
  if (stage === TaskStage.FULL) return refinerInPass(p, "first") || refinerInPass(p, "second");
  const pass = samplingPass(stage);
  return pass !== undefined && refinerInPass(p, pass);
}

/** UNet evaluations a reported step of the task takes. */
function callsPerStep(task: Task): number {
  return task.steps > 0 ? task.modelCalls / task.steps : 1;
}

/** Stages whose result is a hand-over to a later stage rather than the image. */
export function handsOver(stage: TaskStage | undefined): boolean {
  return stage === TaskStage.FIRST_PASS || stage === TaskStage.UPSCALE || stage === TaskStage.SECOND_PASS_TILE;
}

/** One attempt of a task on one agent. */
export interface Run {
  readonly task: Task;
  readonly agent: AgentState;
  readonly attempt: number;
  readonly abort: AbortController;
  readonly startedAt: number;
  readonly backup: boolean;
  readonly modelLoaded: boolean;
  firstProgressAt: number | undefined;
  lastProgressAt: number | undefined;
  lastStep: number;
  /** When this attempt should end, from the speed model, refined by its progress. */
  expectedEnd: number;
  /** Whether the estimate came from measurements of this agent (speculation needs that). */
  measured: boolean;
  /** Model calls it replays from an earlier attempt's checkpoint (0: it samples from the start). */
  resumedCalls?: number;
  /** The agent's own time for the attempt (RunTaskResponse.usage), sent just before its output. */
  usage?: TaskUsage;
  /** Its record went out (SchedulerHooks.onAttemptEnded): once per attempt. */
  recorded?: boolean;
}

export interface SchedulerHooks {
  onPlaced(task: Task, run: Run): void;
  onStep(task: Task, step: StepProgress): void;
  onWarning(task: Task, message: string): void;
  /** The task's image; the task is already "done" and every other attempt is being cancelled. */
  onResult(task: Task, image: Image, run: Run): void;
  /** A stage task's hand-over to later stages (see TaskStageSpec); the task is "done" as with onResult. */
  onHandover?(task: Task, handover: Handover, run: Run): void;
  onRetry(task: Task, err: FarmError, run: Run): void;
  /** The task failed for good (non-retryable error, or the delivery limit was reached). */
  onFailed(task: Task, err: FarmError): void;
  /**
   * An attempt ended (each once, at coordinator shutdown none): its record for the image's provenance.
   * An attempt whose output is used ends before onResult or onHandover is called for it.
   */
  onAttemptEnded?(task: Task, attempt: TaskAttempt): void;
}

export interface SchedulerOptions {
  logger: Logger;
  /** Failed attempts after which a task fails (a poison task); hand-backs from draining agents do not count. */
  maxAttempts: number;
  /** Start a backup copy of a slow or stalled attempt on an idle agent that would finish it sooner. */
  speculate: boolean;
  tenantPolicy: (tenant: string) => TenantPolicy;
  speed: SpeedModel;
  metrics?: MetricSet<typeof COORDINATOR_METRICS>;
  /** Agents whose free memory is below this, without the model loaded, are used only when nothing else can run the task. */
  minFreeMemoryBytes?: bigint;
  /**
   * Ask agents for a checkpoint of each task's sampling pass every this many steps (0 or absent: none),
   * so that a retry resumes where the failed attempt's last checkpoint was. Costs the coordinator the
   * pass's answers per running task: steps × the latent's bytes (256 KiB a step at 1024×1024).
   */
  checkpointEverySteps?: number;
  /**
   * The most checkpoint bytes held at once (default 1 GiB): past it, a task's further checkpoints are
   * dropped (it keeps the ones it has, and a retry resumes from those).
   */
  checkpointMaxBytes?: number;
}

/** Checkpoint bytes held at most by default. */
const DEFAULT_CHECKPOINT_MAX_BYTES = 1 << 30;

// Statuses that mean "this agent could not finish", not "this task is bad".
const RETRY_ON = new Set<grpc.status>([
  grpc.status.UNAVAILABLE,
  grpc.status.CANCELLED,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.ABORTED,
  grpc.status.UNKNOWN,
  grpc.status.INTERNAL,
]);

/** Why the coordinator ended an attempt itself: decides whether the attempt counts as a failure. */
class AttemptAborted extends FarmError {
  constructor(
    code: grpc.status,
    message: string,
    readonly counts: boolean,
  ) {
    super(code, message);
  }
}

/** An agent returned the task without trying it (draining, no free slot): not the task's fault. */
function isHandBack(err: FarmError, agent: AgentState): boolean {
  if (agent.info.draining && (err.code === grpc.status.UNAVAILABLE || err.code === grpc.status.CANCELLED)) return true;
  if (err.code === grpc.status.RESOURCE_EXHAUSTED) return true;
  return err.handBack;
}

const HOLD_MIN_GAIN_MS = 5;

/**
 * Slot availability per agent, as one placement pass sees it: now for a free slot, else the
 * expected end of a running attempt. Agents the pass has not planned on are read straight from
 * their runs; only the ones it places or holds work on get a copy it can change.
 */
interface AgentSlot {
  pass: number;
  at: number;
}

class Plan {
  private readonly planned = new Map<AgentState, number[]>();
  /** Estimates per task kind (model, size, steps), aligned with the kind's candidate agents. */
  readonly estimates = new Map<string, { ms: Float64Array; measured: Uint8Array }>();
  private readonly capacities = new Map<object, Map<string, number>>();
  private lastCapacity: { kind: object; key: string } | undefined;

  capacity(kind: object, key: string): number | undefined {
    const v = this.capacities.get(kind)?.get(key);
    if (v !== undefined) this.lastCapacity = { kind, key };
    return v;
  }

  setCapacity(kind: object, key: string, n: number): void {
    let m = this.capacities.get(kind);
    if (!m) this.capacities.set(kind, (m = new Map()));
    m.set(key, n);
    this.lastCapacity = { kind, key };
  }

  /** A task was held: one unit of the capacity last asked for is spoken for. */
  capacityUsed(key: string): void {
    const l = this.lastCapacity;
    if (!l || l.key !== key) return;
    const m = this.capacities.get(l.kind);
    const v = m?.get(key);
    if (m && v !== undefined) m.set(key, v - 1);
  }
  /**
   * `slots` outlives passes (entries are stamped with the pass): a pass at 256 agents reads every
   * agent, and per-pass maps, sorted arrays and doubles boxed on return from calls made the
   * garbage whose collection pauses were the tail of placement latency. Hot loops read
   * `slot(a).at` (a field, no boxing) rather than calling a function that returns a number.
   */
  constructor(
    readonly now: number,
    private readonly runsOf: (a: AgentState) => Iterable<Run>,
    private readonly pass: number,
    private readonly slots: Map<AgentState, AgentSlot>,
  ) {}

  private of(a: AgentState): number[] {
    let s = this.planned.get(a);
    if (!s) {
      s = [];
      const free = a.info.slots - a.inFlight;
      for (let i = 0; i < free; i++) s.push(this.now);
      // A running attempt past its estimate still holds its slot: it ends "any moment", never
      // "now" (only a free slot is available now).
      const soon = this.now + 1;
      for (const r of this.runsOf(a)) {
        const end = r.expectedEnd > soon ? r.expectedEnd : soon;
        // Insertion keeps it sorted; a handful of slots, and Array#sort allocates.
        let i = s.length;
        s.push(end);
        while (i > 0 && s[i - 1]! > end) {
          s[i] = s[i - 1]!;
          i--;
        }
        s[i] = end;
      }
      this.planned.set(a, s);
    }
    return s;
  }

  /** The horizon capacityUntil counts to (a field: doubles passed to a call are boxed). */
  until = 0;

  /** Tasks of `ms[i]` each the agent's slots could finish by `this.until`, counting what is planned. */
  capacityUntil(a: AgentState, msOf: Float64Array, i: number): number {
    const until = this.until;
    const ms = Math.max(1e-3, msOf[i]!);
    let n = 0;
    const s = this.planned.get(a);
    if (s) {
      for (const free of s) if (free < until) n += Math.floor((until - free) / ms);
      return n;
    }
    const free = a.info.slots - a.inFlight;
    if (free > 0 && this.now < until) n += free * Math.floor((until - this.now) / ms);
    const soon = this.now + 1;
    for (const r of this.runsOf(a)) {
      const end = r.expectedEnd > soon ? r.expectedEnd : soon;
      if (end < until) n += Math.floor((until - end) / ms);
    }
    return n;
  }

  /** When the agent's earliest slot is free (`at`), as this pass sees it. */
  slot(a: AgentState): AgentSlot {
    let e = this.slots.get(a);
    if (e === undefined) this.slots.set(a, (e = { pass: -1, at: Infinity }));
    if (e.pass === this.pass) return e;
    e.pass = this.pass;
    if (a.info.slots - a.inFlight > 0) {
      e.at = this.now;
      return e;
    }
    let m = Infinity;
    const soon = this.now + 1;
    for (const r of this.runsOf(a)) {
      const end = r.expectedEnd > soon ? r.expectedEnd : soon;
      if (end < m) m = end;
    }
    e.at = m;
    return e;
  }

  earliest(a: AgentState): number {
    return this.slot(a).at;
  }

  freeNow(a: AgentState): boolean {
    return this.earliest(a) <= this.now;
  }

  /** The agent's earliest slot is taken until `until`. */
  occupy(a: AgentState, until: number): void {
    const s = this.of(a);
    s.shift();
    let i = s.length;
    while (i > 0 && s[i - 1]! > until) i--;
    s.splice(i, 0, until);
    const e = this.slot(a);
    e.at = s[0] ?? Infinity;
  }
}

/**
 * The task queue and placement. Tasks wait in per-tenant fair queues; each pass walks them in fair
 * order and gives each task the agent expected to finish it first ("earliest completion time"):
 * an agent's start is now if it has a free slot, else when its running attempt should end; its
 * duration comes from the speed model (seconds per model call for the model and size, plus load time
 * when the model is not loaded). So a batch splits across unequal agents in proportion to their
 * speed, and a task may wait a moment for a fast agent rather than start on a slow one. When the
 * queue runs dry, an idle agent takes over work from a slower or stalled one by starting a backup
 * copy; the first result wins and the other copy is cancelled (images are deterministic, so both
 * are the same image).
 */
export class Scheduler {
  readonly tasks = new Map<string, Task>();
  private readonly queue: FairQueue<Task>;
  private readonly runsByAgent = new Map<string, Set<Run>>();
  private readonly slotCache = new Map<AgentState, AgentSlot>();
  private byModel: Map<string, AgentState[]> | undefined;
  private readonly estimateCache = new Map<
    string,
    { agents: AgentState[]; ms: Float64Array; measured: Uint8Array; version: Float64Array; loaded: Uint8Array; fleet: number }
  >();
  private queuedCount = 0;
  /** Queued tasks per model: how deep the queue is behind a task decides whether holding it back pays. */
  private readonly queuedByModel = new Map<string, number>();
  private runningCount = 0;
  /** Each job's place in its tenant's queue, kept for the stages it adds later. */
  private readonly laneOrder = new WeakMap<Job, number>();
  private pumpScheduled = false;
  private wakeTimer: NodeJS.Timeout | undefined;
  private wakeAt = Infinity;
  private tick: NodeJS.Timeout | undefined;
  private paused = false;
  private closing = false;
  /** Placement passes and the tasks they placed, for the placement benchmark and metrics. */
  readonly stats = {
    passes: 0,
    placed: 0,
    held: 0,
    backups: 0,
    /** Tasks re-attached to the agent still running them after a restart. */
    adopted: 0,
    /** Wall time of each pass. */
    passMs: [] as number[],
    /** Per placement: from the event that asked for a pass (a slot freed, a task arrived) to the placement. */
    placeMs: [] as number[],
  };
  private pumpRequestedAt = 0;
  /** Resumed tasks waiting to be re-attached to the agent that still runs them. */
  private readonly adopting = new Set<Task>();
  private lastSpeculation = 0;
  private lastPassEnd = 0;

  constructor(
    private readonly registry: Pick<AgentRegistry, "list">,
    private readonly hooks: SchedulerHooks,
    private readonly opts: SchedulerOptions,
  ) {
    this.queue = new FairQueue<Task>((t) => t.state === "queued", opts.tenantPolicy);
    if (opts.speculate) {
      // Stalls show only as silence, so look again now and then while anything runs.
      this.tick = setInterval(() => {
        if (this.runningCount > 0) this.schedulePump();
      }, 500);
      this.tick.unref();
    }
  }

  get queued(): number {
    return this.queuedCount;
  }

  private countQueued(task: Task, delta: number): void {
    this.queuedCount += delta;
    const m = task.key.model;
    const n = (this.queuedByModel.get(m) ?? 0) + delta;
    if (n <= 0) this.queuedByModel.delete(m);
    else this.queuedByModel.set(m, n);
  }

  get running(): number {
    return this.runningCount;
  }

  tenantRunning(tenant: string): number {
    return this.queue.running(tenant);
  }

  /** Queues a job's tasks (new, resumed after a restart, or stages whose inputs just arrived). */
  enqueueJob(job: Job, tasks: Task[]): void {
    for (const t of tasks) {
      this.tasks.set(t.id, t);
      t.state = "queued";
      this.countQueued(t, 1);
      if (t.preferAgent !== undefined && (t.adoptUntil ?? 0) > Date.now()) {
        this.adopting.add(t);
        this.wakeUpAt(t.adoptUntil!);
      }
    }
    this.laneOrder.set(job, this.queue.pushJob(job.spec.tenant, job.spec.priority, tasks, this.laneOrder.get(job)));
    this.updateGauges();
    this.schedulePump();
  }

  /** Agents joined, left or changed what they offer. */
  agentsChanged(): void {
    this.byModel = undefined;
    this.slotCache.clear();
    this.estimateCache.clear();
    this.schedulePump();
  }

  pause(): void {
    this.paused = true;
  }

  /** Coalesces placement into one pass per event-loop turn. */
  schedulePump(): void {
    if (this.pumpScheduled || this.paused) return;
    this.pumpScheduled = true;
    const now = performance.now();
    this.pumpRequestedAt = now;
    const run = (): void => {
      this.pumpScheduled = false;
      this.pump();
    };
    // Placement right away while passes are rare; when they come back to back (a saturated farm),
    // one pass per event-loop turn serves every slot freed in it, which is cheaper.
    if (now - this.lastPassEnd > 2) queueMicrotask(run);
    else setImmediate(run);
  }

  private updateGauges(): void {
    this.opts.metrics?.queueDepth.set(this.queuedCount);
    this.opts.metrics?.tasksRunning.set(this.runningCount);
  }

  private agentsFor(model: string): AgentState[] {
    if (!this.byModel) {
      this.byModel = new Map();
      for (const a of this.registry.list()) {
        for (const m of a.available) {
          let l = this.byModel.get(m);
          if (!l) this.byModel.set(m, (l = []));
          l.push(a);
        }
      }
    }
    // Every agent can take an Extras task: it needs no model.
    if (model === EXTRAS_MODEL) return this.registry.list();
    return this.byModel.get(model) ?? [];
  }

  private runsOn = (a: AgentState): Iterable<Run> => this.runsByAgent.get(a.id) ?? [];

  /** One placement pass: fills free slots in fair order, holding tasks for faster busy agents. */
  pump(): void {
    if (this.paused || (this.queuedCount === 0 && !this.opts.speculate)) return;
    if (this.adopting.size > 0) this.adopt();
    const t0 = performance.now();
    const requested = this.pumpRequestedAt > 0 && this.pumpRequestedAt <= t0 ? this.pumpRequestedAt : t0;
    this.pumpRequestedAt = 0;
    const now = Date.now();
    let free = 0;
    for (const a of this.registry.list()) if (!a.info.draining) free += Math.max(0, a.info.slots - a.inFlight);
    if (free === 0) return;
    this.stats.passes++;
    const plan = new Plan(now, this.runsOn, this.stats.passes, this.slotCache);
    // Models with no agent free now are skipped cheaply; held tasks bound how far the pass looks.
    const closed = new Set<string>();
    const heldByModel = new Map<string, number>();
    let held = 0;
    // Holding only matters at the end of a batch, where a few dozen tasks are in play.
    const lookahead = 64;
    let wakeAt = Infinity;
    let exhausted = true;
    if (this.queuedCount > 0) {
      for (const task of this.queue.order((t) => closed.has(t.key.model))) {
        if (free <= 0 || held >= lookahead) {
          exhausted = false;
          break;
        }
        if (task.job.final || this.adopting.has(task)) continue;
        const model = task.key.model;
        if (closed.has(model)) continue;
        const choice = this.choose(task, plan, (this.queuedByModel.get(model) ?? 0) - (heldByModel.get(model) ?? 0));
        if (!choice) {
          // A task that avoids agents it failed on says nothing about the model's other tasks.
          if (task.failedOn.size === 0) closed.add(model);
          continue;
        }
        if (choice.start <= now) {
          // The plan is updated first: it reads the agent's slots as they were before this run.
          plan.occupy(choice.agent, now + choice.ms);
          this.queue.take(task);
          this.startRun(task, choice.agent, false, choice);
          free--;
          this.stats.placed++;
          if (this.stats.placeMs.length < 200_000) this.stats.placeMs.push(performance.now() - requested);
        } else {
          plan.occupy(choice.agent, choice.start + choice.ms);
          heldByModel.set(model, (heldByModel.get(model) ?? 0) + 1);
          held++;
          this.stats.held++;
          wakeAt = Math.min(wakeAt, choice.start);
        }
      }
    }
    // Backups only when the queue has nothing left these free agents should run instead.
    if (free > 0 && exhausted && held === 0 && this.opts.speculate && this.runningCount > 0 && t0 - this.lastSpeculation >= 50) {
      // At the end of a batch every freed slot asks; looking every 50 ms is enough for backups.
      this.lastSpeculation = t0;
      this.speculate(plan);
    }
    if (wakeAt < Infinity) this.wakeUpAt(wakeAt);
    this.lastPassEnd = performance.now();
    const ms = this.lastPassEnd - t0;
    if (this.stats.passMs.length < 100_000) this.stats.passMs.push(ms);
    this.opts.metrics?.placementPass.observe(ms / 1000);
    this.updateGauges();
  }

  /**
   * Re-attaches resumed tasks to the agents that were running them: the agent's render went on
   * while the coordinator was down, and a RunTask for the same task id picks it up where it is. The
   * agent's slot is already taken by that render, so no free slot is needed. A task whose agent is
   * not seen in time goes through normal placement.
   */
  private adopt(): void {
    const now = Date.now();
    for (const task of this.adopting) {
      if (task.state !== "queued") {
        this.adopting.delete(task);
        continue;
      }
      const agent = this.registry.list().find((a) => a.id === task.preferAgent);
      if (agent && !agent.info.draining) {
        this.adopting.delete(task);
        this.queue.take(task);
        this.startRun(task, agent, false, this.estimate(agent, task), true);
        this.stats.adopted++;
      } else if ((task.adoptUntil ?? 0) <= now) {
        this.adopting.delete(task);
      }
    }
  }

  private wakeUpAt(at: number): void {
    if (this.wakeTimer && this.wakeAt <= at) return;
    if (this.wakeTimer) clearTimeout(this.wakeTimer);
    this.wakeAt = at;
    this.wakeTimer = setTimeout(
      () => {
        this.wakeTimer = undefined;
        this.wakeAt = Infinity;
        this.schedulePump();
      },
      Math.max(1, at - Date.now() + 1),
    );
    this.wakeTimer.unref();
  }

  private estimate(a: AgentState, task: Task, refiner = refinerToSwitchTo(task)): { ms: number; measured: boolean } {
    const speed = this.opts.speed;
    const loaded = a.info.loadedModels.includes(task.key.model);
    const e = speed.taskSeconds(a.id, task.key, task.modelCalls, loaded);
    // An agent that switches to the refiner itself loads its pipeline first, unless it is loaded.
    const refinerLoad = refiner !== undefined && loadsRefiner(a, refiner) ? (speed.loadSeconds(refiner) ?? 0) : 0;
    return { ms: (e.seconds + refinerLoad) * 1000, measured: e.measured };
  }

  /**
   * Estimates for every candidate agent of a task kind, kept across passes: an entry is recomputed
   * only when its agent's figures changed (or, for an unmeasured agent, the fleet's), or the agent
   * loaded or dropped the model.
   */
  private estimatesFor(task: Task, candidates: AgentState[], plan: Plan): { ms: Float64Array; measured: Uint8Array } {
    const refiner = refinerToSwitchTo(task);
    const kind = `${task.key.model}|${task.key.width}x${task.key.height}|${task.modelCalls}${refiner === undefined ? "" : `|${refiner}`}`;
    const inPass = plan.estimates.get(kind);
    if (inPass) return inPass;
    let e = this.estimateCache.get(kind);
    if (!e || e.agents !== candidates) {
      const n = candidates.length;
      e = {
        agents: candidates,
        ms: new Float64Array(n),
        measured: new Uint8Array(n),
        version: new Float64Array(n).fill(-1),
        loaded: new Uint8Array(n),
        fleet: -1,
      };
      this.estimateCache.set(kind, e);
    }
    const speed = this.opts.speed;
    const fleet = speed.fleetVersion;
    for (let i = 0; i < candidates.length; i++) {
      const a = candidates[i]!;
      const v = speed.agentVersion(a.id);
      // Bit 1: the model is loaded; bit 2: the refiner it would switch to here is not (a load to count).
      const loaded = (a.info.loadedModels.includes(task.key.model) ? 1 : 0) | (refiner !== undefined && loadsRefiner(a, refiner) ? 2 : 0);
      // Load times are fleet figures too, so an unloaded agent follows the fleet version.
      if (e.version[i] === v && e.loaded[i] === loaded && ((e.measured[i] && loaded === 1) || e.fleet === fleet)) continue;
      const x = this.estimate(a, task, refiner);
      e.ms[i] = x.ms;
      e.measured[i] = x.measured ? 1 : 0;
      e.version[i] = v;
      e.loaded[i] = loaded;
    }
    e.fleet = fleet;
    plan.estimates.set(kind, e);
    return e;
  }

  /**
   * The agent expected to finish the task first. A busy agent wins over a free one only when both
   * estimates are measured and it finishes clearly sooner; on guesses the free agent goes first.
   */
  private choose(task: Task, plan: Plan, waiting: number): { agent: AgentState; start: number; ms: number; measured: boolean } | undefined {
    const candidates = this.agentsFor(task.key.model);
    const est = this.estimatesFor(task, candidates, plan);
    // Agents that also offer the refiner the task may switch to, when one can start it now, over a
    // hand-back. When all of them are busy, an agent without the refiner starts it: its pass runs up to
    // the switch meanwhile and the rest waits for a refiner's slot, which finishes no later than waiting
    // for that slot to run it all (the hand-back costs its state's transfer and a second placement).
    const refiner = refinerToSwitchTo(task);
    const withRefiner =
      refiner !== undefined &&
      candidates.some(
        (a) => !a.info.draining && !task.failedOn.has(a.id) && a.available.has(refiner) && hasFilesFor(a, task) && plan.freeNow(a),
      );
    // Agents the task failed on, or short of memory, only when no other agent can take it.
    let restrict = false;
    if (task.failedOn.size > 0 || this.opts.minFreeMemoryBytes) {
      for (const a of candidates) {
        if (!a.info.draining && !task.failedOn.has(a.id) && this.memoryOk(a, task) && hasFilesFor(a, task)) {
          restrict = true;
          break;
        }
      }
    }
    const now = plan.now;
    let fi = -1;
    let fFinish = Infinity;
    let fTie = Infinity;
    let bi = -1;
    let bFinish = Infinity;
    let bStart = 0;
    for (let i = 0; i < candidates.length; i++) {
      const a = candidates[i]!;
      // An agent without the VAE file the job names cannot render it (Submit checked that one can).
      if (a.info.draining || !hasFilesFor(a, task)) continue;
      if (restrict && (task.failedOn.has(a.id) || !this.memoryOk(a, task))) continue;
      if (withRefiner && !a.available.has(refiner)) continue;
      const start = plan.slot(a).at;
      if (start === Infinity) continue;
      let finish = start + est.ms[i]!;
      if (task.preferAgent === a.id) finish -= 1;
      if (start <= now) {
        // Among free agents with equal estimates, the least busy one (spreads a batch).
        const tie = a.inFlight / Math.max(1, a.info.slots);
        if (finish < fFinish - 1e-6 || (Math.abs(finish - fFinish) <= 1e-6 && tie < fTie)) {
          fi = i;
          fFinish = finish;
          fTie = tie;
        }
      } else if (finish < bFinish) {
        bi = i;
        bFinish = finish;
        bStart = start;
      }
    }
    // No agent free for this task now: nothing to decide in this pass.
    if (fi < 0) return undefined;
    // A stage of a split image is placed work-conserving, never held: the stages after it are not
    // queued yet, so the queue (what holding weighs) understates the work still to come, and the
    // agent held for would be needed for it.
    if (
      bi >= 0 &&
      !task.stage &&
      est.measured[bi] &&
      est.measured[fi] &&
      bFinish + Math.max(HOLD_MIN_GAIN_MS, 0.1 * est.ms[fi]!) < fFinish
    ) {
      // Holding pays only near the end of a batch: when the agents can finish all the waiting work
      // of this model before the free agent would finish this task. With a deeper queue the free
      // agent's work is needed anyway, so it starts now.
      if (waiting <= this.capacityBefore(fFinish, candidates, est, plan, restrict ? task : undefined, `${fi}`)) {
        plan.capacityUsed(`${fi}`);
        return { agent: candidates[bi]!, start: bStart, ms: est.ms[bi]!, measured: true };
      }
    }
    return { agent: candidates[fi]!, start: now, ms: est.ms[fi]!, measured: est.measured[fi] === 1 };
  }

  /** How many tasks of this kind the candidate agents could finish by `until`, counting what is already planned. */
  private capacityBefore(
    until: number,
    candidates: AgentState[],
    est: { ms: Float64Array },
    plan: Plan,
    excludeFailedOf: Task | undefined,
    key: string,
  ): number {
    // Computed once per pass and free agent; each task held after that uses up one unit of it.
    const cached = plan.capacity(est, key);
    if (cached !== undefined) return cached;
    let n = 0;
    plan.until = until;
    for (let i = 0; i < candidates.length; i++) {
      const a = candidates[i]!;
      if (a.info.draining || (excludeFailedOf && excludeFailedOf.failedOn.has(a.id))) continue;
      n += plan.capacityUntil(a, est.ms, i);
    }
    plan.setCapacity(est, key, n);
    return n;
  }

  private memoryOk(a: AgentState, task: Task): boolean {
    const min = this.opts.minFreeMemoryBytes;
    if (!min || a.freeMemoryBytes <= 0n) return true;
    return a.info.loadedModels.includes(task.key.model) || a.freeMemoryBytes >= min;
  }

  /** Idle agents take over slow or stalled attempts with a backup copy, when they would finish sooner. */
  private speculate(plan: Plan): void {
    const now = plan.now;
    const idle: AgentState[] = [];
    for (const a of this.registry.list()) {
      if (a.info.draining || !plan.freeNow(a)) continue;
      // An agent with queued work for its models is idle by choice (held for faster agents), not out of work.
      let hasQueued = false;
      for (const m of a.available) if (this.queuedByModel.has(m)) hasQueued = true;
      if (!hasQueued) idle.push(a);
      if (idle.length >= 64) break;
    }
    if (idle.length === 0) return;
    // Only attempts with enough time left for a backup to win are worth a look.
    const candidates: Array<{ task: Task; run: Run; remaining: number }> = [];
    for (const set of this.runsByAgent.values()) {
      for (const run of set) {
        const task = run.task;
        if (task.state !== "running" || task.runs.length !== 1 || run.backup || task.job.final) continue;
        const remaining = this.remaining(run, now);
        if (remaining === Infinity || (run.measured && remaining > HOLD_MIN_GAIN_MS * 4)) candidates.push({ task, run, remaining });
      }
    }
    if (candidates.length === 0) return;
    candidates.sort((a, b) => b.remaining - a.remaining);
    const top = candidates
      .slice(0, 32)
      .map((c) => ({ ...c, kind: `${c.task.key.model}|${c.task.key.width}x${c.task.key.height}|${c.task.modelCalls}` }));
    const estimates = new Map<string, Map<AgentState, { ms: number; measured: boolean }>>();
    for (const a of idle) {
      for (const c of top) {
        if (
          c.task.runs.length !== 1 ||
          c.run.agent === a ||
          c.task.failedOn.has(a.id) ||
          !offersModel(a, c.task.key.model) ||
          !hasFilesFor(a, c.task)
        )
          continue;
        let byAgent = estimates.get(c.kind);
        if (!byAgent) estimates.set(c.kind, (byAgent = new Map()));
        let est = byAgent.get(a);
        if (!est) byAgent.set(a, (est = this.estimate(a, c.task)));
        if (!est.measured) continue;
        const stalled = c.remaining === Infinity;
        if (!stalled && !(est.ms * 1.25 + HOLD_MIN_GAIN_MS < c.remaining)) continue;
        this.stats.backups++;
        this.opts.metrics?.taskBackups.inc({ reason: stalled ? "stalled" : "slow" });
        plan.occupy(a, now + est.ms);
        this.startRun(c.task, a, true, { ms: est.ms, measured: true });
        break;
      }
    }
  }

  /** Expected time left for an attempt; Infinity when it stopped making progress. */
  private remaining(run: Run, now: number): number {
    const stepMs = (this.opts.speed.agentCallSeconds(run.agent.id, run.task.key) ?? 0) * callsPerStep(run.task) * 1000;
    if (run.lastProgressAt !== undefined && now - run.lastProgressAt > Math.max(2000, 5 * stepMs)) return Infinity;
    return Math.max(0, run.expectedEnd - now);
  }

  private startRun(task: Task, agent: AgentState, backup: boolean, est: { ms: number; measured: boolean }, adopt = false): void {
    const wasQueued = task.state === "queued";
    task.state = "running";
    if (wasQueued) {
      this.countQueued(task, -1);
      this.runningCount++;
    }
    const now = Date.now();
    const run: Run = {
      task,
      agent,
      // A re-attach continues the attempt that is running; anything else is a new attempt.
      attempt: task.stage
        ? adopt
          ? task.stage.attempts
          : ++task.stage.attempts
        : (task.job.attempts[task.imageIndex] ?? 0) + (adopt ? 0 : 1),
      abort: new AbortController(),
      startedAt: now,
      backup,
      modelLoaded: agent.info.loadedModels.includes(task.key.model),
      firstProgressAt: undefined,
      lastProgressAt: undefined,
      lastStep: 0,
      expectedEnd: now + est.ms,
      measured: est.measured,
    };
    // A new attempt of a task with a checkpoint resumes from it, and owns the checkpoints from here on.
    const checkpoint = task.checkpoint;
    if (!adopt && checkpoint !== undefined && checkpoint.answers.length > 0) {
      run.resumedCalls = checkpoint.answers.length;
      checkpoint.owner = run.attempt;
      this.opts.metrics?.checkpointResumes.inc();
    }
    task.runs.push(run);
    agent.inFlight++;
    let set = this.runsByAgent.get(agent.id);
    if (!set) this.runsByAgent.set(agent.id, (set = new Set()));
    set.add(run);
    this.opts.metrics?.tasksDispatched.inc();
    this.hooks.onPlaced(task, run);
    void this.drive(run);
  }

  private async drive(run: Run): Promise<void> {
    const { task, agent } = run;
    const deadline = task.job.spec.deadlineUnixMs;
    const req = create(RunTaskRequestSchema, {
      taskId: task.id,
      jobId: task.job.id,
      params: task.job.spec.params,
      imageIndex: task.imageIndex,
      seed: task.seed,
      subseed: task.subseed,
      attempt: run.attempt,
      ...task.stage?.request,
      ...(task.refinerResume !== undefined && { refinerResume: task.refinerResume }),
      ...(this.opts.checkpointEverySteps && { checkpointEverySteps: this.opts.checkpointEverySteps }),
      ...(run.resumedCalls && { resumeFrom: this.resumeFrom(task) }),
    });
    let out: { case: "result"; value: Image } | { case: "handover"; value: Handover } | undefined;
    let switched: RefinerResume | undefined;
    try {
      const call = agent.client.runTask(req, {
        signal: run.abort.signal,
        ...(deadline > 0 ? { timeoutMs: Math.max(1, deadline - Date.now()) } : {}),
      });
      for await (const msg of call) {
        if (msg.kind.case === "progress") this.onProgress(run, msg.kind.value);
        else if (msg.kind.case === "result" || msg.kind.case === "handover") out = msg.kind;
        else if (msg.kind.case === "refinerSwitch") switched = msg.kind.value;
        else if (msg.kind.case === "checkpoint") this.onCheckpoint(run, msg.kind.value);
        else if (msg.kind.case === "usage") run.usage = msg.kind.value;
        else if (msg.kind.case === "warning" && task.state === "running") this.hooks.onWarning(task, msg.kind.value.message);
      }
      if (switched !== undefined && !out) {
        this.onRefinerSwitch(run, switched);
        return;
      }
      if (!out) throw new FarmError(grpc.status.INTERNAL, `agent ${agent.id} ended task ${task.id} without a result`);
      // An agent that does not know stages renders the whole image instead: another agent may.
      if ((out.case === "handover") !== handsOver(task.stage?.request.stage)) {
        throw new FarmError(
          grpc.status.INTERNAL,
          `agent ${agent.id} returned ${out.case === "handover" ? "a hand-over" : "an image"} for task ${task.id}`,
        );
      }
      this.onResult(run, out);
    } catch (err) {
      const reason: unknown = run.abort.signal.reason;
      const fe = run.abort.signal.aborted && reason instanceof FarmError ? reason : FarmError.from(err);
      // A broken stream only orphans the render on the agent (it waits there for a restarted
      // coordinator to re-attach), so an attempt this coordinator gives up on is stopped explicitly.
      // At shutdown the renders are left running on purpose: the next coordinator adopts them.
      if (!this.closing && (run.abort.signal.aborted || fe.code === grpc.status.DEADLINE_EXCEEDED)) this.stopOnAgent(run, fe.message);
      this.onAttemptFailed(run, fe);
    } finally {
      this.endRun(run);
    }
  }

  /**
   * A checkpoint of an attempt's pass: the calls it adds are appended when they follow the stored ones
   * and come from the attempt that owns them. Another attempt's (a backup racing the original) are
   * dropped, so a resume never mixes two attempts' answers.
   */
  private onCheckpoint(run: Run, c: PassCheckpoint): void {
    const task = run.task;
    if (task.state !== "running") return;
    const bytes = c.start.length + c.init.length + [...c.answers, ...c.uncondAnswers].reduce((n, a) => n + a.length, 0);
    // Over the cap the part is dropped; the next ones then follow no stored call and are dropped too.
    if (this.checkpointBytes + bytes > (this.opts.checkpointMaxBytes ?? DEFAULT_CHECKPOINT_MAX_BYTES)) return;
    const stored = task.checkpoint;
    if (stored === undefined) {
      if (c.firstCall !== 0 || c.start.length === 0) return;
      task.checkpoint = {
        owner: run.attempt,
        start: c.start,
        init: c.init,
        answers: [...c.answers],
        uncondAnswers: [...c.uncondAnswers],
        bytes,
      };
    } else {
      if (stored.owner !== run.attempt || c.firstCall !== stored.answers.length) return;
      stored.answers.push(...c.answers);
      stored.uncondAnswers.push(...c.uncondAnswers);
      stored.bytes += bytes;
    }
    this.checkpointBytes += bytes;
    this.opts.metrics?.checkpointBytes.set(this.checkpointBytes);
  }

  /** A task ended: its checkpoints go (its job keeps the task while the job is in memory). */
  private dropCheckpoint(task: Task): void {
    if (task.checkpoint === undefined) return;
    this.checkpointBytes -= task.checkpoint.bytes;
    task.checkpoint = undefined;
    this.opts.metrics?.checkpointBytes.set(this.checkpointBytes);
  }

  /** Bytes of the checkpoints held for running tasks. */
  private checkpointBytes = 0;

  private resumeFrom(task: Task): PassCheckpoint {
    const c = task.checkpoint!;
    return create(PassCheckpointSchema, { start: c.start, init: c.init, answers: c.answers, uncondAnswers: c.uncondAnswers });
  }

  private stopOnAgent(run: Run, reason: string): void {
    run.agent.client.cancelTask({ taskId: run.task.id, attempt: run.attempt, reason }, { timeoutMs: 30_000 }).catch((err: unknown) => {
      // The agent may be gone or frozen; an orphaned render ends on its own after the agent's grace period.
      this.opts.logger.debug("could not stop a task on its agent", { taskId: run.task.id, agentId: run.agent.id, error: String(err) });
    });
  }

  /** Step progress of an attempt, from its RunTask stream or from NATS. */
  onProgress(run: Run, step: StepProgress): void {
    const now = Date.now();
    if (step.step <= run.lastStep) return;
    run.lastStep = step.step;
    run.firstProgressAt ??= now;
    run.lastProgressAt = now;
    const perCall = this.opts.speed.agentCallSeconds(run.agent.id, run.task.key);
    if (perCall !== undefined) {
      run.expectedEnd = now + (run.task.steps - step.step) * callsPerStep(run.task) * perCall * 1000;
    } else if (step.step > 1) {
      run.expectedEnd = now + ((run.task.steps - step.step) * (now - run.firstProgressAt)) / (step.step - 1);
    }
    const task = run.task;
    if (task.state !== "running" || step.step <= task.lastStep) return;
    task.lastStep = step.step;
    this.hooks.onStep(task, step);
  }

  /** Progress that arrived over NATS for a task id. */
  onNatsProgress(taskId: string, agentId: string, step: StepProgress): void {
    const task = this.tasks.get(taskId);
    if (!task) return;
    const run = task.runs.find((r) => r.agent.id === agentId);
    if (run) this.onProgress(run, step);
  }

  /**
   * An attempt's record, once: the agent's time when it sent it, else this coordinator's from dispatch,
   * and the tenant's device-seconds by whether the work reached an image.
   */
  private recordAttempt(run: Run, outcome: AttemptOutcome, error = ""): void {
    if (run.recorded) return;
    run.recorded = true;
    const { task, agent, usage } = run;
    const seconds = usage?.seconds ?? (Date.now() - run.startedAt) / 1000;
    const used = outcome === AttemptOutcome.USED || outcome === AttemptOutcome.HANDED_BACK;
    this.opts.metrics?.tenantDeviceSeconds.inc({ tenant: task.tenant, outcome: used ? "used" : "wasted" }, seconds);
    this.hooks.onAttemptEnded?.(
      task,
      create(TaskAttemptSchema, {
        stage: task.stage?.name ?? "",
        attempt: run.attempt,
        agentId: agent.id,
        outcome,
        seconds,
        agentMeasured: usage !== undefined,
        loadSeconds: usage?.loadSeconds ?? 0,
        executionProvider: agent.info.executionProvider,
        device: agent.info.device,
        runtime: agent.info.runtime,
        resumedCalls: run.resumedCalls ?? 0,
        error,
      }),
    );
  }

  private onResult(run: Run, out: { case: "result"; value: Image } | { case: "handover"; value: Handover }): void {
    const { task, agent } = run;
    if (task.state !== "running") {
      // A late result: the task finished elsewhere, was cancelled, or this attempt was given up on.
      this.opts.metrics?.resultsDiscarded.inc({ reason: task.state === "done" ? "duplicate" : "late" });
      this.recordAttempt(run, AttemptOutcome.SUPERSEDED, `task ${task.id} ended before this attempt's output arrived`);
      return;
    }
    this.recordAttempt(run, AttemptOutcome.USED);
    task.state = "done";
    this.leaveRunning(task);
    this.dropCheckpoint(task);
    this.tasks.delete(task.id);
    for (const other of task.runs) {
      if (other !== run) other.abort.abort(new AttemptAborted(grpc.status.CANCELLED, `task ${task.id} finished on ${agent.id}`, false));
    }
    this.observeSpeed(run);
    if (out.case === "handover") this.hooks.onHandover?.(task, out.value, run);
    else this.hooks.onResult(task, out.value, run);
  }

  /**
   * An attempt's pass reached its refiner switch on an agent without the refiner: the task goes back to
   * the queue, carrying the switch, to be placed by the refiner (not a failure; other copies stop).
   */
  private onRefinerSwitch(run: Run, resume: RefinerResume): void {
    const { task, agent } = run;
    if (this.closing) return;
    if (task.state !== "running") {
      this.recordAttempt(run, AttemptOutcome.SUPERSEDED, `task ${task.id} ended before this attempt's refiner switch arrived`);
      return;
    }
    const refiner = refinerToSwitchTo(task);
    if (refiner === undefined) {
      this.onAttemptFailed(
        run,
        new FarmError(grpc.status.INTERNAL, `agent ${agent.id} handed back a refiner switch task ${task.id} cannot make`),
      );
      return;
    }
    this.recordAttempt(run, AttemptOutcome.HANDED_BACK);
    for (const other of task.runs) {
      if (other !== run)
        other.abort.abort(new AttemptAborted(grpc.status.CANCELLED, `task ${task.id} switched to its refiner on ${agent.id}`, false));
    }
    task.state = "queued";
    this.leaveRunning(task);
    task.refinerResume = resume;
    task.key = { ...task.key, model: refiner };
    task.preferAgent = undefined;
    this.countQueued(task, 1);
    this.queue.pushRetry(task);
    this.opts.metrics?.refinerHandbacks.inc();
    this.opts.logger.info("task switches to its refiner on another agent", { taskId: task.id, agentId: agent.id, refiner });
  }

  private observeSpeed(run: Run): void {
    const end = Date.now();
    const steps = run.task.steps;
    // Stages without sampling steps (upscale, assemble) say nothing about seconds per model call, nor
    // does a run that carried on from a refiner switch (its first steps were made elsewhere).
    if (steps === 0 || run.task.refinerResume !== undefined || run.resumedCalls) return;
    const calls = callsPerStep(run.task);
    if (run.firstProgressAt !== undefined && steps > 1) {
      const perStep = (end - run.firstProgressAt) / (steps - 1) / 1000;
      const before = (run.firstProgressAt - run.startedAt) / 1000 - perStep;
      if (run.modelLoaded)
        this.opts.speed.observe(run.agent.id, run.task.key, { secondsPerCall: perStep / calls, overheadSeconds: Math.max(0, before) });
      else {
        const usual = this.opts.speed.overheadSeconds(run.agent.id) ?? 0;
        this.opts.speed.observe(run.agent.id, run.task.key, { secondsPerCall: perStep / calls, loadSeconds: Math.max(0, before - usual) });
      }
    } else if (run.modelLoaded) {
      this.opts.speed.observe(run.agent.id, run.task.key, {
        secondsPerCall: (end - run.startedAt) / 1000 / Math.max(1, run.task.modelCalls),
      });
    }
  }

  private onAttemptFailed(run: Run, err: FarmError): void {
    const { task, agent } = run;
    // At shutdown running tasks stay "running" in the store; the next coordinator places them again
    // (and adopts the renders still going, so this attempt is not over).
    if (this.closing) return;
    this.recordAttempt(run, err instanceof AttemptAborted && !err.counts ? AttemptOutcome.SUPERSEDED : AttemptOutcome.FAILED, err.message);
    if (task.state !== "running") return;
    if (task.runs.length > 1) {
      // Another copy is still running; this one just ends.
      if (!(err instanceof AttemptAborted && !err.counts)) task.failedOn.add(agent.id);
      return;
    }
    const handBack = err instanceof AttemptAborted ? !err.counts : isHandBack(err, agent);
    if (!handBack) {
      task.failures++;
      task.failedOn.add(agent.id);
    }
    if (RETRY_ON.has(err.code) && (handBack || task.failures < this.opts.maxAttempts) && !task.job.final) {
      task.state = "queued";
      this.leaveRunning(task);
      this.countQueued(task, 1);
      this.queue.pushRetry(task);
      this.opts.metrics?.taskRetries.inc({ reason: handBack ? "HANDED_BACK" : statusName(err.code) });
      this.opts.logger.warn("task attempt failed; placing it again", {
        taskId: task.id,
        agentId: agent.id,
        attempt: run.attempt,
        failures: task.failures,
        error: err.message,
      });
      this.hooks.onRetry(task, err, run);
      return;
    }
    task.state = "failed";
    this.leaveRunning(task);
    this.dropCheckpoint(task);
    this.tasks.delete(task.id);
    this.hooks.onFailed(task, err);
  }

  private leaveRunning(task: Task): void {
    this.runningCount--;
    this.queue.release(task.tenant);
  }

  private endRun(run: Run): void {
    const { task, agent } = run;
    if (!this.closing) this.recordAttempt(run, AttemptOutcome.FAILED, "the attempt ended without an outcome");
    const i = task.runs.indexOf(run);
    if (i >= 0) task.runs.splice(i, 1);
    agent.inFlight = Math.max(0, agent.inFlight - 1);
    this.runsByAgent.get(agent.id)?.delete(run);
    this.updateGauges();
    this.schedulePump();
  }

  /** An agent is gone: its attempts end, and their tasks go back to the queue (this counts as a failure). */
  agentLost(agent: AgentState, reason: string): void {
    for (const run of this.runsByAgent.get(agent.id) ?? []) {
      run.abort.abort(new AttemptAborted(grpc.status.UNAVAILABLE, `agent ${agent.id} lost: ${reason}`, true));
    }
    this.runsByAgent.delete(agent.id);
    this.agentsChanged();
  }

  /** Cancels tasks: queued ones leave the queue, running attempts are cancelled on their agents. */
  cancel(tasks: Iterable<Task>, message: string): void {
    for (const t of tasks) {
      if (t.state === "queued") {
        t.state = "cancelled";
        this.countQueued(t, -1);
      } else if (t.state === "running") {
        t.state = "cancelled";
        this.leaveRunning(t);
        for (const r of t.runs) r.abort.abort(new AttemptAborted(grpc.status.CANCELLED, message, false));
      } else continue;
      this.dropCheckpoint(t);
      this.tasks.delete(t.id);
    }
    this.updateGauges();
    this.schedulePump();
  }

  /** Ends every running attempt (coordinator shutdown); the tasks stay unfinished in the store. */
  abortAll(message: string): void {
    this.paused = true;
    this.closing = true;
    for (const set of this.runsByAgent.values()) {
      for (const r of set) r.abort.abort(new AttemptAborted(grpc.status.UNAVAILABLE, message, false));
    }
  }

  close(): void {
    this.paused = true;
    if (this.tick) clearInterval(this.tick);
    if (this.wakeTimer) clearTimeout(this.wakeTimer);
  }
}

/**
 * Each stage of a job has an agent that holds its checkpoint and every file it runs, together: a job whose
 * upscaler is on one agent and model on another is accepted otherwise and then waits for an agent that
 * never comes. A pass that may switch to a refiner finishes where the refiner is, with the same files.
 * FAILED_PRECONDITION naming the field of the file the model's agents lack (the farm's layout, not the
 * request, is what would change). Draining agents count: their files come back with the agent.
 */
export function checkStagesPlaceable(p: GenerationParams, plan: HiresPlan | undefined, agents: readonly AgentState[]): void {
  const refiner = refinerCheckpoint(p);
  for (const stage of stageKinds(plan)) {
    const needs = auxiliaryNeeds(p, stage);
    const missing = new Map(agents.map((a) => [a, missingFile(a, p, needs)]));
    const first = stage === TaskStage.FULL || stage === TaskStage.FIRST_PASS;
    const models = [p.model === EXTRAS_MODEL || first ? p.model : secondPassModel(p)];
    const pass = samplingPass(stage);
    const switches =
      stage === TaskStage.FULL ? refinerInPass(p, "first") || refinerInPass(p, "second") : pass !== undefined && refinerInPass(p, pass);
    if (refiner !== undefined && switches) models.push(refiner);
    for (const model of models) {
      const offering = agents.filter((a) => offersModel(a, model));
      if (offering.length === 0) continue; // NOT_FOUND already, for the model itself
      // LoRAs merge into checkpoints' named weights; an exported ONNX folder has none (the agent refuses it),
      // so a stage that merges one needs an agent with the model as a checkpoint.
      const holders = needs.loras.length > 0 ? offering.filter((a) => a.models.get(model)?.format !== "diffusers-onnx") : offering;
      if (holders.length === 0) {
        throw new FarmError(
          grpc.status.FAILED_PRECONDITION,
          `"${model}" is an ONNX folder on every agent that has it, and LoRAs (here "${needs.loras[0]!.name}") merge into .safetensors checkpoints only: render with a checkpoint`,
          { field: model === p.model ? "model" : model === refiner ? "refiner_checkpoint" : "hr_checkpoint_name", retryable: false },
        );
      }
      if (holders.some((a) => missing.get(a) === undefined)) continue;
      const { what, field } = missing.get(holders[0]!)!;
      const where = agents
        .filter((a) => missing.get(a) === undefined)
        .map((a) => a.id)
        .sort();
      const holderIds = holders.map((a) => a.id).sort();
      const message =
        model === EXTRAS_MODEL
          ? `no agent has every file this Extras job runs: none with the others has ${what}`
          : `no agent has both checkpoint "${model}" (on ${holderIds.join(", ")}) and ${what}` +
            (where.length > 0 ? ` with the job's other files (those are on ${where.join(", ")})` : "") +
            `: put the file on an agent with the checkpoint, or render elsewhere`;
      throw new FarmError(grpc.status.FAILED_PRECONDITION, message, { field, retryable: false });
    }
  }
}
