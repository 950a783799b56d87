import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import sharp from "sharp";
import * as grpc from "@grpc/grpc-js";
import { fromBinary } from "@bufbuild/protobuf";
import { connect } from "@nats-io/transport-node";
import {
  AttemptOutcome,
  FarmError,
  HeartbeatSchema,
  JobState,
  RngSource,
  subjects,
  type Heartbeat,
  type ImageProvenance,
  type JobEvent,
} from "@latentfarm/shared";
import {
  FIXTURES,
  REPO,
  TEST_EMBEDDING,
  TEST_EMBEDDING_WORDS,
  TEST_RENAMED_CHECKPOINT,
  TEST_SDXL_CHECKPOINT,
  TEST_SDXL_REFINER_CHECKPOINT,
  TEST_UPSCALER,
  TEST_LORA,
  testLora,
  TEST_VAE,
  TEST_VAE_SHIFT,
  farmSkipReason,
  startService,
  startTestFarm,
  testEmbedding,
  testVae,
  type TestFarm,
} from "../harness/farm.js";

const skip = farmSkipReason();

/** The refiner job both refiner tests render: on one agent holding both checkpoints, and across two. */
const REFINER_JOB = {
  prompt: "a tower",
  model: "tiny-sd15",
  width: 64,
  height: 64,
  steps: 4,
  samplerName: "DPM++ 2M",
  seed: 23n,
  refinerCheckpoint: TEST_RENAMED_CHECKPOINT,
  refinerSwitchAt: 0.5,
};
/** Its image as one agent renders it (set by the first suite's refiner test). */
let refinedOnOneAgent: { infotext: string; pixels: Buffer } | undefined;

async function collect(farm: TestFarm, jobId: string): Promise<JobEvent[]> {
  const events: JobEvent[] = [];
  for await (const { event } of farm.client.watch({ jobId })) if (event) events.push(event);
  return events;
}

/** Renders a job's first image: its events (the job done), infotext and pixels. */
async function renderImage(farm: TestFarm, params: Record<string, unknown>) {
  const { jobId } = await farm.client.submit({ params });
  const events = await collect(farm, jobId);
  assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
  const img = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0]!;
  return { events, infotext: img.infotext, pixels: await sharp(img.png).raw().toBuffer() };
}

async function maxLevelDiff(png: Uint8Array, expectedPath: string): Promise<number> {
  const a = await sharp(png).removeAlpha().raw().toBuffer();
  const b = await sharp(expectedPath).removeAlpha().raw().toBuffer();
  assert.equal(a.length, b.length, "image sizes differ");
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!));
  return max;
}

/** A list command of the CLI against the farm, with --json: what it printed, parsed. */
function cliList(farm: TestFarm, command: string, ...flags: string[]): unknown {
  const cli = spawnSync(
    process.execPath,
    [join(REPO, "bin", "latentfarm.js"), command, "--coordinator", farm.coordinatorAddress, "--json", ...flags],
    {
      encoding: "utf8",
      timeout: 60_000,
    },
  );
  assert.equal(cli.status, 0, cli.stderr);
  return JSON.parse(cli.stdout);
}

async function expectStatus(p: Promise<unknown>, code: grpc.status, field?: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    const fe = FarmError.from(err);
    assert.equal(fe.codeName, grpc.status[code], `expected ${grpc.status[code]}, got ${fe.codeName}: ${fe.message}`);
    if (field) assert.match(fe.message, new RegExp(field), `message should name ${field}: ${fe.message}`);
    return true;
  });
}

describe("farm end to end (nats-server, coordinator and two agents as processes)", { skip, concurrency: false, timeout: 300_000 }, () => {
  let farm: TestFarm;
  before(async () => {
    // Checkpoints every 2 steps: they change no image, and a retry resumes from them.
    farm = await startTestFarm({ agents: 2, slots: 2, coordinatorArgs: ["--checkpoint-every", "2"] });
  });
  after(async () => {
    await farm?.close();
  });

  test("batch_size 2 × n_iter 2 lands on both agents; four PNGs come back through Watch with ordered steps", async () => {
    const { jobId, imageCount } = await farm.client.submit({
      params: {
        prompt: "a photo of a cat",
        model: "tiny-sd15",
        samplerName: "Euler a",
        steps: 6,
        width: 64,
        height: 64,
        batchSize: 2,
        nIter: 2,
        seed: 1000n,
      },
    });
    assert.equal(imageCount, 4);
    const events = await collect(farm, jobId);
    const seqs = events.map((e) => Number(e.sequence));
    assert.deepEqual(
      seqs,
      seqs.map((_, i) => i + 1),
      "event sequence numbers are 1..n without gaps",
    );
    const images = events
      .filter((e) => e.event.case === "image")
      .map((e) => (e.event.value as { image: { seed: bigint; png: Uint8Array; agentId: string; index: number } }).image);
    assert.equal(images.length, 4);
    assert.deepEqual(images.map((i) => i.seed).sort(), [1000n, 1001n, 1002n, 1003n]);
    assert.equal(new Set(images.map((i) => i.agentId)).size, 2, "both agents rendered");
    for (const img of images) {
      const meta = await sharp(img.png).metadata();
      assert.equal(meta.format, "png");
      assert.equal(meta.width, 64);
      // Provenance: the attempt that made it, where, on what, and how long its agent took.
      const { attempts, deviceSeconds, wastedDeviceSeconds } = (img as unknown as { provenance: ImageProvenance }).provenance;
      assert.equal(attempts.length, 1);
      const a = attempts[0]!;
      assert.deepEqual(
        [a.stage, a.agentId, a.outcome, a.agentMeasured, a.executionProvider],
        ["", img.agentId, AttemptOutcome.USED, true, "cpu"],
      );
      assert.match(a.runtime, /^onnxruntime-node \d+\.\d+\.\d+$/);
      assert.ok(a.device.length > 0 && a.seconds > 0 && a.loadSeconds >= 0 && a.loadSeconds <= a.seconds);
      assert.deepEqual([deviceSeconds, wastedDeviceSeconds], [a.seconds, 0]);
    }
    // Steps arrive in order per image, and each image's steps precede its image event.
    const lastStep = new Map<number, number>();
    for (const e of events) {
      if (e.event.case === "step") {
        const s = e.event.value;
        assert.ok(s.step > (lastStep.get(s.imageIndex) ?? 0), `step ${s.step} of image ${s.imageIndex} out of order`);
        assert.equal(s.totalSteps, 6);
        lastStep.set(s.imageIndex, s.step);
      }
    }
    assert.ok(lastStep.size > 0, "step events were relayed");
    assert.equal(events.at(-1)?.event.case, "done");
    const got = await farm.client.get({ jobId });
    assert.equal(got.state, JobState.SUCCEEDED);
    assert.equal(got.images.length, 4);
    // Re-watching a finished job replays from a sequence number.
    const replay: JobEvent[] = [];
    for await (const { event } of farm.client.watch({ jobId, afterSequence: BigInt(events.length - 2) })) if (event) replay.push(event);
    assert.deepEqual(
      replay.map((e) => Number(e.sequence)),
      [events.length - 1, events.length],
    );
  });

  // Every A1111 reference case: Euler a with CPU and NV RNG (p1, p2), DPM++ 2M Karras with weights,
  // BREAK and a weighted negative (p3), a 2-chunk prompt with clip skip 2 (p4), Heun batch (p5).
  const cases = skip
    ? []
    : (JSON.parse(readFileSync(join(FIXTURES, "reference", "txt2img", "cases.json"), "utf8")) as Array<Record<string, unknown>>);
  const RNG: Record<string, RngSource> = { CPU: RngSource.CPU, GPU: RngSource.GPU, NV: RngSource.NV };
  for (const c of cases) {
    test(`reference ${c["id"] as string} comes out within ±2 levels through the farm`, async () => {
      const { jobId } = await farm.client.submit({
        params: {
          prompt: c["prompt"] as string,
          negativePrompt: c["negative_prompt"] as string,
          seed: BigInt(c["seed"] as number),
          samplerName: c["sampler_name"] as string,
          scheduler: (c["scheduler"] as string | undefined) ?? "",
          steps: c["steps"] as number,
          cfgScale: c["cfg_scale"] as number,
          width: c["width"] as number,
          height: c["height"] as number,
          rng: RNG[c["rng"] as string]!,
          batchSize: (c["batch_size"] as number | undefined) ?? 1,
          clipSkip: (c["clip_skip"] as number | undefined) ?? 1,
          model: "tiny-sd15",
        },
      });
      const events = await collect(farm, jobId);
      const images = events
        .filter((e) => e.event.case === "image")
        .map((e) => (e.event.value as { image: { png: Uint8Array; infotext: string; index: number } }).image);
      const expected = c["expected"] as string[];
      assert.equal(images.length, expected.length, `images: ${JSON.stringify(events.at(-1)?.event)}`);
      for (const img of images) {
        const diff = await maxLevelDiff(img.png, join(FIXTURES, "reference", "txt2img", expected[img.index]!));
        assert.ok(diff <= 2, `${expected[img.index]}: max difference ${diff} levels`);
        assert.match(
          img.infotext,
          new RegExp(`Steps: ${c["steps"] as number}, Sampler: ${(c["sampler_name"] as string).replace(/[+]/g, "\\+")}, `),
        );
      }
    });
  }

  test("ListSamplers and ListSchedulers list A1111's names with their aliases and options", async () => {
    const { samplers } = await farm.client.listSamplers({});
    assert.equal(samplers.length, 20);
    const dpm = samplers.find((s) => s.name === "DPM++ 2M SDE");
    assert.deepEqual(dpm?.aliases, ["k_dpmpp_2m_sde"]);
    assert.deepEqual(dpm?.options, { scheduler: "exponential", brownian_noise: "True" });
    assert.deepEqual(samplers.find((s) => s.name === "Euler a")?.aliases, ["k_euler_a", "k_euler_ancestral"]);
    const { schedulers } = await farm.client.listSchedulers({});
    assert.equal(schedulers.length, 12);
    assert.deepEqual(
      schedulers.find((s) => s.name === "sgm_uniform"),
      { $typeName: "latentfarm.v1.SchedulerInfo", name: "sgm_uniform", label: "SGM Uniform", aliases: ["SGMUniform"] },
    );
    // Every listed name and alias is accepted by Submit's validation (a 1-step job reaches the queue).
    for (const name of [...samplers.flatMap((s) => [s.name, ...s.aliases])]) {
      const { jobId } = await farm.client.submit({
        params: { prompt: "x", model: "tiny-sd15", width: 64, height: 64, steps: 1, samplerName: name, seed: 1n },
      });
      await farm.client.cancel({ jobId }).catch(() => undefined);
    }
  });

  test("the CLI's img2img, inpainting and hires flags reach the agents; a bad flag value is a usage error", async () => {
    const dir = mkdtempSync(join(tmpdir(), "latentfarm-cli-"));
    try {
      const init = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 80, b: 40 } } })
        .png()
        .toBuffer();
      const mask = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 0, g: 0, b: 0 } } })
        .composite([
          { input: { create: { width: 24, height: 24, channels: 3, background: { r: 255, g: 255, b: 255 } } }, left: 20, top: 20 },
        ])
        .png()
        .toBuffer();
      writeFileSync(join(dir, "init.png"), init);
      writeFileSync(join(dir, "mask.png"), mask);
      const cli = (...args: string[]) =>
        spawnSync(
          process.execPath,
          [
            join(REPO, "bin", "latentfarm.js"),
            ...args,
            "--coordinator",
            farm.coordinatorAddress,
            "--model",
            "tiny-sd15",
            "--quiet",
            "--seed",
            "9",
          ],
          { encoding: "utf8", timeout: 120_000 },
        );
      const inpaint = cli(
        "img2img",
        "--prompt",
        "a red door",
        "--init-image",
        join(dir, "init.png"),
        "--mask",
        join(dir, "mask.png"),
        "--mask-blur",
        "2",
        "--inpainting-fill",
        "latent-noise",
        "--denoising-strength",
        "0.6",
        "--steps",
        "6",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        join(dir, "inpaint"),
      );
      assert.equal(inpaint.status, 0, inpaint.stderr);
      const [png] = readdirSync(join(dir, "inpaint"));
      const text = (await sharp(join(dir, "inpaint", png!)).metadata()).comments?.find((c) => c.keyword === "parameters")?.text ?? "";
      assert.match(text, /Denoising strength: 0\.6/);
      assert.match(text, /Mask blur: 2/);
      assert.match(text, /Masked content: latent noise/);
      const hires = cli(
        "txt2img",
        "--prompt",
        "a lighthouse",
        "--hr-scale",
        "2",
        "--hr-upscaler",
        "Latent (nearest)",
        "--hr-second-pass-steps",
        "3",
        "--denoising-strength",
        "0.5",
        "--steps",
        "4",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        join(dir, "hires"),
      );
      assert.equal(hires.status, 0, hires.stderr);
      const [hpng] = readdirSync(join(dir, "hires"));
      assert.deepEqual([(await sharp(join(dir, "hires", hpng!)).metadata()).width], [128]);
      const bad = cli(
        "img2img",
        "--prompt",
        "x",
        "--init-image",
        join(dir, "init.png"),
        "--resize-mode",
        "stretch",
        "--out",
        join(dir, "bad"),
      );
      assert.equal(bad.status, 2);
      assert.match(bad.stderr, /--resize-mode must be one of/);
      const tuned = cli(
        "txt2img",
        "--prompt",
        "a lighthouse",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--s-min-uncond",
        "100",
        "--override-setting",
        "skip_early_cond=0.2",
        "--override-setting",
        "always_discard_next_to_last_sigma=true",
        "--preview-every",
        "1",
        "--out",
        join(dir, "tuned"),
      );
      assert.equal(tuned.status, 0, tuned.stderr);
      // One live preview per step, named by job, image and step.
      assert.deepEqual(
        readdirSync(join(dir, "tuned", "previews")).map((f) => f.replace(/^.*-(\d+)-(\d+)\.png$/, "$1/$2")),
        ["0/0001", "0/0002", "0/0003"],
      );
      const [tpng] = readdirSync(join(dir, "tuned")).filter((f) => f.endsWith(".png"));
      const tunedText = (await sharp(join(dir, "tuned", tpng!)).metadata()).comments?.find((c) => c.keyword === "parameters")?.text ?? "";
      assert.match(tunedText, /Discard penultimate sigma: True, Skip Early CFG: 0\.2, NGMS: 100/);
      // An A1111 PNG's parameters as the whole job: the same image.
      const again = cli("txt2img", "--infotext-from", join(dir, "tuned", tpng!), "--out", join(dir, "again"));
      assert.equal(again.status, 0, again.stderr);
      const [apng] = readdirSync(join(dir, "again"));
      assert.deepEqual(readFileSync(join(dir, "again", apng!)), readFileSync(join(dir, "tuned", tpng!)));
      // A1111's Extras tab as a job: the rendered PNG upscaled by 2 (Lanczos) on an agent, its parameters kept.
      const extrasCli = (...args: string[]) =>
        spawnSync(
          process.execPath,
          [join(REPO, "bin", "latentfarm.js"), "extras", ...args, "--coordinator", farm.coordinatorAddress, "--quiet"],
          {
            encoding: "utf8",
            timeout: 120_000,
          },
        );
      const up = extrasCli(
        "--image",
        join(dir, "tuned", tpng!),
        "--upscaler-1",
        "Lanczos",
        "--upscaling-resize",
        "2",
        "--out",
        join(dir, "extras"),
      );
      assert.equal(up.status, 0, up.stderr);
      const [epng] = readdirSync(join(dir, "extras"));
      assert.match(epng!, /^\d{5}\.png$/);
      const upMeta = await sharp(join(dir, "extras", epng!)).metadata();
      assert.deepEqual([upMeta.width, upMeta.height], [128, 128]);
      const upText = Object.fromEntries((upMeta.comments ?? []).map((c) => [c.keyword, c.text]));
      assert.equal(upText["parameters"], tunedText);
      assert.equal(upText["postprocessing"], "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos");
      const noImage = extrasCli("--upscaler-1", "Lanczos", "--out", join(dir, "bad"));
      assert.equal(noImage.status, 2);
      assert.match(noImage.stderr, /--image/);
      const noText = cli("txt2img", "--infotext-from", join(dir, "init.png"), "--out", join(dir, "bad"));
      assert.equal(noText.status, 2);
      assert.match(noText.stderr, /has no "parameters" text/);
      const unknown = cli("txt2img", "--prompt", "x", "--override-setting", "eta_ancestrall=1", "--out", join(dir, "bad"));
      assert.equal(unknown.status, 2);
      assert.match(unknown.stderr, /--override-setting: .*eta_ancestrall/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("bad input gets a clear status naming the field, and the farm keeps serving", async () => {
    const base = { prompt: "x", model: "tiny-sd15", width: 64, height: 64, steps: 2 };
    const s = (p: Record<string, unknown>) => farm.client.submit({ params: { ...base, ...p } });
    await expectStatus(s({ width: 65 }), grpc.status.INVALID_ARGUMENT, "width");
    await expectStatus(s({ height: 100 }), grpc.status.INVALID_ARGUMENT, "height");
    await expectStatus(s({ steps: 0 }), grpc.status.INVALID_ARGUMENT, "steps");
    await expectStatus(s({ steps: 10_000 }), grpc.status.INVALID_ARGUMENT, "steps");
    await expectStatus(s({ samplerName: "Euler z" }), grpc.status.INVALID_ARGUMENT, "sampler_name");
    await expectStatus(s({ scheduler: "Fancy" }), grpc.status.INVALID_ARGUMENT, "scheduler");
    await expectStatus(s({ batchSize: 0 }), grpc.status.INVALID_ARGUMENT, "batch_size");
    await expectStatus(s({ nIter: 0 }), grpc.status.INVALID_ARGUMENT, "n_iter");
    await expectStatus(s({ cfgScale: -1 }), grpc.status.INVALID_ARGUMENT, "cfg_scale");
    await expectStatus(s({ cfgScale: Number.NaN }), grpc.status.INVALID_ARGUMENT, "cfg_scale");
    await expectStatus(s({ model: "no-such-model" }), grpc.status.NOT_FOUND, "model");
    await expectStatus(s({ model: "../etc" }), grpc.status.INVALID_ARGUMENT, "model");
    await expectStatus(s({ mask: new Uint8Array(10) }), grpc.status.INVALID_ARGUMENT, "mask");
    await expectStatus(s({ enableHr: true, hrScale: 0.5 }), grpc.status.INVALID_ARGUMENT, "hr_scale");
    await expectStatus(s({ enableHr: true, hrSamplerName: "nope" }), grpc.status.INVALID_ARGUMENT, "hr_sampler_name");
    await expectStatus(s({ denoisingStrength: 1.5 }), grpc.status.INVALID_ARGUMENT, "denoising_strength");
    await expectStatus(s({ loras: [{ name: "../x", teWeight: 1, unetWeight: 1 }] }), grpc.status.INVALID_ARGUMENT, "loras");
    // Upscalers and face restorers no agent has a model file for, refused at Submit naming their field.
    await expectStatus(s({ enableHr: true, hrUpscaler: "4x-UltraSharp", denoisingStrength: 0.5 }), grpc.status.NOT_FOUND, "hr_upscaler");
    await expectStatus(s({ restoreFaces: true }), grpc.status.NOT_FOUND, "restore_faces");
    await expectStatus(
      s({ initImages: [new Uint8Array(8)], extras: { upscaler1: "R-ESRGAN 4x+" } }),
      grpc.status.NOT_FOUND,
      "extras.upscaler_1",
    );
    await expectStatus(s({ extras: { upscaler1: "Lanczos" } }), grpc.status.INVALID_ARGUMENT, "init_images");
    await expectStatus(s({ sMinUncond: -1 }), grpc.status.INVALID_ARGUMENT, "s_min_uncond");
    await expectStatus(s({ overrideSettings: { uniPcVariant: "bh9" } }), grpc.status.INVALID_ARGUMENT, "override_settings.uni_pc_variant");
    await expectStatus(s({ overrideSettings: { skipEarlyCond: 2 } }), grpc.status.INVALID_ARGUMENT, "override_settings.skip_early_cond");
    await expectStatus(
      s({ overrideSettings: { sdNoiseSchedule: "Cosine" } }),
      grpc.status.INVALID_ARGUMENT,
      "override_settings.sd_noise_schedule",
    );
    // A sigma_min above the model's σ_max is only found where the schedule is built: the job fails with the agent's status.
    const { jobId: rising } = await farm.client.submit({ params: { ...base, scheduler: "Karras", overrideSettings: { sigmaMin: 20 } } });
    const risingEnd = (await collect(farm, rising)).at(-1)?.event;
    assert.equal(risingEnd?.case, "failed");
    assert.equal((risingEnd?.value as { code: string }).code, "INVALID_ARGUMENT");
    assert.match((risingEnd?.value as { message: string }).message, /sigma_min/);
    // Undecodable init images are found by the agent: the job fails with the agent's status, not a crash.
    const { jobId: bad } = await farm.client.submit({ params: { ...base, initImages: [new Uint8Array(10)] } });
    const badEvents = await collect(farm, bad);
    const failed = badEvents.at(-1)?.event;
    assert.equal(failed?.case, "failed");
    assert.equal((failed?.value as { code: string }).code, "INVALID_ARGUMENT");
    assert.match((failed?.value as { message: string }).message, /init_images/);
    await expectStatus(s({ prompt: "x".repeat(70 * 1024 * 1024) }), grpc.status.RESOURCE_EXHAUSTED);
    await expectStatus(farm.client.get({ jobId: "nope" }), grpc.status.NOT_FOUND, "job_id");
    await expectStatus(farm.client.cancel({ jobId: "nope" }), grpc.status.NOT_FOUND, "job_id");
    // Still serving.
    await farm.runJob();
  });

  test("A1111's settings and infotexts reach the agents: settings change the image and its infotext, which renders the image again", async () => {
    const params = {
      prompt: "a red cube",
      negativePrompt: "blurry",
      model: "tiny-sd15",
      width: 64,
      height: 64,
      steps: 4,
      samplerName: "Euler a",
      seed: 5n,
    };
    const render = async (extra: Record<string, unknown>) => {
      const { jobId } = await farm.client.submit({ params: { ...params, ...extra } });
      const events = await collect(farm, jobId);
      const img = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0];
      assert.ok(img, JSON.stringify(events.at(-1)?.event.value));
      return img;
    };
    const plain = await render({});
    const tuned = await render({
      sMinUncond: 100,
      overrideSettings: { etaAncestral: 0.5, skipEarlyCond: 0.25, sdNoiseSchedule: "Zero Terminal SNR" },
    });
    assert.doesNotMatch(plain.infotext, /Eta|NGMS|Skip Early CFG|Noise Schedule/);
    assert.match(tuned.infotext, /Noise Schedule: Zero Terminal SNR, Eta: 0\.5, Skip Early CFG: 0\.25, NGMS: 100/);
    assert.notDeepEqual(tuned.png, plain.png);

    // The image's infotext alone, as A1111's API takes one, renders the same image; entries the farm does
    // not reproduce come back as the job's warning.
    const { jobId } = await farm.client.submit({ params: { infotext: `${tuned.infotext}, ADetailer model: face_yolov8n.pt` } });
    const events = await collect(farm, jobId);
    const again = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0];
    assert.ok(again, JSON.stringify(events.at(-1)?.event.value));
    assert.deepEqual(again.png, tuned.png);
    const warnings = events.flatMap((e) => (e.event.case === "warning" ? [e.event.value.message] : []));
    assert.deepEqual(warnings, ["infotext: not reproduced by this farm: ADetailer model: face_yolov8n.pt"]);
    // An A1111 before 1.7.0-225 had ᾱ in float16: its infotext brings that back.
    const { jobId: oldJob } = await farm.client.submit({ params: { infotext: plain.infotext.replace(/Version: .*$/, "Version: v1.6.0") } });
    const old = (await collect(farm, oldJob)).flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0];
    assert.ok(old);
    assert.match(old.infotext, /Downcast alphas_cumprod: True/);
    assert.notDeepEqual(old.png, plain.png);
    // Pad conds: a prompt longer than its negative, padded to one UNet batch; the entry turns the option on again.
    const padded = await render({ prompt: Array.from({ length: 90 }, () => "cube").join(" "), overrideSettings: { padCondUncond: true } });
    assert.match(padded.infotext, /, Pad conds: True, Version: /);
    const { jobId: padJob } = await farm.client.submit({ params: { infotext: padded.infotext } });
    const padAgain = (await collect(farm, padJob)).flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0];
    assert.deepEqual(padAgain?.png, padded.png);
    // A civitai text names a checkpoint this farm may not have.
    await expectStatus(
      farm.client.submit({ params: { infotext: "x\nSteps: 2, Seed: 1, Model: not-here" } }),
      grpc.status.NOT_FOUND,
      "model",
    );
    await expectStatus(
      farm.client.submit({ params: { infotext: "x\nSteps: many, Sampler: Euler, Seed: 1" } }),
      grpc.status.INVALID_ARGUMENT,
      "infotext",
    );
  });

  test("a hires-fix job renders every image at the upscaled size with A1111's hires infotext", async () => {
    const { jobId } = await farm.client.submit({
      params: {
        prompt: "a castle",
        negativePrompt: TEST_EMBEDDING,
        model: "tiny-sd15",
        width: 64,
        height: 64,
        steps: 4,
        samplerName: "Euler",
        seed: 9n,
        batchSize: 2,
        enableHr: true,
        hrScale: 1.5,
        hrUpscaler: "Latent",
        denoisingStrength: 0.6,
        previewEveryNSteps: 2,
      },
    });
    const events = await collect(farm, jobId);
    assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
    // Live previews ride on the step events of both passes: the first pass's at 8×8, the second's at 12×12.
    const previews = events.flatMap((e) => (e.event.case === "step" && e.event.value.previewPng.length > 0 ? [e.event.value] : []));
    for (const index of [0, 1]) {
      const mine = previews.filter((p) => p.imageIndex === index);
      assert.deepEqual(
        mine.map((p) => p.step),
        [2, 4, 6, 8],
        `image ${index}`,
      );
      const sizes = await Promise.all(mine.map(async (p) => (await sharp(p.previewPng).metadata()).width));
      assert.deepEqual(sizes, [8, 8, 12, 12]);
    }
    const images = events
      .filter((e) => e.event.case === "image")
      .map((e) => (e.event.value as { image: { png: Uint8Array; infotext: string } }).image);
    assert.equal(images.length, 2);
    for (const img of images) {
      const meta = await sharp(img.png).metadata();
      assert.deepEqual([meta.width, meta.height], [96, 96]);
      assert.match(img.infotext, /Size: 64x64, .*Denoising strength: 0\.6, .*Hires upscale: 1\.5/);
      // The first pass's embeddings, recorded as it encoded its prompts.
      assert.match(img.infotext, new RegExp(`TI hashes: "${TEST_EMBEDDING}: [0-9a-f]{12}"`));
    }
  });

  test("a hires checkpoint: the second pass loads it and runs there; the infotext names both models", async () => {
    const params = {
      prompt: "a tower",
      model: "tiny-sd15",
      width: 64,
      height: 64,
      steps: 3,
      samplerName: "Euler",
      seed: 21n,
      enableHr: true,
      hrScale: 1.5,
      denoisingStrength: 0.5,
    };
    const image = (extra: Record<string, unknown>) => renderImage(farm, { ...params, ...extra });
    const switched = await image({ hrCheckpointName: "tiny-sd15-hr" });
    assert.match(switched.infotext, /Model: tiny-sd15, .*Hires checkpoint: tiny-sd15-hr,/);
    // Agents report their loaded models in their heartbeats.
    for (const deadline = Date.now() + 5000; ;) {
      const { agents } = await farm.client.listAgents({});
      if (agents.some((a) => a.loadedModels.includes("tiny-sd15-hr"))) break;
      assert.ok(Date.now() < deadline, "no agent reports the hires checkpoint loaded");
      await new Promise((r) => setTimeout(r, 50));
    }
    // The checkpoint is a second name for the same weights: the same pixels as without it.
    const same = await image({});
    assert.deepEqual(switched.pixels, same.pixels);
    assert.doesNotMatch(same.infotext, /Hires checkpoint/);
  });

  test("a refiner: the pass switches to it on the agent that runs it; the infotext names both; bad refiners are refused", async () => {
    const params = { prompt: "a tower", model: "tiny-sd15", width: 64, height: 64, steps: 4, samplerName: "DPM++ 2M", seed: 23n };
    const image = (extra: Record<string, unknown>) => renderImage(farm, { ...params, ...extra });
    // z-renamed holds the kit's SD 1.x weights as a checkpoint the agent builds: another pipeline to switch to.
    const sd1 = await image(REFINER_JOB);
    refinedOnOneAgent = sd1;
    assert.match(
      sd1.infotext,
      new RegExp(`Model: tiny-sd15, .*Refiner: ${TEST_RENAMED_CHECKPOINT} \\[[0-9a-f]{10}\\], Refiner switch at: 0.5`),
    );
    const s = (extra: Record<string, unknown>) => farm.client.submit({ params: { ...params, ...extra } });
    await expectStatus(s({ refinerCheckpoint: "no-such-refiner" }), grpc.status.NOT_FOUND, "refiner_checkpoint");
    await expectStatus(s({ refinerCheckpoint: "tiny-sd15-hr", refinerSwitchAt: 2 }), grpc.status.INVALID_ARGUMENT, "refiner_switch_at");
  });

  test("an SDXL checkpoint renders through the farm, Hires.fix and the SDXL refiner included; a batch image equals its single render; ListModels says SDXL", async () => {
    const params = {
      prompt: "a (red:1.2) castle",
      model: TEST_SDXL_CHECKPOINT,
      width: 64,
      height: 48,
      steps: 3,
      samplerName: "DPM++ 2M",
      scheduler: "Karras",
      seed: 31n,
      enableHr: true,
      hrScale: 1.5,
      hrUpscaler: "Latent",
      denoisingStrength: 0.5,
    };
    const render = async (extra: Record<string, unknown>) => {
      const { jobId } = await farm.client.submit({ params: { ...params, ...extra } });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      // Images arrive as they finish: by seed, they are in batch order.
      return Promise.all(
        events
          .flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))
          .sort((a, b) => Number(a.seed - b.seed))
          .map(async (img) => ({
            infotext: img.infotext,
            meta: await sharp(img.png).metadata(),
            pixels: await sharp(img.png).raw().toBuffer(),
          })),
      );
    };
    const batch = await render({ batchSize: 2 });
    assert.equal(batch.length, 2);
    for (const img of batch) {
      assert.deepEqual([img.meta.width, img.meta.height], [96, 72]);
      assert.match(img.infotext, new RegExp(`Model hash: [0-9a-f]{10}, Model: ${TEST_SDXL_CHECKPOINT},`));
    }
    assert.notDeepEqual(batch[0]!.pixels, batch[1]!.pixels);
    const [single] = await render({ seed: 32n });
    assert.deepEqual(single!.pixels, batch[1]!.pixels);
    // Refined by the SDXL refiner: the second pass hands over to it on the agent that holds both.
    const [refined] = await render({ seed: 32n, refinerCheckpoint: TEST_SDXL_REFINER_CHECKPOINT, refinerSwitchAt: 0.5 });
    assert.match(refined!.infotext, new RegExp(`Refiner: ${TEST_SDXL_REFINER_CHECKPOINT} \\[[0-9a-f]{10}\\], Refiner switch at: 0.5`));
    assert.notDeepEqual(refined!.pixels, single!.pixels);
    // ListModels tells SDXL from SD 1.x by the files: the kit's ONNX export carries nothing that says.
    const { models } = await farm.client.listModels({});
    const family = (name: string) => models.find((m) => m.name === name)?.family;
    assert.deepEqual(
      [family(TEST_SDXL_CHECKPOINT), family(TEST_SDXL_REFINER_CHECKPOINT), family(TEST_RENAMED_CHECKPOINT), family("tiny-sd15")],
      ["sdxl", "sdxl-refiner", "sd1", ""],
    );
  });

  test("a textual-inversion embedding in the agents' --embeddings folder: its name in a prompt uses it, and the infotext says so", async () => {
    const image = async (prompt: string, negativePrompt = "") => {
      const { jobId } = await farm.client.submit({
        params: { prompt, negativePrompt, model: "tiny-sd15", width: 64, height: 64, steps: 3, samplerName: "Euler", seed: 8n },
      });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      const img = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0]!;
      return { infotext: img.infotext, pixels: await sharp(img.png).raw().toBuffer() };
    };
    const hash = createHash("sha256").update(testEmbedding()).digest("hex").slice(0, 12);
    const used = await image("a castle", `${TEST_EMBEDDING}, fog`);
    assert.match(used.infotext, new RegExp(`TI hashes: "${TEST_EMBEDDING}: ${hash}"`));
    // Its vectors are the model's own rows for TEST_EMBEDDING_WORDS: the agents put them in the text encoder.
    const words = await image("a castle", `${TEST_EMBEDDING_WORDS}, fog`);
    assert.doesNotMatch(words.infotext, /TI hashes/);
    assert.deepEqual(used.pixels, words.pixels);
    // A name no embedding has is encoded as words: another image.
    assert.notDeepEqual((await image("a castle", "lf-sparkly, fog")).pixels, used.pixels);
    // ListEmbeddings: the file, with the agents whose folders have it (from their heartbeats).
    const listed = { name: TEST_EMBEDDING, vectors: 2, width: 32, hash, agents: ["agent-0", "agent-1"] };
    const { embeddings, skipped } = await farm.client.listEmbeddings({});
    assert.deepEqual(
      embeddings.map((e) => ({ name: e.name, vectors: e.vectors, width: e.width, hash: e.hash, agents: e.agents })),
      [listed],
    );
    // The file no model can use, with why.
    const left = skipped.map((s) => ({ file: s.file, reason: s.reason.replace(/^.*not-an-embedding\.pt: /, ""), agents: s.agents }));
    const why = "not a torch zip archive: files saved by torch before 1.6 (or not by torch.save) are not read; convert it to .safetensors";
    assert.deepEqual(left, [{ file: "not-an-embedding.pt", reason: why, agents: ["agent-0", "agent-1"] }]);
    const printed = cliList(farm, "embeddings") as { embeddings: unknown[]; skipped: Array<{ file: string }> };
    assert.deepEqual(printed.embeddings, [listed]);
    assert.deepEqual(
      printed.skipped.map((s) => s.file),
      ["not-an-embedding.pt"],
    );
  });

  test("a VAE file in the agents' --vae-dir decodes in place of the model's own when a job's sd_vae names it", async () => {
    const image = async (sdVae: string | undefined, extra: Record<string, unknown> = {}) => {
      const { jobId } = await farm.client.submit({
        params: {
          prompt: "a lighthouse",
          model: "tiny-sd15",
          width: 64,
          height: 64,
          steps: 3,
          samplerName: "Euler",
          seed: 9n,
          ...(sdVae !== undefined && { overrideSettings: { sdVae } }),
          ...extra,
        },
      });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      const img = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0]!;
      return { infotext: img.infotext, pixels: await sharp(img.png).raw().toBuffer() };
    };
    const own = await image(undefined);
    const bright = await image(TEST_VAE);
    const hash = createHash("sha256").update(testVae()).digest("hex").slice(0, 10);
    assert.match(bright.infotext, new RegExp(`Model: tiny-sd15, VAE hash: ${hash}, VAE: ${TEST_VAE.replace(".", "\\.")},`));
    assert.doesNotMatch(own.infotext, /VAE/);
    // Its decoder's output bias is the model's own plus TEST_VAE_SHIFT: every pixel that stays unclipped
    // is TEST_VAE_SHIFT × 127.5 levels brighter (±2 for the two builds' float rounding).
    const shift = TEST_VAE_SHIFT * 127.5;
    let compared = 0;
    for (let i = 0; i < own.pixels.length; i++) {
      if (own.pixels[i]! < 3 || own.pixels[i]! + shift > 250) continue;
      assert.ok(Math.abs(bright.pixels[i]! - own.pixels[i]! - shift) <= 2, `pixel ${i}: ${own.pixels[i]} → ${bright.pixels[i]}`);
      compared++;
    }
    assert.ok(compared > own.pixels.length / 2, `only ${compared} pixels below the clip`);
    // "None" is the model's own VAE; a pasted infotext's "VAE" names the file as sd_vae does.
    assert.deepEqual((await image("None")).pixels, own.pixels);
    const pasted = await image(undefined, { infotext: `a lighthouse\nSteps: 3, Sampler: Euler, Seed: 9, VAE: ${TEST_VAE}` });
    assert.deepEqual(pasted.pixels, bright.pixels);
    // The agents list it (ListVaes, and the CLI); a name none has is refused at Submit, naming the field.
    const listed = { name: TEST_VAE, sizeBytes: testVae().length, agents: ["agent-0", "agent-1"] };
    const { vaes } = await farm.client.listVaes({});
    assert.deepEqual(
      vaes.map((f) => ({ name: f.name, sizeBytes: Number(f.sizeBytes), agents: f.agents })),
      [listed],
    );
    assert.deepEqual(cliList(farm, "vaes"), [listed]);
    await expectStatus(
      farm.client.submit({ params: { prompt: "x", model: "tiny-sd15", overrideSettings: { sdVae: "kl-f8-anime2.ckpt" } } }),
      grpc.status.NOT_FOUND,
      "override_settings.sd_vae",
    );
    await expectStatus(
      farm.client.submit({ params: { model: "tiny-sd15", infotext: "x\nSteps: 3, Seed: 1, VAE: kl-f8-anime2.ckpt" } }),
      grpc.status.NOT_FOUND,
      "override_settings.sd_vae.*it comes from the infotext's VAE",
    );
    await expectStatus(
      farm.client.submit({ params: { prompt: "x", model: "tiny-sd15", overrideSettings: { sdVae: "../VAE/x.pt" } } }),
      grpc.status.INVALID_ARGUMENT,
      "override_settings.sd_vae",
    );
  });

  test("a LoRA on one agent: listed there (ListLoras, the CLI), its jobs rendered there; one no agent with the checkpoint has is refused at Submit", async () => {
    const listed = { name: TEST_LORA, sizeBytes: testLora().length, agents: ["agent-0"] };
    const { loras } = await farm.client.listLoras({});
    // Metadata only when asked for, read from the agent that has the file.
    assert.equal(loras[0]?.metadataJson, "");
    const withMetadata = await farm.client.listLoras({ metadata: true });
    assert.deepEqual(JSON.parse(withMetadata.loras[0]!.metadataJson), {
      ss_resolution: "(64, 64)",
      ss_tag_frequency: { ink: { lf: 3 } },
      ss_network_dim: "2",
    });
    assert.deepEqual(
      loras.map((l) => ({ name: l.name, sizeBytes: Number(l.sizeBytes), agents: l.agents })),
      [listed],
    );
    assert.deepEqual(cliList(farm, "loras"), [listed]);
    assert.deepEqual(cliList(farm, "loras", "--metadata"), [
      { ...listed, metadata: { ss_resolution: "(64, 64)", ss_tag_frequency: { ink: { lf: 3 } }, ss_network_dim: "2" } },
    ]);
    const misuse = spawnSync(
      process.execPath,
      [join(REPO, "bin", "latentfarm.js"), "vaes", "--coordinator", farm.coordinatorAddress, "--metadata"],
      {
        encoding: "utf8",
        timeout: 60_000,
      },
    );
    assert.deepEqual([misuse.status, misuse.stderr], [2, "latentfarm vaes: --metadata is for `latentfarm loras` only\n"]);
    // Its images come from agent-0, the one with the file, merged into the checkpoint (LoRAs merge into .safetensors ones).
    const render = async (prompt: string) => {
      const { jobId } = await farm.client.submit({
        params: { prompt, model: TEST_RENAMED_CHECKPOINT, width: 64, height: 64, steps: 3, samplerName: "Euler", seed: 5n, batchSize: 2 },
      });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      return events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []));
    };
    const withLora = await render(`a lighthouse <lora:${TEST_LORA.toUpperCase()}:1>`);
    assert.deepEqual(
      withLora.map((i) => i.agentId),
      ["agent-0", "agent-0"],
    );
    // Placed there from the start: no attempt failed on the agent without the file first.
    for (const img of withLora) {
      const { attempts } = (img as unknown as { provenance: ImageProvenance }).provenance;
      assert.deepEqual(
        attempts.map((a) => [a.agentId, a.outcome]),
        [["agent-0", AttemptOutcome.USED]],
      );
    }
    const hash = createHash("sha256")
      .update(testLora().subarray(8 + Number(Buffer.from(testLora()).readBigUInt64LE(0))))
      .digest("hex");
    assert.match(withLora[0]!.infotext, new RegExp(`Lora hashes: "${TEST_LORA.toUpperCase()}: ${hash.slice(0, 12)}"`));
    const without = await render("a lighthouse");
    assert.notDeepEqual(await sharp(withLora[0]!.png).raw().toBuffer(), await sharp(without[0]!.png).raw().toBuffer());
    // Named in the prompt (in any case), in `loras`, or in the hires prompt only: each names its field.
    await expectStatus(
      farm.client.submit({ params: { prompt: "x <lora:nowhere:0.8>", model: TEST_RENAMED_CHECKPOINT } }),
      grpc.status.FAILED_PRECONDITION,
      `prompt: no agent has both checkpoint "${TEST_RENAMED_CHECKPOINT}".* and LoRA "nowhere"`,
    );
    await expectStatus(
      farm.client.submit({
        params: { prompt: "x", model: TEST_RENAMED_CHECKPOINT, loras: [{ name: "nowhere", teWeight: 1, unetWeight: 1 }] },
      }),
      grpc.status.FAILED_PRECONDITION,
      "loras\\[0\\].name",
    );
    await expectStatus(
      farm.client.submit({
        params: {
          prompt: "x",
          model: TEST_RENAMED_CHECKPOINT,
          enableHr: true,
          hrScale: 2,
          hrPrompt: "<lora:nowhere:1>",
          width: 64,
          height: 64,
        },
      }),
      grpc.status.FAILED_PRECONDITION,
      "hr_prompt",
    );
    // The kit's tiny-sd15 is an ONNX folder on both agents: no LoRA merges into it.
    await expectStatus(
      farm.client.submit({ params: { prompt: `x <lora:${TEST_LORA}:1>`, model: "tiny-sd15" } }),
      grpc.status.FAILED_PRECONDITION,
      'model: "tiny-sd15" is an ONNX folder on every agent that has it',
    );
    // A tag A1111 cannot parse is the prompt's error.
    await expectStatus(
      farm.client.submit({ params: { prompt: `x <lora:${TEST_LORA}:heavy>`, model: "tiny-sd15" } }),
      grpc.status.INVALID_ARGUMENT,
      "prompt",
    );
  });

  test("agents leave repeated inventories out of their heartbeats once the coordinator has asked; its listings stay whole", async () => {
    const nc = await connect({ servers: farm.nats.url });
    const seen = new Map<string, Heartbeat[]>();
    try {
      const sub = nc.subscribe(subjects.allAgentHeartbeats, {
        callback: (err, msg) => {
          if (err) return;
          const hb = fromBinary(HeartbeatSchema, msg.data);
          const id = hb.agent?.agentId ?? "";
          seen.set(id, [...(seen.get(id) ?? []), hb]);
        },
      });
      // Heartbeats every 250 ms here; whole inventories every 10 s or on a change.
      await new Promise((r) => setTimeout(r, 2000));
      sub.unsubscribe();
    } finally {
      await nc.close();
    }
    for (const id of ["agent-0", "agent-1"]) {
      const beats = seen.get(id) ?? [];
      assert.ok(beats.length >= 4, `${id}: ${beats.length} heartbeats`);
      assert.ok(
        beats.every((b) => b.omitsInventory && /^[0-9a-f]{32}$/.test(b.inventoryDigest)),
        `${id}: the coordinator asked, so the agent leaves repeats out`,
      );
      assert.ok(
        beats.some((b) => b.inventoryOmitted && b.availableModels.length === 0 && b.loras.length === 0),
        id,
      );
    }
    // The coordinator kept what they left out.
    const { models } = await farm.client.listModels({});
    assert.ok(models.some((m) => m.name === TEST_RENAMED_CHECKPOINT));
    const { loras } = await farm.client.listLoras({});
    assert.deepEqual(
      loras.map((l) => [l.name, l.agents]),
      [[TEST_LORA, ["agent-0"]]],
    );
  });

  test("A1111 prompt styles from the coordinator's --styles-file merge into the prompts; ListStyles lists them", async () => {
    const image = async (params: Record<string, unknown>) => {
      const { jobId } = await farm.client.submit({
        params: { model: "tiny-sd15", width: 64, height: 64, steps: 3, samplerName: "Euler", seed: 4n, ...params },
      });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      const img = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0]!;
      return { infotext: img.infotext, pixels: await sharp(img.png).raw().toBuffer() };
    };
    const styled = await image({ prompt: "a harbour", negativePrompt: "blurry", styles: ["lf-cinematic", "lf-grain"] });
    const written = await image({ prompt: "cinematic still of a harbour, bokeh, film grain", negativePrompt: "blurry, cartoon" });
    assert.deepEqual(styled.pixels, written.pixels);
    assert.equal(styled.infotext, written.infotext);
    assert.match(styled.infotext, /^cinematic still of a harbour, bokeh, film grain\nNegative prompt: blurry, cartoon\n/);
    const listed = [
      { name: "lf-cinematic", prompt: "cinematic still of {prompt}, bokeh", negativePrompt: "cartoon" },
      { name: "lf-grain", prompt: "film grain", negativePrompt: "" },
    ];
    const { styles } = await farm.client.listStyles({});
    assert.deepEqual(
      styles.map((st) => ({ name: st.name, prompt: st.prompt, negativePrompt: st.negativePrompt })),
      listed,
    );
    assert.deepEqual(cliList(farm, "styles"), listed);
    await expectStatus(
      farm.client.submit({ params: { prompt: "x", model: "tiny-sd15", styles: ["lf-grain", "Noir"] } }),
      grpc.status.NOT_FOUND,
      "styles\\[1\\]",
    );
  });

  test("a pasted infotext's model is found by its Model hash, as A1111 finds it, though this farm names the file otherwise", async () => {
    const hash = createHash("sha256")
      .update(readFileSync(join(FIXTURES, "tiny-sd15.safetensors")))
      .digest("hex")
      .slice(0, 10);
    // Agents hash their checkpoints in the background and report the hashes in heartbeats (ListModels too).
    for (const deadline = Date.now() + 20_000; ;) {
      const { models } = await farm.client.listModels({});
      const m = models.find((x) => x.name === TEST_RENAMED_CHECKPOINT);
      if (m?.modelHash === hash) {
        assert.equal(m.format, "safetensors");
        assert.equal(models.find((x) => x.name === "tiny-sd15")?.modelHash, "", "an ONNX folder has no Model hash");
        break;
      }
      assert.ok(Date.now() < deadline, `no agent reported ${TEST_RENAMED_CHECKPOINT}'s hash: ${JSON.stringify(m)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const pasted = `a lighthouse\nSteps: 3, Sampler: Euler, Seed: 6, Size: 64x64, Model hash: ${hash}, Model: tiny-sd15-pruned-fp16`;
    const { jobId } = await farm.client.submit({ params: { infotext: pasted } });
    const events = await collect(farm, jobId);
    assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
    const img = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))[0]!;
    assert.match(img.infotext, new RegExp(`Model hash: ${hash}, Model: ${TEST_RENAMED_CHECKPOINT},`));
    // A hash no checkpoint has leaves the infotext's name, which no agent offers here: NOT_FOUND, naming the
    // model and where it came from.
    await expectStatus(
      farm.client.submit({ params: { infotext: "x\nSteps: 3, Seed: 6, Model hash: 0123456789, Model: tiny-sd15-pruned-fp16" } }),
      grpc.status.NOT_FOUND,
      "model.*it comes from the infotext",
    );
  });

  test("Cancel ends the job cancelled within one step and frees the agent", async () => {
    const { jobId } = await farm.client.submit({
      params: { prompt: "slow", model: "tiny-sd15", width: 64, height: 64, steps: 150, samplerName: "Euler", seed: 5n },
    });
    const it = farm.client.watch({ jobId })[Symbol.asyncIterator]();
    for (;;) {
      const { value, done } = await it.next();
      assert.ok(!done, "job ended before it started");
      if (value.event?.event.case === "step") {
        break;
      }
    }
    const sent = Date.now();
    const { state } = await farm.client.cancel({ jobId });
    assert.equal(state, JobState.CANCELLED);
    const rest: JobEvent[] = [];
    for (;;) {
      const { value, done } = await it.next();
      if (done) break;
      if (value.event) rest.push(value.event);
    }
    assert.equal(rest.at(-1)?.event.case, "cancelled");
    // The agent stops within one model call: its busy slots drop to zero well before 150 steps.
    for (;;) {
      const { agents } = await farm.client.listAgents({});
      const busy = agents.reduce((n, a) => n + a.busySlots, 0);
      if (busy === 0) break;
      assert.ok(Date.now() - sent < 3000, "agent still busy 3 s after cancel");
      await new Promise((r) => setTimeout(r, 20));
    }
    await expectStatus(farm.client.cancel({ jobId }), grpc.status.FAILED_PRECONDITION, "job_id");
  });

  test("ListUpscalers names the built-in upscalers and the model files agents have; an Extras job with one runs where it is", async () => {
    const { upscalers, faceRestorers } = await farm.client.listUpscalers({});
    assert.ok(upscalers.some((u) => u.name === "Lanczos" && u.builtin && u.agents.length === 0));
    assert.ok(upscalers.some((u) => u.name === "Latent (nearest-exact)" && u.builtin));
    assert.deepEqual(
      upscalers.filter((u) => !u.builtin).map((u) => ({ name: u.name, agents: u.agents })),
      [{ name: TEST_UPSCALER, agents: ["agent-0"] }],
    );
    assert.deepEqual(faceRestorers, []);
    const [w, h] = [24, 16];
    const raw = Uint8Array.from({ length: w * h * 3 }, (_, i) => (i * 37) % 256);
    const source = await sharp(raw, { raw: { width: w, height: h, channels: 3 } })
      .png()
      .toBuffer();
    const images = (
      await collect(
        farm,
        (await farm.client.submit({ params: { initImages: [source], extras: { upscaler1: TEST_UPSCALER, upscalingResize: 2 } } })).jobId,
      )
    )
      .filter((e) => e.event.case === "image")
      .map((e) => (e.event.value as { image: { agentId: string; png: Uint8Array; infotext: string } }).image);
    assert.equal(images.length, 1);
    assert.equal(images[0]!.agentId, "agent-0", "only agent-0 has the upscaler's file");
    assert.equal(images[0]!.infotext, `Postprocess upscale by: 2.0, Postprocess upscaler: ${TEST_UPSCALER}`);
    // ×2 nearest: each source pixel becomes a 2×2 block.
    const { data, info } = await sharp(images[0]!.png).raw().toBuffer({ resolveWithObject: true });
    assert.deepEqual([info.width, info.height], [2 * w, 2 * h]);
    for (const [x, y] of [
      [0, 0],
      [5, 3],
      [23, 15],
    ] as const) {
      for (const [dx, dy] of [
        [0, 0],
        [1, 1],
      ] as const) {
        const at = ((2 * y + dy) * 2 * w + 2 * x + dx) * info.channels;
        assert.deepEqual([...data.subarray(at, at + 3)], [...raw.subarray((y * w + x) * 3, (y * w + x) * 3 + 3)], `pixel ${x},${y}`);
      }
    }
  });

  test("A1111's HTTP API (latentfarm a1111-api) renders what Submit renders, answers as A1111 does, and cancels a job whose caller leaves", async () => {
    const gateway = await startService(["a1111-api", "--coordinator", farm.coordinatorAddress, "--port", "0", "--metrics-port", "0"]);
    const base = `${String(gateway.ready["url"])}/sdapi/v1`;
    const post = (path: string, body: unknown, signal?: AbortSignal) =>
      fetch(`${base}/${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
        ...(signal && { signal }),
      });
    try {
      // A body as A1111 clients send it: the checkpoint by its A1111 title, a null for a default, settings by option name.
      const body = {
        prompt: "a lighthouse",
        negative_prompt: "fog",
        seed: 4242,
        steps: 5,
        cfg_scale: 6,
        width: 64,
        height: 64,
        batch_size: 2,
        sampler_name: "DPM++ 2M",
        scheduler: "Karras",
        restore_faces: null,
        send_images: true,
        save_images: false,
        alwayson_scripts: {},
        override_settings: { sd_model_checkpoint: "tiny-sd15.safetensors", CLIP_stop_at_last_layers: 2, samples_format: "png" },
      };
      const res = await post("txt2img", body);
      assert.equal(res.status, 200, await res.clone().text());
      const answer = (await res.json()) as { images: string[]; parameters: Record<string, unknown>; info: string };
      assert.equal(answer.images.length, 2);
      assert.deepEqual(answer.parameters, body);
      const info = JSON.parse(answer.info) as Record<string, unknown>;
      assert.deepEqual(info["all_seeds"], [4242, 4243]);
      assert.equal(info["seed"], 4242);
      assert.equal(info["sampler_name"], "DPM++ 2M");
      assert.equal(info["clip_skip"], 2);
      assert.equal(info["sd_model_name"], "tiny-sd15");
      assert.deepEqual(info["all_prompts"], ["a lighthouse", "a lighthouse"]);
      // The same job through Submit gives the same PNGs (infotext included) byte for byte.
      const { jobId } = await farm.client.submit({
        params: {
          prompt: "a lighthouse",
          negativePrompt: "fog",
          seed: 4242n,
          steps: 5,
          cfgScale: 6,
          width: 64,
          height: 64,
          batchSize: 2,
          samplerName: "DPM++ 2M",
          scheduler: "Karras",
          model: "tiny-sd15",
          clipSkip: 2,
        },
      });
      const direct = (await collect(farm, jobId))
        .flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []))
        .sort((a, b) => a.index - b.index);
      assert.deepEqual(
        answer.images,
        direct.map((i) => Buffer.from(i.png).toString("base64")),
      );
      assert.deepEqual(
        info["infotexts"],
        direct.map((i) => i.infotext),
      );
      // png-info reads the generation data back from an image, as A1111's does.
      const pngInfo = (await (await post("png-info", { image: `data:image/png;base64,${answer.images[1]}` })).json()) as {
        info: string;
        parameters: Record<string, string>;
      };
      assert.equal(pngInfo.info, direct[1]!.infotext);
      assert.deepEqual(
        [pngInfo.parameters["Prompt"], pngInfo.parameters["Seed"], pngInfo.parameters["Sampler"]],
        ["a lighthouse", "4243", "DPM++ 2M"],
      );
      // Extras in a batch: each image upscaled, in the list's order.
      const batch = (await (
        await post("extra-batch-images", {
          imageList: answer.images.map((data, k) => ({ data, name: `${k}.png` })),
          upscaler_1: "Lanczos",
          upscaling_resize: 2,
        })
      ).json()) as { images: string[] };
      assert.equal(batch.images.length, 2);
      for (const b of batch.images) {
        const meta = await sharp(Buffer.from(b, "base64")).metadata();
        assert.deepEqual([meta.width, meta.height], [128, 128]);
      }
      // POST /options sets the caller's settings for its later calls (as A1111's global options), checked when set.
      const unknownModel = await post("options", { sd_model_checkpoint: "no-such-model.safetensors [0123456789]" });
      assert.equal(unknownModel.status, 404, await unknownModel.clone().text());
      assert.equal((await post("options", { sd_model_checkpoint: "tiny-sd15", CLIP_stop_at_last_layers: 2 })).status, 200);
      assert.deepEqual(await (await fetch(`${base}/options`)).json(), { sd_model_checkpoint: "tiny-sd15", CLIP_stop_at_last_layers: 2 });
      const { override_settings: _omitted, ...withoutSettings } = body;
      const viaOptions = (await (await post("txt2img", withoutSettings)).json()) as { images: string[] };
      assert.deepEqual(viaOptions.images, answer.images, "the stored options render the same images");
      assert.equal((await post("options", { sd_model_checkpoint: null, CLIP_stop_at_last_layers: null })).status, 200);
      // Unset, the checkpoint is the farm's default model, which the caller's jobs render with, by A1111's title.
      const fallback = (await farm.client.listModels({})).models.find((m) => m.isDefault)!;
      const cleared = (await (await fetch(`${base}/options`)).json()) as { sd_model_checkpoint: string };
      assert.deepEqual(Object.keys(cleared), ["sd_model_checkpoint"]);
      assert.match(cleared.sd_model_checkpoint, new RegExp(`^${fallback.name}( \\[[0-9a-f]{10}\\])?$`));
      // Listings in A1111's shapes.
      const samplers = (await (await fetch(`${base}/samplers`)).json()) as Array<{ name: string; aliases: string[] }>;
      assert.ok(samplers.some((s) => s.name === "Euler a" && s.aliases.includes("k_euler_a")));
      const emb = (await (await fetch(`${base}/embeddings`)).json()) as { loaded: Record<string, { vectors: number; shape: number }> };
      assert.ok((emb.loaded[TEST_EMBEDDING]?.vectors ?? 0) > 0, JSON.stringify(emb));
      const sdModels = (await (await fetch(`${base}/sd-models`)).json()) as Array<{ model_name: string; title: string }>;
      assert.ok(sdModels.some((m) => m.model_name === "tiny-sd15"));
      // With its training metadata, as A1111 gives it: JSON values parsed, ss_resolution and ss_tag_frequency first.
      const loraList = (await (await fetch(`${base}/loras`)).json()) as Array<{ metadata: Record<string, unknown> }>;
      assert.deepEqual(loraList, [
        {
          name: TEST_LORA,
          alias: TEST_LORA,
          path: `${TEST_LORA}.safetensors`,
          metadata: { ss_resolution: "(64, 64)", ss_tag_frequency: { ink: { lf: 3 } }, ss_network_dim: "2" },
        },
      ]);
      assert.deepEqual(Object.keys(loraList[0]!.metadata), ["ss_resolution", "ss_tag_frequency", "ss_network_dim"]);
      assert.equal((await post("refresh-loras", {})).status, 200);
      // Bad input: FastAPI's 422 naming the field; unknown routes 404; an unknown sampler is the farm's NOT_FOUND-free refusal.
      const bad = await post("txt2img", { steps: "many" });
      assert.equal(bad.status, 422);
      assert.deepEqual(((await bad.json()) as { detail: Array<{ loc: string[] }> }).detail[0]!.loc, ["body", "steps"]);
      const badSampler = await post("txt2img", { sampler_name: "Nope", steps: 2, width: 64, height: 64 });
      assert.equal(badSampler.status, 422, await badSampler.clone().text());
      assert.deepEqual(((await badSampler.json()) as { detail: Array<{ loc: string[] }> }).detail[0]!.loc, ["body", "sampler_name"]);
      const script = await post("txt2img", { script_name: "x/y/z plot" });
      assert.equal(script.status, 422);
      assert.equal((await fetch(`${base}/nothing-here`)).status, 404);
      // Idle progress is A1111's zeros.
      const idle = (await (await fetch(`${base}/progress`)).json()) as { progress: number; state: { job_count: number } };
      assert.deepEqual([idle.progress, idle.state.job_count], [0, 0]);
      // A caller that leaves mid-job: its job is cancelled on the farm. /progress shows the job while it runs.
      const leaving = new AbortController();
      const long = post(
        "txt2img",
        {
          prompt: "a long wait",
          steps: 150,
          batch_size: 2,
          width: 64,
          height: 64,
          sampler_name: "Euler",
          override_settings: { show_progress_every_n_steps: 2 },
        },
        leaving.signal,
      );
      let early = "";
      long.then(
        async (r) => (early = `answered ${r.status} ${await r.text()}`),
        () => undefined,
      );
      let job = "";
      for (const deadline = Date.now() + 30_000; job === "";) {
        assert.ok(Date.now() < deadline && early === "", `the long job shows in /progress ${early}`);
        const p = (await (await fetch(`${base}/progress`)).json()) as {
          progress: number;
          current_image: string | null;
          state: { job: string; sampling_steps: number };
        };
        // With show_progress_every_n_steps, current_image is the live preview, a PNG.
        if (p.progress > 0 && p.state.sampling_steps === 150 && p.current_image !== null) {
          assert.equal((await sharp(Buffer.from(p.current_image, "base64")).metadata()).format, "png");
          job = p.state.job;
        } else await new Promise((r) => setTimeout(r, 50));
      }
      leaving.abort();
      // Its /metrics counts the calls by route and status.
      const exposition = await (await fetch(String(gateway.ready["metrics"]))).text();
      const count = (labels: string) =>
        Number(new RegExp(`^latentfarm_a1111_api_requests_total\\{${labels}\\} (\\d+)$`, "m").exec(exposition)?.[1] ?? 0);
      assert.ok(count('route="txt2img",status="200"') >= 2, exposition);
      assert.ok(count('route="txt2img",status="422"') >= 3);
      assert.equal(count('route="other",status="404"'), 1);
      for (const deadline = Date.now() + 30_000; ;) {
        const { state } = await farm.client.get({ jobId: job });
        if (state === JobState.CANCELLED) break;
        assert.ok(Date.now() < deadline, `job ${job} is ${JobState[state]}, not cancelled`);
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      await gateway.kill();
    }
  });

  test("killing an agent mid-task resumes its task on the other agent from its last checkpoint: the image of an uninterrupted run", async () => {
    const params = {
      prompt: "resilient",
      model: "tiny-sd15",
      width: 64,
      height: 64,
      steps: 60,
      samplerName: "Euler a",
      seed: 77n,
      batchSize: 2,
    };
    const metric = async (series: string) =>
      Number(new RegExp(`^${series} ([0-9.e+-]+)$`, "m").exec(await fetch(farm.coordinatorMetricsUrl).then((r) => r.text()))?.[1] ?? 0);
    const resumesBefore = await metric("latentfarm_checkpoint_resumes_total");
    const { jobId } = await farm.client.submit({ params });
    const events: JobEvent[] = [];
    let killed = "";
    for await (const { event } of farm.client.watch({ jobId })) {
      if (!event) continue;
      events.push(event);
      // Step 5: the checkpoint of steps 1–2 went out two steps before, on the same stream as the steps.
      if (!killed && event.event.case === "step" && event.event.value.step >= 5) {
        const placed = events.filter((e) => e.event.case === "placed").map((e) => e.event.value as { agentId: string; imageIndex: number });
        const victim = placed.find((p) => p.imageIndex === (event.event.value as { imageIndex: number }).imageIndex)!.agentId;
        killed = victim;
        const proc = farm.agents.find((a) => a.ready["id"] === victim)!;
        await proc.kill("SIGKILL");
      }
    }
    assert.ok(killed, "an agent was killed mid-task");
    assert.equal(events.at(-1)?.event.case, "done", `job ended with ${events.at(-1)?.event.case}`);
    assert.ok(
      events.some((e) => e.event.case === "retried"),
      "a task was retried",
    );
    const images = events.filter((e) => e.event.case === "image").map((e) => (e.event.value as { image: { agentId: string } }).image);
    assert.equal(images.length, 2);
    assert.ok(
      images.every((i) => i.agentId !== killed),
      "the killed agent produced no image",
    );
    // The retry replayed the lost attempt's checkpointed steps, and the images are those of a job no one interrupted.
    assert.ok((await metric("latentfarm_checkpoint_resumes_total")) > resumesBefore, "a retry resumed from a checkpoint");
    // Each image's provenance ends with the attempt that made it, timed by its agent; the lost attempt is
    // in it too, timed by the coordinator, as wasted device time; the attempt after it resumed.
    const records = images.map((i) => (i as unknown as { provenance: ImageProvenance }).provenance);
    for (const [k, p] of records.entries()) {
      const last = p.attempts.at(-1)!;
      assert.equal(last.outcome, AttemptOutcome.USED);
      assert.equal(last.agentId, images[k]!.agentId);
      assert.ok(last.agentMeasured && last.seconds > 0);
      assert.ok(Math.abs(p.deviceSeconds - p.attempts.reduce((n, a) => n + a.seconds, 0)) < 1e-9);
    }
    const interrupted = records.find((p) => p.attempts.some((a) => a.agentId === killed));
    assert.ok(interrupted, "the killed agent's attempt is in its image's provenance");
    const lost = interrupted.attempts.find((a) => a.agentId === killed)!;
    assert.equal(lost.outcome, AttemptOutcome.FAILED);
    assert.equal(lost.agentMeasured, false);
    assert.ok(interrupted.wastedDeviceSeconds >= lost.seconds && lost.seconds > 0);
    assert.ok(interrupted.attempts.at(-1)!.resumedCalls > 0, "the attempt that made it resumed from the checkpoint");
    const again = (await collect(farm, (await farm.client.submit({ params })).jobId))
      .filter((e) => e.event.case === "image")
      .map((e) => (e.event.value as { image: { index: number; png: Uint8Array } }).image);
    const byIndex = (list: Array<{ index: number; png: Uint8Array }>) =>
      [...list].sort((a, b) => a.index - b.index).map((i) => Buffer.from(i.png).toString("base64"));
    assert.deepEqual(byIndex(images as unknown as Array<{ index: number; png: Uint8Array }>), byIndex(again));
  });
});

describe(
  "Hires.fix across agents (nats-server, coordinator and three one-slot agents as processes)",
  { skip, concurrency: false, timeout: 300_000 },
  () => {
    // Second passes above 96×96 are tiled in 64 px tiles with 16 px overlap (128² → 3 × 3 tiles).
    let farm: TestFarm;
    before(async () => {
      farm = await startTestFarm({
        agents: 3,
        slots: 1,
        coordinatorArgs: ["--hires-tile-above", "96x96", "--hires-tile-size", "64", "--hires-tile-overlap", "16"],
      });
      // Every agent loads the model first (three images, three free slots), so load times do not
      // make one agent look much faster than the others when the hires job starts.
      await farm.runJob({ batchSize: 3 });
    });
    after(async () => {
      await farm?.close();
    });

    const placements = (events: JobEvent[]) =>
      events
        .flatMap((e) => (e.event.case === "placed" ? [e.event.value] : []))
        .map((p) => ({ ...p, stage: p.taskId.slice(p.taskId.lastIndexOf(".") + 1) }));

    test("batch 4 on 3 agents: 4 images, each a first-pass task then a second-pass task, handed over between agents", async (t) => {
      const { jobId } = await farm.client.submit({
        params: {
          prompt: "a castle",
          model: "tiny-sd15",
          width: 64,
          height: 64,
          steps: 4,
          samplerName: "Euler",
          seed: 21n,
          batchSize: 4,
          enableHr: true,
          hrScale: 1.5,
          hrSecondPassSteps: 3,
          hrUpscaler: "Latent",
          denoisingStrength: 0.6,
        },
      });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      const images = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []));
      assert.equal(images.length, 4);
      const placed = placements(events);
      const pairs: string[] = [];
      let handedToAnother = 0;
      for (const img of images) {
        assert.deepEqual([img.width, img.height], [96, 96]);
        assert.match(img.infotext, /Steps: 4, .*Size: 64x64, .*Denoising strength: 0\.6, .*Hires upscale: 1\.5, Hires steps: 3/);
        const mine = placed.filter((p) => p.imageIndex === img.index);
        assert.deepEqual(
          [...new Set(mine.map((p) => p.stage))].sort(),
          ["first", "second"],
          `image ${img.index}: ${mine.map((p) => p.taskId).join(", ")}`,
        );
        const first = new Set(mine.filter((p) => p.stage === "first").map((p) => p.agentId));
        // The image's agent is the one whose second pass won; the first pass may have run on another.
        if (!first.has(img.agentId)) handedToAnother++;
        pairs.push(`${img.index}: ${[...first].join("+")} → ${img.agentId}`);
      }
      // One slot per agent, stages placed work-conserving: the first agent to finish a first pass
      // takes the fourth image's first pass, so each second pass goes to the next agent that frees,
      // which is busy-free only because it finished something else. Timing noise (or a backup copy)
      // can put one image back on its first agent, hardly two.
      t.diagnostic(`first pass → second pass agents: ${pairs.join("; ")}`);
      assert.ok(handedToAnother >= 2, `second passes ran on other agents than their first passes (${pairs.join("; ")})`);
      const steps = events.flatMap((e) => (e.event.case === "step" ? [e.event.value] : []));
      assert.ok(
        steps.every((s) => s.totalSteps === 7),
        "progress counts first + second pass steps",
      );
      for (let i = 0; i < 4; i++)
        assert.equal(Math.max(...steps.filter((s) => s.imageIndex === i).map((s) => s.step)), 7, `image ${i} reached 7 steps`);
    });

    let tiled: { png: Uint8Array; infotext: string } | undefined;
    const tiledParams = {
      prompt: "a castle",
      model: "tiny-sd15",
      width: 64,
      height: 64,
      steps: 3,
      samplerName: "Euler a",
      seed: 33n,
      subseed: 5n,
      enableHr: true,
      hrScale: 2,
      hrSecondPassSteps: 2,
      denoisingStrength: 0.5,
    };

    test("a tiled second pass on 3 agents: every agent runs tiles, one 128² image with the one-task infotext", async () => {
      const { jobId } = await farm.client.submit({ params: tiledParams });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      const placed = placements(events);
      const tiles = placed.filter((p) => /^t\d+$/.test(p.stage));
      assert.equal(new Set(tiles.map((p) => p.stage)).size, 9, "3 × 3 tiles");
      assert.equal(
        new Set(tiles.map((p) => p.agentId)).size,
        3,
        `tiles ran on all three agents (${tiles.map((p) => `${p.stage}@${p.agentId}`).join(", ")})`,
      );
      const [img] = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []));
      assert.ok(img);
      assert.deepEqual([img.width, img.height], [128, 128]);
      assert.match(
        img.infotext,
        /Steps: 3, Sampler: Euler a, .*Size: 64x64, .*Denoising strength: 0\.5, .*Hires upscale: 2, Hires steps: 2/,
      );
      // The image's provenance has every stage that made it, each where the placements say it ran.
      const used = img.provenance!.attempts.filter((a) => a.outcome === AttemptOutcome.USED);
      assert.deepEqual(used.map((a) => a.stage).sort(), ["asm", "first", "up", ...Array.from({ length: 9 }, (_, k) => `t${k}`)].sort());
      for (const a of used) {
        assert.ok(
          placed.some((p) => p.stage === a.stage && p.agentId === a.agentId && p.attempt === a.attempt),
          `${a.stage} on ${a.agentId}`,
        );
      }
      tiled = { png: img.png, infotext: img.infotext };
    });

    test("the tiled second pass on 1 agent gives the same image as on 3 agents", async () => {
      assert.ok(tiled, "the 3-agent run produced an image");
      await Promise.all(farm.agents.slice(1).map((a) => a.kill("SIGTERM")));
      for (const deadline = Date.now() + 15_000; ;) {
        const { agents } = await farm.client.listAgents({});
        if (agents.length === 1 && !agents[0]!.draining) break;
        assert.ok(Date.now() < deadline, `${agents.length} agents still listed`);
        await new Promise((r) => setTimeout(r, 100));
      }
      const { jobId } = await farm.client.submit({ params: tiledParams });
      const events = await collect(farm, jobId);
      assert.equal(events.at(-1)?.event.case, "done", JSON.stringify(events.at(-1)?.event.value));
      assert.equal(new Set(placements(events).map((p) => p.agentId)).size, 1, "every stage ran on the one agent left");
      const [img] = events.flatMap((e) => (e.event.case === "image" ? [e.event.value.image!] : []));
      assert.equal(img?.infotext, tiled!.infotext);
      assert.deepEqual(Buffer.from(img!.png), Buffer.from(tiled!.png), "same bytes whichever agents ran the tiles");
    });
  },
);

describe(
  "a refiner on another agent (nats-server, coordinator and two one-slot agents, each with one of the checkpoints)",
  { skip, concurrency: false, timeout: 300_000 },
  () => {
    let farm: TestFarm;
    before(async () => {
      farm = await startTestFarm({
        agents: 2,
        slots: 1,
        // tiny-sd15-hr (an ONNX folder) gives the second agent its tokenizer for the checkpoint.
        agentModels: [["tiny-sd15"], [TEST_RENAMED_CHECKPOINT, "tiny-sd15-hr"]],
      });
    });
    after(async () => {
      await farm?.close();
    });

    test("the pass runs on the model's agent to its switch, then carries on on the refiner's: the same image as on one agent", async () => {
      const { events, infotext, pixels } = await renderImage(farm, REFINER_JOB);
      const placed = events.flatMap((e) => (e.event.case === "placed" ? [e.event.value] : []));
      assert.deepEqual(
        placed.map((p) => p.agentId),
        ["agent-0", "agent-1"],
      );
      assert.equal(new Set(placed.map((p) => p.taskId)).size, 1, "one task, placed again from its switch");
      assert.ok(!events.some((e) => e.event.case === "retried"), "a switch is not a retry");
      assert.match(
        infotext,
        new RegExp(`Model: tiny-sd15, .*Refiner: ${TEST_RENAMED_CHECKPOINT} \\[[0-9a-f]{10}\\], Refiner switch at: 0.5`),
      );
      if (refinedOnOneAgent !== undefined) {
        assert.equal(infotext, refinedOnOneAgent.infotext);
        assert.deepEqual(pixels, refinedOnOneAgent.pixels);
      }
      // What the dashboards show: one switch handed back by agent-0, one task placed again.
      const metric = async (url: string, series: string) =>
        Number(new RegExp(`^${series.replace(/[{}]/g, "\\$&")} ([0-9.e+-]+)$`, "m").exec(await fetch(url).then((r) => r.text()))?.[1]);
      assert.equal(await metric(farm.agentMetricsUrls[0]!, 'latentfarm_agent_refiner_switches_total{outcome="handed_back"}'), 1);
      assert.equal(await metric(farm.agentMetricsUrls[1]!, 'latentfarm_agent_refiner_switches_total{outcome="handed_back"}'), 0);
      assert.equal(await metric(farm.coordinatorMetricsUrl, "latentfarm_refiner_handbacks_total"), 1);
    });
  },
);
