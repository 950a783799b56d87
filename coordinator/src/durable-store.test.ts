import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { create, toBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import { GenerationParamsSchema, ImageSchema, JobEventBatchSchema, JobEventSchema, silentLogger, type JobEvent } from "@latentfarm/shared";
import { Job, JobStore } from "./job-store.js";
import { findNatsServer, startNatsServer, type NatsServerHandle } from "./cli/nats-server.js";
import {
  ConflictError,
  DEFAULT_DURABLE_CONFIG,
  DurableStore,
  StoreConfigError,
  encodeBatch,
  ensureStream,
  type StoredJob,
} from "./durable-store.js";

const skip = findNatsServer() ? false : "nats-server not installed (apt-get install nats-server)";

function stored(images: string, state: StoredJob["state"] = "queued"): StoredJob {
  return {
    v: 1,
    params: "",
    tenant: "t",
    requestId: "",
    imageCount: images.length,
    createdAt: 1,
    deadlineUnixMs: 0,
    priority: 0,
    state,
    images,
    updatedAt: 1,
  };
}

function events(jobId: string, from: number, n: number, pad = 0): JobEvent[] {
  return Array.from({ length: n }, (_, i) =>
    create(JobEventSchema, { jobId, sequence: BigInt(from + i), event: { case: "warning", value: { message: "x".repeat(pad) } } }),
  );
}

describe("DurableStore on a real nats-server", { skip, concurrency: false }, () => {
  let nats: NatsServerHandle;
  let nc: NatsConnection;
  let store: DurableStore;
  before(async () => {
    nats = await startNatsServer();
    nc = await connect({ servers: nats.url });
    store = await DurableStore.open(nc, { ...DEFAULT_DURABLE_CONFIG, imageTtlMs: 3_600_000, prefix: "t1" }, silentLogger);
  });
  after(async () => {
    await nc?.close();
    await nats?.stop();
  });

  test("creates the buckets and stream with the settings durability needs, and updates them on a later start", async () => {
    const jsm = await jetstreamManager(nc);
    const images = await jsm.streams.info(store.names.imagesStream);
    assert.equal(images.config.max_age, 3_600_000 * 1e6);
    const ev = await jsm.streams.info(store.names.events);
    assert.deepEqual(ev.config.subjects, ["lf.job.*.events"]);
    assert.equal(ev.config.duplicate_window, 120e9);
    assert.equal((await jsm.streams.info(store.names.jobsStream)).config.max_msgs_per_subject, 1);
    // A restart with another image TTL changes the stream rather than failing.
    await DurableStore.open(nc, { ...DEFAULT_DURABLE_CONFIG, imageTtlMs: 7_200_000, prefix: "t1" }, silentLogger);
    assert.equal((await jsm.streams.info(store.names.imagesStream)).config.max_age, 7_200_000 * 1e6);
  });

  test("a setting the server silently drops fails the startup check (nats-server 2.9 drops allow_msg_ttl)", async () => {
    const jsm = await jetstreamManager(nc);
    const version = nc.info!.version;
    const [major, minor] = version.split(".").map(Number) as [number, number];
    const check = ensureStream(jsm, store.names.events, { allow_msg_ttl: true }, version, silentLogger);
    if (major === 2 && minor < 11) {
      await assert.rejects(
        check,
        (err: unknown) => err instanceof StoreConfigError && /allow_msg_ttl \(dropped by the server\)/.test(err.message),
      );
    } else {
      await check;
    }
    await assert.rejects(ensureStream(jsm, store.names.events, { no_such_setting: 1 } as object, version, silentLogger));
  });

  test("job records: create is once only, updates are compare-and-swap, a scan returns the latest value of each", async () => {
    const a = await store.createJob("job-a", stored("qq"));
    assert.ok(a.created);
    assert.equal((await store.createJob("job-a", stored("dd"))).created, false);
    const r2 = await store.updateJob("job-a", stored("dq", "running"), a.revision);
    await assert.rejects(store.updateJob("job-a", stored("qd"), a.revision), ConflictError);
    await store.updateJob("job-a", stored("dd", "succeeded"), r2);
    await store.createJob("job-b", stored("q"));
    const scanned = new Map<string, StoredJob>();
    for await (const j of store.scanJobs()) scanned.set(j.id, j.job);
    assert.equal(scanned.get("job-a")?.state, "succeeded");
    assert.equal(scanned.get("job-a")?.images, "dd");
    assert.equal(scanned.get("job-b")?.images, "q");
  });

  test("concurrent claims of one request id all get the first claimant's job id; tenants are separate", async () => {
    const ids = await Promise.all(["j1", "j2", "j3", "j4", "j5"].map((j) => store.claimRequest("tenant", "req-1", j)));
    assert.equal(new Set(ids).size, 1);
    assert.equal(await store.lookupRequest("tenant", "req-1"), ids[0]);
    assert.equal(await store.claimRequest("other", "req-1", "j9"), "j9");
    assert.equal(await store.lookupRequest("tenant", "nope"), undefined);
  });

  test("event batches: a retried publish is stored once, reads come back in sequence order", async () => {
    const first = events("job-e", 1, 3);
    await store.publishEvents("job-e", first);
    await store.publishEvents("job-e", first);
    await store.publishEvents("job-e", events("job-e", 4, 2));
    const back = await store.readEvents("job-e");
    assert.deepEqual(
      back.map((e) => Number(e.sequence)),
      [1, 2, 3, 4, 5],
    );
    assert.deepEqual(await store.readEvents("job-none"), []);
  });

  test("a log read back after a restart keeps in memory only each image's latest preview; storage keeps them all", async () => {
    const step = (sequence: number, imageIndex: number, preview: number[]) =>
      create(JobEventSchema, {
        jobId: "job-p",
        sequence: BigInt(sequence),
        event: { case: "step", value: { taskId: "t", imageIndex, step: sequence, totalSteps: 9, previewPng: Uint8Array.from(preview) } },
      });
    await store.publishEvents("job-p", [
      step(1, 0, [1]),
      step(2, 1, [2]),
      step(3, 0, []),
      step(4, 0, [4]),
      step(5, 1, [5]),
      step(6, 0, []),
    ]);
    const jobs = new JobStore(store, { logger: silentLogger });
    const job = new Job({
      id: "job-p",
      params: create(GenerationParamsSchema, { model: "m" }),
      tenant: "t",
      requestId: "",
      imageCount: 2,
      createdAt: 1,
      deadlineUnixMs: 0,
      priority: 0,
    });
    await jobs.restoreEvents(job);
    assert.deepEqual(
      job.events.map((e) => (e.event.case === "step" ? [...e.event.value.previewPng] : undefined)),
      [[], [], [], [4], [5], []],
    );
    assert.equal(job.eventsStored, 6);
    assert.deepEqual(
      (await store.readEvents("job-p")).map((e) => (e.event.case === "step" ? e.event.value.previewPng.length : -1)),
      [1, 1, 0, 1, 1, 0],
    );
  });

  test("a batch encoded by hand is the JobEventBatch protobuf-es writes", () => {
    const evs = [...events("j", 1, 3, 10), ...events("j", 4, 1, 300)];
    assert.deepEqual(encodeBatch(evs), toBinary(JobEventBatchSchema, create(JobEventBatchSchema, { events: evs })));
  });

  test("batches split so each message stays well under the 1 MiB payload limit", () => {
    const big = events("j", 1, 10, 200_000);
    const parts = DurableStore.batches(big);
    assert.ok(parts.length >= 4, `${parts.length} batches`);
    assert.deepEqual(
      parts.flat().map((e) => Number(e.sequence)),
      big.map((e) => Number(e.sequence)),
    );
  });

  test("images round-trip through the object store under a deterministic name; a re-put overwrites", async () => {
    const png = new Uint8Array(300_000).map((_, i) => i % 251);
    await store.putImage("job-i", create(ImageSchema, { index: 2, seed: 7n, png, infotext: "x" }));
    await store.putImage("job-i", create(ImageSchema, { index: 2, seed: 7n, png, infotext: "y" }));
    const back = await store.getImage("job-i", 2);
    assert.equal(back?.infotext, "y");
    assert.deepEqual(back?.png, png);
    assert.equal(await store.getImage("job-i", 3), undefined);
    // Written in the object store's own layout: the library's reader checks the digest and sizes.
    const os = await new Objm(nc).open(store.names.images);
    const info = await os.info("job-i.2");
    assert.equal(info?.chunks, 3);
    assert.equal(info?.size, (await os.getBlob("job-i.2"))?.length);
    assert.ok((await os.list()).some((o) => o.name === "job-i.2"));
  });
});
