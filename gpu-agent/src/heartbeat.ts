import { createHash } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { HeartbeatSchema, type Heartbeat } from "@latentfarm/shared";

/** The share of NATS's max_payload a heartbeat may take with its LoRA list; the rest is the other lists' margin. */
const LORA_LIST_SHARE = 0.75;

/** How often a heartbeat carries the whole inventory even when it has not changed. */
export const INVENTORY_EVERY_MS = 10_000;

/** A heartbeat's inventory alone (Heartbeat fields 2 and 4-10): what inventory_digest names. */
function inventoryOf(hb: Heartbeat): Heartbeat {
  return create(HeartbeatSchema, {
    availableModels: hb.availableModels,
    embeddings: hb.embeddings,
    skippedEmbeddings: hb.skippedEmbeddings,
    vaes: hb.vaes,
    upscalers: hb.upscalers,
    faceRestorers: hb.faceRestorers,
    loras: hb.loras,
    lorasUnlisted: hb.lorasUnlisted,
  });
}

/**
 * The heartbeat as it may go out, with its inventory_digest: within NATS's max_payload, since a LoRA folder
 * of many thousands of files makes the list alone about a megabyte, and a message over the limit is not
 * published at all, so the agent would drop out of the farm. Then the list is left out and `loras_unlisted`
 * set (placement assumes the agent may have any LoRA, as before agents listed them).
 */
export function fittedHeartbeat(hb: Heartbeat, maxPayload: number): { heartbeat: Heartbeat; lorasUnlisted: boolean } {
  let inventory = toBinary(HeartbeatSchema, inventoryOf(hb));
  let heartbeat = hb;
  // The agent's own fields (AgentInfo, free memory) are a few hundred bytes: the inventory is the size.
  const lorasUnlisted = inventory.length > maxPayload * LORA_LIST_SHARE && hb.loras.length > 0;
  if (lorasUnlisted) {
    heartbeat = create(HeartbeatSchema, { ...hb, loras: [], lorasUnlisted: true });
    inventory = toBinary(HeartbeatSchema, inventoryOf(heartbeat));
  }
  const inventoryDigest = createHash("sha256").update(inventory).digest("hex").slice(0, 32);
  return { heartbeat: create(HeartbeatSchema, { ...heartbeat, inventoryDigest, inventoryOmitted: false }), lorasUnlisted };
}

/**
 * Encodes an agent's heartbeats: once a coordinator has asked for the inventory (allowOmission), the
 * inventory (models and file lists, tens of kilobytes with a large LoRA folder) only when its digest
 * changed or INVENTORY_EVERY_MS passed since it was last sent whole; the others carry the digest and the
 * agent's state. Every coordinator then decodes the lists about once
 * per change instead of once a second per agent.
 */
export class HeartbeatEncoder {
  private sentDigest: string | undefined;
  private sentAt = -Infinity;
  /**
   * Whether heartbeats may leave the inventory out: only once a coordinator asked for it (allowOmission),
   * so a coordinator that predates digests, which takes every heartbeat as whole, keeps getting whole ones.
   */
  private omitting = false;

  constructor(private readonly inventoryEveryMs = INVENTORY_EVERY_MS) {}

  /** A coordinator asked this agent's Status for its inventory: it understands heartbeats without one. */
  allowOmission(): void {
    this.omitting = true;
  }

  /** `hb` from fittedHeartbeat; `now` in milliseconds. */
  encode(hb: Heartbeat, now: number): Uint8Array {
    if (!this.omitting || hb.inventoryDigest !== this.sentDigest || now - this.sentAt >= this.inventoryEveryMs) {
      this.sentDigest = hb.inventoryDigest;
      this.sentAt = now;
      return toBinary(HeartbeatSchema, create(HeartbeatSchema, { ...hb, omitsInventory: this.omitting }));
    }
    return toBinary(
      HeartbeatSchema,
      create(HeartbeatSchema, {
        ...(hb.agent !== undefined && { agent: hb.agent }),
        freeMemoryBytes: hb.freeMemoryBytes,
        inventoryDigest: hb.inventoryDigest,
        inventoryOmitted: true,
        omitsInventory: true,
      }),
    );
  }

  /** The next heartbeat carries the inventory whatever its digest (the last one may not have gone out). */
  forget(): void {
    this.sentDigest = undefined;
  }
}
