import { test } from "node:test";
import assert from "node:assert/strict";
import { DEFAULT_TENANT_POLICY, FairQueue, type TenantPolicy } from "./fair-queue.js";

interface Item {
  tenant: string;
  cost: number;
  name: string;
  queued: boolean;
}

function make(policies: Record<string, Partial<TenantPolicy>> = {}) {
  const q = new FairQueue<Item>(
    (i) => i.queued,
    (t) => ({ ...DEFAULT_TENANT_POLICY, ...policies[t] }),
  );
  const items = (tenant: string, n: number, cost = 1, prefix = tenant): Item[] =>
    Array.from({ length: n }, (_, i) => ({ tenant, cost, name: `${prefix}${i}`, queued: true }));
  /** Takes the first item in fair order n times, as the scheduler does when slots free one by one. */
  const drain = (n: number): string[] => {
    const out: string[] = [];
    for (let k = 0; k < n; k++) {
      const next = q.order().next();
      if (next.done) break;
      q.take(next.value);
      next.value.queued = false;
      q.release(next.value.tenant);
      out.push(next.value.name);
    }
    return out;
  };
  return { q, items, drain };
}

test("equal weights alternate between backlogged tenants, whatever their arrival order", () => {
  const { q, items, drain } = make();
  q.pushJob("a", 0, items("a", 6));
  q.pushJob("b", 0, items("b", 6));
  const got = drain(8);
  assert.deepEqual(got.map((n) => n[0]).join(""), "abababab");
});

test("weights 3:1 give the heavier tenant 3 of every 4 items while both are backlogged", () => {
  const { q, items, drain } = make({ heavy: { weight: 3 } });
  q.pushJob("light", 0, items("light", 20));
  q.pushJob("heavy", 0, items("heavy", 20));
  const got = drain(16).map((n) => (n.startsWith("heavy") ? "H" : "L"));
  assert.equal(got.filter((x) => x === "H").length, 12);
  // Evenly spread, not bunched: every window of 4 has 3 heavy items.
  for (let i = 0; i + 4 <= got.length; i += 4) assert.equal(got.slice(i, i + 4).filter((x) => x === "H").length, 3, got.join(""));
});

test("cost counts: a tenant of items twice as costly gets half as many items", () => {
  const { q, items, drain } = make();
  q.pushJob("big", 0, items("big", 10, 2));
  q.pushJob("small", 0, items("small", 20, 1));
  const got = drain(12);
  assert.equal(got.filter((n) => n.startsWith("big")).length, 4);
  assert.equal(got.filter((n) => n.startsWith("small")).length, 8);
});

test("a tenant that was idle gets no saved-up credit when it comes back", () => {
  const { q, items, drain } = make();
  q.pushJob("a", 0, items("a", 30));
  drain(20);
  q.pushJob("b", 0, items("b", 10));
  const got = drain(6)
    .map((n) => n[0])
    .join("");
  assert.equal([...got].filter((c) => c === "b").length, 3, `b shares equally from its arrival on, no burst: ${got}`);
});

test("within a tenant, higher priority jobs go first, then older jobs", () => {
  const { q, items, drain } = make();
  q.pushJob("t", 0, items("t", 2, 1, "old"));
  q.pushJob("t", 0, items("t", 2, 1, "newer"));
  q.pushJob("t", 5, items("t", 2, 1, "urgent"));
  assert.deepEqual(drain(6), ["urgent0", "urgent1", "old0", "old1", "newer0", "newer1"]);
});

test("retries go to the front of their tenant's queue", () => {
  const { q, items, drain } = make();
  const xs = items("t", 3);
  q.pushJob("t", 0, xs);
  drain(1);
  xs[0]!.queued = true;
  q.pushRetry(xs[0]!);
  assert.deepEqual(drain(3), ["t0", "t1", "t2"]);
});

test("the running limit skips a tenant at its cap without blocking others; order() does not change the queue", () => {
  const { q, items } = make({ narrow: { maxRunningImages: 1 } });
  q.pushJob("narrow", 0, items("narrow", 3));
  q.pushJob("wide", 0, items("wide", 3));
  const look = [...q.order()].map((i) => i.name);
  assert.deepEqual(
    look.filter((n) => n.startsWith("narrow")),
    ["narrow0"],
    "only one narrow item while none runs",
  );
  assert.equal(look.filter((n) => n.startsWith("wide")).length, 3);
  assert.deepEqual(
    [...q.order()].map((i) => i.name),
    look,
    "looking is free",
  );
  const first = look.find((n) => n.startsWith("narrow"))!;
  const item = [...q.order()].find((i) => i.name === first)!;
  q.take(item);
  item.queued = false;
  assert.deepEqual(
    [...q.order()].filter((i) => i.tenant === "narrow"),
    [],
    "at its cap the tenant is skipped",
  );
  q.release("narrow");
  assert.deepEqual(
    [...q.order()].filter((i) => i.tenant === "narrow").map((i) => i.name),
    ["narrow1"],
  );
});

test("items that left the queue (cancelled, placed) are skipped and dropped", () => {
  const { q, items } = make();
  const xs = items("t", 4);
  q.pushJob("t", 0, xs);
  xs[0]!.queued = false;
  xs[2]!.queued = false;
  assert.deepEqual(
    [...q.order()].map((i) => i.name),
    ["t1", "t3"],
  );
  xs[1]!.queued = false;
  xs[3]!.queued = false;
  assert.deepEqual([...q.order()], []);
  q.compact();
  assert.equal(q.size, 0);
});
