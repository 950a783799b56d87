import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import {
  FarmError,
  JobState,
  RunTaskRequestSchema,
  statusName,
  type COORDINATOR_METRICS,
  type Logger,
  type MetricSet,
} from "@latentfarm/shared";
import type { AgentRegistry, AgentState } from "./agent-registry.js";
import { isFinal, type Job, type JobStore } from "./job-store.js";

export interface Task {
  readonly id: string;
  readonly job: Job;
  readonly imageIndex: number;
  readonly seed: bigint;
  readonly subseed: bigint;
  attempt: number;
  agentId: string | undefined;
  /** Agents this task already failed on; avoided when others can take it. */
  failedOn: Set<string>;
  abort: AbortController | undefined;
  lastStep: number;
  state: "queued" | "running" | "done" | "failed" | "cancelled";
}

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

/**
 * The task queue and placement: each image task goes to an agent with a free slot that offers the
 * model, preferring one that has it loaded, then the least busy. A task that fails retryably is
 * queued again, up to maxAttempts.
 */
export class Scheduler {
  private readonly queue: Task[] = [];
  readonly tasks = new Map<string, Task>();
  private pumping = false;
  private runningCount = 0;

  constructor(
    private readonly registry: AgentRegistry,
    private readonly store: JobStore,
    private readonly metrics: MetricSet<typeof COORDINATOR_METRICS>,
    private readonly opts: {
      logger: Logger;
      maxAttempts: number;
      onImage: (task: Task) => void;
      onTaskFailed: (task: Task, err: FarmError) => void;
    },
  ) {}

  enqueue(tasks: Task[]): void {
    for (const t of tasks) {
      this.tasks.set(t.id, t);
      this.queue.push(t);
    }
    this.updateGauges();
    this.pump();
  }

  private updateGauges(): void {
    this.metrics.queueDepth.set(this.queue.length);
    this.metrics.tasksRunning.set(this.runningCount);
  }

  /** Places as many queued tasks as agents have room for. */
  pump(): void {
    if (this.pumping || this.queue.length === 0) return;
    this.pumping = true;
    try {
      // Models some agent has room for; when none has, the queue scan is skipped entirely.
      const open = new Set<string>();
      for (const a of this.registry.list()) if (!a.info.draining && a.info.slots - a.inFlight > 0) for (const m of a.available) open.add(m);
      for (let i = 0; i < this.queue.length && open.size > 0; ) {
        const task = this.queue[i]!;
        if (task.state !== "queued" || isFinal(task.job.state)) {
          this.queue.splice(i, 1);
          continue;
        }
        const agent = open.has(task.job.params.model) ? this.pick(task) : undefined;
        if (!agent) {
          open.delete(task.job.params.model);
          i++;
          continue;
        }
        this.queue.splice(i, 1);
        this.dispatch(task, agent);
        if (agent.info.slots - agent.inFlight <= 0) {
          open.clear();
          for (const a of this.registry.list()) if (!a.info.draining && a.info.slots - a.inFlight > 0) for (const m of a.available) open.add(m);
        }
      }
    } finally {
      this.pumping = false;
      this.updateGauges();
    }
  }

  private pick(task: Task): AgentState | undefined {
    const model = task.job.params.model;
    let best: AgentState | undefined;
    let bestScore = -Infinity;
    for (const a of this.registry.list()) {
      if (a.info.draining || !a.available.has(model)) continue;
      const free = a.info.slots - a.inFlight;
      if (free <= 0) continue;
      let score = free / Math.max(1, a.info.slots);
      if (a.info.loadedModels.includes(model)) score += 10;
      if (task.failedOn.has(a.id)) score -= 100;
      if (score > bestScore) {
        best = a;
        bestScore = score;
      }
    }
    return best;
  }

  private dispatch(task: Task, agent: AgentState): void {
    task.attempt++;
    task.agentId = agent.id;
    task.state = "running";
    task.lastStep = 0;
    const abort = new AbortController();
    task.abort = abort;
    agent.inFlight++;
    this.runningCount++;
    this.metrics.tasksDispatched.inc();
    if (task.job.state === JobState.QUEUED) task.job.state = JobState.RUNNING;
    this.store.emit(task.job, {
      case: "placed",
      value: { taskId: task.id, imageIndex: task.imageIndex, agentId: agent.id, attempt: task.attempt },
    });
    const req = create(RunTaskRequestSchema, {
      taskId: task.id,
      jobId: task.job.id,
      params: task.job.params,
      imageIndex: task.imageIndex,
      seed: task.seed,
      subseed: task.subseed,
      attempt: task.attempt,
    });
    void (async () => {
      let result = false;
      try {
        for await (const msg of agent.client.runTask(req, { signal: abort.signal })) {
          if (msg.kind.case === "result") {
            const image = msg.kind.value;
            image.agentId = agent.id;
            image.index = task.imageIndex;
            task.job.images[task.imageIndex] = image;
            result = true;
          } else if (msg.kind.case === "warning") {
            this.store.emit(task.job, { case: "warning", value: msg.kind.value });
          }
        }
        if (!result) throw new FarmError(grpc.status.INTERNAL, `agent ${agent.id} ended task ${task.id} without a result`);
        task.state = "done";
        this.opts.onImage(task);
      } catch (err) {
        this.onAttemptFailed(task, agent, FarmError.from(abort.signal.aborted && abort.signal.reason instanceof FarmError ? abort.signal.reason : err));
      } finally {
        agent.inFlight = Math.max(0, agent.inFlight - 1);
        this.runningCount--;
        if (task.abort === abort) task.abort = undefined;
        if (isFinal(task.job.state)) this.tasks.delete(task.id);
        this.updateGauges();
        this.pump();
      }
    })();
  }

  private onAttemptFailed(task: Task, agent: AgentState, err: FarmError): void {
    if (task.state === "cancelled" || isFinal(task.job.state)) return;
    if (RETRY_ON.has(err.code) && task.attempt < this.opts.maxAttempts) {
      task.failedOn.add(agent.id);
      task.state = "queued";
      task.agentId = undefined;
      this.metrics.taskRetries.inc({ reason: statusName(err.code) });
      this.opts.logger.warn("task attempt failed; retrying", { taskId: task.id, agentId: agent.id, attempt: task.attempt, error: err.message });
      this.store.emit(task.job, {
        case: "retried",
        value: { taskId: task.id, imageIndex: task.imageIndex, reason: `${statusName(err.code)}: ${err.message}` },
      });
      this.queue.unshift(task);
      return;
    }
    task.state = "failed";
    this.opts.onTaskFailed(task, err);
  }

  /** An agent is gone: abort its calls so their tasks go back to the queue. */
  agentLost(agent: AgentState, reason: string): void {
    for (const t of this.tasks.values()) {
      if (t.agentId === agent.id && t.state === "running") {
        t.abort?.abort(new FarmError(grpc.status.UNAVAILABLE, `agent ${agent.id} lost: ${reason}`));
      }
    }
  }

  /** Cancels every task of a job: queued ones are dropped, running calls are cancelled. */
  cancelJob(job: Job): void {
    for (const t of this.tasks.values()) {
      if (t.job !== job) continue;
      if (t.state === "queued" || t.state === "running") {
        t.state = "cancelled";
        t.abort?.abort(new FarmError(grpc.status.CANCELLED, "job cancelled"));
      }
    }
    this.pump();
  }

  /** Drops bookkeeping of a finished job's tasks. */
  forgetJob(job: Job): void {
    for (const [id, t] of this.tasks) if (t.job === job && t.state !== "running") this.tasks.delete(id);
  }

  get queued(): number {
    return this.queue.length;
  }
}
