import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { GenerationParamsSchema, ImageSchema } from "@latentfarm/shared";
import { jobTimestamp, processedInfo, progressResponse } from "./response.js";

const infotext = (seed: number) =>
  `a fox, <lora:ink:0.5>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: ${seed}, ` +
  `Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.5, Clip skip: 2, Hires resize: 1024x768, ` +
  `Hires upscaler: Latent, Lora hashes: "ink: 0123abcd", Version: v1.10.1`;

test("info is Processed.js() read back from the images' infotexts: prompts, every seed, the model, extra generation params apart", () => {
  const params = create(GenerationParamsSchema, {
    prompt: "a fox, <lora:ink:0.5>",
    batchSize: 2,
    width: 512,
    height: 512,
    styles: ["ink"],
  });
  const images = [11, 12].map((seed, index) => create(ImageSchema, { index, seed: BigInt(seed), subseed: 99n, infotext: infotext(seed) }));
  const info = processedInfo(params, images, new Date("2026-11-29T07:05:09Z"));
  assert.equal(info["prompt"], "a fox, <lora:ink:0.5>");
  assert.deepEqual(info["all_negative_prompts"], ["blurry", "blurry"]);
  assert.deepEqual([info["seed"], info["all_seeds"], info["all_subseeds"]], [11, [11, 12], [99, 99]]);
  assert.deepEqual(
    [info["sampler_name"], info["cfg_scale"], info["steps"], info["clip_skip"], info["denoising_strength"]],
    ["DPM++ 2M", 7, 20, 2, 0.5],
  );
  assert.deepEqual([info["sd_model_name"], info["sd_model_hash"], info["sd_vae_name"]], ["v1-5", "6ce0161689", null]);
  // What create_infotext took from p.extra_generation_params, WxH values whole.
  assert.deepEqual(info["extra_generation_params"], {
    "Schedule type": "Karras",
    "Hires resize": "1024x768",
    "Hires upscaler": "Latent",
    "Lora hashes": "ink: 0123abcd",
  });
  assert.deepEqual(info["infotexts"], [infotext(11), infotext(12)]);
  assert.deepEqual(info["styles"], ["ink"]);
  assert.equal(info["job_timestamp"], "20261129070509");
  assert.equal(jobTimestamp(new Date("2026-01-02T03:04:05Z")), "20260102030405");
});

test("progress: the share of the job's steps made, the time left at the rate so far, A1111's zeros when idle", () => {
  const idle = progressResponse(undefined, 0, false);
  assert.deepEqual([idle["progress"], idle["eta_relative"], idle["current_image"]], [0, 0, null]);
  const job = {
    jobId: "j",
    imageCount: 2,
    totalSteps: 10,
    steps: new Map([
      [0, 5],
      [1, 3],
    ]),
    done: 0,
    startedAt: 0,
    preview: Uint8Array.of(1, 2, 3),
  };
  const p = progressResponse(job, 8_000, false);
  assert.equal(p["progress"], 0.4);
  assert.ok(Math.abs((p["eta_relative"] as number) - 12) < 1e-9, "8 s for 40%: 12 s left");
  assert.deepEqual(p["state"], {
    skipped: false,
    interrupted: false,
    stopping_generation: false,
    job: "j",
    job_count: 2,
    job_timestamp: "0",
    job_no: 0,
    sampling_step: 5,
    sampling_steps: 10,
  });
  assert.equal(p["current_image"], Buffer.from([1, 2, 3]).toString("base64"));
  assert.equal(progressResponse(job, 8_000, true)["current_image"], null, "skip_current_image");
});
