import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { EXTRAS_MODEL, FarmError, ModelInfoSchema, RngSource } from "@latentfarm/shared";
import { modelFromCheckpointTitle, readApiRequest } from "./request.js";

const models = [
  create(ModelInfoSchema, { name: "v1-5-pruned-emaonly", modelHash: "6ce0161689" }),
  create(ModelInfoSchema, { name: "tiny-sd15", modelHash: "" }),
];

const refused = (f: () => unknown, field: string): void => {
  assert.throws(
    f,
    (e: unknown) => e instanceof FarmError && e.codeName === "INVALID_ARGUMENT" && e.field === field,
    `refused naming ${field}`,
  );
};

test("a txt2img body as A1111 clients send it: fields by A1111's names, nulls for defaults, Euler when no sampler is named", () => {
  const { params, sendImages, ignored } = readApiRequest(
    "txt2img",
    {
      prompt: "a cat",
      negative_prompt: "blurry",
      seed: -1,
      subseed: 12,
      subseed_strength: 0.25,
      steps: 20,
      cfg_scale: 6.5,
      width: 768,
      height: 512,
      batch_size: 2,
      n_iter: 3,
      restore_faces: null,
      scheduler: "Karras",
      denoising_strength: 0.7,
      styles: ["cinematic"],
      send_images: true,
      save_images: false,
      do_not_save_grid: true,
      script_args: [],
      alwayson_scripts: {},
      some_future_field: 1,
    },
    models,
  );
  assert.equal(params.prompt, "a cat");
  assert.equal(params.negativePrompt, "blurry");
  assert.equal(params.seed, -1n);
  assert.equal(params.subseed, 12n);
  assert.equal(params.subseedStrength, 0.25);
  assert.deepEqual([params.steps, params.cfgScale, params.width, params.height, params.batchSize, params.nIter], [20, 6.5, 768, 512, 2, 3]);
  assert.equal(params.samplerName, "Euler", "sampler_index's default");
  assert.equal(params.scheduler, "Karras");
  assert.equal(params.restoreFaces, false);
  assert.equal(params.denoisingStrength, undefined, "without Hires.fix txt2img's denoising_strength is A1111's unused default");
  assert.deepEqual(params.styles, ["cinematic"]);
  assert.equal(sendImages, true);
  assert.deepEqual(ignored, ["some_future_field"]);
  // sampler_name wins; sampler_index stands in for it (A1111: sampler_name or sampler_index).
  assert.equal(
    readApiRequest("txt2img", { sampler_name: "DPM++ 2M Karras", sampler_index: "Euler a" }, []).params.samplerName,
    "DPM++ 2M Karras",
  );
  assert.equal(readApiRequest("txt2img", { sampler_name: "", sampler_index: "Euler a" }, []).params.samplerName, "Euler a");
  assert.equal(readApiRequest("txt2img", { send_images: false }, []).sendImages, false);
  // Hires.fix keeps its fields, denoising_strength with them.
  const hr = readApiRequest(
    "txt2img",
    { enable_hr: true, hr_scale: 2, hr_upscaler: "Latent", denoising_strength: 0.55, hr_second_pass_steps: 10 },
    [],
  ).params;
  assert.deepEqual([hr.enableHr, hr.hrScale, hr.hrUpscaler, hr.denoisingStrength, hr.hrSecondPassSteps], [true, 2, "Latent", 0.55, 10]);
});

test("override_settings: options that are request fields move there (a body field wins), the rest stay settings, others are left out", () => {
  const { params, ignored } = readApiRequest(
    "txt2img",
    {
      eta_noise_seed_delta: 7,
      override_settings: {
        sd_model_checkpoint: "v1-5-pruned-emaonly.safetensors [6ce0161689]",
        CLIP_stop_at_last_layers: 2,
        eta_noise_seed_delta: 31337,
        randn_source: "CPU",
        sd_vae: "anime.vae.pt",
        eta_ddim: 0.5,
        samples_format: "jpg",
        face_restoration: true,
        sd_noise_schedule: null,
      },
    },
    models,
  );
  assert.equal(params.model, "v1-5-pruned-emaonly");
  assert.equal(params.clipSkip, 2);
  assert.equal(params.etaNoiseSeedDelta, 7n, "the body's field wins over the option");
  assert.equal(params.rng, RngSource.CPU);
  assert.equal(params.restoreFaces, true);
  assert.equal(params.overrideSettings?.sdVae, "anime.vae.pt");
  assert.equal(params.overrideSettings?.etaDdim, 0.5);
  assert.deepEqual(ignored, ["override_settings.samples_format"]);
  // Live previews, for /progress's current_image: A1111's -1 is every step.
  assert.equal(readApiRequest("txt2img", { override_settings: { show_progress_every_n_steps: 5 } }, []).params.previewEveryNSteps, 5);
  assert.equal(readApiRequest("txt2img", { override_settings: { show_progress_every_n_steps: -1 } }, []).params.previewEveryNSteps, 1);
  refused(
    () => readApiRequest("txt2img", { override_settings: { show_progress_every_n_steps: 1.5 } }, []),
    "override_settings.show_progress_every_n_steps",
  );
  refused(() => readApiRequest("txt2img", { override_settings: { randn_source: "TPU" } }, models), "override_settings.randn_source");
  refused(() => readApiRequest("txt2img", { override_settings: "x" }, models), "override_settings");
  refused(() => readApiRequest("txt2img", { override_settings: { eta_ddim: "lots" } }, models), "override_settings.eta_ddim");
});

test("A1111 checkpoint titles find the farm's model: by name with or without the extension, or by hash", () => {
  assert.equal(modelFromCheckpointTitle("v1-5-pruned-emaonly.safetensors [6ce0161689]", models), "v1-5-pruned-emaonly");
  assert.equal(modelFromCheckpointTitle("v1-5-pruned-emaonly", models), "v1-5-pruned-emaonly");
  assert.equal(modelFromCheckpointTitle("renamed.ckpt [6ce0161689]", models), "v1-5-pruned-emaonly", "by Model hash");
  assert.equal(modelFromCheckpointTitle("tiny-sd15", models), "tiny-sd15");
  assert.equal(modelFromCheckpointTitle("unknown.safetensors [0123456789]", models), "unknown", "left for Submit to refuse");
});

test("img2img: base64 or data-URL images, A1111's 0/1 mask invert; URLs and a missing init image are refused", () => {
  const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
  const { params } = readApiRequest(
    "img2img",
    {
      init_images: [`data:image/png;base64,${png.toString("base64")}`, png.toString("base64")],
      mask: png.toString("base64"),
      inpainting_mask_invert: 1,
      inpainting_fill: 1,
      resize_mode: 2,
      denoising_strength: 0.4,
      include_init_images: false,
    },
    [],
  );
  assert.deepEqual(
    params.initImages.map((b) => Buffer.from(b).equals(png)),
    [true, true],
  );
  assert.ok(Buffer.from(params.mask).equals(png));
  assert.equal(params.inpaintingMaskInvert, true);
  assert.deepEqual([params.inpaintingFill, params.resizeMode, params.denoisingStrength], [1, 2, 0.4]);
  refused(() => readApiRequest("img2img", { prompt: "x" }, []), "init_images");
  refused(() => readApiRequest("img2img", { init_images: ["https://example.com/a.png"] }, []), "init_images[0]");
  refused(() => readApiRequest("img2img", { init_images: ["not base64!"] }, []), "init_images[0]");
  // txt2img has no init images: they are left out, not read.
  assert.deepEqual(readApiRequest("txt2img", { init_images: ["abc"] }, []).ignored, ["init_images"]);
});

test("bad fields are refused by name; scripts and inputs the farm cannot honour are refused rather than dropped", () => {
  refused(() => readApiRequest("txt2img", [], []), "body");
  refused(() => readApiRequest("txt2img", { steps: "many" }, []), "steps");
  refused(() => readApiRequest("txt2img", { cfg_scale: [7] }, []), "cfg_scale");
  refused(() => readApiRequest("txt2img", { script_name: "x/y/z plot" }, []), "script_name");
  refused(() => readApiRequest("txt2img", { alwayson_scripts: { controlnet: { args: [] } } }, []), "alwayson_scripts");
  refused(() => readApiRequest("txt2img", { disable_extra_networks: true }, []), "disable_extra_networks");
  refused(() => readApiRequest("img2img", { init_images: ["AAAA"], latent_mask: "AAAA" }, []), "latent_mask");
  // An empty script name is A1111's "no script".
  assert.doesNotThrow(() => readApiRequest("txt2img", { script_name: "", script_args: [] }, []));
});

test("extra-single-image and extra-batch-images: the images and A1111's Extras fields; upscaler_1 defaults to None", () => {
  const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 9]);
  const { params } = readApiRequest(
    "extra-single-image",
    {
      image: png.toString("base64"),
      resize_mode: 0,
      show_extras_results: true,
      upscaling_resize: 2,
      upscaler_1: "R-ESRGAN 4x+",
      gfpgan_visibility: 0.5,
      codeformer_visibility: 0,
      upscale_first: false,
    },
    [],
  );
  assert.equal(params.model, EXTRAS_MODEL);
  assert.ok(Buffer.from(params.initImages[0]!).equals(png));
  assert.deepEqual([params.extras?.upscalingResize, params.extras?.upscaler1, params.extras?.gfpganVisibility], [2, "R-ESRGAN 4x+", 0.5]);
  assert.equal(readApiRequest("extra-single-image", { image: png.toString("base64") }, []).params.extras?.upscaler1, "None");
  refused(() => readApiRequest("extra-single-image", { upscaling_resize: 2 }, []), "image");
  // A batch: one image of the job per list entry, in order.
  const other = Buffer.from([0x89, 0x50, 0x4e, 0x47, 7]);
  const batch = readApiRequest(
    "extra-batch-images",
    {
      imageList: [
        { data: png.toString("base64"), name: "a.png" },
        { data: other.toString("base64"), name: "b.png" },
      ],
      upscaling_resize: 2,
    },
    [],
  ).params;
  assert.deepEqual(
    batch.initImages.map((b) => Buffer.from(b).at(-1)),
    [9, 7],
  );
  assert.equal(batch.extras?.upscalingResize, 2);
  refused(() => readApiRequest("extra-batch-images", { imageList: [] }, []), "imageList");
  refused(() => readApiRequest("extra-batch-images", { imageList: [{ name: "x" }] }, []), "imageList[0].data");
  refused(() => readApiRequest("extra-single-image", { image: png.toString("base64"), upscaling_resize: "big" }, []), "upscaling_resize");
});
