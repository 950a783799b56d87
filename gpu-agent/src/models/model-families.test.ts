import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, utimesSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { encodeSafetensors, makeTinyModel } from "../model-graph/index.js";
import { ModelCatalog } from "./catalog.js";
import { ModelFamilies, familyOfKeys, modelFamily } from "./model-families.js";

const dir = mkdtempSync(join(tmpdir(), "lf-families-"));
let sd1: Awaited<ReturnType<typeof makeTinyModel>>;
let xl: Awaited<ReturnType<typeof makeTinyModel>>;
let refiner: Awaited<ReturnType<typeof makeTinyModel>>;
before(async () => {
  sd1 = await makeTinyModel({ outDir: join(dir, "sd1"), config: "small" });
  xl = await makeTinyModel({ outDir: join(dir, "xl"), config: "sdxl-small", checkpointOnly: true });
  refiner = await makeTinyModel({ outDir: join(dir, "refiner"), config: "sdxl-refiner-small" });
});
after(() => rmSync(dir, { recursive: true, force: true }));

test("a checkpoint's family from its text encoders' key prefixes", () => {
  assert.equal(familyOfKeys(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.embeddings.x"]), "sd1");
  assert.equal(familyOfKeys(["cond_stage_model.model.token_embedding.weight"]), "sd2");
  assert.equal(familyOfKeys(["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"]), "sdxl");
  assert.equal(familyOfKeys(["conditioner.embedders.0.model.x", "conditioner.embedders.1.x"]), "sdxl-refiner");
  assert.equal(familyOfKeys(["lora_unet_x.lora_up.weight"]), "");
});

test("checkpoints and ONNX folders as the catalog lists them", async () => {
  assert.equal(await modelFamily({ name: "a", format: "safetensors", path: sd1.checkpointPath }), "sd1");
  assert.equal(await modelFamily({ name: "b", format: "safetensors", path: xl.checkpointPath }), "sdxl");
  assert.equal(await modelFamily({ name: "r", format: "safetensors", path: refiner.checkpointPath }), "sdxl-refiner");
  // A folder the farm built says in its manifest.
  assert.equal(await modelFamily({ name: "c", format: "diffusers-onnx", path: sd1.onnxDir! }), "sd1");
  // A refiner's folder has text_encoder_2 but no text_encoder.
  assert.equal(await modelFamily({ name: "rf", format: "diffusers-onnx", path: refiner.onnxDir! }), "sdxl-refiner");
  const unetOnly = join(dir, "refiner-unet-only");
  mkdirSync(unetOnly);
  writeFileSync(join(unetOnly, "latentfarm.json"), JSON.stringify({ family: "sdxl-refiner" }));
  assert.equal(await modelFamily({ name: "ru", format: "diffusers-onnx", path: unetOnly }), "sdxl-refiner", "from the manifest alone");
  // An exporter's folder: text_encoder_2 means SDXL, else CLIP's width in its config, else unknown.
  const exported = join(dir, "exported");
  mkdirSync(join(exported, "text_encoder"), { recursive: true });
  const entry = { name: "d", format: "diffusers-onnx" as const, path: exported };
  assert.equal(await modelFamily(entry), "");
  writeFileSync(join(exported, "text_encoder", "config.json"), JSON.stringify({ hidden_size: 1024 }));
  assert.equal(await modelFamily(entry), "sd2");
  mkdirSync(join(exported, "text_encoder_2"));
  assert.equal(await modelFamily(entry), "sdxl");
  const exportedRefiner = join(dir, "exported-refiner");
  mkdirSync(join(exportedRefiner, "text_encoder_2"), { recursive: true });
  assert.equal(await modelFamily({ ...entry, path: exportedRefiner }), "sdxl-refiner");
});

test("ModelFamilies reads a file again only when it changed; an unreadable one is unknown", async () => {
  const path = join(dir, "m.safetensors");
  const write = (key: string, mtime: number) => {
    writeFileSync(path, encodeSafetensors({ [key]: { dtype: "F32", shape: [1], data: new Float32Array(1) } }));
    utimesSync(path, mtime, mtime);
  };
  const families = new ModelFamilies();
  // The catalog's listing gives each entry its version (mtime and size).
  const catalog = new ModelCatalog(dir);
  const listed = async () => families.of(await catalog.list());
  write("cond_stage_model.transformer.x", 1000);
  assert.equal((await listed()).get("m"), "sd1");
  // Same size and mtime: the recorded answer stands (the file is not read).
  write("cond_stage_model.model.xxxxxxxx", 1000);
  assert.equal((await listed()).get("m"), "sd1");
  // Without a version an entry is read every time.
  assert.equal((await families.of([{ name: "m", format: "safetensors", path }])).get("m"), "sd2");
  utimesSync(path, 2000, 2000);
  assert.equal((await listed()).get("m"), "sd2");
  writeFileSync(path, "not safetensors");
  assert.equal((await listed()).get("m"), "");
  rmSync(path);
  assert.equal((await listed()).has("m"), false);
});
