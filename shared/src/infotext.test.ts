import { test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { FarmError } from "./errors.js";
import { GenerationParamsSchema, InpaintingFill, RngSource, type GenerationParams } from "./gen/latentfarm/v1/generation_pb.js";
import { applyInfotext, parseInfotext } from "./infotext.js";

// As A1111 1.10 writes one (hires fix, a quoted value, a LoRA hash, ENSD and NV RNG).
const A1111 = [
  "masterpiece, a castle on a hill, <lora:detail:0.6>",
  "(best quality:1.2), night",
  "Negative prompt: blurry, lowres",
  "worst quality",
  "Steps: 28, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, " +
    "Model: v1-5-pruned-emaonly, Variation seed: 42, Variation seed strength: 0.3, Seed resize from: 384x512, Denoising strength: 0.45, " +
    'Clip skip: 2, ENSD: 31337, RNG: NV, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: "Latent (bicubic antialiased)", ' +
    'Lora hashes: "detail: 0123456789ab", Eta: 0.7, Schedule rho: 5, NGMS: 0.5, Version: v1.10.1',
].join("\n");

const job = (p: MessageInitShape<typeof GenerationParamsSchema> = {}): GenerationParams =>
  create(GenerationParamsSchema, { infotext: A1111, ...p });

test("parse: prompt and negative lines, unquoted values, WxH split into -1/-2, as parse_generation_parameters does", () => {
  const parsed = parseInfotext(A1111);
  assert.equal(parsed.prompt, "masterpiece, a castle on a hill, <lora:detail:0.6>\n(best quality:1.2), night");
  assert.equal(parsed.negativePrompt, "blurry, lowres\nworst quality");
  assert.equal(parsed.params.get("Hires upscaler"), "Latent (bicubic antialiased)");
  assert.equal(parsed.params.get("Lora hashes"), "detail: 0123456789ab");
  assert.deepEqual([parsed.params.get("Size-1"), parsed.params.get("Size-2")], ["512", "768"]);
  assert.deepEqual([parsed.params.get("Seed resize from-1"), parsed.params.get("Seed resize from-2")], ["384", "512"]);
  assert.equal(parsed.params.has("Size"), false);
  // A last line with fewer than three entries is part of the prompt.
  const short = parseInfotext("a cat\nSteps: 20, Seed: 1");
  assert.equal(short.prompt, "a cat\nSteps: 20, Seed: 1");
  assert.equal(short.params.size, 0);
});

test("apply: every entry fills its field or setting; Hires entries enable hires fix; nothing unknown is left", () => {
  const p = job();
  const { notReproduced } = applyInfotext(p);
  assert.deepEqual(notReproduced, []);
  assert.equal(p.prompt, "masterpiece, a castle on a hill, <lora:detail:0.6>\n(best quality:1.2), night");
  assert.equal(p.negativePrompt, "blurry, lowres\nworst quality");
  assert.deepEqual(
    [p.steps, p.samplerName, p.scheduler, p.cfgScale, p.seed, p.width, p.height, p.model],
    [28, "DPM++ 2M SDE", "Karras", 6.5, 1234567890n, 512, 768, "v1-5-pruned-emaonly"],
  );
  assert.deepEqual([p.subseed, p.subseedStrength, p.seedResizeFromW, p.seedResizeFromH], [42n, 0.3, 384, 512]);
  assert.deepEqual([p.clipSkip, p.etaNoiseSeedDelta, p.rng, p.sMinUncond], [2, 31337n, RngSource.NV, 0.5]);
  assert.deepEqual(
    [p.enableHr, p.hrScale, p.hrSecondPassSteps, p.hrUpscaler, p.denoisingStrength],
    [true, 1.5, 12, "Latent (bicubic antialiased)", 0.45],
  );
  assert.deepEqual([p.overrideSettings?.etaAncestral, p.overrideSettings?.rho], [0.7, 5]);
});

test("apply: the request's own values win, as in A1111's API", () => {
  const p = job({
    prompt: "my prompt",
    steps: 10,
    samplerName: "Euler",
    seed: 7n,
    rng: RngSource.CPU,
    subseedStrength: 0.9,
    overrideSettings: { etaAncestral: 1 },
  });
  applyInfotext(p);
  assert.deepEqual(
    [p.prompt, p.steps, p.samplerName, p.seed, p.rng, p.subseedStrength],
    ["my prompt", 10, "Euler", 7n, RngSource.CPU, 0.9],
  );
  // Fields the request left unset still come from the text.
  assert.deepEqual([p.cfgScale, p.scheduler, p.negativePrompt], [6.5, "Karras", "blurry, lowres\nworst quality"]);
  assert.equal(p.overrideSettings?.etaAncestral, 1, "an override the request sets is kept");
  assert.equal(p.overrideSettings?.rho, 5);
});

test("apply: img2img requests take no Hires entries; a mask takes the inpainting ones", () => {
  const img2img = create(GenerationParamsSchema, {
    initImages: [new Uint8Array([1])],
    mask: new Uint8Array([2]),
    infotext:
      "a door\nSteps: 20, Sampler: Euler a, Denoising strength: 0.6, Mask blur: 2, Masked content: latent noise, Inpaint area: Only masked, Masked area padding: 48, Hires upscale: 2, Noise multiplier: 0.9",
  });
  const { notReproduced } = applyInfotext(img2img);
  assert.deepEqual(notReproduced, []);
  assert.equal(img2img.enableHr, false);
  assert.deepEqual(
    [img2img.maskBlur, img2img.inpaintingFill, img2img.inpaintFullRes, img2img.inpaintFullResPadding, img2img.initialNoiseMultiplier],
    [2, InpaintingFill.LATENT_NOISE, true, 48, 0.9],
  );
});

test("apply: what the farm does not reproduce is reported, an older A1111's implied behaviours too; bad values name the key", () => {
  const p = create(GenerationParamsSchema, {
    infotext:
      "a [cat:dog:5]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, VAE hash: 0123456789, VAE: kl-f8-anime2.ckpt, " +
      "ADetailer model: face_yolov8n.pt, " +
      "Face restoration: GFPGAN, Emphasis: No norm, Version: v1.5.1",
  });
  const { notReproduced } = applyInfotext(p);
  assert.deepEqual(notReproduced, ["ADetailer model: face_yolov8n.pt"]);
  // "Face restoration" turns restore_faces on and names A1111's face_restoration_model (unless the request names one).
  assert.equal(p.restoreFaces, true);
  assert.equal(p.overrideSettings?.faceRestorationModel, "GFPGAN");
  const faces = (entry: string, faceRestorationModel = "") => {
    const q = create(GenerationParamsSchema, {
      infotext: `x\nSteps: 2, Seed: 1, Face restoration: ${entry}`,
      overrideSettings: { faceRestorationModel },
    });
    return { notReproduced: applyInfotext(q).notReproduced, model: q.overrideSettings?.faceRestorationModel };
  };
  assert.deepEqual(faces("GFPGAN", "CodeFormer"), { notReproduced: [], model: "CodeFormer" });
  assert.deepEqual(faces("RestoreFormer"), { notReproduced: ["Face restoration: RestoreFormer (restored with CodeFormer)"], model: "" });
  // The checkpoints' hashes are kept for finding the farm's checkpoint of those weights, where the text filled the field.
  const hashes = (init: Partial<Pick<GenerationParams, "model" | "hrCheckpointName">>) =>
    applyInfotext(
      create(GenerationParamsSchema, {
        ...init,
        infotext:
          "x\nSteps: 2, Seed: 1, Model hash: 6CE0161689, Model: sd15, Denoising strength: 0.5, Hires upscale: 2, Hires checkpoint: b [0123456789]",
      }),
    ).checkpointHashes;
  assert.deepEqual(hashes({}), { model: "6ce0161689", hiresCheckpoint: "0123456789" });
  assert.deepEqual(hashes({ model: "mine", hrCheckpointName: "other" }), {});
  // "VAE" is A1111's sd_vae setting (its "VAE hash" only informs), unless the request sets one.
  assert.equal(p.overrideSettings?.sdVae, "kl-f8-anime2.ckpt");
  const own = create(GenerationParamsSchema, { infotext: "x\nSteps: 2, Seed: 1, VAE: a.pt", overrideSettings: { sdVae: "None" } });
  applyInfotext(own);
  assert.equal(own.overrideSettings?.sdVae, "None");
  assert.equal(p.overrideSettings?.emphasis, "No norm");
  // A prompt-editing bracket before 1.6.0: A1111's paste turns on the old timelines.
  assert.equal(p.overrideSettings?.useOldScheduling, true);
  // ᾱ was float16 before 1.7.0-225 (a release candidate counts as before its release): the option that reproduces it.
  assert.equal(p.overrideSettings?.useDowncastedAlphaBar, true);
  // DDIM and PLMS padded the negative prompt v0's way before 1.6.0.
  assert.equal(p.overrideSettings?.padCondUncondV0, true);
  assert.equal(p.overrideSettings?.padCondUncond, undefined);
  const rc = create(GenerationParamsSchema, { infotext: "x\nSteps: 2, Seed: 1, Version: 1.7.0-RC-5-gabc" });
  applyInfotext(rc);
  assert.equal(rc.overrideSettings?.useDowncastedAlphaBar, true);
  // UniPC before 1.6 was a sampler of its own (float32 log ᾱ): rendered as 1.6 runs it, and said so.
  const oldUniPc = (version: string) =>
    applyInfotext(create(GenerationParamsSchema, { infotext: `x\nSteps: 2, Sampler: UniPC, Seed: 1, Version: ${version}` })).notReproduced;
  assert.deepEqual(oldUniPc("v1.5.2"), ["Version: v1.5.2 (UniPC as A1111 before 1.6 ran it; rendered as 1.6 runs it)"]);
  assert.deepEqual(oldUniPc("v1.6.0"), []);
  // Defaults A1111 writes, its own later versions, and the farm's own infotexts imply nothing.
  for (const version of ["latentfarm-0.1.0", "v1.7.0-225-gabc", "v1.10.1"]) {
    const later = create(GenerationParamsSchema, { infotext: `x\nSteps: 2, Seed: 1, Emphasis: Original, Version: ${version}` });
    assert.deepEqual(applyInfotext(later).notReproduced, []);
    assert.equal(later.overrideSettings?.useDowncastedAlphaBar, undefined, version);
  }

  for (const [entry, key] of [
    ["Steps: many", "Steps"],
    ["CFG scale: high", "CFG scale"],
    ["Seed: 1.5", "Seed"],
    ["RNG: TPU", "RNG"],
    ["Discard penultimate sigma: maybe", "Discard penultimate sigma"],
  ] as const) {
    assert.throws(
      () => applyInfotext(create(GenerationParamsSchema, { infotext: `x\nSampler: Euler, Size: 512x512, ${entry}` })),
      (e: unknown) => e instanceof FarmError && e.field === "infotext" && e.message.includes(key),
      entry,
    );
  }
});

test("apply: Hires checkpoint names the second pass's model by name, without the hash A1111 writes after it", () => {
  const text = (checkpoint: string) =>
    `a tower\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Model: base, Denoising strength: 0.5, Hires upscale: 2, Hires checkpoint: ${checkpoint}`;
  for (const [checkpoint, name] of [
    ["detail-v2 [0123456789]", "detail-v2"],
    ["detail [v2]", "detail [v2]"],
    ["Use same checkpoint", ""],
  ] as const) {
    const p = create(GenerationParamsSchema, { infotext: text(checkpoint) });
    assert.deepEqual(applyInfotext(p).notReproduced, []);
    assert.deepEqual([p.model, p.enableHr, p.hrCheckpointName], ["base", true, name], checkpoint);
  }
  // The request's own hires checkpoint wins.
  const own = create(GenerationParamsSchema, { infotext: text("detail-v2 [0123456789]"), hrCheckpointName: "mine" });
  applyInfotext(own);
  assert.equal(own.hrCheckpointName, "mine");
});

test("apply: TI hashes are left to the agent, which compares them with its embedding files", () => {
  const p = create(GenerationParamsSchema, {
    infotext:
      'a tower\nNegative prompt: EasyNegative\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, TI hashes: "EasyNegative: c74b4e810b03"',
  });
  assert.deepEqual(applyInfotext(p).notReproduced, []);
  assert.equal(p.negativePrompt, "EasyNegative");
});

test("apply: the refiner's entries fill refiner_checkpoint (its hash kept), refiner_switch_at and its settings", () => {
  const text = (extra: string) => `a tower\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Model: base, ${extra}`;
  const p = create(GenerationParamsSchema, {
    infotext: text("Refiner: xl-refiner [0123456789], Refiner switch at: 0.8, Version: v1.10.1"),
  });
  const applied = applyInfotext(p);
  assert.deepEqual(applied.notReproduced, []);
  assert.deepEqual([p.refinerCheckpoint, p.refinerSwitchAt], ["xl-refiner", 0.8]);
  assert.equal(applied.checkpointHashes.refiner, "0123456789");
  assert.equal(p.overrideSettings?.refinerSwitchBySampleSteps, undefined);
  // Before 1.8.0 A1111 switched by sampling steps: its infotexts say so by their version alone.
  const old = create(GenerationParamsSchema, {
    infotext: text("Refiner: xl-refiner [0123456789], Refiner switch at: 0.8, Version: v1.7.0"),
  });
  applyInfotext(old);
  assert.equal(old.overrideSettings?.refinerSwitchBySampleSteps, true);
  const hires = create(GenerationParamsSchema, {
    infotext: text(
      "Denoising strength: 0.5, Hires upscale: 2, Hires refiner: both passes, Refiner: r, Refiner switch by sampling steps: True",
    ),
  });
  assert.deepEqual(applyInfotext(hires).notReproduced, []);
  assert.deepEqual(
    [hires.refinerCheckpoint, hires.overrideSettings?.hiresFixRefinerPass, hires.overrideSettings?.refinerSwitchBySampleSteps],
    ["r", "both passes", true],
  );
  // The request's own refiner wins.
  const own = create(GenerationParamsSchema, { infotext: text("Refiner: xl-refiner [0123456789]"), refinerCheckpoint: "mine" });
  assert.equal(applyInfotext(own).checkpointHashes.refiner, undefined);
  assert.equal(own.refinerCheckpoint, "mine");
  assert.throws(
    () => applyInfotext(create(GenerationParamsSchema, { infotext: text("Refiner: r, Refiner switch at: soon") })),
    (e: unknown) => e instanceof FarmError && e.field === "infotext" && e.message.includes("Refiner switch at"),
  );
});

test("apply: Tiling: True turns tiling on, unless the request sets it", () => {
  const p = create(GenerationParamsSchema, { infotext: "a wall\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, RNG: CPU, Tiling: True" });
  assert.deepEqual(applyInfotext(p).notReproduced, []);
  assert.equal(p.tiling, true);
  assert.throws(
    () => applyInfotext(create(GenerationParamsSchema, { infotext: "a wall\nSteps: 20, Sampler: Euler, Tiling: yes" })),
    (e: unknown) => e instanceof FarmError && e.field === "infotext" && e.message.includes("Tiling"),
  );
});
