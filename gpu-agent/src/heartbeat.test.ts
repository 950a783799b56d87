import { test } from "node:test";
import assert from "node:assert/strict";
import { create, fromBinary } from "@bufbuild/protobuf";
import { HeartbeatSchema, LoraInfoSchema } from "@latentfarm/shared";
import { heartbeatBytes } from "./heartbeat.js";

test("a heartbeat whose LoRA list would pass NATS's max_payload goes out without it, marked unlisted", () => {
  const loras = Array.from({ length: 2000 }, (_, i) =>
    create(LoraInfoSchema, { name: `character_${i}_v2`, alias: `char${i}`, sizeBytes: 151_000_000n }),
  );
  const hb = create(HeartbeatSchema, { agent: { agentId: "gpu0" }, upscalers: ["4x-UltraSharp"], loras });
  // 1 MiB (NATS's default) holds it whole.
  const whole = heartbeatBytes(hb, 1024 * 1024);
  assert.equal(whole.lorasUnlisted, false);
  assert.equal(fromBinary(HeartbeatSchema, whole.bytes).loras.length, 2000);
  // A 64 KiB limit does not: the rest of the heartbeat still goes out.
  const small = heartbeatBytes(hb, 64 * 1024);
  assert.equal(small.lorasUnlisted, true);
  const sent = fromBinary(HeartbeatSchema, small.bytes);
  assert.deepEqual([sent.loras.length, sent.lorasUnlisted, sent.agent?.agentId, sent.upscalers], [0, true, "gpu0", ["4x-UltraSharp"]]);
  assert.ok(small.bytes.length < 64 * 1024);
  // No LoRAs: nothing to leave out.
  assert.equal(heartbeatBytes(create(HeartbeatSchema, { agent: { agentId: "gpu0" } }), 10).lorasUnlisted, false);
});
