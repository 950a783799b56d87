import { toBinary } from "@bufbuild/protobuf";
import { HeartbeatSchema, type Heartbeat } from "@latentfarm/shared";

/** The share of NATS's max_payload a heartbeat may take with its LoRA list; the rest is the other lists' margin. */
const LORA_LIST_SHARE = 0.75;

/**
 * A heartbeat's bytes, within NATS's max_payload: a LoRA folder of many thousands of files makes the
 * list alone about a megabyte, and a message over the limit is not published at all, so the agent would
 * drop out of the farm. Then the list is left out and `loras_unlisted` set (placement assumes the agent
 * may have any LoRA, as before agents listed them).
 */
export function heartbeatBytes(hb: Heartbeat, maxPayload: number): { bytes: Uint8Array; lorasUnlisted: boolean } {
  const bytes = toBinary(HeartbeatSchema, hb);
  if (bytes.length <= maxPayload * LORA_LIST_SHARE || hb.loras.length === 0) return { bytes, lorasUnlisted: false };
  return { bytes: toBinary(HeartbeatSchema, { ...hb, loras: [], lorasUnlisted: true }), lorasUnlisted: true };
}
