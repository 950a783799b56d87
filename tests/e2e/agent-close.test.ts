import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { silentLogger } from "@latentfarm/shared";
import { startNatsServer, type NatsServerHandle } from "@latentfarm/coordinator";
import { Agent } from "@latentfarm/gpu-agent";
import { farmSkipReason } from "../harness/farm.js";

let nats: NatsServerHandle;
let models: string;
before(async () => {
  if (farmSkipReason()) return;
  nats = await startNatsServer();
  models = mkdtempSync(join(tmpdir(), "latentfarm-empty-models-"));
});
after(async () => {
  await nats?.stop();
  if (models !== undefined) rmSync(models, { recursive: true, force: true });
});

test(
  "closing an agent while a heartbeat is on its way publishes nothing on the draining connection",
  { skip: farmSkipReason() },
  async () => {
    // A heartbeat lists the models first and publishes after; close() may start draining in between.
    const rejections: unknown[] = [];
    const onRejection = (reason: unknown): void => void rejections.push(reason);
    process.on("unhandledRejection", onRejection);
    try {
      for (let i = 0; i < 30; i++) {
        const agent = new Agent({
          listen: "127.0.0.1:0",
          natsUrl: nats.url,
          modelsDir: models,
          ep: { name: "cpu" },
          heartbeatMs: 1,
          logger: silentLogger,
        });
        await agent.start();
        await new Promise((r) => setTimeout(r, 5 + (i % 7)));
        await agent.close();
      }
      await new Promise((r) => setTimeout(r, 100));
    } finally {
      process.off("unhandledRejection", onRejection);
    }
    assert.deepEqual(rejections.map(String), []);
  },
);
