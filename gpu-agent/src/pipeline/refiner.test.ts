import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import sharp from "sharp";
import { rightHalfMask, solidPng } from "../test-support/images.js";
import {
  FarmError,
  RngSource,
  RunTaskRequestSchema,
  TaskStage,
  parseInfotext,
  type GenerationParamsSchema,
  type Image,
  type RefinerResume,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { prepareSampling, sd1Schedule, type ModelRequest, type PreparedSampling } from "../sampling/index.js";
import { parsePipelineKey, passPipelineKey } from "../models/model-loader.js";
import { CatalogPipelines } from "../test-support/lora-catalog.js";
import { runTaskPasses } from "../task-passes.js";
import { RefinerSwitch, denoise, type RefinerMode } from "./denoise.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { conditioningFor, imageRngFor, taskBasics, type RenderContext } from "./render-common.js";
import { runTask, type PipelineOutput } from "./txt2img.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;

const request = (params: Params, stage = TaskStage.FULL): RunTaskRequest =>
  create(RunTaskRequestSchema, { taskId: "t", jobId: "j", seed: 21n, stage, params });
const pixels = async (image: Image): Promise<Buffer> => sharp(image.png).raw().toBuffer();
const ctxOf = (steps: Array<[number, number]> = []): RenderContext => ({
  signal: new AbortController().signal,
  agentId: "t",
  onStep: (step, total) => steps.push([step, total]),
  onWarning: () => {},
});

/** A model call at σ (k-diffusion) or at a timestep (timestep samplers), for the switch rule alone. */
const call = (c: number, sigma: number, timestep = 0): ModelRequest => ({
  kind: "denoise",
  x: new Float32Array(1),
  sigma,
  timestep,
  step: c,
  call: c,
});

describe("the refiner switch rule (A1111's apply_refiner)", () => {
  const table = sd1Schedule().sigmas;
  const sampler = (name: string, refiner: { switchAt: number | undefined } | undefined, settings = {}): PreparedSampling =>
    prepareSampling({ samplerName: name, steps: 10, noise: () => new Float32Array(1), settings, ...(refiner && { refiner }) });

  test("by σ: the progress of the nearest model timestep, (999 − t)/1000 in float32, against the fraction", () => {
    const s = sampler("Euler", { switchAt: 0.8 });
    // t = 199 gives 0.8 exactly; t = 200 gives 0.799.
    assert.equal(s.switchesToRefiner(call(0, table[199]!)), true);
    assert.equal(s.switchesToRefiner(call(0, table[200]!)), false);
    // σ between two table entries takes the nearer one's timestep.
    const mid = (a: number, b: number, w: number) => table[a]! * (1 - w) + table[b]! * w;
    assert.equal(s.switchesToRefiner(call(0, mid(199, 200, 0.4))), true);
    assert.equal(s.switchesToRefiner(call(0, mid(199, 200, 0.6))), false);
    // σ below the table's least is timestep 0: progress 0.999, which a switch at 1 never reaches.
    assert.equal(sampler("Euler", { switchAt: 1 }).switchesToRefiner(call(0, 0.001)), false);
    assert.equal(sampler("Euler", { switchAt: 0.999 }).switchesToRefiner(call(0, 0.001)), true);
    // No fraction (A1111's API default None): the first call switches. No refiner: never.
    assert.equal(sampler("Euler", { switchAt: undefined }).switchesToRefiner(call(0, 14.6)), true);
    assert.equal(sampler("Euler", undefined).switchesToRefiner(call(0, 0.001)), false);
    assert.equal("Refiner switch by sampling steps" in s.infotext, false);
  });

  test("timestep samplers read their timestep: DDIM's 10 steps (901 … 1) switch at 0.8 on t = 101", () => {
    const s = sampler("DDIM", { switchAt: 0.8 });
    // Stored ascending; the sampler walks them from the top.
    const ts = [...s.timesteps!].reverse();
    assert.deepEqual(ts, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    const first = ts.findIndex((t, i) => s.switchesToRefiner(call(i, 0, t)));
    assert.equal(ts[first], 101);
  });

  test("by sample steps: calls made / total calls (doubled for second-order samplers), recorded in the infotext", () => {
    const euler = sampler("Euler", { switchAt: 0.5 }, { refinerSwitchBySampleSteps: true });
    assert.equal(euler.switchesToRefiner(call(4, 14.6)), false);
    assert.equal(euler.switchesToRefiner(call(5, 14.6)), true);
    assert.equal(euler.infotext["Refiner switch by sampling steps"], true);
    const heun = sampler("Heun", { switchAt: 0.5 }, { refinerSwitchBySampleSteps: true });
    assert.equal(heun.switchesToRefiner(call(9, 14.6)), false);
    assert.equal(heun.switchesToRefiner(call(10, 14.6)), true);
  });
});

describe("a pass that switches to its refiner", { concurrency: false }, () => {
  let pipelines: CatalogPipelines;
  before(async () => {
    pipelines = await CatalogPipelines.create({ "tiny-b": 4, "tiny-inpaint": { seed: 6, inChannels: 9 } });
  });
  after(() => pipelines.close());
  const pipe = (key: string): Promise<LoadedPipeline> => pipelines.get(key);
  const base: Params = {
    model: "tiny",
    prompt: "a cat",
    negativePrompt: "blurry",
    samplerName: "Euler",
    steps: 6,
    width: 64,
    height: 64,
    cfgScale: 5,
    rng: RngSource.CPU,
  };

  async function render(params: Params, stage = TaskStage.FULL) {
    const keys: string[] = [];
    const steps: Array<[number, number]> = [];
    const output = await runTaskPasses(request(params, stage), ctxOf(steps), async (key, req, c): Promise<PipelineOutput> => {
      keys.push(parsePipelineKey(key).model);
      return runTask(await pipe(key), req, c);
    });
    assert.equal(output.case, "result");
    const image = output.value as Image;
    return { image, keys, steps, info: parseInfotext(image.infotext).params };
  }

  /**
   * The replay, checked without a second model: a run stopped at its switch and resumed on the same
   * pipeline must give the bytes of a run that never stopped, whatever the sampler keeps between calls.
   */
  test("a run resumed from its switch equals the run that never switched, for every kind of sampler state", async () => {
    const tiny = await pipe(passPipelineKey(request(base).params!, "first"));
    // An inpainting blend toward a picture's latent (the left half kept), for some of them: the resume must
    // carry the model's latent, standing in for the refiner's own VAE's encoding of the picture.
    const picture = Float32Array.from({ length: 256 }, (_, i) => Math.sin(i * 0.37));
    const keep = Float32Array.from({ length: 256 }, (_, i) => (i % 8 < 4 ? 1 : 0));
    const blendOf = (init: Float32Array, sampler: string) => ({
      init,
      mask: keep,
      nmask: keep.map((k) => 1 - k),
      beforeModel: ["DDIM", "DDIM CFG++", "PLMS", "UniPC"].includes(sampler),
    });
    for (const samplerName of ["Euler a", "Heun", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LMS"]) {
      const p = request({ ...base, samplerName, steps: 5, ...(samplerName === "DDIM" && { eta: 0.5 }) }).params!;
      const inpaint = ["Euler a", "DPM++ 2M", "DDIM", "PLMS"].includes(samplerName);
      const run = async (refiner: RefinerMode | undefined, init = picture) => {
        const b = taskBasics(tiny, request(p));
        const rng = imageRngFor(b, 8, 8);
        const sampler = prepareSampling({
          samplerName,
          steps: 5,
          noise: () => rng.next(),
          brownian: { seeds: [b.seed], shape: [4, 8, 8], source: b.rng },
          settings: b.settings,
          refiner: { switchAt: 0.45 },
        });
        const cond = await conditioningFor(tiny, ctxOf(), b, p.prompt, p.negativePrompt, sampler);
        const latent = await denoise(tiny, {
          sampler,
          cond,
          cfgScale: 5,
          h: 8,
          w: 8,
          start: sampler.startLatent(rng.first()),
          signal: new AbortController().signal,
          onStep: () => {},
          noiseRng: rng,
          refiner,
          ...(inpaint && { maskBlend: blendOf(init, samplerName) }),
        });
        return { latent, infotext: sampler.infotext };
      };
      const plain = await run(undefined);
      const stop = await run({ mode: "switch" }).then(
        () => assert.fail(`${samplerName}: the run did not switch`),
        (e: unknown) => e as RefinerSwitch,
      );
      assert.ok(stop instanceof RefinerSwitch, samplerName);
      assert.ok(stop.answers.length > 0, `${samplerName}: the switch came after some calls`);
      let tookOver = 0;
      assert.deepEqual(stop.init, inpaint ? picture : undefined, samplerName);
      const resumed = await run(
        {
          mode: "resume",
          start: stop.start,
          init: stop.init,
          answers: stop.answers,
          uncondAnswers: stop.uncondAnswers,
          onTakeOver: () => tookOver++,
        },
        // The refiner's run encodes the picture with its own VAE: here, to other values.
        picture.map((v) => v + 0.25),
      );
      assert.equal(tookOver, 1, samplerName);
      assert.deepEqual(resumed.latent, plain.latent, `${samplerName}: resumed after ${stop.answers.length} calls`);
      assert.equal(samplerName === "DDIM CFG++", stop.uncondAnswers.length === stop.answers.length, samplerName);
    }
  });

  test("switching at the first call renders the refiner's image; a switch the pass never reaches leaves the model's", async () => {
    const onRefiner = await render({ ...base, model: "tiny-b" });
    const onModel = await render(base);
    const fromStart = await render({ ...base, refinerCheckpoint: "tiny-b" });
    assert.deepEqual(fromStart.keys, ["tiny", "tiny-b"]);
    assert.deepEqual(await pixels(fromStart.image), await pixels(onRefiner.image));
    assert.equal(fromStart.info.get("Model"), "tiny");
    const refinerHash = (await pipe(passPipelineKey(request({ ...base, model: "tiny-b" }).params!, "first"))).modelHash;
    assert.equal(fromStart.info.get("Refiner"), `tiny-b [${refinerHash}]`);
    assert.equal(fromStart.info.has("Refiner switch at"), false, "A1111 leaves out a None value");
    // (999 − t)/1000 < 1 for every t: a switch at 1 never happens, and nothing says there was a refiner.
    const never = await render({ ...base, refinerCheckpoint: "tiny-b", refinerSwitchAt: 1 });
    assert.deepEqual(never.keys, ["tiny"]);
    assert.deepEqual(await pixels(never.image), await pixels(onModel.image));
    assert.equal(never.image.infotext, onModel.image.infotext);
    // A refiner that is the model itself: A1111 finds it loaded and never switches.
    const same = await render({ ...base, refinerCheckpoint: "tiny", refinerSwitchAt: 0.5 });
    assert.equal(same.image.infotext, onModel.image.infotext);
    const none = await render({ ...base, refinerCheckpoint: "None", refinerSwitchAt: 0.5 });
    assert.equal(none.image.infotext, onModel.image.infotext);
  });

  test("a switch part way: both models shape the image, progress runs on, and the infotext says where", async () => {
    const onModel = await render(base);
    const onRefiner = await render({ ...base, model: "tiny-b" });
    const half = await render({ ...base, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.5 });
    assert.deepEqual(half.keys, ["tiny", "tiny-b"]);
    assert.notDeepEqual(await pixels(half.image), await pixels(onModel.image));
    assert.notDeepEqual(await pixels(half.image), await pixels(onRefiner.image));
    assert.deepEqual(
      half.steps.map(([s]) => s),
      [1, 2, 3, 4, 5, 6],
      "each step reported once, by the run that made it",
    );
    assert.match(half.image.infotext, /Model: tiny, .*Refiner: tiny-b \[[0-9a-f]{10}\], Refiner switch at: 0.5, Version/);
    // By sample steps: another switch point, and A1111's entry for it.
    const bySteps = await render({
      ...base,
      refinerCheckpoint: "tiny-b",
      refinerSwitchAt: 0.5,
      overrideSettings: { refinerSwitchBySampleSteps: true },
    });
    assert.equal(bySteps.info.get("Refiner switch by sampling steps"), "True");
    // Deterministic: a retry gives the same bytes.
    const again = await render({ ...base, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.5 });
    assert.deepEqual(Buffer.from(again.image.png), Buffer.from(half.image.png));
  });

  test("an agent without the refiner hands the switch back; the task resumed elsewhere gives the image of a local switch", async () => {
    const params = { ...base, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.5 };
    const local = await render(params);
    const runOn = async (key: string, req: RunTaskRequest, c: RenderContext): Promise<PipelineOutput> => runTask(await pipe(key), req, c);
    const withoutRefiner = (name: string) => Promise.resolve(name !== "tiny-b");
    const handedBack = await runTaskPasses(request(params), ctxOf(), runOn, undefined, withoutRefiner);
    assert.equal(handedBack.case, "refinerSwitch");
    const resume = handedBack.value as RefinerResume;
    assert.ok(resume.answers.length > 0 && resume.answers.length < 6);
    assert.equal(resume.model?.name, "tiny");
    // What the coordinator sends the refiner's agent: the task again, with the switch.
    const keys: string[] = [];
    const resumed = await runTaskPasses(
      create(RunTaskRequestSchema, { ...request(params), refinerResume: resume }),
      ctxOf(),
      async (key, req, c) => {
        keys.push(parsePipelineKey(key).model);
        return runOn(key, req, c);
      },
      undefined,
      (name) => Promise.resolve(name === "tiny-b"),
    );
    assert.deepEqual(keys, ["tiny-b"], "the refiner's agent runs no part of the pass on the model");
    assert.equal(resumed.case, "result");
    assert.deepEqual(Buffer.from((resumed.value as Image).png), Buffer.from(local.image.png));
    // A FULL Hires.fix task on an agent without the refiner cannot hand a pass back (the coordinator sends stages).
    await assert.rejects(
      runTaskPasses(
        request({ ...params, enableHr: true, hrScale: 1.5, overrideSettings: { hiresFixRefinerPass: "first pass" } }),
        ctxOf(),
        runOn,
        undefined,
        withoutRefiner,
      ),
      (e: unknown) => FarmError.from(e).codeName === "FAILED_PRECONDITION",
    );
  });

  test("img2img and inpainting switch too; the inpainted image keeps the picture outside its mask", async () => {
    const init = await solidPng(64, 64, { r: 200, g: 80, b: 40 });
    const img = { ...base, initImages: [init], denoisingStrength: 0.6 };
    const plain = await render(img);
    const refined = await render({ ...img, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.7 });
    assert.deepEqual(refined.keys, ["tiny", "tiny-b"]);
    assert.notDeepEqual(await pixels(refined.image), await pixels(plain.image));
    assert.match(refined.image.infotext, /Denoising strength: 0.6, .*Refiner: tiny-b \[[0-9a-f]{10}\], Refiner switch at: 0.7/);
    // The right half masked (white): A1111 pastes the picture back over the left half.
    const mask = await rightHalfMask();
    const inpaint = { ...img, mask, maskBlur: 0, inpaintFullRes: false };
    const unrefined = await render(inpaint);
    const inpainted = await render({ ...inpaint, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.7 });
    assert.deepEqual(inpainted.keys, ["tiny", "tiny-b"]);
    const [a, b] = [await pixels(inpainted.image), await pixels(unrefined.image)];
    const left = (buf: Buffer) => Buffer.concat(Array.from({ length: 64 }, (_, y) => buf.subarray(y * 64 * 3, y * 64 * 3 + 24 * 3)));
    const right = (buf: Buffer) => Buffer.concat(Array.from({ length: 64 }, (_, y) => buf.subarray(y * 64 * 3 + 40 * 3, (y + 1) * 64 * 3)));
    assert.deepEqual(left(a), left(b), "outside the mask both are the picture");
    assert.notDeepEqual(right(a), right(b), "inside it the refiner shows");
    assert.match(inpainted.image.infotext, /Refiner: tiny-b/);
  });

  test("an inpainting (9-channel) model switches to a plain refiner, which ignores its conditioning; an inpainting refiner is UNIMPLEMENTED", async () => {
    const init = await solidPng(64, 64, { r: 40, g: 160, b: 90 });
    const mask = await rightHalfMask();
    const inpaint: Params = {
      ...base,
      model: "tiny-inpaint",
      initImages: [init],
      mask,
      denoisingStrength: 0.6,
      maskBlur: 0,
      inpaintFullRes: false,
    };
    const unrefined = await render(inpaint);
    assert.equal(unrefined.info.get("Conditional mask weight"), "1.0");
    const refined = await render({ ...inpaint, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.7 });
    assert.deepEqual(refined.keys, ["tiny-inpaint", "tiny-b"]);
    // A1111 decides "Conditional mask weight" when processing starts, on the model: it stays after the switch.
    assert.equal(refined.info.get("Conditional mask weight"), "1.0");
    assert.equal(refined.info.get("Model"), "tiny-inpaint");
    assert.match(refined.image.infotext, /Refiner: tiny-b \[[0-9a-f]{10}\], Refiner switch at: 0.7/);
    const [a, b] = [await pixels(refined.image), await pixels(unrefined.image)];
    const left = (buf: Buffer) => Buffer.concat(Array.from({ length: 64 }, (_, y) => buf.subarray(y * 64 * 3, y * 64 * 3 + 24 * 3)));
    const right = (buf: Buffer) => Buffer.concat(Array.from({ length: 64 }, (_, y) => buf.subarray(y * 64 * 3 + 40 * 3, (y + 1) * 64 * 3)));
    assert.deepEqual(left(a), left(b), "outside the mask both are the picture");
    assert.notDeepEqual(right(a), right(b), "inside it the refiner shows");
    // Handed back to an agent with the refiner: the same bytes.
    const runOn = async (key: string, req: RunTaskRequest, c: RenderContext): Promise<PipelineOutput> => runTask(await pipe(key), req, c);
    const params = { ...inpaint, refinerCheckpoint: "tiny-b", refinerSwitchAt: 0.7 };
    const handedBack = await runTaskPasses(request(params), ctxOf(), runOn, undefined, (name) => Promise.resolve(name !== "tiny-b"));
    assert.equal(handedBack.case, "refinerSwitch");
    assert.equal((handedBack.value as RefinerResume).inpaintingConditioning, true);
    const resumed = await runTaskPasses(
      create(RunTaskRequestSchema, { ...request(params), refinerResume: handedBack.value as RefinerResume }),
      ctxOf(),
      runOn,
      undefined,
      (name) => Promise.resolve(name === "tiny-b"),
    );
    assert.deepEqual(Buffer.from((resumed.value as Image).png), Buffer.from(refined.image.png));
    // A plain model switching to an inpainting refiner: A1111 hands that UNet a 5×1×1 dummy and fails; here UNIMPLEMENTED.
    await assert.rejects(render({ ...inpaint, model: "tiny", refinerCheckpoint: "tiny-inpaint", refinerSwitchAt: 0.5 }), (e: unknown) => {
      const err = FarmError.from(e);
      return err.codeName === "UNIMPLEMENTED" && err.field === "refiner_checkpoint";
    });
  });

  test("Hires.fix: the second pass switches by default, either pass or both on request; FULL equals the stages", async () => {
    const hires: Params = {
      ...base,
      enableHr: true,
      hrScale: 1.5,
      hrSecondPassSteps: 4,
      denoisingStrength: 0.6,
      refinerCheckpoint: "tiny-b",
      refinerSwitchAt: 0.6,
    };
    const plain = await render({ ...hires, refinerCheckpoint: "" });
    const second = await render(hires);
    assert.deepEqual(second.keys, ["tiny", "tiny", "tiny-b"]);
    assert.notDeepEqual(await pixels(second.image), await pixels(plain.image));
    assert.equal(second.info.has("Hires refiner"), false, "the default pass is not written");
    assert.equal(second.info.get("Model"), "tiny");
    assert.match(second.info.get("Refiner") ?? "", /^tiny-b \[/);
    for (const which of ["first pass", "both passes"] as const) {
      const r = await render({ ...hires, overrideSettings: { hiresFixRefinerPass: which } });
      assert.deepEqual(r.keys, which === "first pass" ? ["tiny", "tiny-b", "tiny"] : ["tiny", "tiny-b", "tiny", "tiny-b"], which);
      assert.equal(r.info.get("Hires refiner"), which);
      assert.equal(r.info.get("Model"), "tiny", which);
      assert.notDeepEqual(await pixels(r.image), await pixels(second.image), which);
    }
    // The farm's way across agents: FIRST_PASS then SECOND_PASS as tasks of their own.
    const both: Params = { ...hires, overrideSettings: { hiresFixRefinerPass: "both passes" } };
    const first = await runTaskPasses(request(both, TaskStage.FIRST_PASS), ctxOf(), async (key, req, c) =>
      runTask(await pipe(key), req, c),
    );
    assert.equal(first.case, "handover");
    const staged = await runTaskPasses(
      create(RunTaskRequestSchema, { ...request(both, TaskStage.SECOND_PASS), inputs: [first.value as never] }),
      ctxOf(),
      async (key, req, c) => runTask(await pipe(key), req, c),
    );
    const full = await render(both);
    assert.equal(staged.case, "result");
    assert.deepEqual(Buffer.from((staged.value as Image).png), Buffer.from(full.image.png));
  });
});
