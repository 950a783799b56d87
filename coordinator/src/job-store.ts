import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  JobEventSchema,
  JobState,
  type GenerationParams,
  type Image,
  type JobEvent,
} from "@latentfarm/shared";

type EventBody = NonNullable<MessageInitShape<typeof JobEventSchema>["event"]>;

export interface Job {
  readonly id: string;
  readonly params: GenerationParams;
  readonly requestId: string;
  readonly tenant: string;
  readonly imageCount: number;
  readonly createdAt: number;
  state: JobState;
  images: Array<Image | undefined>;
  events: JobEvent[];
  errorCode: string;
  errorMessage: string;
  finishedAt?: number;
  /** Wakes Watch streams waiting for new events. */
  waiters: Set<() => void>;
}

export const isFinal = (s: JobState): boolean =>
  s === JobState.SUCCEEDED || s === JobState.FAILED || s === JobState.CANCELLED;

/**
 * Jobs and their event logs, in memory (the durability issue moves this onto JetStream). Finished
 * jobs are kept for a retention period and a count bound, so memory stays bounded.
 */
export class JobStore {
  private readonly jobs = new Map<string, Job>();
  private readonly byRequestId = new Map<string, string>();

  constructor(private readonly retention: { maxFinished: number; maxAgeMs: number } = { maxFinished: 10_000, maxAgeMs: 3_600_000 }) {}

  add(job: Omit<Job, "events" | "waiters" | "images" | "state" | "errorCode" | "errorMessage">): Job {
    const full: Job = {
      ...job,
      state: JobState.QUEUED,
      images: new Array<Image | undefined>(job.imageCount).fill(undefined),
      events: [],
      errorCode: "",
      errorMessage: "",
      waiters: new Set(),
    };
    this.jobs.set(job.id, full);
    if (job.requestId) this.byRequestId.set(`${job.tenant}\u0000${job.requestId}`, job.id);
    this.prune();
    return full;
  }

  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  byRequest(tenant: string, requestId: string): Job | undefined {
    const id = this.byRequestId.get(`${tenant}\u0000${requestId}`);
    return id === undefined ? undefined : this.jobs.get(id);
  }

  emit(job: Job, event: EventBody): JobEvent {
    const e = create(JobEventSchema, {
      jobId: job.id,
      sequence: BigInt(job.events.length + 1),
      timeUnixMs: BigInt(Date.now()),
      event,
    });
    job.events.push(e);
    for (const w of job.waiters) w();
    job.waiters.clear();
    return e;
  }

  /** Events after a sequence number, then live ones, until the job's final event. */
  async *watch(job: Job, afterSequence: bigint, signal: AbortSignal): AsyncGenerator<JobEvent> {
    let next = Number(afterSequence);
    for (;;) {
      while (next < job.events.length) {
        const e = job.events[next++]!;
        yield e;
      }
      if (isFinal(job.state) && next >= job.events.length) return;
      if (signal.aborted) return;
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          signal.removeEventListener("abort", wake);
          job.waiters.delete(wake);
          resolve();
        };
        job.waiters.add(wake);
        signal.addEventListener("abort", wake, { once: true });
      });
    }
  }

  private prune(): void {
    const now = Date.now();
    const finished = [...this.jobs.values()].filter((j) => isFinal(j.state));
    const excess = finished.length - this.retention.maxFinished;
    finished.sort((a, b) => (a.finishedAt ?? 0) - (b.finishedAt ?? 0));
    finished.forEach((j, i) => {
      if (i < excess || now - (j.finishedAt ?? now) > this.retention.maxAgeMs) {
        this.jobs.delete(j.id);
        if (j.requestId) this.byRequestId.delete(`${j.tenant}\u0000${j.requestId}`);
      }
    });
  }

  get size(): number {
    return this.jobs.size;
  }
}
