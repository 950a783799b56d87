import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readFileSync } from "node:fs";
import * as grpc from "@grpc/grpc-js";
import { AgentService, FarmError, RenderService, TokenAuth, createClient, silentLogger } from "@latentfarm/shared";
import { Coordinator, startNatsServer, type NatsServerHandle } from "@latentfarm/coordinator";
import { Agent } from "@latentfarm/gpu-agent";
import { TINY_SD15, farmSkipReason } from "../harness/farm.js";
import { makeCerts, type TestCerts } from "../harness/certs.js";

const TOKEN = "tok-studio-a-0123456789";

describe(
  "TLS for clients, mTLS coordinator → agent, tenant API tokens",
  { skip: farmSkipReason(), concurrency: false, timeout: 120_000 },
  () => {
    let certs: TestCerts;
    let nats: NatsServerHandle;
    let coordinator: Coordinator;
    let agent: Agent;
    let models: string;
    before(async () => {
      certs = makeCerts();
      nats = await startNatsServer();
      models = mkdtempSync(join(tmpdir(), "latentfarm-models-"));
      mkdirSync(join(models, "m"));
      symlinkSync(TINY_SD15, join(models, "m", "tiny-sd15"));
      const tls = { cert: certs.cert, key: certs.key, ca: certs.ca };
      coordinator = new Coordinator({
        listen: "127.0.0.1:0",
        natsUrl: nats.url,
        tls,
        auth: TokenAuth.fromMap({ [TOKEN]: "studio-a" }),
        logger: silentLogger,
      });
      await coordinator.start();
      agent = new Agent({
        listen: "127.0.0.1:0",
        natsUrl: nats.url,
        modelsDir: join(models, "m"),
        ep: { name: "cpu" },
        tls,
        intraOpNumThreads: 1,
        heartbeatMs: 200,
        logger: silentLogger,
      });
      await agent.start();
    });
    after(async () => {
      await agent?.close();
      await coordinator?.close();
      await nats?.stop();
      rmSync(models, { recursive: true, force: true });
      rmSync(certs.dir, { recursive: true, force: true });
    });

    test("a client needs TLS and a valid token; with both, a job runs over mTLS to the agent", async () => {
      const address = `localhost:${coordinator.port}`;
      const tlsClient = createClient(RenderService, address, { credentials: grpc.credentials.createSsl(readFileSync(certs.ca)) });
      const plain = createClient(RenderService, address);
      try {
        await assert.rejects(plain.listModels({}, { timeoutMs: 3000 }), (e: unknown) => FarmError.from(e).code === grpc.status.UNAVAILABLE);
        await assert.rejects(tlsClient.listModels({}), (e: unknown) => FarmError.from(e).code === grpc.status.UNAUTHENTICATED);
        await assert.rejects(
          tlsClient.listModels({}, { metadata: { authorization: "Bearer wrong-token-000000000" } }),
          (e: unknown) => FarmError.from(e).code === grpc.status.UNAUTHENTICATED,
        );
        const metadata = { authorization: `Bearer ${TOKEN}` };
        for (const deadline = Date.now() + 10_000; ;) {
          const { agents } = await tlsClient.listAgents({}, { metadata });
          if (agents.length === 1) break;
          assert.ok(Date.now() < deadline, "agent never registered");
          await new Promise((r) => setTimeout(r, 50));
        }
        const { jobId } = await tlsClient.submit(
          { params: { prompt: "tls", model: "tiny-sd15", width: 64, height: 64, steps: 2, seed: 3n } },
          { metadata },
        );
        let done = false;
        for await (const { event } of tlsClient.watch({ jobId }, { metadata })) {
          if (event?.event.case === "failed") assert.fail(event.event.value.message);
          if (event?.event.case === "done") done = true;
        }
        assert.ok(done);
      } finally {
        tlsClient.close();
        plain.close();
      }
    });

    test("the agent port refuses clients without a certificate from the farm's CA", async () => {
      const noCert = createClient(AgentService, `localhost:${agent.port}`, {
        credentials: grpc.credentials.createSsl(readFileSync(certs.ca)),
      });
      const plain = createClient(AgentService, `localhost:${agent.port}`);
      try {
        await assert.rejects(noCert.status({}, { timeoutMs: 3000 }), (e: unknown) => FarmError.from(e).code === grpc.status.UNAVAILABLE);
        await assert.rejects(plain.status({}, { timeoutMs: 3000 }), (e: unknown) => FarmError.from(e).code === grpc.status.UNAVAILABLE);
      } finally {
        noCert.close();
        plain.close();
      }
    });
  },
);
