import { createHash } from "node:crypto";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { headers, nuid, type NatsConnection } from "@nats-io/transport-node";
import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiError,
  RetentionPolicy,
  StorageType,
  jetstream,
  jetstreamManager,
  type JetStreamClient,
  type JetStreamManager,
  type StreamConfig,
} from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import { Objm, type ObjectStore } from "@nats-io/obj";
import {
  HandoverSchema,
  ImageSchema,
  JobEventBatchSchema,
  JobEventSchema,
  subjects,
  type Handover,
  type Image,
  type JobEvent,
  type Logger,
} from "@latentfarm/shared";

/** Per-image state as stored: queued, running, done, failed, cancelled. */
export type ImageStatus = "q" | "r" | "d" | "f" | "c";
export type StoredJobState = "queued" | "running" | "succeeded" | "failed" | "cancelled";

/**
 * A job as stored under `job.<id>` in the jobs bucket: the immutable spec and the mutable state in
 * one value, so creating a job is one atomic write and every transition is one compare-and-swap.
 */
export interface StoredJob {
  v: 1;
  /** GenerationParams, protobuf binary in base64, seeds already resolved (so a re-run is identical). */
  params: string;
  tenant: string;
  requestId: string;
  imageCount: number;
  createdAt: number;
  deadlineUnixMs: number;
  priority: number;
  state: StoredJobState;
  /** One ImageStatus character per image. */
  images: string;
  /** Attempts started per image (sparse: index → count). */
  attempts?: Record<string, number>;
  /** Failed attempts per image that count toward the delivery limit (sparse). */
  failures?: Record<string, number>;
  /** Agent of the latest attempt of each running image (sparse), preferred when work resumes. */
  agents?: Record<string, string>;
  /** Last error of each failed image (sparse). */
  imageErrors?: Record<string, { code: string; message: string }>;
  error?: { code: string; message: string; imageIndex: number };
  finishedAt?: number;
  updatedAt: number;
}

export const isFinalStored = (s: StoredJobState): boolean => s === "succeeded" || s === "failed" || s === "cancelled";

export interface DurableStoreConfig {
  /** Stream replicas: 1 on a single test server, 3 (or 5) in production (see DURABILITY.md). */
  replicas: number;
  /** How long finished images stay in the object store. */
  imageTtlMs: number;
  /** How long job records and event logs are kept after their last write. */
  jobRetentionMs: number;
  /** Caps on the stored bytes; -1 = none (then TTLs alone bound the store). */
  imageMaxBytes: number;
  eventsMaxBytes: number;
  /** Names of the bucket/stream set, so two farms can share one NATS account. */
  prefix: string;
  /**
   * Time limit of one JetStream operation. Writes are retried (idempotently) after it, so it is
   * also how long work stalls when a server dies with requests in flight.
   */
  opTimeoutMs: number;
}

export const DEFAULT_DURABLE_CONFIG: DurableStoreConfig = {
  replicas: 1,
  imageTtlMs: 24 * 3_600_000,
  jobRetentionMs: 7 * 24 * 3_600_000,
  imageMaxBytes: -1,
  eventsMaxBytes: -1,
  prefix: "lf",
  opTimeoutMs: 3000,
};

/** Thrown when a compare-and-swap lost: someone else wrote the key first. */
export class ConflictError extends Error {
  constructor(readonly key: string) {
    super(`concurrent write to ${key}`);
    this.name = "ConflictError";
  }
}

/** Thrown at startup when the server's stored config is not what durability needs. */
export class StoreConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "StoreConfigError";
  }
}

// JetStream's "wrong last sequence" API error: the revision a CAS expected is stale.
const WRONG_LAST_SEQUENCE = 10071;
const isCasFailure = (err: unknown): boolean =>
  err instanceof JetStreamApiError && (err.code === WRONG_LAST_SEQUENCE || /wrong last sequence/i.test(err.message));

const ms2ns = (ms: number): number => Math.round(ms * 1e6);
// NATS max_payload is 1 MiB by default; event batches stay well under it.
const MAX_BATCH_BYTES = 512 * 1024;

/**
 * What the coordinator keeps on JetStream: a KV bucket of jobs (spec + state, CAS transitions) and
 * request-id claims, an object store of finished images with a TTL, and a stream of job events
 * that Watch replays from any sequence number.
 */
export class DurableStore {
  private constructor(
    private readonly maxPayload: number,
    private readonly js: JetStreamClient,
    private readonly jsm: JetStreamManager,
    private readonly kv: KV,
    private readonly images: ObjectStore,
    readonly names: { jobs: string; jobsStream: string; images: string; imagesStream: string; events: string },
  ) {}

  /** Creates or updates the buckets and stream, then checks the server kept every setting. */
  static async open(nc: NatsConnection, cfg: DurableStoreConfig, logger: Logger): Promise<DurableStore> {
    const js = jetstream(nc, { timeout: cfg.opTimeoutMs });
    const jsm = await jetstreamManager(nc, { timeout: Math.max(cfg.opTimeoutMs, 5000) });
    const names = {
      jobs: `${cfg.prefix}_jobs`,
      jobsStream: `KV_${cfg.prefix}_jobs`,
      images: `${cfg.prefix}_images`,
      imagesStream: `OBJ_${cfg.prefix}_images`,
      events: `${cfg.prefix.toUpperCase()}_EVENTS`,
    };
    const version = nc.info?.version ?? "unknown";

    const jobsWanted: Partial<StreamConfig> = {
      max_age: ms2ns(cfg.jobRetentionMs),
      num_replicas: cfg.replicas,
      max_msgs_per_subject: 1,
      storage: StorageType.File,
      discard: DiscardPolicy.New,
      allow_rollup_hdrs: true,
    };
    if (!(await streamExists(jsm, names.jobsStream))) {
      await new Kvm(js).create(names.jobs, { history: 1, replicas: cfg.replicas, ttl: cfg.jobRetentionMs, storage: StorageType.File });
    }
    await ensureStream(jsm, names.jobsStream, jobsWanted, version, logger);
    const kv = await new Kvm(js).open(names.jobs);

    const imagesWanted: Partial<StreamConfig> = {
      max_age: ms2ns(cfg.imageTtlMs),
      num_replicas: cfg.replicas,
      max_bytes: cfg.imageMaxBytes,
      storage: StorageType.File,
      allow_rollup_hdrs: true,
    };
    if (!(await streamExists(jsm, names.imagesStream))) {
      await new Objm(js).create(names.images, {
        ttl: ms2ns(cfg.imageTtlMs),
        replicas: cfg.replicas,
        max_bytes: cfg.imageMaxBytes,
        storage: StorageType.File,
      });
    }
    await ensureStream(jsm, names.imagesStream, imagesWanted, version, logger);
    const images = await new Objm(js).open(names.images);

    const eventsWanted: Partial<StreamConfig> = {
      subjects: [subjects.allJobEvents],
      retention: RetentionPolicy.Limits,
      storage: StorageType.File,
      num_replicas: cfg.replicas,
      max_age: ms2ns(cfg.jobRetentionMs),
      max_bytes: cfg.eventsMaxBytes,
      // Retried publishes carry the same id and are stored once.
      duplicate_window: ms2ns(120_000),
      max_msg_size: 1024 * 1024,
      discard: DiscardPolicy.Old,
    };
    if (!(await streamExists(jsm, names.events))) await jsm.streams.add({ name: names.events, ...eventsWanted });
    await ensureStream(jsm, names.events, eventsWanted, version, logger);
    return new DurableStore(nc.info?.max_payload ?? 1024 * 1024, js, jsm, kv, images, names);
  }

  private key(jobId: string): string {
    return `job.${jobId}`;
  }

  /** Creates a job; false if the id is taken (the caller lost a race for a request id). */
  async createJob(jobId: string, job: StoredJob): Promise<{ created: boolean; revision: number }> {
    try {
      const revision = await this.kv.create(this.key(jobId), JSON.stringify(job));
      return { created: true, revision };
    } catch (err) {
      if (isCasFailure(err)) return { created: false, revision: 0 };
      throw err;
    }
  }

  async getJob(jobId: string): Promise<{ job: StoredJob; revision: number } | undefined> {
    const e = await this.kv.get(this.key(jobId));
    if (!e || e.operation !== "PUT" || e.value.length === 0) return undefined;
    return { job: e.json<StoredJob>(), revision: e.revision };
  }

  /** Compare-and-swap: writes only if the stored revision is still `revision`. */
  async updateJob(jobId: string, job: StoredJob, revision: number): Promise<number> {
    try {
      return await this.kv.update(this.key(jobId), JSON.stringify(job), revision);
    } catch (err) {
      if (isCasFailure(err)) throw new ConflictError(this.key(jobId));
      throw err;
    }
  }

  /**
   * Claims a client request id for a job id; returns the job id that holds the claim (ours, or an
   * earlier Submit's). Tenant and request id are hashed: they are free text, keys are subject tokens.
   */
  private requestKey(tenant: string, requestId: string): string {
    return `req.${createHash("sha256").update(tenant).update("\u0000").update(requestId).digest("hex").slice(0, 40)}`;
  }

  /** The job id a request id was claimed for, if any. */
  async lookupRequest(tenant: string, requestId: string): Promise<string | undefined> {
    const e = await this.kv.get(this.requestKey(tenant, requestId));
    return e && e.operation === "PUT" && e.value.length > 0 ? e.string() : undefined;
  }

  async claimRequest(tenant: string, requestId: string, jobId: string): Promise<string> {
    const key = this.requestKey(tenant, requestId);
    for (let i = 0; i < 5; i++) {
      try {
        await this.kv.create(key, jobId);
        return jobId;
      } catch (err) {
        if (!isCasFailure(err)) throw err;
        const e = await this.kv.get(key);
        if (e && e.operation === "PUT" && e.value.length > 0) return e.string();
      }
    }
    throw new Error(`request id claim for ${key} kept racing`);
  }

  /** All stored jobs, last value of each key, in one pass (startup recovery). */
  async *scanJobs(): AsyncGenerator<{ id: string; job: StoredJob; revision: number }> {
    const prefix = `$KV.${this.names.jobs}.job.`;
    for await (const m of this.readSubject(this.names.jobsStream, `${prefix}>`, DeliverPolicy.LastPerSubject)) {
      if (m.data.length === 0) continue;
      let job: StoredJob;
      try {
        job = JSON.parse(new TextDecoder().decode(m.data)) as StoredJob;
      } catch {
        continue;
      }
      yield { id: m.subject.slice(prefix.length), job, revision: m.seq };
    }
  }

  /**
   * Stores a finished image (PNG, infotext and metadata) under a deterministic name; a re-run
   * overwrites it. This writes the object store's own layout (chunks, then the metadata record that
   * rolls up the previous one), which any object store client reads, without the library's
   * existence check first: that check is a round trip, and a failed lookup, per image. The chunks of
   * an overwritten image (rare: a re-render after a crash) are left to the bucket's TTL.
   */
  async putImage(jobId: string, image: Image): Promise<void> {
    await this.putObject(`${jobId}.${image.index}`, toBinary(ImageSchema, image));
  }

  /**
   * Stores what one stage of an image hands to the next (see hires-stages.ts) under
   * `<job_id>.<index>.<name>`, next to the images and with their TTL; a restart reads it back so
   * only the stages after it run again.
   */
  async putHandover(jobId: string, index: number, name: string, handover: Handover): Promise<void> {
    await this.putObject(`${jobId}.${index}.${name}`, toBinary(HandoverSchema, handover));
  }

  async getHandover(jobId: string, index: number, name: string): Promise<Handover | undefined> {
    const b = await this.images.getBlob(`${jobId}.${index}.${name}`);
    return b ? fromBinary(HandoverSchema, b) : undefined;
  }

  /** Drops hand-overs once their image is finished (missing ones are fine). */
  async deleteHandovers(jobId: string, index: number, names: readonly string[]): Promise<void> {
    for (const name of names) {
      try {
        await this.images.delete(`${jobId}.${index}.${name}`);
      } catch (err) {
        if (!/not found/i.test(String(err))) throw err;
      }
    }
  }

  private async putObject(name: string, data: Uint8Array): Promise<void> {
    const bucket = this.names.images;
    const id = nuid.next();
    const chunkSubject = `$O.${bucket}.C.${id}`;
    const maxChunk = Math.min(128 * 1024, this.maxPayload);
    const acks: Array<Promise<unknown>> = [];
    let chunks = 0;
    for (let off = 0; off < data.length; off += maxChunk) {
      acks.push(this.js.publish(chunkSubject, data.subarray(off, Math.min(data.length, off + maxChunk))));
      chunks++;
    }
    // The metadata goes out with the chunks, in one write: JetStream stores one connection's
    // messages in order. If a chunk failed, the caller puts the image again under a new id (the
    // new metadata replaces the broken one); nothing reads an image before its put succeeded.
    const info = {
      bucket,
      nuid: id,
      size: data.length,
      chunks,
      name,
      description: "",
      options: { max_chunk_size: maxChunk },
      mtime: new Date().toISOString(),
      digest: `SHA-256=${base64UrlPadded(createHash("sha256").update(data).digest())}`,
      deleted: false,
    };
    const h = headers();
    h.set("Nats-Rollup", "sub");
    acks.push(this.js.publish(`$O.${bucket}.M.${base64UrlPadded(Buffer.from(name, "latin1"))}`, JSON.stringify(info), { headers: h }));
    await Promise.all(acks);
  }

  /** Whether an image was stored (its metadata record exists and is not a deletion). */
  async hasImage(jobId: string, index: number): Promise<boolean> {
    const name = `${jobId}.${index}`;
    const m = await this.jsm.streams.getMessage(this.names.imagesStream, {
      last_by_subj: `$O.${this.names.images}.M.${base64UrlPadded(Buffer.from(name, "latin1"))}`,
    });
    if (!m) return false;
    try {
      return (m.json<{ deleted?: boolean }>().deleted ?? false) === false;
    } catch {
      return false;
    }
  }

  async getImage(jobId: string, index: number): Promise<Image | undefined> {
    const b = await this.images.getBlob(`${jobId}.${index}`);
    return b ? fromBinary(ImageSchema, b) : undefined;
  }

  /**
   * Appends consecutive events of one job as one message. The message id is the first sequence
   * number, so a retried publish of the same batch is stored once.
   */
  async publishEvents(jobId: string, events: readonly JobEvent[]): Promise<void> {
    if (events.length === 0) return;
    await this.js.publish(subjects.jobEvents(jobId), encodeBatch(events), { msgID: `${jobId}:${events[0]!.sequence}` });
  }

  /** Splits events into batches that fit one message. */
  static batches(events: readonly JobEvent[], maxCount = 512): JobEvent[][] {
    const out: JobEvent[][] = [];
    let cur: JobEvent[] = [];
    let bytes = 0;
    for (const e of events) {
      const size = encodedEvent(e).length + 8;
      if (cur.length > 0 && (bytes + size > MAX_BATCH_BYTES || cur.length >= maxCount)) {
        out.push(cur);
        cur = [];
        bytes = 0;
      }
      cur.push(e);
      bytes += size;
    }
    if (cur.length > 0) out.push(cur);
    return out;
  }

  /** Every stored event of a job in sequence order, each sequence number once. */
  async readEvents(jobId: string): Promise<JobEvent[]> {
    const bySeq = new Map<bigint, JobEvent>();
    for await (const m of this.readSubject(this.names.events, subjects.jobEvents(jobId), DeliverPolicy.All)) {
      let batch;
      try {
        batch = fromBinary(JobEventBatchSchema, m.data);
      } catch {
        continue;
      }
      for (const e of batch.events) if (!bySeq.has(e.sequence)) bySeq.set(e.sequence, e);
    }
    return [...bySeq.values()].sort((a, b) => (a.sequence < b.sequence ? -1 : a.sequence > b.sequence ? 1 : 0));
  }

  /** Reads a subject's messages with a short-lived consumer, stopping at what was pending when it began. */
  private async *readSubject(
    stream: string,
    subject: string,
    deliver: DeliverPolicy,
  ): AsyncGenerator<{ subject: string; data: Uint8Array; seq: number }> {
    const ci = await this.jsm.consumers.add(stream, {
      filter_subject: subject,
      ack_policy: AckPolicy.None,
      deliver_policy: deliver,
      inactive_threshold: ms2ns(30_000),
      mem_storage: true,
    });
    try {
      let pending = ci.num_pending;
      if (pending === 0) return;
      const c = await this.js.consumers.get(stream, ci.name);
      while (pending > 0) {
        let got = 0;
        const it = await c.fetch({ max_messages: Math.min(pending, 1000), expires: 5000 });
        for await (const m of it) {
          got++;
          pending--;
          yield { subject: m.subject, data: m.data, seq: m.seq };
        }
        if (got === 0) break;
      }
    } finally {
      await this.jsm.consumers.delete(stream, ci.name).catch(() => undefined);
    }
  }
}

// Events are immutable once emitted: each is encoded once, for sizing and for its batch.
const encoded = new WeakMap<JobEvent, Uint8Array>();
function encodedEvent(e: JobEvent): Uint8Array {
  let b = encoded.get(e);
  if (!b) encoded.set(e, (b = toBinary(JobEventSchema, e)));
  return b;
}

/** A JobEventBatch on the wire: field 1 (repeated JobEvent, length-delimited) per event. */
export function encodeBatch(events: readonly JobEvent[]): Uint8Array {
  const parts = events.map(encodedEvent);
  let size = 0;
  for (const p of parts) size += 1 + varintLength(p.length) + p.length;
  const out = new Uint8Array(size);
  let o = 0;
  for (const p of parts) {
    out[o++] = 0x0a;
    let n = p.length;
    while (n > 0x7f) {
      out[o++] = (n & 0x7f) | 0x80;
      n >>>= 7;
    }
    out[o++] = n;
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function varintLength(n: number): number {
  let len = 1;
  while (n > 0x7f) {
    n >>>= 7;
    len++;
  }
  return len;
}

/** The object store's name and digest encoding: base64url, padding kept. */
function base64UrlPadded(b: Uint8Array): string {
  return Buffer.from(b).toString("base64").replace(/\+/g, "-").replace(/\//g, "_");
}

async function streamExists(jsm: JetStreamManager, name: string): Promise<boolean> {
  try {
    await jsm.streams.info(name);
    return true;
  } catch (err) {
    if (err instanceof JetStreamApiError && /not found/i.test(err.message)) return false;
    throw err;
  }
}

/**
 * Brings an existing stream to the wanted settings and reads the config back. nats-server 2.9
 * silently drops settings it does not know, so a setting missing from the read-back means the
 * server cannot give the guarantee, and startup fails rather than running without it.
 */
export async function ensureStream(
  jsm: JetStreamManager,
  name: string,
  wanted: Partial<StreamConfig>,
  serverVersion: string,
  logger: Logger,
): Promise<void> {
  let info = await jsm.streams.info(name);
  const differs = configDifferences(info.config, wanted);
  if (differs.length > 0) {
    logger.info("updating stream settings", { stream: name, fields: differs.map((d) => d.field) });
    info = await jsm.streams.update(name, { ...info.config, ...wanted });
  }
  const after = configDifferences(info.config, wanted);
  if (after.length > 0) {
    const detail = after.map((d) =>
      d.got === undefined ? `${d.field} (dropped by the server)` : `${d.field}=${JSON.stringify(d.got)}, wanted ${JSON.stringify(d.want)}`,
    );
    throw new StoreConfigError(`stream ${name} on nats-server ${serverVersion} does not keep ${detail.join("; ")}`);
  }
}

export function configDifferences(got: object, wanted: object): Array<{ field: string; got: unknown; want: unknown }> {
  const out: Array<{ field: string; got: unknown; want: unknown }> = [];
  const g = got as Record<string, unknown>;
  for (const [field, want] of Object.entries(wanted)) {
    if (want === undefined) continue;
    const have = g[field];
    if (JSON.stringify(have) !== JSON.stringify(want)) out.push({ field, got: have, want });
  }
  return out;
}
