import { test } from "node:test";
import assert from "node:assert/strict";
import { PipelineCache } from "./pipeline-cache.js";

class Fake {
  closed = false;
  constructor(readonly id: number) {}
  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }
}

test("a discarded pipeline is closed once its last user releases it, and the next acquire loads it again", async () => {
  let loads = 0;
  const cache = new PipelineCache<Fake>(2, () => Promise.resolve(new Fake(++loads)));
  const a = await cache.acquire("m");
  const b = await cache.acquire("m");
  cache.discard("m", a.value);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(cache.names, []);
  a.release();
  assert.equal(a.value.closed, false, "still in use by b");
  b.release();
  assert.equal(a.value.closed, true, "closed with its last user");
  const c = await cache.acquire("m");
  assert.equal(c.value.id, 2, "loaded again");
  // Discarding a value the cache no longer holds leaves the current one alone.
  cache.discard("m", a.value);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(cache.names, ["m"]);
  c.release();
  assert.equal(c.value.closed, false);
  await cache.close();
  assert.equal(c.value.closed, true);
});
