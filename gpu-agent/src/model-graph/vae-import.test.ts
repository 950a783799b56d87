import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FarmError } from "@latentfarm/shared";
import { encodeTorchFile } from "../test-support/torch-writer.js";
import { writeSafetensors } from "./safetensors.js";
import { makeTinyModel } from "./tiny-model.js";
import { importVae } from "./vae-import.js";

let dir: string;
let checkpoint: string;
before(async () => {
  dir = mkdtempSync(join(tmpdir(), "lf-vae-import-"));
  checkpoint = (await makeTinyModel({ outDir: join(dir, "gen"), seed: 3, config: "small" })).checkpointPath;
});
after(() => rmSync(dir, { recursive: true, force: true }));

const one = { dtype: "F32" as const, shape: [1], data: Float32Array.of(1) };

test("files that are not LDM-layout VAEs are refused with what they are", async () => {
  const cacheDir = join(dir, "cache");
  const cases: Array<[string, () => Promise<void>, RegExp]> = [
    [
      "diffusers.safetensors",
      () => writeSafetensors(join(dir, "diffusers.safetensors"), { "decoder.up_blocks.0.resnets.0.conv1.weight": one }),
      /diffusers layout/,
    ],
    ["lora.safetensors", () => writeSafetensors(join(dir, "lora.safetensors"), { "lora_unet_x.lora_up.weight": one }), /not a VAE/],
    ["empty-dict.pt", async () => writeFileSync(join(dir, "empty-dict.pt"), encodeTorchFile({ state_dict: {} })), /no tensors/],
    ["old.ckpt", async () => writeFileSync(join(dir, "old.ckpt"), Buffer.from("\x80\x02}q\x00.", "latin1")), /before 1\.6/],
  ];
  for (const [name, make, reason] of cases) {
    await make();
    await assert.rejects(
      importVae(join(dir, name), { cacheDir }),
      (err: unknown) => err instanceof FarmError && reason.test(err.message),
      name,
    );
  }
  await assert.rejects(importVae(checkpoint, { cacheDir }), /a whole checkpoint, not a VAE/);
  await assert.rejects(
    importVae(join(dir, "missing.safetensors"), { cacheDir }),
    (err: unknown) => err instanceof FarmError && err.code === 5,
  );
});
