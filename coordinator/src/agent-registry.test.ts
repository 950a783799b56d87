// The registry on a real nats-server, with a real gRPC agent that answers Status: heartbeats that leave
// out an inventory the coordinator has keep the one it has; one it lacks is asked for.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { create, toBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  AgentService,
  FarmError,
  HeartbeatSchema,
  LoraInfoSchema,
  ModelInfoSchema,
  addService,
  bindServer,
  shutdownServer,
  silentLogger,
  subjects,
  type Heartbeat,
} from "@latentfarm/shared";
import { AgentRegistry, type AgentState } from "./agent-registry.js";
import { findNatsServer, startNatsServer, type NatsServerHandle } from "./cli/nats-server.js";

const skip = findNatsServer() ? false : "nats-server not installed (apt-get install nats-server)";

describe("AgentRegistry: heartbeats without their inventory", { skip, concurrency: false }, () => {
  let nats: NatsServerHandle;
  let nc: NatsConnection;
  const server = new grpc.Server();
  let address = "";
  /** What the agent's Status answers, and how often it was asked for its inventory. */
  let inventory: Heartbeat;
  let asked = 0;
  let statusFails = false;
  const warnings: string[] = [];
  let registry: AgentRegistry;
  const updates: Array<{ id: string; changed: boolean }> = [];

  /** A whole heartbeat, from an agent that leaves repeats out (`omits`) or not yet. */
  const whole = (digest: string, models: string[], loras: string[], omits = true): Heartbeat =>
    create(HeartbeatSchema, {
      agent: { agentId: "gpu0", address, slots: 2 },
      availableModels: models.map((name) => create(ModelInfoSchema, { name, format: "safetensors" })),
      loras: loras.map((name) => create(LoraInfoSchema, { name, sizeBytes: 1n })),
      inventoryDigest: digest,
      omitsInventory: omits && digest !== "",
    });
  const omitted = (digest: string, busy = 0): Heartbeat =>
    create(HeartbeatSchema, {
      agent: { agentId: "gpu0", address, slots: 2, busySlots: busy },
      inventoryDigest: digest,
      inventoryOmitted: true,
      omitsInventory: true,
    });
  const publish = async (hb: Heartbeat) => {
    nc.publish(subjects.agentHeartbeat("gpu0"), toBinary(HeartbeatSchema, hb));
    await nc.flush();
  };
  const until = async (what: string, ok: () => boolean) => {
    const end = Date.now() + 5000;
    while (!ok()) {
      if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  const agent = (): AgentState => registry.get("gpu0")!;

  before(async () => {
    nats = await startNatsServer();
    nc = await connect({ servers: nats.url });
    addService(server, AgentService, {
      runTask: () => {
        throw FarmError.invalid("task_id", "not here");
      },
      cancelTask: async () => ({ stopped: false }),
      loraMetadata: async () => ({ metadataJson: {} }),
      status: async (req) => {
        if (req.inventory) asked++;
        if (statusFails) throw new FarmError(grpc.status.UNAVAILABLE, "restarting");
        return { agent: inventory.agent, models: [], runningTasks: [], ...(req.inventory && { heartbeat: inventory }) };
      },
    });
    address = `127.0.0.1:${await bindServer(server, "127.0.0.1:0")}`;
    const logger = { ...silentLogger, warn: (message: string) => void warnings.push(message) };
    registry = new AgentRegistry({
      timeoutMs: 60_000,
      logger,
      onUpdate: (a, changed) => updates.push({ id: a.id, changed }),
    });
    registry.start(nc);
    await nc.flush();
  });
  after(async () => {
    registry?.close();
    await nc?.close();
    await shutdownServer(server);
    await nats?.stop();
  });

  test("an agent first seen without its inventory is asked for it; the same digest again asks nothing", async () => {
    inventory = whole("d1", ["sd15"], ["ink"]);
    await publish(omitted("d1"));
    await until("the inventory from Status", () => agent()?.available.has("sd15") === true);
    assert.equal(asked, 1);
    assert.deepEqual([...agent().loraNames], ["ink"]);
    assert.equal(agent().inventoryDigest, "d1");
    assert.ok(
      updates.some((u) => u.changed),
      "placement re-indexes the agent once its models are known",
    );

    // Heartbeats leaving out the inventory it has: the agent's state moves on, its lists stay, nobody asks.
    await publish(omitted("d1", 1));
    await until("the busy count", () => agent().info.busySlots === 1);
    assert.equal(asked, 1);
    assert.deepEqual([...agent().available], ["sd15"]);
    assert.deepEqual([...agent().loraNames], ["ink"]);
  });

  test("a whole heartbeat replaces the inventory; a digest the registry lacks is asked for", async () => {
    await publish(whole("d2", ["sd15", "xl"], []));
    await until("the second model", () => agent().available.has("xl"));
    assert.deepEqual([agent().inventoryDigest, agent().loraNames.size, asked], ["d2", 0, 1]);

    // The whole heartbeat with d3 was lost: the next one names d3 without it.
    inventory = whole("d3", ["sd15"], ["style"]);
    await publish(omitted("d3"));
    await until("the inventory d3", () => agent().inventoryDigest === "d3");
    assert.equal(asked, 2);
    assert.deepEqual([[...agent().available], [...agent().loraNames]], [["sd15"], ["style"]]);

    // An agent that does not leave repeats out yet (it restarted) is asked once: that starts it.
    inventory = whole("d5", ["sd15"], ["style"], true);
    await publish(whole("d5", ["sd15"], ["style"], false));
    await until("the ask that starts omission", () => asked === 3);
    await publish(whole("d5", ["sd15"], ["style"], true));
    await publish(omitted("d5", 2));
    await until("the omitted heartbeat", () => agent().info.busySlots === 2);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(asked, 3);

    // Agents that send no digest: every heartbeat is whole, as before, and nobody asks.
    await publish(whole("", ["sd15"], ["ink", "style"]));
    await until("the digest-less inventory", () => agent().loraNames.size === 2);
    await publish(whole("", ["sd15"], ["ink", "style"]));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(asked, 3);
  });

  test("an agent whose Status fails is asked again at its next heartbeat, with one warning until it answers", async () => {
    statusFails = true;
    inventory = whole("d4", ["sd15", "sdxl"], []);
    const before = asked;
    for (let k = 1; k <= 3; k++) {
      await publish(omitted("d4"));
      await until(`ask ${k}`, () => asked === before + k);
      // The failed call is over before the next heartbeat asks again.
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.deepEqual(
      warnings.filter((w) => w === "cannot ask an agent for its inventory"),
      ["cannot ask an agent for its inventory"],
    );
    // The inventory it had (the digest-less one above) is kept meanwhile.
    assert.deepEqual([agent().inventoryDigest, agent().loraNames.size, agent().available.has("sdxl")], ["", 2, false]);
    statusFails = false;
    await publish(omitted("d4"));
    await until("the inventory d4", () => agent().inventoryDigest === "d4");
    assert.ok(agent().available.has("sdxl"));
  });
});
