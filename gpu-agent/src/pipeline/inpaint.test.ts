import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema, type Image } from "@latentfarm/shared";
import { makeTinyModel } from "../model-graph/tiny-model.js";
import { ImageRng, cIn, tToSigma } from "../sampling/index.js";
import { binaryMask, blurMask, latentMask, resizeImageA1111 } from "../imaging/mask.js";
import { LoadedPipeline } from "./loaded-pipeline.js";
import { encodeRgb } from "./render-common.js";
import type { RenderContext } from "./render-common.js";
import { renderTask } from "./txt2img.js";
import { kitSkip } from "../test-support/kit.js";
import { gradientRgb, rawPng } from "../test-support/images.js";
import { loadTinyModel, loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const skip = kitSkip("tiny-sd15");
/** A blue channel with structure, so that masks and blurs have something to show. */
const patternBlue = (x: number, y: number): number => (x * 7 + y * 13) % 256;

interface Rect {
  x0: number;
  y0: number;
  x1: number;
  y1: number;
}

/** A gray mask: 255 inside the rectangle (right/bottom exclusive), 0 elsewhere. */
function rectMask(width: number, height: number, r: Rect): Uint8Array {
  const m = new Uint8Array(width * height);
  for (let y = r.y0; y < r.y1; y++) m.fill(255, y * width + r.x0, y * width + r.x1);
  return m;
}

async function grayPng(gray: Uint8Array, width: number, height: number): Promise<Uint8Array> {
  return new Uint8Array(
    await sharp(gray, { raw: { width, height, channels: 1 } })
      .toColourspace("b-w")
      .png()
      .toBuffer(),
  );
}

async function pixels(img: Image): Promise<Uint8Array> {
  const { data, info } = await sharp(img.png).raw().toBuffer({ resolveWithObject: true });
  assert.equal(info.channels, 3);
  assert.equal(info.width, img.width);
  assert.equal(info.height, img.height);
  return new Uint8Array(data.buffer, data.byteOffset, data.length);
}

/**
 * Pixels at least `margin` away from the rectangle in x or y: there the blurred mask is 0 (σ = 4
 * blurs reach 10 px), so A1111's overlay restores the init picture byte for byte.
 */
function assertFarPixelsKept(out: Uint8Array, init: Uint8Array, width: number, height: number, r: Rect, margin: number): number {
  let checked = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const far = x < r.x0 - margin || x >= r.x1 + margin || y < r.y0 - margin || y >= r.y1 + margin;
      if (!far) continue;
      for (let c = 0; c < 3; c++) {
        const i = (y * width + x) * 3 + c;
        if (out[i] !== init[i]) assert.fail(`pixel (${x}, ${y}) channel ${c}: ${out[i]} ≠ init ${init[i]}`);
      }
      checked++;
    }
  }
  return checked;
}

function changedInside(out: Uint8Array, init: Uint8Array, width: number, r: Rect): number {
  let n = 0;
  for (let y = r.y0; y < r.y1; y++)
    for (let x = r.x0; x < r.x1; x++) for (let c = 0; c < 3; c++) if (out[(y * width + x) * 3 + c] !== init[(y * width + x) * 3 + c]) n++;
  return n;
}

const ctxOf = (warnings: string[] = []): RenderContext => ({
  signal: new AbortController().signal,
  agentId: "t",
  onStep: () => {},
  onWarning: (w) => warnings.push(w),
});

const expectStatus = (code: string, field: RegExp) => (err: unknown) => {
  const e = err as { codeName?: string; message: string };
  assert.equal(e.codeName, code, e.message);
  assert.match(e.message, field);
  return true;
};

describe("inpainting on the tiny fixture model", { skip, concurrency: false }, () => {
  let pipe: LoadedPipeline;
  let calls: Array<{ t: number; x: Float32Array }> = [];
  const RECT: Rect = { x0: 40, y0: 30, x1: 56, y1: 46 };
  const init96 = gradientRgb(96, 80, patternBlue);
  const init64 = gradientRgb(64, 64, patternBlue);
  let init96Png: Uint8Array;
  let init64Png: Uint8Array;
  let mask96: Uint8Array;
  let mask64: Uint8Array;
  const RECT64: Rect = { x0: 24, y0: 24, x1: 40, y1: 40 };

  before(async () => {
    pipe = await loadTinyPipeline();
    const evaluate = pipe.batcher.evaluate.bind(pipe.batcher);
    pipe.batcher.evaluate = (req, signal) => {
      calls.push({ t: req.t, x: req.x.slice() });
      return evaluate(req, signal);
    };
    init96Png = await rawPng(init96, 96, 80);
    init64Png = await rawPng(init64, 64, 64);
    mask96 = await grayPng(rectMask(96, 80, RECT), 96, 80);
    mask64 = await grayPng(rectMask(64, 64, RECT64), 64, 64);
  });
  after(async () => pipe?.close());

  const request = (params: Record<string, unknown>, seed = 42n, imageIndex = 0) =>
    create(RunTaskRequestSchema, {
      taskId: "i",
      jobId: "i",
      seed,
      subseed: 0n,
      imageIndex,
      params: {
        prompt: "a castle",
        samplerName: "Euler a",
        steps: 8,
        cfgScale: 7,
        width: 64,
        height: 64,
        rng: RngSource.NV,
        model: "tiny-sd15",
        initImages: [init96Png],
        mask: mask96,
        denoisingStrength: 0.75,
        inpaintFullResPadding: 8,
        ...params,
      },
    });

  test("only masked (A1111's default): outside the blurred mask the init comes back byte for byte, at the init's size", async () => {
    const img = await renderTask(pipe, request({}), ctxOf());
    assert.equal(img.width, 96);
    assert.equal(img.height, 80);
    const out = await pixels(img);
    const kept = assertFarPixelsKept(out, init96, 96, 80, RECT, 11);
    assert.ok(kept > (96 * 80) / 2, `${kept} pixels checked`);
    assert.ok(changedInside(out, init96, 96, RECT) > 100, "the masked area was repainted");
    assert.match(img.infotext, /Size: 64x64, /);
    assert.match(
      img.infotext,
      /Denoising strength: 0\.75, .*Mask blur: 4, Inpaint area: Only masked, Masked area padding: 8, Masked content: fill, .*Version: /,
    );
  });

  test("whole picture: far pixels kept; the CFG blend pins kept latent cells to init + noise·σ (Euler) or to init (DDIM)", async () => {
    const { latent: init } = await encodeRgb(pipe, init64, 64, 64, new AbortController().signal);
    const noise = new ImageRng({ shape: [4, 8, 8], seeds: [42], subseeds: [0], source: "NV" }).first();
    const m = blurMask(
      binaryMask({ mode: "L", image: { width: 64, height: 64, channels: 1, data: rectMask(64, 64, RECT64) } }, true),
      4,
      4,
    );
    const nmask = latentMask(resizeImageA1111(0, m, 64, 64), 8, 8, true);
    assert.ok(nmask.some((v) => v === 1) && nmask.some((v) => v === 0));
    const base = { initImages: [init64Png], mask: mask64, inpaintFullRes: false, inpaintingFill: 1 };

    calls = [];
    const euler = await renderTask(pipe, request({ ...base, samplerName: "Euler" }), ctxOf());
    assert.equal(euler.width, 64);
    assertFarPixelsKept(await pixels(euler), init64, 64, 64, RECT64, 11);
    assert.doesNotMatch(euler.infotext, /Masked content|Inpaint area/);
    assert.match(euler.infotext, /Mask blur: 4/);
    let maxKept = 0;
    let maxFree = 0;
    for (const call of calls) {
      const sigma = tToSigma(call.t);
      for (let c = 0; c < 4; c++) {
        for (let i = 0; i < 64; i++) {
          const k = c * 64 + i;
          const d = Math.abs(call.x[k]! - (init[k]! + noise[k]! * sigma) * cIn(sigma));
          if (nmask[i] === 0) maxKept = Math.max(maxKept, d);
          else maxFree = Math.max(maxFree, d);
        }
      }
    }
    assert.ok(maxKept < 1e-4, `kept cells drift by ${maxKept}`);
    assert.ok(maxFree > 1e-2, `generated cells follow the model (${maxFree})`);

    calls = [];
    await renderTask(pipe, request({ ...base, samplerName: "DDIM" }), ctxOf());
    assert.ok(calls.length > 1);
    for (const call of calls) {
      for (let c = 0; c < 4; c++) {
        for (let i = 0; i < 64; i++)
          if (nmask[i] === 0) assert.equal(call.x[c * 64 + i], init[c * 64 + i], "DDIM's model input is the init there");
      }
    }
  });

  test("each masked-content mode is deterministic, the modes differ, and the infotext names them", async () => {
    const pngs: Uint8Array[] = [];
    const names = ["fill", undefined, "latent noise", "latent nothing"];
    for (const inpaintingFill of [0, 1, 2, 3]) {
      const a = await renderTask(pipe, request({ inpaintingFill, steps: 4 }), ctxOf());
      const b = await renderTask(pipe, request({ inpaintingFill, steps: 4 }), ctxOf());
      assert.deepEqual(a.png, b.png, `fill ${inpaintingFill} is deterministic`);
      const name = names[inpaintingFill];
      if (name === undefined) assert.doesNotMatch(a.infotext, /Masked content/);
      else assert.match(a.infotext, new RegExp(`Masked content: ${name}, `));
      for (const earlier of pngs) assert.notDeepEqual(a.png, earlier);
      pngs.push(a.png);
    }
    const inverted = await renderTask(pipe, request({ inpaintingMaskInvert: true, steps: 4 }), ctxOf());
    assert.match(inverted.infotext, /Mask mode: Inpaint not masked, Mask blur: 4, /);
    const sharpEdge = await renderTask(pipe, request({ maskBlurX: 0, maskBlurY: 2, steps: 4 }), ctxOf());
    assert.doesNotMatch(sharpEdge.infotext, /Mask blur/, "A1111 writes Mask blur only when x and y agree");
    const noBlur = await renderTask(pipe, request({ maskBlur: 0, maskBlurX: 9, steps: 4 }), ctxOf());
    assert.doesNotMatch(noBlur.infotext, /Mask blur/, "mask_blur overrides both axes");
  });

  test("latent noise is drawn from the image's batch slot seed (A1111's all_seeds[0:batch_size])", async () => {
    calls = [];
    // Third image of a batch-of-2 job: its own seed is 44, its slot's seed is 42.
    await renderTask(
      pipe,
      request({ inpaintingFill: 2, batchSize: 2, nIter: 2, initImages: [init64Png], mask: mask64, inpaintFullRes: false }, 44n, 2),
      ctxOf(),
    );
    const first = calls[0]!;
    const sigma = tToSigma(first.t);
    const slot = new ImageRng({ shape: [4, 8, 8], seeds: [42], source: "NV" }).first();
    const own = new ImageRng({ shape: [4, 8, 8], seeds: [44], source: "NV" }).first();
    // In the centre latent cells the mask is 1: init' = slot noise, start = init' + own noise · σ.
    for (let c = 0; c < 4; c++) {
      for (const i of [3 * 8 + 3, 3 * 8 + 4, 4 * 8 + 3, 4 * 8 + 4]) {
        const k = c * 64 + i;
        const initPrime = first.x[k]! / cIn(sigma) - own[k]! * sigma;
        assert.ok(Math.abs(initPrime - slot[k]!) < 1e-3, `cell ${k}: ${initPrime} vs ${slot[k]}`);
      }
    }
  });

  test("a mask of another size is resized as A1111 resizes it", async () => {
    const small = await grayPng(rectMask(32, 32, { x0: 12, y0: 12, x1: 20, y1: 20 }), 32, 32);
    const whole = await renderTask(pipe, request({ initImages: [init64Png], mask: small, inpaintFullRes: false, steps: 4 }), ctxOf());
    assert.equal(whole.width, 64);
    // The 32² mask is blurred at its own size (reach 10 px), then doubled to 64²: 20 px reach.
    assertFarPixelsKept(await pixels(whole), init64, 64, 64, RECT64, 21);
    // "Only masked" crops with the mask's own coordinates; the overlay mask is resized to the init.
    const crop = await renderTask(pipe, request({ initImages: [init64Png], mask: small, steps: 4 }), ctxOf());
    assert.equal(crop.width, 64);
    assertFarPixelsKept(await pixels(crop), init64, 64, 64, RECT64, 21);
  });

  test("a blank mask with 'only masked' renders plain img2img, as A1111 falls back to", async () => {
    const warnings: string[] = [];
    const blank = await grayPng(new Uint8Array(64 * 64), 64, 64);
    const a = await renderTask(pipe, request({ initImages: [init64Png], mask: blank, steps: 4 }), ctxOf(warnings));
    const b = await renderTask(pipe, request({ initImages: [init64Png], mask: new Uint8Array(), steps: 4 }), ctxOf());
    assert.deepEqual(await pixels(a), await pixels(b));
    assert.match(warnings.join("\n"), /mask is blank/);
  });

  test("bad masks and impossible combinations get a clear status naming the field; the agent keeps serving", async () => {
    const invalid = (re: RegExp) => expectStatus("INVALID_ARGUMENT", re);
    await assert.rejects(
      renderTask(pipe, request({ mask: Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) }), ctxOf()),
      invalid(/^mask: /),
    );
    await assert.rejects(renderTask(pipe, request({ mask: mask96.slice(0, 60) }), ctxOf()), invalid(/^mask: .*decode/));
    await assert.rejects(
      renderTask(pipe, request({}), { ...ctxOf(), resources: { maxInputPixels: 96 * 80 - 1, maxInputBytes: 1 << 20 } }),
      invalid(/^(init_images|mask): .*pixel/),
    );
    await assert.rejects(renderTask(pipe, request({ initImages: [], mask: mask64 }), ctxOf()), invalid(/^mask: .*init_images/));
    await assert.rejects(renderTask(pipe, request({ maskBlur: 65 }), ctxOf()), invalid(/^mask_blur: /));
    await assert.rejects(renderTask(pipe, request({ maskBlurY: -1 }), ctxOf()), invalid(/^mask_blur_y: /));
    await assert.rejects(renderTask(pipe, request({ inpaintFullResPadding: -4 }), ctxOf()), invalid(/^inpaint_full_res_padding: /));
    await assert.rejects(
      renderTask(pipe, request({ inpaintFullRes: false, resizeMode: 3 }), ctxOf()),
      invalid(/^resize_mode: .*latent upscale/),
    );
    await assert.rejects(renderTask(pipe, request({ samplerName: "LCM" }), ctxOf()), expectStatus("UNIMPLEMENTED", /^sampler_name: /));
    const ok = await renderTask(pipe, request({ steps: 2 }), ctxOf());
    assert.equal(ok.width, 96);
  });
});

describe("inpainting UNets (9 input channels)", { concurrency: false }, () => {
  let dir: string;
  let pipe: LoadedPipeline;
  const samples: Array<{ data: Float32Array; dims: { n: number; h: number; w: number } }> = [];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "inpaint9-"));
    const tiny = await makeTinyModel({ outDir: dir, seed: 11, config: "small", overrides: { inChannels: 9 } });
    const model = await loadTinyModel(tiny.onnxDir!, "tiny-inpaint");
    const unet = model.unet.bind(model);
    model.unet = (sample, t, context, dims, signal) => {
      samples.push({ data: sample.slice(), dims });
      return unet(sample, t, context, dims, signal);
    };
    pipe = new LoadedPipeline(model, { maxBatchRows: 16 });
  });
  after(async () => {
    await pipe?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const request = (params: Record<string, unknown>) =>
    create(RunTaskRequestSchema, {
      taskId: "n",
      jobId: "n",
      seed: 7n,
      subseed: 0n,
      params: {
        prompt: "a",
        samplerName: "Euler",
        steps: 3,
        width: 32,
        height: 32,
        rng: RngSource.CPU,
        model: "tiny-inpaint",
        denoisingStrength: 1,
        ...params,
      },
    });

  test("the UNet gets [x, mask, masked-picture latent]; the infotext carries Conditional mask weight", async () => {
    assert.equal(pipe.model.unetInChannels, 9);
    const init = await rawPng(gradientRgb(32, 32, patternBlue), 32, 32);
    const mask = await grayPng(rectMask(32, 32, { x0: 0, y0: 0, x1: 16, y1: 32 }), 32, 32);
    samples.length = 0;
    const img = await renderTask(pipe, request({ initImages: [init], mask, inpaintFullRes: false, maskBlur: 0 }), ctxOf());
    assert.match(img.infotext, /Denoising strength: 1, Conditional mask weight: 1\.0, /);
    assert.ok(samples.length > 0);
    const { data, dims } = samples[0]!;
    const plane = dims.h * dims.w;
    assert.equal(data.length, dims.n * 9 * plane);
    // Mask plane (channel 4): the left half of the 4×4 latent is 1, the right half 0.
    const maskPlane = [...data.subarray(4 * plane, 5 * plane)];
    assert.deepEqual(maskPlane, [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]);
    // Every row of the batch (cond and uncond) carries the same conditioning.
    for (let r = 1; r < dims.n; r++)
      assert.deepEqual(data.subarray(r * 9 * plane + 4 * plane, (r + 1) * 9 * plane), data.subarray(4 * plane, 9 * plane));

    // Weight 0 leaves the picture unmasked in the conditioning: a different masked-picture latent.
    samples.length = 0;
    const w0 = await renderTask(
      pipe,
      request({ initImages: [init], mask, inpaintFullRes: false, maskBlur: 0, inpaintingMaskWeight: 0 }),
      ctxOf(),
    );
    assert.match(w0.infotext, /Conditional mask weight: 0\.0, /);
    assert.notDeepEqual(samples[0]!.data.subarray(5 * plane, 9 * plane), data.subarray(5 * plane, 9 * plane));
  });

  test("img2img without a mask conditions on an all-ones mask; txt2img is refused plainly", async () => {
    const init = await rawPng(gradientRgb(32, 32, patternBlue), 32, 32);
    samples.length = 0;
    await renderTask(pipe, request({ initImages: [init] }), ctxOf());
    const { data, dims } = samples[0]!;
    const plane = dims.h * dims.w;
    assert.ok(data.subarray(4 * plane, 5 * plane).every((v) => v === 1));
    await assert.rejects(renderTask(pipe, request({}), ctxOf()), expectStatus("FAILED_PRECONDITION", /^model: .*inpainting/));
  });
});
