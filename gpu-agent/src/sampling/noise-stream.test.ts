import { test } from "node:test";
import assert from "node:assert/strict";
import { ImageRng, NoiseContinuation } from "./image-rng.js";
import { NoiseThread, type NoiseStream } from "./noise-stream.js";
import { createGenerator, restoreGenerator } from "./generator.js";
import type { RngSource } from "./generator.js";

const shape = [4, 24, 24] as const;
const rng = (source: RngSource) =>
  new ImageRng({ shape, seeds: [11, 12], subseeds: [5, 6], subseedStrength: 0.3, source, etaNoiseSeedDelta: 31337 });

/** A stream on `thread` continuing rng(source) after its first(). */
function openStream(thread: NoiseThread, source: RngSource): NoiseStream {
  const r = rng(source);
  r.first();
  return thread.open(r.continuation());
}

/** ImageRng's sampler draws after first(), computed the plain way. */
function reference(source: RngSource, n: number): Float32Array[] {
  const r = rng(source);
  r.first();
  return Array.from({ length: n }, () => r.next());
}

test("a generator restored from a snapshot draws exactly what the original draws next", () => {
  for (const source of ["CPU", "GPU", "NV"] as const) {
    const g = createGenerator(source, 1234);
    g.next(7); // an odd size: the CPU source's small-tensor path caches a second normal
    g.next([4, 5, 5]);
    const copy = restoreGenerator(structuredClone(g.snapshot()));
    for (const size of [3, 100, 33]) assert.deepEqual(copy.next(size), g.next(size), `${source} size ${size}`);
  }
});

test("a noise continuation resumed elsewhere continues ImageRng.next() exactly", () => {
  for (const source of ["CPU", "NV"] as const) {
    const r = rng(source);
    r.first();
    r.next();
    const resumed = NoiseContinuation.resume(structuredClone(r.continuation()));
    for (let i = 0; i < 3; i++) assert.deepEqual(resumed.next(), r.next());
  }
  assert.throws(() => rng("CPU").continuation(), /after the initial noise/);
});

test("a noise stream hands out the thread's draws in order: awaited, waited for synchronously, or unrequested", async () => {
  const thread = new NoiseThread();
  try {
    for (const source of ["CPU", "NV"] as const) {
      const want = reference(source, 7);
      const stream = openStream(thread, source);
      assert.ok(stream.remote);
      // A draw is lent until the next take(): kept, it is copied.
      const take = (): Float32Array => stream.take().slice();
      stream.request(2);
      await stream.ready();
      const got = [take(), take()];
      got.push(take()); // never requested: asked for and waited for on the spot
      stream.request(2);
      got.push(take(), take()); // requested but not awaited
      stream.request(1);
      await stream.ready();
      got.push(take(), take());
      got.forEach((g, i) => assert.deepEqual(g, want[i], `${source} draw ${i}`));
      stream.close();
    }
  } finally {
    await thread.close();
  }
});

test("when the thread is gone a stream continues on this thread after the draws already taken", async () => {
  const want = reference("CPU", 5);
  const thread = new NoiseThread();
  const stream = openStream(thread, "CPU");
  stream.request(2);
  await stream.ready();
  const got: Float32Array[] = [stream.take().slice(), stream.take().slice()];
  stream.request(3);
  stream.threadFailed();
  assert.equal(stream.remote, false);
  await stream.ready();
  got.push(stream.take(), stream.take(), stream.take());
  got.forEach((g, i) => assert.deepEqual(g, want[i], `draw ${i}`));
  await thread.close();
  // A closed thread opens streams that draw here.
  const local = openStream(thread, "NV");
  assert.equal(local.remote, false);
  assert.deepEqual(local.take(), reference("NV", 1)[0]);
});

test("a taken draw is lent from the stream's ring: intact while the thread makes the next ones, its slot reused after the next take", async () => {
  const want = reference("NV", 8);
  const thread = new NoiseThread();
  try {
    const stream = openStream(thread, "NV");
    const lent: Float32Array[] = [];
    for (let i = 0; i < 8; i++) {
      const draw = stream.take();
      assert.deepEqual(draw, want[i], `draw ${i}`);
      lent.push(draw);
      // The sampler asks one or two ahead; the thread makes them while draw i is still lent.
      stream.request(i % 2 === 0 ? 2 : 1);
      await stream.ready();
      assert.deepEqual(draw, want[i], `draw ${i} unchanged while the next ones are made`);
    }
    assert.equal(new Set(lent.map((d) => d.buffer)).size, 1, "one ring, not a buffer per draw");
    assert.ok(new Set(lent.map((d) => d.byteOffset)).size <= 3, "a few slots, reused");
    assert.equal(thread.delivered, 8);
    stream.close();
  } finally {
    await thread.close();
  }
});

test("draws posted while this thread was blocked (as by a UNet call) are ready without an event-loop turn", async () => {
  const want = reference("NV", 3);
  const thread = new NoiseThread();
  try {
    const stream = openStream(thread, "NV");
    stream.request(1);
    await stream.ready(); // the thread is up
    stream.request(2);
    const blocker = new Int32Array(new SharedArrayBuffer(4));
    const deadline = performance.now() + 10_000;
    // Waits without taking anything from the port, so that ready() itself has to take the draws.
    while (thread.postedDraws < 3 && performance.now() < deadline) Atomics.wait(blocker, 0, 0, 20);
    assert.ok(thread.postedDraws >= 3, "the draws arrived within 10 s");
    // Microtasks only: a draw still waiting for its "message" event would need a turn of the event loop.
    let settled = false;
    void stream.ready().then(() => (settled = true));
    for (let i = 0; i < 3; i++) await Promise.resolve();
    assert.equal(settled, true, "ready() resolved in a microtask, before the next turn");
    for (let i = 0; i < 3; i++) assert.deepEqual(stream.take(), want[i], `draw ${i}`);
    stream.close();
  } finally {
    await thread.close();
  }
});
