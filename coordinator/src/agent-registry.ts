import { fromBinary } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import {
  AgentService,
  HeartbeatSchema,
  loraKey,
  createClient,
  subjects,
  type AgentInfo,
  type EmbeddingInfo,
  type SkippedEmbedding,
  type LoraInfo,
  type VaeInfo,
  type Heartbeat,
  type Logger,
  type ServiceClient,
} from "@latentfarm/shared";

type AgentServiceMethods = typeof AgentService extends { method: infer M } ? M : never;

export interface AgentState {
  readonly id: string;
  info: AgentInfo;
  available: Set<string>;
  /** What its heartbeat says of each model it offers: format, family, and A1111's "Model hash" once hashed. */
  models: Map<string, { format: string; modelHash: string; family: string }>;
  /** The textual-inversion embeddings in its embeddings folder, and the files it left out (for listings). */
  embeddings: EmbeddingInfo[];
  skippedEmbeddings: SkippedEmbedding[];
  /** The VAE files it lists (A1111's VAE list), for listings and for checking a job's sd_vae. */
  vaes: VaeInfo[];
  /** The upscalers and face restorers it has model files for (Heartbeat.upscalers, face_restorers). */
  upscalers: ReadonlySet<string>;
  faceRestorers: ReadonlySet<string>;
  /** Its LoRA files (for listings), and the names tags may give them (loraNamesOf). */
  loras: LoraInfo[];
  loraNames: ReadonlySet<string>;
  /** Its LoRA list did not fit in a heartbeat (Heartbeat.loras_unlisted): it may have any LoRA. */
  lorasUnlisted: boolean;
  /** The digest of the inventory above (Heartbeat.inventory_digest; '' from agents that send none). */
  inventoryDigest: string;
  freeMemoryBytes: bigint;
  lastSeen: number;
  /** Tasks this coordinator has running there; authoritative over the heartbeat's busy count. */
  inFlight: number;
  client: ServiceClient<AgentServiceMethods>;
}

function modelsOf(hb: Heartbeat): Map<string, { format: string; modelHash: string; family: string }> {
  return new Map(hb.availableModels.map((m) => [m.name, { format: m.format, modelHash: m.modelHash, family: m.family }]));
}

/**
 * Agents known from NATS heartbeats. An agent that stays silent past the timeout is dropped and
 * its tasks are handed back to the scheduler through onLost.
 */
export class AgentRegistry {
  private readonly agents = new Map<string, AgentState>();
  private sub: Subscription | undefined;
  private sweep: NodeJS.Timeout | undefined;
  private connected = true;

  constructor(
    private readonly opts: {
      timeoutMs: number;
      logger: Logger;
      onJoin?: (a: AgentState) => void;
      /** Every heartbeat; `changed` when the agent's models, slots or draining flag changed. */
      onUpdate?: (a: AgentState, changed: boolean) => void;
      onLost?: (a: AgentState, reason: string) => void;
      /** Credentials for coordinator → agent channels (mTLS in production). */
      credentials?: grpc.ChannelCredentials;
    },
  ) {}

  start(nc: NatsConnection): void {
    this.sub = nc.subscribe(subjects.allAgentHeartbeats, {
      callback: (err, msg) => {
        if (err) return;
        let hb: Heartbeat;
        try {
          hb = fromBinary(HeartbeatSchema, msg.data);
        } catch {
          this.opts.logger.warn("undecodable heartbeat", { subject: msg.subject });
          return;
        }
        this.observe(hb);
      },
    });
    this.sweep = setInterval(() => this.expire(), Math.max(50, Math.floor(this.opts.timeoutMs / 4)));
  }

  private observe(hb: Heartbeat): void {
    const info = hb.agent;
    if (!info || !info.agentId || !info.address) return;
    let a = this.agents.get(info.agentId);
    if (a && a.info.address !== info.address) {
      // Same id, new address: a restarted agent. Treat the old one as lost.
      this.drop(a, "agent restarted at a new address");
      a = undefined;
    }
    if (!a) {
      a = {
        id: info.agentId,
        info,
        available: new Set(),
        models: new Map(),
        embeddings: [],
        skippedEmbeddings: [],
        vaes: [],
        upscalers: new Set(),
        faceRestorers: new Set(),
        loras: [],
        loraNames: new Set(),
        lorasUnlisted: false,
        inventoryDigest: "",
        freeMemoryBytes: hb.freeMemoryBytes,
        lastSeen: Date.now(),
        inFlight: 0,
        // No transparent retries on agent calls: the scheduler retries tasks itself (on another
        // agent, counting attempts), and grpc-js's retry layer buffers every message of every call.
        client: createClient(AgentService, info.address, {
          ...(this.opts.credentials ? { credentials: this.opts.credentials } : {}),
          channelOptions: { "grpc.enable_retries": 0 },
        }),
      };
      if (!hb.inventoryOmitted) this.takeInventory(a, hb);
      this.agents.set(a.id, a);
      this.opts.logger.info("agent joined", { agentId: a.id, address: info.address });
      this.opts.onJoin?.(a);
      // Joined between two inventories (this coordinator started after the agent): it offers nothing until
      // asked. An agent not leaving inventories out yet starts once asked.
      if (hb.inventoryOmitted || (hb.inventoryDigest !== "" && !hb.omitsInventory)) this.askInventory(a);
      return;
    }
    // Placement indexes agents by model; only a change in what the agent offers needs a re-index.
    let changed =
      a.info.draining !== info.draining ||
      a.info.slots !== info.slots ||
      a.info.loadedModels.join("\u0000") !== info.loadedModels.join("\u0000");
    a.info = info;
    if (!hb.inventoryOmitted) changed = this.takeInventory(a, hb) || changed;
    if (hb.inventoryOmitted ? hb.inventoryDigest !== a.inventoryDigest : hb.inventoryDigest !== "" && !hb.omitsInventory) {
      this.askInventory(a);
    }
    a.freeMemoryBytes = hb.freeMemoryBytes;
    a.lastSeen = Date.now();
    this.opts.onUpdate?.(a, changed);
  }

  /** Takes a heartbeat's inventory (whole); true when the models the agent offers changed. */
  private takeInventory(a: AgentState, hb: Heartbeat): boolean {
    // The whole inventory again (every 10 s) as the registry has it: nothing to rebuild.
    if (hb.inventoryDigest !== "" && hb.inventoryDigest === a.inventoryDigest) return false;
    a.inventoryDigest = hb.inventoryDigest;
    const available = hb.availableModels.map((m) => m.name);
    const changed = available.length !== a.available.size || available.some((m) => !a.available.has(m));
    if (changed) a.available = new Set(available);
    a.models = modelsOf(hb);
    a.embeddings = hb.embeddings;
    a.skippedEmbeddings = hb.skippedEmbeddings;
    a.vaes = hb.vaes;
    a.upscalers = new Set(hb.upscalers);
    a.faceRestorers = new Set(hb.faceRestorers);
    a.loras = hb.loras;
    a.loraNames = loraNamesOf(hb.loras);
    a.lorasUnlisted = hb.lorasUnlisted;
    return changed;
  }

  /** Agents whose inventory is being asked for (Status with inventory), so that one call at a time goes out. */
  private readonly asking = new Set<AgentState>();
  /** Agents whose last inventory call failed (warned once). */
  private readonly askFailed = new WeakSet<AgentState>();

  /**
   * The agent left out an inventory this coordinator has not seen (it started after the agent sent it, or
   * that heartbeat was lost): asks the agent's Status for it rather than waiting for the next whole one.
   * Also asked of an agent that sends a digest but every inventory whole: the call tells it that this
   * coordinator takes heartbeats without one.
   */
  private askInventory(a: AgentState): void {
    if (this.asking.has(a)) return;
    this.asking.add(a);
    a.client
      .status({ inventory: true }, { timeoutMs: 10_000 })
      .then(
        (res) => {
          this.askFailed.delete(a);
          if (this.agents.get(a.id) !== a || res.heartbeat === undefined) return;
          const changed = this.takeInventory(a, res.heartbeat);
          this.opts.onUpdate?.(a, changed);
        },
        (err: unknown) => {
          // The next heartbeat that leaves it out asks again (warned once until an answer comes); the
          // agent sends it whole within 10 s anyway.
          if (!this.askFailed.has(a)) this.opts.logger.warn("cannot ask an agent for its inventory", { agentId: a.id, error: String(err) });
          this.askFailed.add(a);
        },
      )
      .finally(() => this.asking.delete(a));
  }

  /**
   * While this coordinator is cut off from NATS, silence says nothing about the agents; their
   * clocks restart when the connection is back.
   */
  setConnected(connected: boolean): void {
    this.connected = connected;
    if (connected) {
      // Agents reconnect on their own schedule (the NATS client waits up to seconds between tries).
      const graceUntil = Date.now() + Math.max(2000, this.opts.timeoutMs);
      for (const a of this.agents.values()) a.lastSeen = graceUntil;
    }
  }

  private expire(): void {
    if (!this.connected) return;
    const now = Date.now();
    for (const a of this.agents.values()) {
      if (now - a.lastSeen > this.opts.timeoutMs) this.drop(a, `no heartbeat for ${now - a.lastSeen} ms`);
    }
  }

  private drop(a: AgentState, reason: string): void {
    if (this.agents.get(a.id) !== a) return;
    this.agents.delete(a.id);
    this.opts.logger.warn("agent lost", { agentId: a.id, reason });
    this.opts.onLost?.(a, reason);
    a.client.close();
  }

  get(id: string): AgentState | undefined {
    return this.agents.get(id);
  }

  list(): AgentState[] {
    return [...this.agents.values()];
  }

  close(): void {
    this.sub?.unsubscribe();
    if (this.sweep) clearInterval(this.sweep);
    for (const a of this.agents.values()) a.client.close();
    this.agents.clear();
  }
}

/**
 * The names tags may give an agent's LoRAs, as placement compares them: file names and aliases, without
 * regard to case (the agent falls back to that for file names).
 */
export function loraNamesOf(loras: readonly LoraInfo[]): ReadonlySet<string> {
  return new Set(loras.flatMap((l) => (l.alias === "" ? [loraKey(l.name)] : [loraKey(l.name), loraKey(l.alias)])));
}
