import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, TaskStage, cropHandover, planTiles, type Handover, type Image } from "@latentfarm/shared";
import { tToSigma } from "../sampling/index.js";
import { writeTinyCodeFormer, writeTinyFaceDetector, writeTinyGfpgan, writeTinySrvggNet } from "../imaging/tiny-models.js";
import { FFHQ_TEMPLATE_512 } from "../imaging/index.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import type { RenderContext } from "./render-common.js";
import { renderTask, runTask } from "./txt2img.js";
import { kitSkip } from "../test-support/kit.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const skip = kitSkip("tiny-sd15");

describe("Hires.fix on the tiny fixture model", { skip, concurrency: false }, () => {
  let pipe: LoadedPipeline;
  let calls: Array<{ t: number; h: number; w: number; contexts: readonly Float32Array[] }> = [];
  const upscalersDir = mkdtempSync(join(tmpdir(), "hires-up-"));
  before(async () => {
    pipe = await loadTinyPipeline();
    const evaluate = pipe.batcher.evaluate.bind(pipe.batcher);
    pipe.batcher.evaluate = (req, signal) => {
      calls.push({ t: req.t, h: req.h, w: req.w, contexts: req.contexts });
      return evaluate(req, signal);
    };
    await writeTinySrvggNet(join(upscalersDir, "realesr-general-x4v3.onnx"));
    // One face filling the 64×64 render (detector scale 10): template × 0.1 → image, × 10 → detector.
    await writeTinyFaceDetector(join(upscalersDir, "yoloface_8n.onnx"), [
      { box: [320, 320, 500, 500], score: 0.9, landmarks: FFHQ_TEMPLATE_512.map(([x, y]) => [x, y] as const) },
    ]);
    await writeTinyCodeFormer(join(upscalersDir, "codeformer.onnx"));
    await writeTinyGfpgan(join(upscalersDir, "GFPGANv1.4.onnx"));
  });
  after(async () => pipe?.close());

  const ctx: RenderContext = {
    signal: new AbortController().signal,
    agentId: "t",
    onStep: () => {},
    onWarning: () => {},
    resources: { upscalersDir, maxInputPixels: 1 << 24, maxInputBytes: 1 << 24 },
  };
  const request = (params: Record<string, unknown>) =>
    create(RunTaskRequestSchema, {
      taskId: "h",
      jobId: "h",
      seed: 7n,
      subseed: 0n,
      params: {
        prompt: "a castle",
        samplerName: "DPM++ 2M",
        scheduler: "Karras",
        steps: 20,
        cfgScale: 7,
        width: 64,
        height: 64,
        rng: RngSource.NV,
        model: "tiny-sd15",
        enableHr: true,
        hrScale: 1.5,
        denoisingStrength: 0.7,
        ...params,
      },
    });

  test("steps 20, denoise 0.7: the second pass runs exactly 20 steps from sigmas₂₈[8] = 3.82133 (Karras)", async () => {
    calls = [];
    const img = await renderTask(pipe, request({}), ctx);
    assert.equal(calls.length, 40, "20 first-pass + 20 second-pass calls (DPM++ 2M: one per step)");
    assert.ok(calls.slice(0, 20).every((c) => c.h === 8 && c.w === 8));
    assert.ok(
      calls.slice(20).every((c) => c.h === 12 && c.w === 12),
      "second pass at 96×96 px",
    );
    const sigma = tToSigma(calls[20]!.t);
    assert.ok(Math.abs(sigma - 3.82133) < 1e-3, `second pass starts at σ ${sigma}`);
    assert.equal(img.width, 96);
    assert.equal(img.height, 96);
    assert.match(img.infotext, /Size: 64x64, Model: tiny-sd15, Denoising strength: 0\.7, .*Hires upscale: 1\.5, /);
    assert.doesNotMatch(img.infotext, /Hires upscaler/, "None (= Latent) is not written");
  });

  test("hr_second_pass_steps, hr sampler and the latent modes; output sizes follow hr_resize", async () => {
    calls = [];
    const img = await renderTask(
      pipe,
      request({
        steps: 4,
        hrSecondPassSteps: 3,
        hrSamplerName: "Euler",
        hrUpscaler: "Latent (bicubic antialiased)",
        hrResizeX: 80,
        hrResizeY: 72,
      }),
      ctx,
    );
    assert.equal(calls.length, 7);
    // Cover 80×72 keeping 1:1 → 80×80 → latent 10×10, cropped by (80−72)//8 = 1 row.
    assert.deepEqual([img.width, img.height], [80, 72]);
    assert.match(img.infotext, /Hires sampler: Euler/);
    assert.match(img.infotext, /Hires resize: 80x72, Hires steps: 3, Hires upscaler: Latent \(bicubic antialiased\)/);
    for (const hrUpscaler of ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest)", "Latent (nearest-exact)"]) {
      const out = await renderTask(pipe, request({ steps: 2, hrSecondPassSteps: 1, hrUpscaler }), ctx);
      assert.deepEqual([out.width, out.height], [96, 96], hrUpscaler);
    }
  });

  test("pixel upscalers: Lanczos and an ESRGAN-family model from the folder; a missing one is FAILED_PRECONDITION", async () => {
    for (const hrUpscaler of ["Lanczos", "R-ESRGAN General 4xV3"]) {
      const out = await renderTask(pipe, request({ steps: 2, hrSecondPassSteps: 1, hrUpscaler }), ctx);
      assert.deepEqual([out.width, out.height], [96, 96]);
      assert.match(out.infotext, new RegExp(`Hires upscaler: ${hrUpscaler}`));
    }
    await assert.rejects(renderTask(pipe, request({ steps: 2, hrUpscaler: "R-ESRGAN 4x+" }), ctx), (e: Error & { codeName?: string }) => {
      assert.equal(e.codeName, "FAILED_PRECONDITION");
      assert.match(e.message, /hr_upscaler.*RealESRGAN_x4plus\.onnx/);
      return true;
    });
  });

  test("restore_faces runs CodeFormer after generation and writes Face restoration; missing models fail", async () => {
    const faces = { ...ctx, resources: { ...ctx.resources!, faceModelsDir: upscalersDir } };
    const plain = await renderTask(pipe, request({ enableHr: false, steps: 3 }), ctx);
    const restored = await renderTask(pipe, request({ enableHr: false, steps: 3, restoreFaces: true, codeFormerWeight: 0 }), faces);
    assert.notDeepEqual(restored.png, plain.png);
    assert.match(restored.infotext, /Seed: 7, Face restoration: CodeFormer, Size: 64x64/);
    // face_restoration_model GFPGAN: its own network (code_former_weight does not reach it) and its name.
    const gfpgan = (codeFormerWeight: number) =>
      renderTask(
        pipe,
        request({ enableHr: false, steps: 3, restoreFaces: true, codeFormerWeight, overrideSettings: { faceRestorationModel: "GFPGAN" } }),
        faces,
      );
    const byGfpgan = await gfpgan(0);
    assert.match(byGfpgan.infotext, /Seed: 7, Face restoration: GFPGAN, Size: 64x64/);
    assert.notDeepEqual(byGfpgan.png, restored.png);
    assert.notDeepEqual(byGfpgan.png, plain.png);
    assert.deepEqual((await gfpgan(1)).png, byGfpgan.png);
    await assert.rejects(
      renderTask(
        pipe,
        request({ enableHr: false, steps: 3, restoreFaces: true, overrideSettings: { faceRestorationModel: "GPEN" } }),
        faces,
      ),
      (e: Error & { codeName?: string; field?: string }) =>
        e.codeName === "INVALID_ARGUMENT" && e.field === "override_settings.face_restoration_model",
    );
    await assert.rejects(
      renderTask(pipe, request({ enableHr: false, steps: 3, restoreFaces: true }), ctx),
      (e: Error & { codeName?: string }) => e.codeName === "FAILED_PRECONDITION" && /restore_faces/.test(e.message),
    );
  });

  const stage = async (
    params: Record<string, unknown>,
    st: TaskStage,
    inputs: Handover[] = [],
    extra: Record<string, unknown> = {},
    steps?: Array<[number, number]>,
  ) => {
    const c = steps ? { ...ctx, onStep: (k: number, n: number) => steps.push([k, n]) } : ctx;
    return runTask(pipe, create(RunTaskRequestSchema, { ...request(params), stage: st, inputs, ...extra }), c);
  };
  const handover = (o: Awaited<ReturnType<typeof stage>>): Handover => {
    assert.equal(o.case, "handover");
    return o.value as Handover;
  };
  const image = (o: Awaited<ReturnType<typeof stage>>): Image => {
    assert.equal(o.case, "result");
    return o.value as Image;
  };
  /** A 64×64 job's upscale to 96×96 and its second pass as four tiles: the tiles' hand-overs and the ASSEMBLE layout. */
  const tiledSecondPass = async (params: Record<string, unknown>, first: Handover) => {
    const up = handover(await stage(params, TaskStage.UPSCALE, [first]));
    const layout = planTiles(96, 96, { tileSize: 64, overlap: 16 });
    const tiles = { width: 96, height: 96, tileWidth: layout.tileWidth, tileHeight: layout.tileHeight, xs: layout.xs, ys: layout.ys };
    const outs: Handover[] = [];
    for (const t of layout.tiles) {
      outs.push(handover(await stage(params, TaskStage.SECOND_PASS_TILE, [cropHandover(up, t)], { tileIndex: t.index })));
    }
    return { outs, tiles };
  };
  /**
   * The job as stages: FIRST_PASS → SECOND_PASS, and FIRST_PASS → UPSCALE → tiles → ASSEMBLE, each writing
   * `full`'s infotext (and SECOND_PASS its bytes). Returns the hand-overs, whose carried entries a test checks.
   */
  const stagesMatchFull = async (params: Record<string, unknown>, full: Image) => {
    const first = handover(await stage(params, TaskStage.FIRST_PASS));
    const second = image(await stage(params, TaskStage.SECOND_PASS, [first]));
    assert.equal(second.infotext, full.infotext);
    assert.deepEqual(second.png, full.png);
    const { outs, tiles } = await tiledSecondPass(params, first);
    const assembled = image(await stage(params, TaskStage.ASSEMBLE, outs, { tiles }));
    assert.equal(assembled.infotext, full.infotext, "the tiled image's infotext is what one task writes");
    return { first, outs, tiles };
  };

  test("split into FIRST_PASS → SECOND_PASS (latent and pixel upscalers) gives FULL's bytes and infotext", async () => {
    for (const hrUpscaler of ["Latent (bicubic antialiased)", "Lanczos"]) {
      const params = { steps: 3, hrSecondPassSteps: 2, hrUpscaler, hrResizeX: 80, hrResizeY: 72 };
      const full = await renderTask(pipe, request(params), ctx);
      const steps1: Array<[number, number]> = [];
      const first = handover(await stage(params, TaskStage.FIRST_PASS, [], {}, steps1));
      assert.equal(first.data.case, hrUpscaler === "Lanczos" ? "rgb" : "latent", "a pixel upscaler starts from the decoded 8-bit image");
      assert.deepEqual(steps1.at(-1), [3, 3], "first-pass progress counts its own steps");
      const steps2: Array<[number, number]> = [];
      const second = image(await stage(params, TaskStage.SECOND_PASS, [first], {}, steps2));
      assert.deepEqual(steps2.at(-1), [2, 2]);
      assert.equal(second.infotext, full.infotext, hrUpscaler);
      assert.deepEqual(second.png, full.png, `${hrUpscaler}: same bytes as one task`);
      assert.deepEqual([second.width, second.height], [80, 72]);
    }
  });

  test("tiled stages: UPSCALE once, tiles in any order, ASSEMBLE in tile order → identical bytes, FULL's infotext", async () => {
    for (const hrUpscaler of ["Latent", "Lanczos"]) {
      const params = { steps: 3, hrSecondPassSteps: 2, hrUpscaler, restoreFaces: false };
      const full = await renderTask(pipe, request(params), ctx);
      const first = handover(await stage(params, TaskStage.FIRST_PASS));
      const up = handover(await stage(params, TaskStage.UPSCALE, [first]));
      const layout = planTiles(96, 96, { tileSize: 64, overlap: 16 });
      assert.equal(layout.tiles.length, 4);
      const tiles = { width: 96, height: 96, tileWidth: layout.tileWidth, tileHeight: layout.tileHeight, xs: layout.xs, ys: layout.ys };
      const runTiles = async (order: number[]) => {
        const out: Handover[] = [];
        for (const i of order)
          out[i] = handover(await stage(params, TaskStage.SECOND_PASS_TILE, [cropHandover(up, layout.tiles[i]!)], { tileIndex: i }));
        return out;
      };
      const a = image(await stage(params, TaskStage.ASSEMBLE, await runTiles([0, 1, 2, 3]), { tiles }));
      const b = image(await stage(params, TaskStage.ASSEMBLE, await runTiles([3, 1, 0, 2]), { tiles }));
      assert.deepEqual(a.png, b.png, `${hrUpscaler}: tile order does not change the image`);
      assert.deepEqual([a.width, a.height], [96, 96]);
      assert.equal(a.infotext, full.infotext, "the tiled image's infotext is what one task writes");
      await assert.rejects(stage(params, TaskStage.ASSEMBLE, (await runTiles([0, 1, 2, 3])).slice(0, 3), { tiles }), /4 tiles, 3 results/);
    }
  });

  test("NGMS and Skip Early CFG, recorded as a pass runs, reach the infotext whichever stage writes it", async () => {
    // NGMS fires in the first pass only: the second pass's DDIM compares timesteps (≥ 1) with 0.5.
    const params = {
      steps: 4,
      hrSecondPassSteps: 3,
      hrUpscaler: "Latent",
      hrSamplerName: "DDIM",
      sMinUncond: 0.5,
      prompt: "a (castle:1.3)",
      overrideSettings: { skipEarlyCond: 0.1, sMinUncondAll: true, emphasis: "No norm" },
    };
    const full = await renderTask(pipe, request(params), ctx);
    assert.match(full.infotext, /Emphasis: No norm, Skip Early CFG: 0\.1, NGMS: 0\.5, NGMS all steps: True/);
    const plain = await renderTask(pipe, request({ steps: 4, hrSecondPassSteps: 3, hrUpscaler: "Latent", hrSamplerName: "DDIM" }), ctx);
    assert.notDeepEqual(full.png, plain.png, "the skipped negative prompt changes the image");
    // Brackets only in the hires prompt: A1111 encodes it after the infotext took its encoder's entries.
    const hiresOnly = await renderTask(
      pipe,
      request({
        steps: 2,
        hrSecondPassSteps: 1,
        hrUpscaler: "Latent",
        prompt: "a castle",
        hrPrompt: "a (castle:1.3)",
        overrideSettings: { emphasis: "No norm" },
      }),
      ctx,
    );
    assert.match(hiresOnly.infotext, /Hires prompt: "a \(castle:1\.3\)"/);
    assert.doesNotMatch(hiresOnly.infotext, /Emphasis/);

    const { first, outs, tiles } = await stagesMatchFull(params, full);
    assert.deepEqual(
      first.firstPassInfotext.map(({ key, value }) => [key, value]),
      [
        ["Emphasis", "No norm"],
        ["Skip Early CFG", "0.1"],
        ["NGMS", "0.5"],
        ["NGMS all steps", "True"],
      ],
    );
    // The second pass's own encoding writes nothing (see recordConditioningInfotext); its run does.
    assert.deepEqual(
      outs[0]!.secondPassInfotext.map(({ key }) => key),
      ["Skip Early CFG"],
    );
    // A hand-over carries only what runs record.
    const forged = { ...outs[0]!, secondPassInfotext: [{ $typeName: "latentfarm.v1.InfotextEntry" as const, key: "Seed", value: "1" }] };
    await assert.rejects(stage(params, TaskStage.ASSEMBLE, [forged, ...outs.slice(1)], { tiles }), /"Seed" is not an entry/);
  });

  test("Pad conds, written after a pass's sampling, reaches the infotext whichever stage writes it", async () => {
    // Only the hires prompt outgrows the negative prompt's chunk, so only the second pass pads.
    const params = {
      steps: 3,
      hrSecondPassSteps: 2,
      hrUpscaler: "Latent",
      sMinUncond: 5,
      hrPrompt: Array.from({ length: 90 }, () => "castle").join(" "),
      overrideSettings: { padCondUncond: true },
    };
    const full = await renderTask(pipe, request(params), ctx);
    assert.match(full.infotext, /, NGMS: 5, Pad conds: True, Version: /);
    const { first, outs } = await stagesMatchFull(params, full);
    assert.deepEqual(
      first.firstPassInfotext.map(({ key }) => key),
      ["NGMS"],
    );
    assert.deepEqual(
      outs[0]!.secondPassInfotext.map(({ key }) => key),
      ["NGMS", "Pad conds"],
    );
  });

  test("the second pass's prompt editing counts against hires steps, as A1111's hires_steps schedules do", async () => {
    // First pass 4 steps, second pass 4 (Euler: one call each). "[a:b:1.5]" in the hires prompt: new-style
    // scheduling with hires_steps puts 1.5 halfway through the second pass, (1.5 − 1)·4 = step 2, so its
    // calls 0–2 see "a" and call 3 "b" (without hires_steps, 1.5·4 = 6 ≥ 4 would keep "a" throughout).
    calls = [];
    await renderTask(
      pipe,
      request({
        steps: 4,
        samplerName: "Euler",
        scheduler: "",
        hrSecondPassSteps: 4,
        hrUpscaler: "Latent",
        hrPrompt: "a castle [at dawn:at dusk:1.5]",
      }),
      ctx,
    );
    const second = calls.filter((c) => c.h === 12);
    assert.equal(second.length, 4);
    const cond = (c: (typeof second)[number]) => c.contexts.at(-1)!;
    assert.deepEqual(
      second.map((c) => (cond(c) === cond(second[0]!) ? "a" : "b")),
      ["a", "a", "a", "b"],
    );
    assert.equal(second.at(-1)!.contexts[0], second[0]!.contexts[0], "the negative prompt has no schedule");
  });

  test("the same seed gives the same hires image", async () => {
    const a = await renderTask(pipe, request({ steps: 3 }), ctx);
    const b = await renderTask(pipe, request({ steps: 3 }), ctx);
    assert.deepEqual(a.png, b.png);
  });
});
