// What agents' heartbeats cost a farm with large LoRA folders: bytes through NATS and the coordinator's
// protobuf decoding, per agent per second, for heartbeats that carry the whole inventory every second
// (as before inventory digests) against the agent's HeartbeatEncoder (the inventory when it changes and
// every 10 s), side by side over the same simulated minute. The agent: 40 checkpoints, 200 embeddings,
// `loras` LoRA files, one heartbeat a second; its inventory changes once in the minute.
//   node --import tsx tests/bench/heartbeats.ts
import { fileURLToPath } from "node:url";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { EmbeddingInfoSchema, HeartbeatSchema, LoraInfoSchema, ModelInfoSchema, type Heartbeat } from "@latentfarm/shared";
import { fittedHeartbeat, HeartbeatEncoder } from "../../gpu-agent/src/heartbeat.js";

function agentHeartbeat(loras: number, second: number): Heartbeat {
  return create(HeartbeatSchema, {
    agent: { agentId: "gpu-07", address: "10.0.3.7:7070", slots: 2, busySlots: second % 3, lastHeartbeatUnixMs: BigInt(second * 1000) },
    freeMemoryBytes: BigInt(40e9 - second * 1e6),
    availableModels: Array.from({ length: 40 }, (_, i) =>
      create(ModelInfoSchema, { name: `checkpoints/model-${i}-v2`, format: "safetensors", modelHash: "a1b2c3d4e5", family: "sd15" }),
    ),
    embeddings: Array.from({ length: 200 }, (_, i) =>
      create(EmbeddingInfoSchema, { name: `embedding-${i}`, vectors: 8, width: 768, hash: "0123456789ab" }),
    ),
    // A file added half-way through the minute.
    loras: Array.from({ length: loras + (second >= 30 ? 1 : 0) }, (_, i) =>
      create(LoraInfoSchema, { name: `characters/character_lora_${i}_v3`, alias: `character_${i}`, sizeBytes: 151_000_000n }),
    ),
  });
}

export function benchHeartbeats(opts: { loras?: number; seconds?: number } = {}): Record<string, number> {
  const loras = opts.loras ?? 1000;
  const seconds = opts.seconds ?? 60;
  const beats = Array.from({ length: seconds }, (_, s) => fittedHeartbeat(agentHeartbeat(loras, s), 1 << 20).heartbeat);
  const encoder = new HeartbeatEncoder();
  // As once a coordinator has asked for the inventory (agents that predate digests never are).
  encoder.allowOmission();
  const whole = beats.map((hb) => toBinary(HeartbeatSchema, hb));
  const digested = beats.map((hb, s) => encoder.encode(hb, s * 1000));
  const decodeMs = (messages: Uint8Array[]): number => {
    const rounds = 5;
    let best = Infinity;
    for (let r = 0; r < rounds; r++) {
      const t = performance.now();
      for (const m of messages) fromBinary(HeartbeatSchema, m);
      best = Math.min(best, performance.now() - t);
    }
    return best;
  };
  decodeMs(whole);
  decodeMs(digested);
  // Alternating, the faster of each: the coordinator's decode per agent-second.
  let wholeMs = Infinity;
  let digestedMs = Infinity;
  for (let k = 0; k < 3; k++) {
    wholeMs = Math.min(wholeMs, decodeMs(whole));
    digestedMs = Math.min(digestedMs, decodeMs(digested));
  }
  const bytes = (ms: Uint8Array[]) => ms.reduce((n, m) => n + m.length, 0) / seconds;
  return {
    loras,
    whole_inventory_count: digested.filter((m) => !fromBinary(HeartbeatSchema, m).inventoryOmitted).length,
    bytes_per_agent_s_every_beat: bytes(whole),
    bytes_per_agent_s_digest: bytes(digested),
    bytes_ratio: bytes(digested) / bytes(whole),
    decode_ms_per_agent_s_every_beat: wholeMs / seconds,
    decode_ms_per_agent_s_digest: digestedMs / seconds,
    decode_ratio: digestedMs / wholeMs,
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const loras of [100, 1000, 5000]) process.stdout.write(`${JSON.stringify(benchHeartbeats({ loras }))}\n`);
}
