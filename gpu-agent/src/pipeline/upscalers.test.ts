import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, utimesSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { upscaleWithModel, upscaleWithTensorTiles, type Image8 } from "../imaging/index.js";
import { writeTinyRrdbNet, writeTinySrvggNet } from "../imaging/tiny-models.js";
import { inProcessRunner } from "./aux-runner.test-support.js";
import { listUpscalers, resolveUpscaler, upscaleImage, upscalerFileCandidates } from "./upscalers.js";

const resources = (upscalersDir?: string) => ({ maxInputPixels: 1 << 24, maxInputBytes: 1 << 24, ...(upscalersDir && { upscalersDir }) });
const signal = new AbortController().signal;

function picture(width: number, height: number): Image8 {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    const x = i % width;
    const y = Math.floor(i / width);
    data[i * 3] = (x * 7 + y * 3) % 256;
    data[i * 3 + 1] = (x * y) % 256;
    data[i * 3 + 2] = 128 + Math.round(100 * Math.sin(x / 9) * Math.cos(y / 7));
  }
  return { width, height, channels: 3, data };
}

describe("ESRGAN-family ONNX upscalers", () => {
  const dir = mkdtempSync(join(tmpdir(), "upscalers-"));
  before(async () => {
    await writeTinyRrdbNet(join(dir, "RealESRGAN_x4plus.onnx"));
    await writeTinySrvggNet(join(dir, "realesr-general-x4v3.onnx"));
  });

  test("A1111 names resolve to the published file stems; the scale is measured (×4)", async () => {
    assert.deepEqual(upscalerFileCandidates("R-ESRGAN 4x+"), ["R-ESRGAN 4x+.onnx", "RealESRGAN_x4plus.onnx"]);
    const runner = inProcessRunner();
    for (const name of ["R-ESRGAN 4x+", "R-ESRGAN General 4xV3"]) {
      const up = await resolveUpscaler(runner, name, resources(dir), "hr_upscaler", signal);
      assert.equal(up.kind, "model");
      assert.equal(up.kind === "model" && up.scale, 4);
    }
  });

  test("the scale is measured once per file: later resolutions run no probe, a file changed since is probed again", async () => {
    const runner = inProcessRunner();
    const own = mkdtempSync(join(tmpdir(), "upscaler-probe-"));
    const file = join(own, "RealESRGAN_x4plus.onnx");
    await writeTinyRrdbNet(file);
    for (let i = 0; i < 3; i++) {
      const up = await resolveUpscaler(runner, "R-ESRGAN 4x+", resources(own), "hr_upscaler", signal);
      assert.equal(up.kind === "model" && up.scale, 4);
    }
    assert.equal(runner.runs.get(file), 1, "one probe for three resolutions");
    // Written again (a new mtime): measured again.
    utimesSync(file, new Date(), new Date(Date.now() + 5_000));
    await resolveUpscaler(runner, "R-ESRGAN 4x+", resources(own), "hr_upscaler", signal);
    assert.equal(runner.runs.get(file), 2);
  });

  test("a missing model is FAILED_PRECONDITION naming the file; no folder names the flag", async () => {
    const runner = inProcessRunner();
    await assert.rejects(
      resolveUpscaler(runner, "4x-UltraSharp", resources(dir), "hr_upscaler", signal),
      (e: Error & { codeName?: string }) => {
        assert.equal(e.codeName, "FAILED_PRECONDITION");
        assert.match(e.message, /hr_upscaler.*4x-UltraSharp\.onnx/);
        return true;
      },
    );
    await assert.rejects(
      resolveUpscaler(runner, "R-ESRGAN 4x+", resources(), "hr_upscaler", signal),
      /--upscalers.*RealESRGAN_x4plus\.onnx|RealESRGAN_x4plus\.onnx.*--upscalers/,
    );
  });

  test("tiled (192/8) equals the whole-image run away from the seam", async () => {
    const runner = inProcessRunner();
    const up = await resolveUpscaler(runner, "R-ESRGAN 4x+", resources(dir), "hr_upscaler", signal);
    assert.ok(up.kind === "model");
    // 376×192: two tiles at x = 0 and 184, one row, no padding; seam zone x ∈ [184, 192).
    const img = picture(376, 192);
    const whole = await upscaleWithModel(img, (t) => up.run(t, signal), { tileSize: 0 });
    const tiled = await upscaleWithModel(img, (t) => up.run(t, signal));
    assert.equal(tiled.width, 376 * 4);
    let far = 0;
    let seam = 0;
    for (let y = 0; y < tiled.height; y++) {
      for (let x = 0; x < tiled.width; x++) {
        const sx = x / 4;
        for (let c = 0; c < 3; c++) {
          const d = Math.abs(tiled.data[(y * tiled.width + x) * 3 + c]! - whole.data[(y * tiled.width + x) * 3 + c]!);
          if (sx < 176 || sx >= 200) far = Math.max(far, d);
          else seam = Math.max(seam, d);
        }
      }
    }
    assert.equal(far, 0, "identical away from the seam");
    assert.ok(seam <= 8, `seam zone differs by ${seam} levels`);
  });

  test("upscaleImage reaches the exact target: model ×4 then Lanczos down; Lanczos and Nearest via sharp", async () => {
    const runner = inProcessRunner();
    const up = await resolveUpscaler(runner, "R-ESRGAN General 4xV3", resources(dir), "hr_upscaler", signal);
    const out = await upscaleImage(picture(40, 24), { width: 60, height: 36 }, up, signal);
    assert.deepEqual([out.width, out.height], [60, 36]);
    const nearest = await upscaleImage(picture(40, 24), { width: 80, height: 48 }, { kind: "resize", name: "Nearest" }, signal);
    const src = picture(40, 24);
    // Nearest ×2: output (2x, 2y) is source (x, y).
    assert.deepEqual(
      [...nearest.data.subarray((2 * 80 + 2) * 3, (2 * 80 + 2) * 3 + 3)],
      [...src.data.subarray((1 * 40 + 1) * 3, (1 * 40 + 1) * 3 + 3)],
    );
  });
});

describe("SwinIR and ScuNET: tensor tiles, as A1111's upscale_2", () => {
  const dir = mkdtempSync(join(tmpdir(), "upscalers-swinir-"));
  before(async () => {
    // A1111's download name for "SwinIR 4x" at the top, a model of the user's own in A1111's SwinIR folder,
    // and a DAT model, which A1111 tiles as ESRGAN.
    await writeTinySrvggNet(join(dir, "SwinIR_4x.onnx"));
    mkdirSync(join(dir, "SwinIR"));
    await writeTinySrvggNet(join(dir, "SwinIR", "my-swinir.onnx"));
    await writeTinySrvggNet(join(dir, "DAT_x4.onnx"));
  });

  test("built-in names and the family's folder get SWIN_tile 192/8; DAT and the rest keep split_grid", async () => {
    const runner = inProcessRunner();
    for (const name of ["SwinIR 4x", "my-swinir"]) {
      const up = await resolveUpscaler(runner, name, resources(dir), "hr_upscaler", signal);
      assert.ok(up.kind === "model" && up.tensorTiles, name);
      assert.deepEqual([up.tensorTiles.tileSize, up.tensorTiles.tileOverlap, up.scale], [192, 8, 4], name);
    }
    // What the agent's heartbeat lists: every file's stem, and A1111's names of the files it knows.
    assert.deepEqual(await listUpscalers(dir), ["DAT x4", "DAT_x4", "SwinIR 4x", "SwinIR_4x", "my-swinir"]);
    assert.deepEqual(await listUpscalers(undefined), []);
    const dat = await resolveUpscaler(runner, "DAT x4", resources(dir), "hr_upscaler", signal);
    assert.ok(dat.kind === "model" && dat.tensorTiles === undefined && dat.path.endsWith("DAT_x4.onnx"));
    await assert.rejects(
      resolveUpscaler(runner, "ScuNET GAN", resources(dir), "hr_upscaler", signal),
      /scunet_color_real_gan\.onnx or .*ScuNET\.onnx not found \(nor in its SwinIR or ScuNET folder\)/,
    );
  });

  test("upscaleImage runs a SwinIR model on tensor tiles: averaged overlaps, not split_grid's 8-bit blend", async () => {
    const runner = inProcessRunner();
    const up = await resolveUpscaler(runner, "SwinIR 4x", resources(dir), "hr_upscaler", signal);
    assert.ok(up.kind === "model" && up.tensorTiles);
    // 200×40: the tile is min(192, 40, 200) = 40 px at a stride of 32, six tiles along a row.
    const img = picture(200, 40);
    const out = await upscaleImage(img, { width: 800, height: 160 }, up, signal);
    assert.deepEqual([out.width, out.height], [800, 160]);
    const direct = await upscaleWithTensorTiles(img, (x, w, h) => up.tensorTiles!.runTensor(x, w, h, signal), up.tensorTiles);
    assert.deepEqual(out, direct);
    const grid = await upscaleWithModel(img, (t) => up.run(t, signal));
    assert.notDeepEqual(out.data, grid.data);
  });
});
