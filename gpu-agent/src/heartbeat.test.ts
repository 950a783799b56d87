import { test } from "node:test";
import assert from "node:assert/strict";
import { create, fromBinary } from "@bufbuild/protobuf";
import { HeartbeatSchema, LoraInfoSchema, ModelInfoSchema } from "@latentfarm/shared";
import { fittedHeartbeat, HeartbeatEncoder, INVENTORY_EVERY_MS } from "./heartbeat.js";

const loras = (n: number) =>
  Array.from({ length: n }, (_, i) => create(LoraInfoSchema, { name: `character_${i}_v2`, alias: `char${i}`, sizeBytes: 151_000_000n }));

test("a heartbeat whose LoRA list would pass NATS's max_payload goes out without it, marked unlisted", () => {
  const hb = create(HeartbeatSchema, { agent: { agentId: "gpu0" }, upscalers: ["4x-UltraSharp"], loras: loras(2000) });
  // 1 MiB (NATS's default) holds it whole.
  const whole = fittedHeartbeat(hb, 1024 * 1024);
  assert.equal(whole.lorasUnlisted, false);
  assert.equal(whole.heartbeat.loras.length, 2000);
  // A 64 KiB limit does not: the rest of the heartbeat still goes out.
  const small = fittedHeartbeat(hb, 64 * 1024);
  assert.equal(small.lorasUnlisted, true);
  const sent = fromBinary(HeartbeatSchema, new HeartbeatEncoder().encode(small.heartbeat, 0));
  assert.deepEqual([sent.loras.length, sent.lorasUnlisted, sent.agent?.agentId, sent.upscalers], [0, true, "gpu0", ["4x-UltraSharp"]]);
  assert.ok(new HeartbeatEncoder().encode(small.heartbeat, 0).length < 64 * 1024);
  // The digest is the inventory's as sent: without the list, another one.
  assert.notEqual(small.heartbeat.inventoryDigest, whole.heartbeat.inventoryDigest);
  // No LoRAs: nothing to leave out.
  assert.equal(fittedHeartbeat(create(HeartbeatSchema, { agent: { agentId: "gpu0" } }), 10).lorasUnlisted, false);
});

test("the inventory digest names the models and file lists, not the agent's state", () => {
  const base = {
    availableModels: [create(ModelInfoSchema, { name: "sd15", format: "safetensors" })],
    upscalers: ["R-ESRGAN 4x+"],
    loras: loras(3),
  };
  const a = fittedHeartbeat(create(HeartbeatSchema, { ...base, agent: { agentId: "gpu0", busySlots: 0 }, freeMemoryBytes: 1n }), 1 << 20);
  const b = fittedHeartbeat(create(HeartbeatSchema, { ...base, agent: { agentId: "gpu0", busySlots: 2 }, freeMemoryBytes: 9n }), 1 << 20);
  assert.match(a.heartbeat.inventoryDigest, /^[0-9a-f]{32}$/);
  assert.equal(a.heartbeat.inventoryDigest, b.heartbeat.inventoryDigest);
  for (const changed of [{ loras: loras(4) }, { upscalers: [] }, { availableModels: [] }, { faceRestorers: ["CodeFormer"] }]) {
    const c = fittedHeartbeat(create(HeartbeatSchema, { ...base, ...changed, agent: { agentId: "gpu0" } }), 1 << 20);
    assert.notEqual(c.heartbeat.inventoryDigest, a.heartbeat.inventoryDigest, JSON.stringify(Object.keys(changed)));
  }
});

test("until a coordinator asked for the inventory, every heartbeat carries it", () => {
  const encoder = new HeartbeatEncoder();
  const hb = fittedHeartbeat(create(HeartbeatSchema, { agent: { agentId: "gpu0" }, loras: loras(10) }), 1 << 20).heartbeat;
  for (const at of [0, 1000, 2000]) {
    const sent = fromBinary(HeartbeatSchema, encoder.encode(hb, at));
    assert.deepEqual([sent.inventoryOmitted, sent.omitsInventory, sent.loras.length], [false, false, 10]);
  }
  encoder.allowOmission();
  const sent = fromBinary(HeartbeatSchema, encoder.encode(hb, 3000));
  assert.deepEqual([sent.inventoryOmitted, sent.omitsInventory, sent.loras.length], [true, true, 0]);
});

test("heartbeats carry the inventory when it changed and every INVENTORY_EVERY_MS, else only its digest", () => {
  const encoder = new HeartbeatEncoder();
  encoder.allowOmission();
  const hb = (n: number, busy: number) =>
    fittedHeartbeat(create(HeartbeatSchema, { agent: { agentId: "gpu0", busySlots: busy }, freeMemoryBytes: 5n, loras: loras(n) }), 1 << 20)
      .heartbeat;
  const sent = (n: number, busy: number, at: number) => fromBinary(HeartbeatSchema, encoder.encode(hb(n, busy), at));

  const first = sent(100, 0, 0);
  assert.deepEqual([first.inventoryOmitted, first.omitsInventory, first.loras.length], [false, true, 100]);
  // Unchanged a second later: the agent's state and the digest, no lists.
  const next = sent(100, 1, 1000);
  assert.deepEqual(
    [next.inventoryOmitted, next.loras.length, next.inventoryDigest, next.agent?.busySlots, next.freeMemoryBytes],
    [true, 0, first.inventoryDigest, 1, 5n],
  );
  // A LoRA more: whole at once.
  const changed = sent(101, 1, 2000);
  assert.deepEqual([changed.inventoryOmitted, changed.loras.length], [false, 101]);
  assert.notEqual(changed.inventoryDigest, first.inventoryDigest);
  assert.equal(sent(101, 1, 2000 + INVENTORY_EVERY_MS - 1).inventoryOmitted, true);
  // Unchanged, but the last whole one is INVENTORY_EVERY_MS old.
  assert.equal(sent(101, 1, 2000 + INVENTORY_EVERY_MS).inventoryOmitted, false);
  assert.equal(sent(101, 1, 2000 + INVENTORY_EVERY_MS + 1).inventoryOmitted, true);
  // After a publish failed, the next one is whole.
  encoder.forget();
  assert.equal(sent(101, 1, 2000 + INVENTORY_EVERY_MS + 2).inventoryOmitted, false);
  // The omitted one is small.
  assert.ok(encoder.encode(hb(101, 1), 2000 + INVENTORY_EVERY_MS + 3).length < 200);
});
