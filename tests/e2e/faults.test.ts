// Fault injection with real agents on the tiny SD1.5 fixture, where the outputs themselves are the
// point: after an agent is killed mid-step, the coordinator is killed mid-batch, or nats-server is
// killed and restarted, every image must be byte-for-byte the PNG a fault-free run produced
// (renders are deterministic: same seed and settings, same bytes). Agents run one task at a time,
// so no run mixes batched and unbatched UNet calls.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { TINY_SD15, farmSkipReason } from "../harness/farm.js";
import { checkJob, sleep, startFaultFarm, watchToEnd, type FaultFarm } from "../harness/sim-agent-farm.js";

const skip = farmSkipReason();
const METRICS = ["--metrics-port", "0"];
const PARAMS = {
  prompt: "a lighthouse at dusk",
  model: "tiny-sd15",
  width: 64,
  height: 64,
  steps: 8,
  samplerName: "Euler a",
  batchSize: 4,
  seed: 4242n,
};

describe("fault injection with real agents: outputs equal a fault-free run", { skip, concurrency: false, timeout: 240_000 }, () => {
  let farm: FaultFarm;
  let models: string;
  const reference = new Map<number, Buffer>();
  before(async () => {
    models = mkdtempSync(join(tmpdir(), "latentfarm-models-"));
    mkdirSync(join(models, "m"));
    symlinkSync(TINY_SD15, join(models, "m", "tiny-sd15"));
    farm = await startFaultFarm({ coordinatorArgs: ["--max-attempts", "4"] });
    await farm.startCoordinator();
    await Promise.all([
      farm.startRealAgent("agent-0", join(models, "m"), METRICS),
      farm.startRealAgent("agent-1", join(models, "m"), METRICS),
    ]);
    await farm.waitForAgents(2);
    const { jobId } = await farm.client.submit({ params: PARAMS });
    const out = checkJob((await watchToEnd(farm.client, jobId)).events, 4);
    assert.equal(out.terminal, "done");
    for (const [i, img] of out.images) reference.set(i, Buffer.from(img.png));
  });
  after(async () => {
    await farm?.close();
    if (models) rmSync(models, { recursive: true, force: true });
  });

  function sameAsReference(events: Parameters<typeof checkJob>[0]): ReturnType<typeof checkJob> {
    const out = checkJob(events, 4);
    assert.equal(out.terminal, "done", `job ended ${out.terminal}`);
    for (const [i, img] of out.images) {
      assert.equal(img.seed, PARAMS.seed + BigInt(i));
      assert.ok(Buffer.from(img.png).equals(reference.get(i)!), `image ${i} differs from the fault-free run`);
    }
    return out;
  }

  test("kill -9 of an agent mid-step: its image is rendered again elsewhere, identical", { timeout: 45_000 }, async () => {
    const { jobId } = await farm.client.submit({ params: PARAMS });
    let victim = "";
    let killedImage = -1;
    const placed = new Map<number, string>();
    const { events } = await watchToEnd(farm.client, jobId, {
      onEvent: async (e) => {
        if (e.event.case === "placed") placed.set(e.event.value.imageIndex, e.event.value.agentId);
        if (!victim && e.event.case === "step" && e.event.value.step >= 2) {
          killedImage = e.event.value.imageIndex;
          victim = placed.get(killedImage)!;
          await farm.agents.find((a) => a.ready["id"] === victim)!.kill("SIGKILL");
        }
      },
    });
    assert.ok(victim, "an agent was killed mid-step");
    const out = sameAsReference(events);
    assert.ok(
      events.some((e) => e.event.case === "retried"),
      "a task was placed again",
    );
    assert.notEqual(out.images.get(killedImage)!.agentId, victim, "the killed agent's image came from the other agent");
    // Bring the farm back to two agents for the next faults.
    farm.agents.splice(
      farm.agents.findIndex((a) => a.ready["id"] === victim),
      1,
    );
    await farm.startRealAgent(victim, join(models, "m"), METRICS);
    await farm.waitForAgents(2);
  });

  test(
    "kill -9 of the coordinator mid-batch, then a restart: the job finishes from where it was, identical",
    { timeout: 45_000 },
    async () => {
      const { jobId } = await farm.client.submit({ params: PARAMS });
      let killedAfter = -1;
      let restart: Promise<void> | undefined;
      const before = new Set<number>();
      const { events, reconnects } = await watchToEnd(farm.client, jobId, {
        onEvent: (e) => {
          if (e.event.case === "image" && killedAfter < 0) {
            before.add(e.event.value.image!.index);
            killedAfter = Number(e.sequence);
            restart = (async () => {
              await farm.stopCoordinator("SIGKILL");
              await sleep(200);
              await farm.startCoordinator();
            })();
          }
        },
      });
      await restart;
      assert.ok(killedAfter > 0 && reconnects > 0, "the coordinator was killed and the client watched again");
      sameAsReference(events);
      for (const e of events) {
        if (e.event.case === "placed" && Number(e.sequence) > killedAfter)
          assert.ok(!before.has(e.event.value.imageIndex), "a finished image was rendered again");
      }
      // The render that was running at the kill went on, and the new coordinator attached to it.
      let reattached = 0;
      for (const a of farm.agents) {
        const text = await (await fetch(a.ready["metrics"] as string)).text();
        reattached += Number(/^latentfarm_agent_task_reattaches_total (\S+)$/m.exec(text)?.[1] ?? 0);
      }
      assert.ok(reattached > 0, "the restarted coordinator re-attached to a render still running on an agent");
      await farm.waitForAgents(2);
    },
  );

  test("nats-server killed (-9) and restarted mid-job: the job completes, identical", { timeout: 45_000 }, async () => {
    const { jobId } = await farm.client.submit({ params: PARAMS });
    let restart: Promise<void> | undefined;
    const { events } = await watchToEnd(farm.client, jobId, {
      timeoutMs: 90_000,
      onEvent: (e) => {
        if (!restart && e.event.case === "step" && e.event.value.step >= 2) restart = farm.restartNats("SIGKILL", 300);
      },
    });
    await restart;
    assert.ok(restart, "nats-server was restarted mid-job");
    sameAsReference(events);
  });
});
