import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { FarmError, RunTaskRequestSchema, type ExtrasParamsSchema, type RunTaskRequest } from "@latentfarm/shared";
import { FFHQ_TEMPLATE_512, type Image8 } from "../imaging/index.js";
import { writeTinyCodeFormer, writeTinyFaceDetector, writeTinyGfpgan, writeTinySrvggNet } from "../imaging/tiny-models.js";
import { inProcessRunner } from "./aux-runner.test-support.js";
import { blendImages, runExtras } from "./extras.js";
import { faceModelPaths, restoreFaces } from "./face-restore.js";
import { readTextChunks, withTextChunks } from "./png.js";
import { resourcesOf, type RenderContext } from "./render-common.js";
import { resolveUpscaler, upscaleBy } from "./upscalers.js";

const dir = mkdtempSync(join(tmpdir(), "lf-extras-"));
const signal = new AbortController().signal;
const ctx: RenderContext = {
  signal,
  agentId: "t",
  onStep: () => {},
  onWarning: () => {},
  resources: { maxInputPixels: 1 << 24, maxInputBytes: 1 << 24, upscalersDir: join(dir, "up"), faceModelsDir: join(dir, "faces") },
};

function picture(width: number, height: number): Image8 {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    const [x, y] = [i % width, Math.floor(i / width)];
    data[i * 3] = (x * 5 + y * 3) % 256;
    data[i * 3 + 1] = 128 + Math.round(90 * Math.sin(x / 7));
    data[i * 3 + 2] = (x * y) % 256;
  }
  return { width, height, channels: 3, data };
}

const png = async (img: Image8, texts: Record<string, string> = {}): Promise<Uint8Array> =>
  withTextChunks(
    await sharp(img.data, { raw: { width: img.width, height: img.height, channels: 3 } })
      .png()
      .toBuffer(),
    texts,
  );
const pixels = async (bytes: Uint8Array): Promise<Image8> => {
  const { data, info } = await sharp(bytes).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  return { width: info.width, height: info.height, channels: 3, data: new Uint8Array(data) };
};
const request = async (extras: MessageInitShape<typeof ExtrasParamsSchema>, images: Uint8Array[]): Promise<RunTaskRequest> =>
  create(RunTaskRequestSchema, { taskId: "t", jobId: "j", imageIndex: 0, params: { initImages: images, extras } });

test("PIL's Image.blend: a + α·(b − a) in float32, truncated and clipped", () => {
  const one = (a: number, b: number, alpha: number) =>
    blendImages(
      { width: 1, height: 1, channels: 3, data: Uint8Array.of(a, a, a) },
      { width: 1, height: 1, channels: 3, data: Uint8Array.of(b, b, b) },
      alpha,
    ).data[0];
  assert.equal(one(10, 20, 0.5), 15);
  // float32(0.3)·255 = 76.5: truncated, as Pillow's (UINT8) cast does, not rounded.
  assert.equal(one(0, 255, 0.3), 76);
  // float32 throughout: 200 + float32(float32(0.3)·(−200)) is 140.0 exactly.
  assert.equal(one(200, 0, 0.3), 140);
  assert.equal(one(0, 255, 1), 255);
  assert.equal(one(7, 255, 0), 7);
});

describe("A1111's Extras tab on one image", () => {
  before(async () => {
    mkdirSync(join(dir, "up"));
    mkdirSync(join(dir, "faces"));
    await writeTinySrvggNet(join(dir, "up", "realesr-general-x4v3.onnx"));
    // One face filling a 64×64 image (detector scale 10).
    await writeTinyFaceDetector(join(dir, "faces", "yoloface_8n.onnx"), [
      { box: [320, 320, 500, 500], score: 0.9, landmarks: FFHQ_TEMPLATE_512.map(([x, y]) => [x, y] as const) },
    ]);
    await writeTinyCodeFormer(join(dir, "faces", "codeformer.onnx"));
    await writeTinyGfpgan(join(dir, "faces", "GFPGANv1.4.onnx"));
  });

  test("scale by: Upscaler.upscale's (w·s)//8·8; upscaler 2 blended in by its visibility; A1111's text; the input's parameters kept", async () => {
    const source = picture(50, 30);
    const input = await png(source, { parameters: "a cat\nSteps: 20, Seed: 1" });
    const out = await runExtras(inProcessRunner(), await request({ upscaler1: "Lanczos", upscalingResize: 2 }, [input]), ctx);
    // 100×60 rounded down to multiples of 8.
    assert.deepEqual([out.width, out.height], [96, 56]);
    assert.equal(out.infotext, "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos");
    assert.deepEqual(readTextChunks(Buffer.from(out.png)), {
      parameters: "a cat\nSteps: 20, Seed: 1",
      postprocessing: out.infotext,
      extras: out.infotext,
    });
    // Every input text is kept, in A1111's order: "parameters" last of them, then the new entries (an
    // earlier Extras run's "postprocessing" keeps its place and takes the new text).
    const again = await runExtras(
      inProcessRunner(),
      await request({ upscaler1: "Lanczos", upscalingResize: 2 }, [
        await png(source, { postprocessing: "old", parameters: "a cat", Software: "x" }),
      ]),
      ctx,
    );
    assert.deepEqual(Object.entries(readTextChunks(Buffer.from(again.png))), [
      ["postprocessing", again.infotext],
      ["Software", "x"],
      ["parameters", "a cat"],
      ["extras", again.infotext],
    ]);
    const runner = inProcessRunner();
    const model = await resolveUpscaler(runner, "R-ESRGAN General 4xV3", ctx.resources!, "x", signal);
    const both = await runExtras(
      runner,
      await request({ upscaler1: "R-ESRGAN General 4xV3", upscaler2: "Lanczos", extrasUpscaler2Visibility: 0.4, upscalingResize: 2.5 }, [
        input,
      ]),
      ctx,
    );
    assert.equal(
      both.infotext,
      "Postprocess upscale by: 2.5, Postprocess upscaler: R-ESRGAN General 4xV3, Postprocess upscaler 2: Lanczos",
    );
    const first = await upscaleBy(source, 2.5, model, signal);
    const second = await upscaleBy(source, 2.5, { kind: "resize", name: "Lanczos" }, signal);
    assert.deepEqual([first.width, first.height], [120, 72]);
    assert.deepEqual((await pixels(both.png)).data, blendImages(first, second, 0.4).data);
  });

  test("scale to: the larger ratio, then a centred crop onto the size (or the upscaled size without the crop)", async () => {
    const input = await png(picture(40, 20));
    const cropped = await runExtras(
      inProcessRunner(),
      await request({ resizeMode: 1, upscaler1: "Nearest", upscalingResizeW: 64, upscalingResizeH: 64 }, [input]),
      ctx,
    );
    // By max(64/40, 64/20) = 3.2: 128×64, cropped to 64×64 around the centre.
    assert.deepEqual([cropped.width, cropped.height], [64, 64]);
    assert.equal(cropped.infotext, "Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: Nearest");
    const uncropped = await runExtras(
      inProcessRunner(),
      await request({ resizeMode: 1, upscaler1: "Nearest", upscalingResizeW: 64, upscalingResizeH: 64, upscalingCrop: false }, [input]),
      ctx,
    );
    assert.deepEqual([uncropped.width, uncropped.height], [128, 64]);
    const whole = await pixels(uncropped.png);
    const crop = await pixels(cropped.png);
    // The crop is the middle 64 columns: x from 32.
    for (let y = 0; y < 64; y += 9) {
      assert.deepEqual(crop.data.subarray(y * 64 * 3, (y + 1) * 64 * 3), whole.data.subarray((y * 128 + 32) * 3, (y * 128 + 96) * 3));
    }
  });

  test("GFPGAN, then CodeFormer, each blended with the image before it by its visibility; 0 skips one", async () => {
    const source = picture(64, 64);
    const input = await png(source);
    const out = await runExtras(
      inProcessRunner(),
      await request({ gfpganVisibility: 0.5, codeformerVisibility: 1, codeformerWeight: 0.3 }, [input]),
      ctx,
    );
    assert.equal(out.infotext, "GFPGAN visibility: 0.5, CodeFormer visibility: 1.0, CodeFormer weight: 0.3");
    const runner = inProcessRunner();
    const gfpgan = (await restoreFaces(runner, faceModelPaths(join(dir, "faces"), "GFPGAN"), source, 0, signal)).image;
    const afterGfpgan = blendImages(source, gfpgan, 0.5);
    const expected = (await restoreFaces(runner, faceModelPaths(join(dir, "faces")), afterGfpgan, 0.3, signal)).image;
    assert.deepEqual((await pixels(out.png)).data, expected.data);
    const none = await runExtras(inProcessRunner(), await request({ gfpganVisibility: 0 }, [input]), ctx);
    assert.equal(none.infotext, "");
    assert.deepEqual((await pixels(none.png)).data, source.data);
  });

  test("bad settings name their field; an upscaler or face model the agent lacks is FAILED_PRECONDITION", async () => {
    const input = await png(picture(16, 16));
    const fails = async (extras: MessageInitShape<typeof ExtrasParamsSchema>, code: string, field: string) =>
      assert.rejects(runExtras(inProcessRunner(), await request(extras, [input]), ctx), (e: unknown) => {
        const err = FarmError.from(e);
        return err.codeName === code && err.field === field;
      });
    await fails({ resizeMode: 2 }, "INVALID_ARGUMENT", "extras.resize_mode");
    await fails({ upscalingResize: 9 }, "INVALID_ARGUMENT", "extras.upscaling_resize");
    await fails({ gfpganVisibility: 1.5 }, "INVALID_ARGUMENT", "extras.gfpgan_visibility");
    await fails({ upscaler1: "../up/x" }, "INVALID_ARGUMENT", "extras.upscaler_1");
    await fails({ upscaler1: "4x-UltraSharp" }, "FAILED_PRECONDITION", "extras.upscaler_1");
    // Face models the agent lacks name the visibility that asked for them, not txt2img's restore_faces.
    const noFaces: RenderContext = { ...ctx, resources: { ...resourcesOf(ctx), faceModelsDir: join(dir, "up") } };
    for (const [extras, field] of [
      [{ gfpganVisibility: 0.5 }, "extras.gfpgan_visibility"],
      [{ codeformerVisibility: 1 }, "extras.codeformer_visibility"],
    ] as const) {
      await assert.rejects(runExtras(inProcessRunner(), await request(extras, [input]), noFaces), (e: unknown) => {
        const err = FarmError.from(e);
        return err.codeName === "FAILED_PRECONDITION" && err.field === field && !err.message.includes("restore_faces:");
      });
    }
    // To 8192×8192 from 20×16: by 512, 10240×8192, over the largest image an Extras job makes.
    const small = await png(picture(20, 16));
    await assert.rejects(
      runExtras(
        inProcessRunner(),
        await request({ upscaler1: "Lanczos", resizeMode: 1, upscalingResizeW: 8192, upscalingResizeH: 8192 }, [small]),
        ctx,
      ),
      (e: unknown) => FarmError.from(e).codeName === "INVALID_ARGUMENT" && FarmError.from(e).field === "extras.upscaling_resize_w",
    );
    await assert.rejects(
      runExtras(inProcessRunner(), await request({ upscaler1: "Lanczos" }, []), ctx),
      (e: unknown) => FarmError.from(e).field === "init_images",
    );
  });
});
