import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  FarmError,
  GenerationParamsSchema,
  ImageDoneSchema,
  ImageSchema,
  JobEventSchema,
  JobState,
  type GenerationParams,
  type Handover,
  type Image,
  type TaskAttempt,
  type JobEvent,
  type Logger,
} from "@latentfarm/shared";
import type { Task } from "./scheduler.js";
import type { HiresImage } from "./hires-stages.js";
import { ConflictError, DurableStore, isFinalStored, type ImageStatus, type StoredJob, type StoredJobState } from "./durable-store.js";

export type EventBody = NonNullable<MessageInitShape<typeof JobEventSchema>["event"]>;
export type { ImageStatus } from "./durable-store.js";

export interface JobSpec {
  readonly id: string;
  /** Validated, defaults filled, seeds resolved. */
  readonly params: GenerationParams;
  readonly tenant: string;
  readonly requestId: string;
  readonly imageCount: number;
  readonly createdAt: number;
  /** Unix ms; 0 = none. */
  readonly deadlineUnixMs: number;
  readonly priority: number;
}

interface StateWaiter {
  want: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** A job in memory: its spec, per-image state, event log and persistence bookkeeping. */
export class Job {
  state: JobState = JobState.QUEUED;
  readonly images: ImageStatus[];
  readonly attempts: number[];
  /** Failed attempts per image that count toward the delivery limit. */
  readonly failures: number[];
  /** Scheduler tasks of a live job, by image (images run as one task; see `hires` for split ones). */
  readonly tasks: Array<Task | undefined>;
  /** Stage state of each Hires.fix image still in progress, by image. */
  readonly hires: Array<HiresImage<Task> | undefined>;
  /** Agent of each image's latest attempt. */
  readonly agents: Array<string | undefined>;
  /** Per image not yet made, its attempts that have ended (its provenance, ImageProvenance). */
  readonly provenance = new Map<number, TaskAttempt[]>();
  readonly imageErrors = new Map<number, { code: string; message: string }>();
  error: { code: string; message: string; imageIndex: number } | undefined;
  finishedAt: number | undefined;
  readonly events: JobEvent[] = [];
  /** Per image, the log index of its latest step event with a live preview (see JobStore.emit). */
  readonly latestPreview = new Map<number, number>();
  /** Wakes Watch streams waiting for new events. */
  readonly waiters = new Set<() => void>();
  /** Scheduled by this coordinator (false: loaded read-only to serve Watch/Get of an old job). */
  live = false;
  /** Images whose end is being stored and not yet announced: the job cannot end before they are. */
  announcing = 0;
  /** A pending coalesced state write (see Coordinator.persistSoon). */
  persistTimer: NodeJS.Timeout | undefined;

  // Persistence: KV revision for CAS, events stored so far, and coalesced state writes.
  revision = 0;
  eventsStored = 0;
  eventFlush: Promise<void> | undefined;
  stateVersion = 0;
  stateWritten = 0;
  stateWriting: Promise<void> | undefined;
  readonly stateWaiters: StateWaiter[] = [];
  /** The spec's params as stored; they never change, so they are encoded once. */
  private paramsStored: string | undefined;

  constructor(readonly spec: JobSpec) {
    this.images = new Array<ImageStatus>(spec.imageCount).fill("q");
    this.attempts = new Array<number>(spec.imageCount).fill(0);
    this.failures = new Array<number>(spec.imageCount).fill(0);
    this.tasks = new Array<Task | undefined>(spec.imageCount).fill(undefined);
    this.hires = new Array<HiresImage<Task> | undefined>(spec.imageCount).fill(undefined);
    this.agents = new Array<string | undefined>(spec.imageCount).fill(undefined);
  }

  get id(): string {
    return this.spec.id;
  }

  get final(): boolean {
    return isFinal(this.state);
  }

  count(status: ImageStatus): number {
    let n = 0;
    for (const s of this.images) if (s === status) n++;
    return n;
  }

  /** Images not yet done, failed or cancelled. */
  get open(): number {
    let n = 0;
    for (const s of this.images) if (s === "q" || s === "r") n++;
    return n;
  }

  toStored(): StoredJob {
    const sparse = <T>(arr: ReadonlyArray<T>, keep: (v: T, i: number) => boolean): Record<string, T> | undefined => {
      let out: Record<string, T> | undefined;
      arr.forEach((v, i) => {
        if (keep(v, i)) (out ??= {})[String(i)] = v;
      });
      return out;
    };
    const s: StoredJob = {
      v: 1,
      params: (this.paramsStored ??= Buffer.from(toBinary(GenerationParamsSchema, this.spec.params)).toString("base64")),
      tenant: this.spec.tenant,
      requestId: this.spec.requestId,
      imageCount: this.spec.imageCount,
      createdAt: this.spec.createdAt,
      deadlineUnixMs: this.spec.deadlineUnixMs,
      priority: this.spec.priority,
      state: storedState(this.state),
      images: this.images.join(""),
      updatedAt: Date.now(),
    };
    const attempts = sparse(this.attempts, (v) => v > 0);
    if (attempts) s.attempts = attempts;
    const failures = sparse(this.failures, (v) => v > 0);
    if (failures) s.failures = failures;
    const agents = sparse(this.agents, (v, i) => v !== undefined && this.images[i] === "r") as Record<string, string> | undefined;
    if (agents) s.agents = agents;
    if (this.imageErrors.size > 0) s.imageErrors = Object.fromEntries([...this.imageErrors].map(([i, e]) => [String(i), e]));
    if (this.error) s.error = this.error;
    if (this.finishedAt !== undefined) s.finishedAt = this.finishedAt;
    return s;
  }

  static fromStored(id: string, s: StoredJob, revision: number): Job {
    const job = new Job({
      id,
      params: fromBinary(GenerationParamsSchema, Buffer.from(s.params, "base64")),
      tenant: s.tenant,
      requestId: s.requestId,
      imageCount: s.imageCount,
      createdAt: s.createdAt,
      deadlineUnixMs: s.deadlineUnixMs,
      priority: s.priority,
    });
    job.applyStored(s);
    job.revision = revision;
    return job;
  }

  /** Takes a stored record's state (after a restart, or a lost CAS race). */
  applyStored(s: StoredJob): void {
    this.state = jobState(s.state);
    for (let i = 0; i < this.images.length; i++) this.images[i] = (s.images[i] as ImageStatus | undefined) ?? "q";
    for (const [i, n] of Object.entries(s.attempts ?? {})) this.attempts[Number(i)] = Math.max(this.attempts[Number(i)] ?? 0, n);
    for (const [i, n] of Object.entries(s.failures ?? {})) this.failures[Number(i)] = Math.max(this.failures[Number(i)] ?? 0, n);
    for (const [i, a] of Object.entries(s.agents ?? {})) this.agents[Number(i)] = a;
    for (const [i, e] of Object.entries(s.imageErrors ?? {})) this.imageErrors.set(Number(i), e);
    this.error = s.error;
    this.finishedAt = s.finishedAt;
  }
}

export const isFinal = (s: JobState): boolean => s === JobState.SUCCEEDED || s === JobState.FAILED || s === JobState.CANCELLED;

function storedState(s: JobState): StoredJobState {
  switch (s) {
    case JobState.SUCCEEDED:
      return "succeeded";
    case JobState.FAILED:
      return "failed";
    case JobState.CANCELLED:
      return "cancelled";
    case JobState.RUNNING:
      return "running";
    default:
      return "queued";
  }
}

function jobState(s: StoredJobState): JobState {
  return {
    queued: JobState.QUEUED,
    running: JobState.RUNNING,
    succeeded: JobState.SUCCEEDED,
    failed: JobState.FAILED,
    cancelled: JobState.CANCELLED,
  }[s];
}

const TERMINAL_EVENTS = new Set(["done", "failed", "cancelled"]);

/** Finished images by job and index, bounded by bytes (least recently used go first). */
class ImageCache {
  private readonly map = new Map<string, Image>();
  private bytes = 0;
  constructor(private readonly maxBytes: number) {}

  get(key: string): Image | undefined {
    const v = this.map.get(key);
    if (v) {
      this.map.delete(key);
      this.map.set(key, v);
    }
    return v;
  }

  set(key: string, image: Image): void {
    const old = this.map.get(key);
    if (old) {
      this.bytes -= old.png.length;
      this.map.delete(key);
    }
    this.map.set(key, image);
    this.bytes += image.png.length;
    for (const [k, v] of this.map) {
      if (this.bytes <= this.maxBytes || this.map.size <= 1) break;
      this.map.delete(k);
      this.bytes -= v.png.length;
    }
  }

  delete(key: string): void {
    const old = this.map.get(key);
    if (old) {
      this.bytes -= old.png.length;
      this.map.delete(key);
    }
  }
}

export interface JobStoreOptions {
  logger: Logger;
  /** Finished jobs kept in memory for fast Watch/Get; older ones are read back from JetStream. */
  maxFinishedInMemory?: number;
  finishedMaxAgeMs?: number;
  imageCacheBytes?: number;
  /** Another writer finished the job first (a CAS race was lost): stop working on it. */
  onRemoteFinal?: (job: Job) => void;
  /** A JetStream write failed and will be retried. */
  onStoreRetry?: (what: "state" | "events" | "image") => void;
  /** How long events gather before they are written (and so before Watch sends them); default 2 ms. */
  eventFlushDelayMs?: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Jobs and their event logs: the live ones in memory, everything durable on JetStream when a
 * DurableStore is given (without one the coordinator keeps state in memory only). State writes are
 * coalesced per job (one CAS write carries every change made while the previous was in flight),
 * and events are appended in batches, in order, retried until stored.
 */
export class JobStore {
  private readonly jobs = new Map<string, Job>();
  private readonly byRequestId = new Map<string, string>();
  private readonly finishedOrder: string[] = [];
  private finishedHead = 0;
  private readonly loading = new Map<string, Promise<Job | undefined>>();
  private readonly images: ImageCache;
  private readonly maxFinished: number;
  private readonly maxAgeMs: number;
  private readonly flushDelayMs: number;
  private nextTick: Promise<void> | undefined;
  private closed = false;

  constructor(
    readonly durable: DurableStore | undefined,
    private readonly opts: JobStoreOptions,
  ) {
    this.images = new ImageCache(opts.imageCacheBytes ?? 256 * 1024 * 1024);
    this.maxFinished = opts.maxFinishedInMemory ?? 1000;
    this.maxAgeMs = opts.finishedMaxAgeMs ?? 600_000;
    this.flushDelayMs = opts.eventFlushDelayMs ?? 2;
  }

  private reqKey(tenant: string, requestId: string): string {
    return `${tenant}\u0000${requestId}`;
  }

  /**
   * Stores a new job durably. With a request id, the id is claimed first: a retried Submit (even
   * to a restarted coordinator) finds the claim and gets the original job back.
   */
  async create(spec: JobSpec): Promise<{ job: Job; created: boolean }> {
    let id = spec.id;
    if (spec.requestId) {
      const known = this.byRequestId.get(this.reqKey(spec.tenant, spec.requestId));
      const existing = known === undefined ? undefined : this.jobs.get(known);
      if (existing) return { job: existing, created: false };
      if (this.durable) id = await this.durable.claimRequest(spec.tenant, spec.requestId, spec.id);
      if (id !== spec.id) {
        const prior = await this.open(id);
        if (prior) return { job: prior, created: false };
        // The claim's owner died before storing its job: store it under the claimed id now.
      }
    }
    const job = new Job({ ...spec, id });
    job.live = true;
    if (this.durable) {
      const stored = job.toStored();
      let r: { created: boolean; revision: number };
      try {
        r = await this.durable.createJob(id, stored);
      } catch (err) {
        // A write that timed out may still have landed: the record decides.
        const back = await this.durable.getJob(id).catch(() => undefined);
        if (!back)
          throw FarmError.from(err).code === grpc.status.INTERNAL
            ? new FarmError(grpc.status.UNAVAILABLE, `job store unavailable: ${String(err)}`)
            : err;
        r =
          back.job.params === stored.params && back.job.createdAt === stored.createdAt
            ? { created: true, revision: back.revision }
            : { created: false, revision: 0 };
      }
      if (!r.created) {
        const prior = await this.open(id);
        if (!prior) throw new Error(`job ${id} exists but cannot be read back`);
        return { job: prior, created: false };
      }
      job.revision = r.revision;
    }
    this.add(job);
    return { job, created: true };
  }

  /** Puts a job (new or resumed) into memory. */
  add(job: Job): void {
    this.jobs.set(job.id, job);
    if (job.spec.requestId) this.byRequestId.set(this.reqKey(job.spec.tenant, job.spec.requestId), job.id);
    if (job.final) this.markFinished(job);
  }

  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  /** A job from memory, or read back from JetStream (events repaired if a crash cut them short). */
  open(id: string): Promise<Job | undefined> {
    const inMemory = this.jobs.get(id);
    if (inMemory) return Promise.resolve(inMemory);
    if (!this.durable) return Promise.resolve(undefined);
    let p = this.loading.get(id);
    if (!p) {
      p = this.load(id).finally(() => this.loading.delete(id));
      this.loading.set(id, p);
    }
    return p;
  }

  private async load(id: string): Promise<Job | undefined> {
    const stored = await this.durable!.getJob(id);
    if (!stored) return undefined;
    const job = Job.fromStored(id, stored.job, stored.revision);
    await this.restoreEvents(job);
    const again = this.jobs.get(id);
    if (again) return again;
    this.add(job);
    if (job.final) await this.repairEvents(job);
    return job;
  }

  /** Reads a job's stored events back into memory; later events continue the sequence. */
  async restoreEvents(job: Job): Promise<void> {
    if (!this.durable) return;
    const events = await this.durable.readEvents(job.id);
    job.events.length = 0;
    job.latestPreview.clear();
    for (const e of events) {
      // Sequence numbers are gapless from 1; a hole means a lost batch, and what follows it cannot be trusted.
      if (Number(e.sequence) !== job.events.length + 1) break;
      job.events.push(e);
    }
    job.eventsStored = job.events.length;
    // A log read back keeps in memory only each image's latest preview, as one written here does.
    job.events.forEach((e, at) => {
      if (e.event.case === "step" && e.event.value.previewPng.length > 0) this.keepLatestPreview(job, e.event.value.imageIndex, at);
    });
  }

  /**
   * Makes the event log agree with the stored state after a crash between a state write and its
   * event: an image event for every done image, and the terminal event of a finished job.
   */
  async repairEvents(job: Job): Promise<number[]> {
    const announced = new Set<number>();
    const cancelledOrFailed = new Set<number>();
    let terminal = false;
    for (const e of job.events) {
      if (e.event.case === "image" && e.event.value.image) announced.add(e.event.value.image.index);
      if (e.event.case === "imageCancelled" || e.event.case === "imageFailed") cancelledOrFailed.add(e.event.value.imageIndex);
      if (TERMINAL_EVENTS.has(e.event.case ?? "")) terminal = true;
    }
    // A stored terminal event closes the log: everything before it was stored before it.
    if (terminal) return [];
    if (job.events.length === 0) this.emit(job, { case: "queued", value: { imageCount: job.spec.imageCount } });
    const lost: number[] = [];
    for (let i = 0; i < job.images.length; i++) {
      if (job.images[i] !== "d" || announced.has(i)) continue;
      const image = await this.image(job.id, i);
      if (image) this.emit(job, { case: "image", value: { image } });
      else lost.push(i);
    }
    for (const [i, e] of job.imageErrors) {
      if (job.images[i] === "f" && !cancelledOrFailed.has(i))
        this.emit(job, { case: "imageFailed", value: { imageIndex: i, code: e.code, message: e.message, attempts: job.attempts[i] ?? 0 } });
    }
    if (job.final && !terminal) this.emitTerminal(job);
    return lost;
  }

  emitTerminal(job: Job): void {
    if (job.state === JobState.SUCCEEDED) this.emit(job, { case: "done", value: { imageCount: job.count("d") } });
    else if (job.state === JobState.CANCELLED) this.emit(job, { case: "cancelled", value: {} });
    else
      this.emit(job, {
        case: "failed",
        value: { code: job.error?.code ?? "UNKNOWN", message: job.error?.message ?? "", imageIndex: job.error?.imageIndex ?? -1 },
      });
  }

  /**
   * A preview is worth showing until the next one of its image (the event at `at`): the log keeps that image's latest in
   * memory, and an earlier one stays only in the stored events (a Watch that replays the log sees the
   * step without its picture). Only events already stored are rewritten, so storage sees each as emitted.
   */
  private keepLatestPreview(job: Job, imageIndex: number, at = job.events.length - 1): void {
    const previous = job.latestPreview.get(imageIndex);
    job.latestPreview.set(imageIndex, at);
    if (previous === undefined || previous >= job.eventsStored) return;
    const e = job.events[previous]!;
    if (e.event.case !== "step") return;
    job.events[previous] = create(JobEventSchema, {
      ...e,
      event: { case: "step", value: { ...e.event.value, previewPng: new Uint8Array(0) } },
    });
  }

  byRequest(tenant: string, requestId: string): Job | undefined {
    const id = this.byRequestId.get(this.reqKey(tenant, requestId));
    return id === undefined ? undefined : this.jobs.get(id);
  }

  /** Appends an event to the job's log, wakes its watchers, and queues it for storage. */
  emit(job: Job, body: EventBody): JobEvent {
    let event = body;
    if (body.case === "image" && body.value.image) {
      // The log keeps image metadata; the PNG lives in the image cache and the object store.
      const full = create(ImageSchema, body.value.image);
      this.images.set(`${job.id}.${full.index}`, full);
      event = { case: "image", value: { image: { ...full, png: new Uint8Array(0) } } };
    }
    const e = create(JobEventSchema, {
      jobId: job.id,
      sequence: BigInt(job.events.length + 1),
      timeUnixMs: BigInt(Date.now()),
      event,
    });
    job.events.push(e);
    if (e.event.case === "step" && e.event.value.previewPng.length > 0) this.keepLatestPreview(job, e.event.value.imageIndex);
    if (this.durable) this.flushEvents(job);
    else {
      job.eventsStored = job.events.length;
      this.wake(job);
    }
    return e;
  }

  /**
   * A short shared wait before JetStream writes. Every writer waiting on it resumes in the same
   * turn of the event loop, so the NATS client sends all their messages in one socket write
   * instead of one each: on a busy coordinator the system calls, not JetStream, were the cost.
   */
  private tick(): Promise<void> {
    if (!this.nextTick) {
      this.nextTick = new Promise<void>((resolve) =>
        setTimeout(() => {
          this.nextTick = undefined;
          resolve();
        }, this.flushDelayMs),
      );
    }
    return this.nextTick;
  }

  private wake(job: Job): void {
    for (const w of job.waiters) w();
    job.waiters.clear();
  }

  private flushEvents(job: Job): void {
    if (!this.durable || job.eventFlush) return;
    const durable = this.durable;
    job.eventFlush = (async () => {
      // Wait for the shared write tick: events emitted close together share a message, and the
      // writes of all jobs go out together (see tick()).
      await this.tick();
      let backoff = 50;
      while (job.eventsStored < job.events.length) {
        // A batch keeps its bounds across retries: its message id is its first sequence number.
        const [batch] = DurableStore.batches(job.events.slice(job.eventsStored, job.eventsStored + 512));
        for (;;) {
          try {
            await durable.publishEvents(job.id, batch!);
            break;
          } catch (err) {
            if (this.closed) return;
            this.opts.onStoreRetry?.("events");
            this.opts.logger.warn("storing job events failed; retrying", { jobId: job.id, error: String(err) });
            await sleep(backoff);
            backoff = Math.min(backoff * 2, 2000);
          }
        }
        backoff = 50;
        job.eventsStored += batch!.length;
        this.wake(job);
      }
    })().finally(() => {
      job.eventFlush = undefined;
      if (job.eventsStored < job.events.length && !this.closed) this.flushEvents(job);
      else this.maybeEvict();
    });
  }

  /**
   * Writes the job's current state with compare-and-swap; resolves once a write that includes every
   * change made before this call is stored. Concurrent calls share writes.
   */
  persist(job: Job): Promise<void> {
    if (!this.durable) return Promise.resolve();
    job.stateVersion++;
    const want = job.stateVersion;
    const p = new Promise<void>((resolve, reject) => job.stateWaiters.push({ want, resolve, reject }));
    this.writeState(job);
    return p;
  }

  private writeState(job: Job): void {
    if (job.stateWriting) return;
    const durable = this.durable!;
    job.stateWriting = (async () => {
      let backoff = 50;
      while (job.stateWritten < job.stateVersion) {
        await this.tick();
        const version = job.stateVersion;
        try {
          job.revision = await durable.updateJob(job.id, job.toStored(), job.revision);
          job.stateWritten = version;
          backoff = 50;
          for (let i = job.stateWaiters.length - 1; i >= 0; i--) {
            const w = job.stateWaiters[i]!;
            if (w.want <= version) {
              job.stateWaiters.splice(i, 1);
              w.resolve();
            }
          }
        } catch (err) {
          if (err instanceof ConflictError) {
            await this.mergeRemote(job);
            continue;
          }
          if (this.closed) break;
          this.opts.onStoreRetry?.("state");
          this.opts.logger.warn("storing job state failed; retrying", { jobId: job.id, error: String(err) });
          await sleep(backoff);
          backoff = Math.min(backoff * 2, 2000);
        }
      }
    })().finally(() => {
      job.stateWriting = undefined;
      if (this.closed) {
        for (const w of job.stateWaiters.splice(0)) w.reject(new Error("coordinator is shutting down"));
      } else if (job.stateWritten < job.stateVersion) this.writeState(job);
      else this.maybeEvict();
    });
  }

  /**
   * Someone else wrote the record (another coordinator, or a stale one still running). Finished
   * images and terminal states are kept from both sides; a job the other side finished stays finished.
   */
  private async mergeRemote(job: Job): Promise<void> {
    const remote = await this.durable!.getJob(job.id);
    if (!remote) return;
    const r = remote.job;
    job.revision = remote.revision;
    this.opts.logger.warn("job record changed under us; merging", { jobId: job.id, remoteState: r.state });
    for (let i = 0; i < job.images.length; i++) {
      const theirs = r.images[i] as ImageStatus | undefined;
      if (theirs === "d" || ((theirs === "f" || theirs === "c") && job.images[i] !== "d")) job.images[i] = theirs;
    }
    if (isFinalStored(r.state) && !job.final) {
      job.applyStored(r);
      this.opts.onRemoteFinal?.(job);
    }
  }

  /** A finished image: cached for watchers, stored in the object store. */
  async storeImage(job: Job, image: Image): Promise<void> {
    this.images.set(`${job.id}.${image.index}`, image);
    if (!this.durable) return;
    let backoff = 50;
    await this.tick();
    for (;;) {
      try {
        await this.durable.putImage(job.id, image);
        return;
      } catch (err) {
        if (this.closed) throw err;
        this.opts.onStoreRetry?.("image");
        this.opts.logger.warn("storing image failed; retrying", { jobId: job.id, index: image.index, error: String(err) });
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 2000);
      }
    }
  }

  /**
   * Keeps a stage's hand-over durably before the stages after it start (as an image is stored
   * before it is announced): a crash after this point re-runs only later stages.
   */
  async storeHandover(job: Job, index: number, name: string, handover: Handover): Promise<void> {
    if (!this.durable) return;
    let backoff = 50;
    await this.tick();
    for (;;) {
      try {
        await this.durable.putHandover(job.id, index, name, handover);
        return;
      } catch (err) {
        if (this.closed) throw err;
        this.opts.onStoreRetry?.("image");
        this.opts.logger.warn("storing a hand-over failed; retrying", { jobId: job.id, index, name, error: String(err) });
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 2000);
      }
    }
  }

  /** A stored hand-over (after a restart), or undefined. */
  async handover(jobId: string, index: number, name: string): Promise<Handover | undefined> {
    return this.durable?.getHandover(jobId, index, name);
  }

  /** Drops an image's hand-overs once it ended; best effort (the object store's TTL removes leftovers). */
  dropHandovers(jobId: string, index: number, names: readonly string[]): void {
    this.durable?.deleteHandovers(jobId, index, names).catch((err: unknown) => {
      this.opts.logger.debug("hand-overs not deleted; the store's TTL will", { jobId, index, error: String(err) });
    });
  }

  /** A finished image with its PNG, from the cache or the object store. */
  async image(jobId: string, index: number): Promise<Image | undefined> {
    const cached = this.images.get(`${jobId}.${index}`);
    if (cached) return cached;
    const stored = await this.durable?.getImage(jobId, index);
    if (stored) this.images.set(`${jobId}.${index}`, stored);
    return stored;
  }

  /**
   * Events after a sequence number, then live ones, until the job's final event. Only stored events
   * are sent: an event a client saw is never lost in a crash, so sequence numbers after a restart
   * continue where every client left off.
   */
  async *watch(job: Job, afterSequence: bigint, signal: AbortSignal): AsyncGenerator<JobEvent> {
    let next = Number(afterSequence);
    for (;;) {
      while (next < job.eventsStored) {
        const e = job.events[next++]!;
        if (e.event.case === "image" && e.event.value.image && e.event.value.image.png.length === 0) {
          const meta = e.event.value.image;
          const full = await this.image(job.id, meta.index);
          yield create(JobEventSchema, { ...e, event: { case: "image", value: create(ImageDoneSchema, { image: full ?? meta }) } });
        } else {
          yield e;
        }
        if (signal.aborted) return;
      }
      if (job.final && next >= job.eventsStored && next >= job.events.length && TERMINAL_EVENTS.has(job.events.at(-1)?.event.case ?? ""))
        return;
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

  markFinished(job: Job): void {
    this.finishedOrder.push(job.id);
    this.maybeEvict();
  }

  /** Drops finished jobs from memory (oldest first) once everything about them is stored. */
  private maybeEvict(): void {
    const now = Date.now();
    while (this.finishedHead < this.finishedOrder.length) {
      const liveFinished = this.finishedOrder.length - this.finishedHead;
      const id = this.finishedOrder[this.finishedHead]!;
      const job = this.jobs.get(id);
      if (job && job.final) {
        const old = now - (job.finishedAt ?? now) > this.maxAgeMs;
        if (liveFinished <= this.maxFinished && !old) break;
        // Without JetStream the memory copy is the only one; it goes when over the bound all the same.
        const settled =
          !job.eventFlush && !job.stateWriting && job.eventsStored === job.events.length && job.stateWritten === job.stateVersion;
        if (this.durable && !settled) break;
        this.jobs.delete(id);
        if (job.spec.requestId && this.byRequestId.get(this.reqKey(job.spec.tenant, job.spec.requestId)) === id) {
          this.byRequestId.delete(this.reqKey(job.spec.tenant, job.spec.requestId));
        }
        for (let i = 0; i < job.images.length; i++) this.images.delete(`${id}.${i}`);
      }
      this.finishedHead++;
    }
    if (this.finishedHead > 1024 && this.finishedHead * 2 > this.finishedOrder.length) {
      this.finishedOrder.splice(0, this.finishedHead);
      this.finishedHead = 0;
    }
  }

  /** Waits until every queued state write and event is stored (graceful drain), up to a time limit. */
  async flush(timeoutMs = 10_000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const pending: Array<Promise<void>> = [];
      for (const j of this.jobs.values()) {
        if (j.eventFlush) pending.push(j.eventFlush);
        if (j.stateWriting) pending.push(j.stateWriting);
      }
      if (pending.length === 0) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await Promise.race([Promise.allSettled(pending), sleep(left)]);
    }
  }

  close(): void {
    this.closed = true;
  }

  get size(): number {
    return this.jobs.size;
  }

  *all(): IterableIterator<Job> {
    yield* this.jobs.values();
  }
}
