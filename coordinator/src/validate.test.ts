import { test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { EXTRAS_MODEL, FarmError, GenerationParamsSchema, type InpaintingFill } from "@latentfarm/shared";
import { validateJob } from "./validate.js";

type Params = MessageInitShape<typeof GenerationParamsSchema>;
const job = (p: Params) => create(GenerationParamsSchema, { prompt: "x", model: "m", ...p });
const init = Uint8Array.from([1]);
const mask = Uint8Array.from([2]);

function rejects(p: Params, code: string, field: string): void {
  assert.throws(
    () => validateJob(job(p)),
    (e: unknown) => e instanceof FarmError && e.codeName === code && e.field === field,
    `${field} → ${code}`,
  );
}

test("inpainting fields: a mask needs init images; blur, padding, fill and weight are range-checked", () => {
  const ok = validateJob(job({ initImages: [init], mask, maskBlur: 64, maskBlurX: 0, inpaintFullResPadding: 256, inpaintingFill: 3 }));
  assert.deepEqual(ok.params.mask, mask);
  rejects({ mask }, "INVALID_ARGUMENT", "mask");
  rejects({ initImages: [init], mask, maskBlur: 65 }, "INVALID_ARGUMENT", "mask_blur");
  rejects({ initImages: [init], mask, maskBlurX: -1 }, "INVALID_ARGUMENT", "mask_blur_x");
  rejects({ initImages: [init], mask, maskBlurY: 1.5 }, "INVALID_ARGUMENT", "mask_blur_y");
  rejects({ initImages: [init], mask, inpaintFullResPadding: -1 }, "INVALID_ARGUMENT", "inpaint_full_res_padding");
  rejects({ initImages: [init], mask, inpaintingFill: 7 as InpaintingFill }, "INVALID_ARGUMENT", "inpainting_fill");
  rejects({ initImages: [init], inpaintingMaskWeight: 1.5 }, "INVALID_ARGUMENT", "inpainting_mask_weight");
  rejects({ initImages: [init], inpaintingMaskWeight: Number.NaN }, "INVALID_ARGUMENT", "inpainting_mask_weight");
  // Without a mask A1111 ignores the mask fields.
  assert.equal(validateJob(job({ initImages: [init], maskBlur: -3 })).params.maskBlur, -3);
});

test("override settings (A1111's options) and s_min_uncond: names known, numbers finite and in range, each error naming its field", () => {
  const ok = validateJob(
    job({
      sMinUncond: 2,
      overrideSettings: {
        etaAncestral: 0.5,
        sigmaMin: 0.1,
        sigmaMax: 10,
        rho: 5,
        uniPcVariant: "bh2",
        uniPcSkipType: "logSNR",
        uniPcOrder: 2,
        skipEarlyCond: 0.2,
        sdNoiseSchedule: "Zero Terminal SNR",
      },
    }),
  );
  assert.equal(ok.params.overrideSettings?.uniPcVariant, "bh2");
  const s = (settings: NonNullable<Params["overrideSettings"]>): Params => ({ overrideSettings: settings });
  rejects(s({ uniPcVariant: "bh3" }), "INVALID_ARGUMENT", "override_settings.uni_pc_variant");
  rejects(s({ uniPcSkipType: "time_cubic" }), "INVALID_ARGUMENT", "override_settings.uni_pc_skip_type");
  rejects(s({ uniPcOrder: 0 }), "INVALID_ARGUMENT", "override_settings.uni_pc_order");
  rejects(s({ uniPcOrder: 51 }), "INVALID_ARGUMENT", "override_settings.uni_pc_order");
  rejects(s({ sdNoiseSchedule: "zero terminal snr" }), "INVALID_ARGUMENT", "override_settings.sd_noise_schedule");
  rejects(s({ emphasis: "Strong" }), "INVALID_ARGUMENT", "override_settings.emphasis");
  rejects(s({ faceRestorationModel: "gfpgan" }), "INVALID_ARGUMENT", "override_settings.face_restoration_model");
  validateJob(job({ restoreFaces: true, overrideSettings: { faceRestorationModel: "GFPGAN" } }));
  // A VAE is named by its file name alone, as ListVaes lists it.
  for (const sdVae of ["../../etc/passwd", "VAE/x.pt", "a\\b.pt", "x\0.pt", "..", "v".repeat(256)]) {
    rejects(s({ sdVae }), "INVALID_ARGUMENT", "override_settings.sd_vae");
  }
  validateJob(job({ overrideSettings: { sdVae: "vae-ft-mse-840000-ema-pruned.safetensors" } }));
  // Styles: at most 64, and only names the farm has (none here).
  rejects({ styles: Array.from({ length: 65 }, (_, i) => `s${i}`) }, "INVALID_ARGUMENT", "styles");
  rejects({ styles: ["Cinematic"] }, "NOT_FOUND", "styles[0]");
  rejects(s({ sdxlCropTop: -8 }), "INVALID_ARGUMENT", "override_settings.sdxl_crop_top");
  rejects(s({ sdxlCropLeft: -1 }), "INVALID_ARGUMENT", "override_settings.sdxl_crop_left");
  rejects(s({ skipEarlyCond: 1.5 }), "INVALID_ARGUMENT", "override_settings.skip_early_cond");
  rejects(s({ skipEarlyCond: Number.NaN }), "INVALID_ARGUMENT", "override_settings.skip_early_cond");
  rejects(s({ etaAncestral: -0.1 }), "INVALID_ARGUMENT", "override_settings.eta_ancestral");
  rejects(s({ etaDdim: Number.POSITIVE_INFINITY }), "INVALID_ARGUMENT", "override_settings.eta_ddim");
  rejects(s({ sigmaMin: 5, sigmaMax: 2 }), "INVALID_ARGUMENT", "override_settings.sigma_min");
  rejects(s({ rho: -1 }), "INVALID_ARGUMENT", "override_settings.rho");
  rejects(s({ betaDistAlpha: 0 }), "INVALID_ARGUMENT", "override_settings.beta_dist_alpha");
  rejects(s({ img2imgExtraNoise: Number.NaN }), "INVALID_ARGUMENT", "override_settings.img2img_extra_noise");
  rejects({ sMinUncond: -1 }, "INVALID_ARGUMENT", "s_min_uncond");
  rejects({ sMinUncond: Number.NaN }, "INVALID_ARGUMENT", "s_min_uncond");
});

test("use_downcasted_alpha_bar cannot be combined with Zero Terminal SNR, whose last σ overflows float16", () => {
  validateJob(job({ overrideSettings: { useDowncastedAlphaBar: true } }));
  rejects(
    { overrideSettings: { useDowncastedAlphaBar: true, sdNoiseSchedule: "Zero Terminal SNR" } },
    "INVALID_ARGUMENT",
    "override_settings.use_downcasted_alpha_bar",
  );
});

test("preview_every_n_steps: 0 (none) up to the step limit; live_preview_content one of A1111's three", () => {
  assert.equal(validateJob(job({ previewEveryNSteps: 5 })).params.previewEveryNSteps, 5);
  rejects({ previewEveryNSteps: -1 }, "INVALID_ARGUMENT", "preview_every_n_steps");
  rejects({ previewEveryNSteps: 1_000_000 }, "INVALID_ARGUMENT", "preview_every_n_steps");
  assert.equal(
    validateJob(job({ overrideSettings: { livePreviewContent: "Combined" } })).params.overrideSettings?.livePreviewContent,
    "Combined",
  );
  rejects({ overrideSettings: { livePreviewContent: "Everything" } }, "INVALID_ARGUMENT", "override_settings.live_preview_content");
});

test("hr_checkpoint_name: a model name, checked only where Hires.fix applies", () => {
  const hires = { enableHr: true, hrCheckpointName: "other" };
  assert.equal(validateJob(job(hires)).params.hrCheckpointName, "other");
  for (const bad of ["../models/x", "a/b", ".hidden", "x".repeat(201)]) {
    rejects({ ...hires, hrCheckpointName: bad }, "INVALID_ARGUMENT", "hr_checkpoint_name");
  }
  // A1111's UI value for none, and a name without Hires.fix, choose nothing.
  validateJob(job({ enableHr: true, hrCheckpointName: "Use same checkpoint" }));
  validateJob(job({ hrCheckpointName: "../x" }));
});

test("refiner: a model name, a switch fraction in [0, 1]; hires_fix_refiner_pass and aesthetic scores checked", () => {
  const ok = validateJob(job({ refinerCheckpoint: "xl-refiner", refinerSwitchAt: 0.8 }));
  assert.deepEqual([ok.params.refinerCheckpoint, ok.params.refinerSwitchAt], ["xl-refiner", 0.8]);
  validateJob(job({ refinerCheckpoint: "None", refinerSwitchAt: 0 }));
  validateJob(job({ refinerCheckpoint: "r", refinerSwitchAt: 1, overrideSettings: { hiresFixRefinerPass: "both passes" } }));
  rejects({ refinerCheckpoint: "../etc", refinerSwitchAt: 0.5 }, "INVALID_ARGUMENT", "refiner_checkpoint");
  rejects({ refinerCheckpoint: "r", refinerSwitchAt: 1.5 }, "INVALID_ARGUMENT", "refiner_switch_at");
  rejects({ refinerCheckpoint: "r", refinerSwitchAt: -0.1 }, "INVALID_ARGUMENT", "refiner_switch_at");
  rejects({ refinerCheckpoint: "r", refinerSwitchAt: Number.NaN }, "INVALID_ARGUMENT", "refiner_switch_at");
  validateJob(job({ refinerCheckpoint: "r", initImages: [init], mask }));
  rejects({ overrideSettings: { hiresFixRefinerPass: "third pass" } }, "INVALID_ARGUMENT", "override_settings.hires_fix_refiner_pass");
  rejects(
    { overrideSettings: { sdxlRefinerHighAestheticScore: Number.POSITIVE_INFINITY } },
    "INVALID_ARGUMENT",
    "override_settings.sdxl_refiner_high_aesthetic_score",
  );
});

test("validation fills a copy: the request keeps what it asked (the infotext, styles and defaults go into the copy)", () => {
  const asked = job({ infotext: "a cat\nSteps: 3, Sampler: Euler, Seed: 5, Refiner: r [0123456789]", prompt: "" });
  const v = validateJob(asked);
  assert.deepEqual([v.params.prompt, v.params.steps, v.params.refinerCheckpoint], ["a cat", 3, "r"]);
  assert.deepEqual([asked.prompt, asked.steps, asked.refinerCheckpoint, asked.width], ["", undefined, "", undefined]);
});

test("an Extras job: one image per init image, no model; its settings checked, and images needed", () => {
  const ok = validateJob(job({ model: "", initImages: [init, init], extras: { upscaler1: "R-ESRGAN 4x+", upscalingResize: 4 } }));
  assert.equal(ok.imageCount, 2);
  assert.equal(ok.params.model, EXTRAS_MODEL);
  // The generation fields an Extras job does not read are not checked either.
  validateJob(job({ initImages: [init], extras: {}, steps: 0, width: 3 }));
  rejects({ extras: {} }, "INVALID_ARGUMENT", "init_images");
  rejects({ initImages: [init], extras: { resizeMode: 3 } }, "INVALID_ARGUMENT", "extras.resize_mode");
  rejects({ initImages: [init], extras: { upscalingResize: 0 } }, "INVALID_ARGUMENT", "extras.upscaling_resize");
  rejects({ initImages: [init], extras: { resizeMode: 1, upscalingResizeW: 0 } }, "INVALID_ARGUMENT", "extras.upscaling_resize_w");
  rejects({ initImages: [init], extras: { codeformerWeight: -0.1 } }, "INVALID_ARGUMENT", "extras.codeformer_weight");
  rejects({ initImages: [init], extras: { upscaler2: "a/b" } }, "INVALID_ARGUMENT", "extras.upscaler_2");
});

test("LoRA tags and names: a tag A1111 fails to parse, or a name outside the LoRA folder, is refused at submit naming its prompt", () => {
  rejects({ prompt: "a cat <lora:style:heavy>" }, "INVALID_ARGUMENT", "prompt");
  rejects({ prompt: "a cat <lora::1>" }, "INVALID_ARGUMENT", "prompt");
  rejects({ prompt: "a cat <lora:../secret:1>" }, "INVALID_ARGUMENT", "prompt");
  rejects({ enableHr: true, hrScale: 2, hrPrompt: "<lora:x:1:dyn=many>" }, "INVALID_ARGUMENT", "hr_prompt");
  rejects({ loras: [{ name: "a\u0001b", teWeight: 1, unetWeight: 1 }] }, "INVALID_ARGUMENT", "loras[0].name");
  // Tags of other kinds are A1111's to ignore, and weights take Python's float forms.
  assert.doesNotThrow(() => validateJob(job({ prompt: "a cat <lora:style:1e-1:unet=.5> <hypernet:h:1> <lyco:l:1>" })));
});
