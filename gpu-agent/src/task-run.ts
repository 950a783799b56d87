import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  FarmError,
  type Handover,
  type Image,
  type RefinerResume,
  type RunTaskResponseSchema,
  type TaskUsageSchema,
} from "@latentfarm/shared";
import * as grpc from "@grpc/grpc-js";

/** Longer than a coordinator restart (process start, JetStream scan) plus one heartbeat. */
export const DEFAULT_ORPHAN_GRACE_MS = 30_000;

export type RunTaskMessage = MessageInitShape<typeof RunTaskResponseSchema>;
/**
 * What a task produces: the final image, a Hires.fix stage's hand-over to the next stage, or, from an
 * agent without the job's refiner, its pass's switch for another agent to carry on from.
 */
export type TaskOutput =
  { case: "result"; value: Image } | { case: "handover"; value: Handover } | { case: "refinerSwitch"; value: RefinerResume };

/** How a render ended: its output and the agent's time for it, or its error. */
export type TaskOutcome = { output: TaskOutput; usage?: MessageInitShape<typeof TaskUsageSchema> } | { error: FarmError };

interface Subscriber {
  readonly queue: RunTaskMessage[];
  wake: (() => void) | undefined;
}

export interface TaskRunOptions {
  taskId: string;
  attempt: number;
  /** The request carried a refiner resume (RunTaskRequest.refiner_resume); default false. */
  resumed?: boolean;
  /**
   * How long the run goes on with nobody attached (its coordinator's stream broke), waiting for a
   * restarted coordinator to re-attach; after that it is cancelled. Also how long a finished
   * run's result is kept for a late re-attach.
   */
  orphanGraceMs: number;
  /** The run has ended and its retention is over: the owner forgets it. */
  onExpired: (run: TaskRun) => void;
}

/**
 * One task's render on this agent, decoupled from the RunTask calls that watch it. A coordinator
 * that restarts loses its streams but not the agents' work: the render keeps going for a grace
 * period, and a RunTask for the same task id attaches to it and receives the rest — the latest
 * step at once (after its warnings and checkpoints), then live progress, the agent's time for it (usage)
 * and the result. Every attached call sees the same outcome.
 */
export class TaskRun {
  readonly taskId: string;
  readonly abort = new AbortController();
  /** The newest attempt attached; CancelTask for an older attempt leaves the run alone. */
  attempt: number;
  /** Whether the run carries on from a refiner switch made elsewhere (RunTaskRequest.refiner_resume). */
  readonly resumed: boolean;
  private readonly subscribers = new Set<Subscriber>();
  private readonly warnings: RunTaskMessage[] = [];
  /** The pass's checkpoints so far, which a re-attaching coordinator needs from the first. */
  private readonly checkpoints: RunTaskMessage[] = [];
  private latestProgress: RunTaskMessage | undefined;
  private outcome: TaskOutcome | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly opts: TaskRunOptions) {
    this.taskId = opts.taskId;
    this.resumed = opts.resumed ?? false;
    this.attempt = opts.attempt;
  }

  get finished(): boolean {
    return this.outcome !== undefined;
  }

  get attached(): number {
    return this.subscribers.size;
  }

  progress(msg: RunTaskMessage): void {
    this.latestProgress = msg;
    this.broadcast(msg);
  }

  warning(msg: RunTaskMessage): void {
    this.warnings.push(msg);
    this.broadcast(msg);
  }

  checkpoint(msg: RunTaskMessage): void {
    this.checkpoints.push(msg);
    this.broadcast(msg);
  }

  /** The render ended; attached calls get its output or the error. */
  finish(outcome: TaskOutcome): void {
    if (this.outcome) return;
    this.outcome = outcome;
    for (const s of this.subscribers) s.wake?.();
    if (this.subscribers.size === 0) this.startTimer();
  }

  /** Stops the render now (CancelTask, drain, shutdown). */
  cancel(reason: FarmError): void {
    this.abort.abort(reason);
  }

  /**
   * Streams the run to one caller: warnings so far, the latest step, then everything live, then
   * the result (or throws the run's error). The caller leaving does not stop the run.
   */
  async *attach(signal: AbortSignal, attempt: number): AsyncGenerator<RunTaskMessage> {
    this.attempt = Math.max(this.attempt, attempt);
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    const sub: Subscriber = { queue: [...this.warnings, ...this.checkpoints], wake: undefined };
    if (this.latestProgress) sub.queue.push(this.latestProgress);
    this.subscribers.add(sub);
    const onAbort = (): void => sub.wake?.();
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        while (sub.queue.length > 0) yield sub.queue.shift()!;
        if (signal.aborted) throw FarmError.from(signal.reason ?? new FarmError(grpc.status.CANCELLED, "call cancelled"));
        if (this.outcome) break;
        await new Promise<void>((r) => (sub.wake = r));
        sub.wake = undefined;
      }
      const outcome = this.outcome;
      if ("error" in outcome) throw outcome.error;
      if (outcome.usage !== undefined) yield { kind: { case: "usage", value: outcome.usage } };
      yield { kind: outcome.output };
    } finally {
      signal.removeEventListener("abort", onAbort);
      this.subscribers.delete(sub);
      if (this.subscribers.size === 0) this.startTimer();
    }
  }

  /** Drops the retention timer (agent shutdown). */
  dispose(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private broadcast(msg: RunTaskMessage): void {
    for (const s of this.subscribers) {
      s.queue.push(msg);
      s.wake?.();
    }
  }

  private startTimer(): void {
    if (this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.subscribers.size > 0) return;
      if (!this.outcome) {
        this.abort.abort(
          new FarmError(grpc.status.CANCELLED, `no coordinator re-attached to task ${this.taskId} within ${this.opts.orphanGraceMs} ms`),
        );
        // The render's own end calls finish(), which starts the retention timer.
        return;
      }
      this.opts.onExpired(this);
    }, this.opts.orphanGraceMs);
    this.timer.unref();
  }
}
