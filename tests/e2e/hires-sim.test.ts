// Hires.fix split across agents, with simulated agents (real processes, gRPC, NATS and JetStream;
// only the model is simulated, with real-sized hand-overs and the farm's own tile blender). The
// tiled image's bytes are a digest of the blend, so they show whether the farm's hand-overs, tile
// inputs and blend order are deterministic whichever agents ran what, and across a coordinator crash.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { findNatsServer } from "@latentfarm/coordinator";
import { FarmError, type JobEvent } from "@latentfarm/shared";
import { REPO } from "../harness/farm.js";
import { checkJob, sleep, startFaultFarm, watchToEnd, type FaultFarm, type SimProcess } from "../harness/sim-agent-farm.js";

const skip = !findNatsServer()
  ? "nats-server not installed (apt-get install nats-server)"
  : !existsSync(join(REPO, "coordinator", "dist", "cli", "main.js"))
    ? "project not built (run npm run build)"
    : false;

// 64² first pass × 2 = 128² second pass; above 96×96 it is tiled in 64 px tiles with 16 px overlap: 3 × 3 tiles.
const TILING = ["--hires-tile-above", "96x96", "--hires-tile-size", "64", "--hires-tile-overlap", "16"];
// The subseed is pinned: an unset one is drawn at random per job, and the simulated render digests it.
const hires = {
  prompt: "castle",
  model: "sim",
  width: 64,
  height: 64,
  steps: 4,
  samplerName: "Euler",
  enableHr: true,
  hrScale: 2,
  denoisingStrength: 0.5,
  subseed: 7n,
};

const placedOn = (events: readonly JobEvent[], suffix: RegExp): string[] =>
  events.flatMap((e) => (e.event.case === "placed" && suffix.test(e.event.value.taskId) ? [e.event.value.agentId] : []));

describe("Hires.fix stages on simulated agents", { skip, concurrency: false, timeout: 120_000 }, () => {
  let farm: FaultFarm;
  let three: SimProcess | undefined;
  before(async () => {
    farm = await startFaultFarm({ coordinatorArgs: TILING });
    await farm.startCoordinator();
  });
  after(async () => {
    await farm?.close();
  });

  let reference: Uint8Array | undefined;

  test("a tiled second pass on 3 agents: tiles spread over the agents, one image, progress to first + second pass steps", async () => {
    three = await farm.startSims({ count: 3, slots: 1, stepMs: 10, prefix: "h3-", progress: true, logTasks: true });
    await farm.waitForAgents(3);
    const { jobId } = await farm.client.submit({ params: { ...hires, seed: 42n, hrSecondPassSteps: 3 } });
    const { events } = await watchToEnd(farm.client, jobId);
    const out = checkJob(events, 1);
    assert.equal(out.terminal, "done");
    const img = out.images.get(0)!;
    assert.deepEqual([img.width, img.height], [128, 128]);
    reference = img.png;
    const tileAgents = placedOn(events, /\.t\d+$/);
    assert.equal(
      new Set(events.flatMap((e) => (e.event.case === "placed" && /\.t\d+$/.test(e.event.value.taskId) ? [e.event.value.taskId] : [])))
        .size,
      9,
      "nine tiles",
    );
    assert.equal(new Set(tileAgents).size, 3, `tiles ran on every agent (${tileAgents.join(",")})`);
    assert.equal(placedOn(events, /\.first$/).length, 1);
    assert.equal(placedOn(events, /\.up$/).length, 1);
    assert.equal(placedOn(events, /\.asm$/).length, 1);
    const steps = events.flatMap((e) => (e.event.case === "step" ? [e.event.value] : []));
    assert.ok(
      steps.every((s, i) => s.totalSteps === 7 && (i === 0 || s.step > steps[i - 1]!.step)),
      "steps rise to 4 + 3",
    );
    assert.equal(steps.at(-1)?.step, 7);
  });

  test("the same job on 1 agent gives the same bytes", async () => {
    assert.ok(reference, "the 3-agent run produced an image");
    await three!.kill("SIGKILL");
    // The coordinator drops the killed agents after its heartbeat timeout.
    for (const deadline = Date.now() + 10_000; ;) {
      const { agents } = await farm.client.listAgents({});
      if (agents.length === 0) break;
      assert.ok(Date.now() < deadline, "killed agents were not dropped");
      await sleep(100);
    }
    await farm.startSims({ count: 1, slots: 1, stepMs: 5, prefix: "h1-", progress: true });
    await farm.waitForAgents(1);
    const { jobId } = await farm.client.submit({ params: { ...hires, seed: 42n, hrSecondPassSteps: 3 } });
    const { events } = await watchToEnd(farm.client, jobId);
    const out = checkJob(events, 1);
    assert.equal(out.terminal, "done");
    assert.deepEqual(new Set(placedOn(events, /./)), new Set(["h1-0"]));
    assert.deepEqual(Buffer.from(out.images.get(0)!.png), Buffer.from(reference!), "tiled on 1 agent = tiled on 3 agents");
  });

  test("a coordinator crash during the tiles re-runs only the missing stages; the image is the same", async () => {
    await farm.startSims({ count: 2, slots: 1, stepMs: 40, prefix: "hc-", progress: true });
    await farm.waitForAgents(3);
    const { jobId } = await farm.client.submit({ params: { ...hires, seed: 42n, hrSecondPassSteps: 3 } });
    let crashed = false;
    const { events } = await watchToEnd(farm.client, jobId, {
      timeoutMs: 60_000,
      onEvent: async (e) => {
        // Second-pass progress: the first pass and the upscale are handed over and stored.
        if (!crashed && e.event.case === "step" && e.event.value.step > 4) {
          crashed = true;
          await farm.stopCoordinator("SIGKILL");
          await farm.startCoordinator();
        }
      },
    });
    assert.ok(crashed, "the coordinator was killed during the second pass");
    const out = checkJob(events, 1);
    assert.equal(out.terminal, "done");
    assert.deepEqual(Buffer.from(out.images.get(0)!.png), Buffer.from(reference!), "the resumed image is the same");
    assert.equal(placedOn(events, /\.first$/).length, 1, "the first pass was placed once, before the crash");
    assert.equal(placedOn(events, /\.up$/).length, 1, "the upscale was placed once");
    // The resumed image counts once toward the tenant's unfinished images, and leaves with it.
    const metrics = await (await fetch(farm.coordinator!.ready["metrics"] as string)).text();
    assert.match(metrics, /latentfarm_tenant_queued_images\{tenant="default"\} 0\n/);
  });

  test("an agent killed during its tile: only that tile runs again elsewhere; the image is the same", async () => {
    const victim = await farm.startSims({ count: 1, slots: 1, stepMs: 60, prefix: "hk-", progress: true });
    await farm.waitForAgents(4);
    const { jobId } = await farm.client.submit({ params: { ...hires, seed: 42n, hrSecondPassSteps: 3 } });
    let killed = false;
    const { events } = await watchToEnd(farm.client, jobId, {
      timeoutMs: 60_000,
      onEvent: async (e) => {
        if (!killed && e.event.case === "placed" && e.event.value.agentId === "hk-0" && /\.t\d+$/.test(e.event.value.taskId)) {
          killed = true;
          await victim.kill("SIGKILL");
        }
      },
    });
    const out = checkJob(events, 1);
    assert.equal(out.terminal, "done");
    // Nine tiles are queued at once and every agent has one free slot, so the new agent gets one.
    assert.ok(killed, "a tile was placed on the agent to kill");
    const retried = events.flatMap((e) => (e.event.case === "retried" ? [e.event.value.taskId] : []));
    assert.ok(retried.length > 0 && retried.every((t) => /\.t\d+$/.test(t)), `only tiles were retried (${retried.join(",")})`);
    assert.equal(placedOn(events, /\.first$/).length, 1);
    assert.deepEqual(Buffer.from(out.images.get(0)!.png), Buffer.from(reference!), "the image is the same");
  });

  test("cancelling a stage task by its id cancels its image: queued tiles never run, running ones stop", async () => {
    const { jobId } = await farm.client.submit({ params: { ...hires, seed: 43n, hrSecondPassSteps: 20, batchSize: 2 } });
    let cancelledAt = 0;
    const { events } = await watchToEnd(farm.client, jobId, {
      timeoutMs: 60_000,
      onEvent: async (e) => {
        if (!cancelledAt && e.event.case === "placed" && e.event.value.imageIndex === 0 && /\.t\d+$/.test(e.event.value.taskId)) {
          cancelledAt = Number(e.sequence);
          const r = await farm.client.cancel({ jobId, taskIds: [e.event.value.taskId] });
          assert.deepEqual(r.cancelledImages, [0]);
        }
      },
    });
    assert.ok(cancelledAt > 0, "a tile of image 0 was placed");
    const out = checkJob(events, 2);
    assert.equal(out.terminal, "done", "the other image finished");
    assert.deepEqual([...out.cancelled], [0]);
    assert.ok(out.images.has(1));
    const cancelEvent = events.find((e) => e.event.case === "imageCancelled")!;
    const laterImage0 = events.filter(
      (e) => e.sequence > cancelEvent.sequence && e.event.case === "placed" && e.event.value.imageIndex === 0,
    );
    assert.deepEqual(laterImage0, [], "nothing of image 0 was placed after its cancellation");
    for (const deadline = Date.now() + 5000; ;) {
      const { agents } = await farm.client.listAgents({});
      if (agents.every((a) => a.busySlots === 0)) break;
      assert.ok(Date.now() < deadline, "agents still busy after the job ended");
      await sleep(50);
    }
  });
});

describe("a hires checkpoint's stages go to the agents that offer it", { skip, concurrency: false, timeout: 120_000 }, () => {
  let farm: FaultFarm;
  before(async () => {
    farm = await startFaultFarm({ coordinatorArgs: TILING });
    await farm.startCoordinator();
    await farm.startSims({ count: 1, slots: 2, stepMs: 5, prefix: "first-", models: ["sim"] });
    await farm.startSims({ count: 2, slots: 2, stepMs: 5, prefix: "second-", models: ["sim-hr"] });
    await farm.waitForAgents(3);
  });
  after(async () => {
    await farm?.close();
  });

  test("the first pass runs on the model's agent; the second pass, untiled or as upscale, tiles and assembly, on the checkpoint's", async () => {
    for (const [hrScale, tiled] of [
      [1.5, false],
      [2, true],
    ] as const) {
      const { jobId } = await farm.client.submit({ params: { ...hires, seed: 9n, hrScale, hrCheckpointName: "sim-hr" } });
      const { events } = await watchToEnd(farm.client, jobId);
      assert.equal(checkJob(events, 1).terminal, "done");
      assert.deepEqual(placedOn(events, /\.first$/), ["first-0"]);
      const later = placedOn(events, tiled ? /\.(up|t\d+|asm)$/ : /\.second$/);
      assert.equal(later.length, tiled ? 11 : 1);
      assert.ok(
        later.every((a) => a.startsWith("second-")),
        `second-pass stages on ${later.join(",")}`,
      );
    }
  });

  test("a hires checkpoint no agent offers is NOT_FOUND naming hr_checkpoint_name; without enable_hr it is ignored", async () => {
    await assert.rejects(farm.client.submit({ params: { ...hires, hrCheckpointName: "nowhere" } }), (err: unknown) => {
      const fe = FarmError.from(err);
      return fe.codeName === "NOT_FOUND" && /hr_checkpoint_name/.test(fe.message) && /nowhere/.test(fe.message);
    });
    const { jobId } = await farm.client.submit({ params: { ...hires, enableHr: false, hrCheckpointName: "nowhere" } });
    const { events } = await watchToEnd(farm.client, jobId);
    assert.equal(checkJob(events, 1).terminal, "done");
    assert.deepEqual(placedOn(events, /./), ["first-0"]);
  });
});
