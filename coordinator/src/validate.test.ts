import { test } from "node:test";
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { FarmError, GenerationParamsSchema, type InpaintingFill } from "@latentfarm/shared";
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
