import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { deflateSync } from "node:zlib";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema } from "@latentfarm/shared";
import { ImageRng, cIn, tToSigma } from "../sampling/index.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { encodeRgb, rgbToVaeInput } from "./render-common.js";
import type { RenderContext } from "./render-common.js";
import { renderTask } from "./txt2img.js";
import { kitSkip } from "../test-support/kit.js";
import { gradientRgb, rawPng } from "../test-support/images.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const skip = kitSkip("tiny-sd15");

/** A smooth 64×64 RGB test picture. */
function crc32(buf: Uint8Array): number {
  let c = ~0;
  for (const b of buf) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return ~c >>> 0;
}

function chunk(type: string, data: Uint8Array): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, "latin1"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}

/** A valid-looking PNG header claiming 60000×60000 pixels over a few bytes of zlib data. */
function pngBomb(): Uint8Array {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(60000, 0);
  ihdr.writeUInt32BE(60000, 4);
  ihdr[8] = 8;
  ihdr[9] = 2;
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(Buffer.alloc(60001 * 4))),
    chunk("IEND", new Uint8Array()),
  ]);
}

test("VAE input is 2·v/255 − 1 per channel plane", () => {
  const x = rgbToVaeInput(Uint8Array.from([0, 255, 51, 102, 153, 204]), 2, 1);
  // Pixels (0,255,51) and (102,153,204) → R, G, B planes.
  assert.deepEqual(
    [...x].map((v) => Math.round(v * 1000) / 1000),
    [-1, -0.2, 1, 0.2, -0.6, 0.6],
  );
});

describe("img2img on the tiny fixture model", { skip, concurrency: false }, () => {
  let pipe: LoadedPipeline;
  let calls: Array<{ t: number; x: Float32Array }> = [];
  let initPng: Uint8Array;
  before(async () => {
    pipe = await loadTinyPipeline();
    const evaluate = pipe.batcher.evaluate.bind(pipe.batcher);
    pipe.batcher.evaluate = (req, signal) => {
      calls.push({ t: req.t, x: req.x.slice() });
      return evaluate(req, signal);
    };
    initPng = await rawPng(gradientRgb(64, 64), 64, 64);
  });
  after(async () => pipe?.close());

  const ctx = (resources?: RenderContext["resources"]): RenderContext => ({
    signal: new AbortController().signal,
    agentId: "t",
    onStep: () => {},
    onWarning: () => {},
    ...(resources && { resources }),
  });
  const request = (params: Record<string, unknown>) =>
    create(RunTaskRequestSchema, {
      taskId: "i",
      jobId: "i",
      seed: 42n,
      subseed: 0n,
      params: {
        prompt: "a castle",
        samplerName: "Euler a",
        steps: 20,
        cfgScale: 7,
        width: 64,
        height: 64,
        rng: RngSource.NV,
        model: "tiny-sd15",
        initImages: [initPng],
        denoisingStrength: 0.75,
        ...params,
      },
    });

  test("strength 0.75 × 20 steps: 16 model calls, the first at σ = 4.85565 on init latent + noise·σ", async () => {
    calls = [];
    const steps: number[] = [];
    const img = await renderTask(pipe, request({}), { ...ctx(), onStep: (s, total) => steps.push(total) });
    assert.equal(calls.length, 16, "Euler a makes one model call per step");
    assert.equal(steps.at(-1), 16);
    const sigma0 = tToSigma(calls[0]!.t);
    assert.ok(Math.abs(sigma0 - 4.85565) < 1e-3, `first σ ${sigma0}`);
    // The sampler's first input is (init + noise·σ₀)·c_in; rebuild it from the parts.
    const { latent: init } = await encodeRgb(pipe, gradientRgb(64, 64), 64, 64, new AbortController().signal);
    const noise = new ImageRng({ shape: [4, 8, 8], seeds: [42], subseeds: [0], source: "NV" }).first();
    let max = 0;
    for (let k = 0; k < init.length; k++) max = Math.max(max, Math.abs(calls[0]!.x[k]! - (init[k]! + noise[k]! * 4.85565) * cIn(4.85565)));
    assert.ok(max < 1e-3, `start latent differs by ${max}`);
    assert.match(img.infotext, /Seed: 42, Size: 64x64, Model: tiny-sd15, Denoising strength: 0\.75, /);
    assert.equal(img.width, 64);
  });

  test("the same request gives the same PNG; the noise multiplier changes it and is written down", async () => {
    const a = await renderTask(pipe, request({}), ctx());
    const b = await renderTask(pipe, request({}), ctx());
    assert.deepEqual(a.png, b.png);
    const c = await renderTask(pipe, request({ initialNoiseMultiplier: 0.9 }), ctx());
    assert.notDeepEqual(c.png, a.png);
    assert.match(c.infotext, /Noise multiplier: 0\.9/);
  });

  test("resize modes place a 48×80 image on a 64×64 canvas", async () => {
    const tall = await rawPng(gradientRgb(48, 80), 48, 80);
    for (const resizeMode of [0, 1, 2, 3]) {
      calls = [];
      const img = await renderTask(pipe, request({ initImages: [tall], resizeMode, denoisingStrength: 0.5, steps: 4 }), ctx());
      assert.equal(img.width, 64);
      assert.equal(img.height, 64);
      assert.equal(calls.length, 3, `mode ${resizeMode}: int(0.5·4)+1 steps`);
    }
  });

  const invalid = (substr: RegExp) => (err: unknown) => {
    const e = err as { codeName?: string; message: string };
    assert.equal(e.codeName, "INVALID_ARGUMENT");
    assert.match(e.message, /init_images/);
    assert.match(e.message, substr);
    return true;
  };

  test("bad init images are INVALID_ARGUMENT naming init_images, and the agent keeps serving", async () => {
    await assert.rejects(
      renderTask(pipe, request({ initImages: [Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])] }), ctx()),
      invalid(/PNG|format/i),
    );
    const truncated = initPng.slice(0, 60);
    await assert.rejects(renderTask(pipe, request({ initImages: [truncated] }), ctx()), invalid(/decode|image/i));
    await assert.rejects(renderTask(pipe, request({}), ctx({ maxInputPixels: 1000, maxInputBytes: 1 << 20 })), invalid(/pixel/i));
    await assert.rejects(renderTask(pipe, request({}), ctx({ maxInputPixels: 1 << 24, maxInputBytes: 100 })), invalid(/bytes/i));
    await assert.rejects(renderTask(pipe, request({ initImages: [pngBomb()] }), ctx()), invalid(/pixel/i));
    const ok = await renderTask(pipe, request({ steps: 4 }), ctx());
    assert.equal(ok.width, 64);
  });
});
