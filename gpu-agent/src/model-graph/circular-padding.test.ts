import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { withCircularPadding } from "./circular-padding.js";
import { makeTinyModel, type TinyModel } from "./tiny-model.js";
import { SeededRandom } from "./random.js";
import { maxAbsDiff, runGraph } from "../test-support/graphs.js";

const dir = mkdtempSync(join(tmpdir(), "circular-"));
after(() => rmSync(dir, { recursive: true, force: true }));
let tiny: TinyModel;
before(async () => {
  tiny = await makeTinyModel({ outDir: join(dir, "tiny"), seed: 5, config: "small" });
});

/** x rolled by `dy`, `dx` along its last two axes (NCHW), as torch.roll does. */
function roll(x: Float32Array, dims: readonly [number, number, number, number], dy: number, dx: number): Float32Array {
  const [n, c, h, w] = dims;
  const out = new Float32Array(x.length);
  for (let p = 0; p < n * c; p++) {
    for (let y = 0; y < h; y++) {
      for (let i = 0; i < w; i++) out[p * h * w + ((y + dy) % h) * w + ((i + dx) % w)] = x[p * h * w + y * w + i]!;
    }
  }
  return out;
}

/** The graph beside the original (its weights are external data named relative to the folder). */
function circular(component: string): string {
  const path = join(tiny.onnxDir!, component, "model.onnx");
  const patched = withCircularPadding(readFileSync(path), path);
  assert.ok(patched.converted > 0, `${component}: no padded Conv found`);
  const target = join(tiny.onnxDir!, component, "model.circular.onnx");
  writeFileSync(target, patched.model);
  return target;
}

test("with circular padding the VAE decoder commutes with rolling the latent: a shift of k cells is 8k pixels, edges included", async () => {
  const h = 6;
  const w = 5;
  const z = new SeededRandom(1).normalArray(4 * h * w);
  const decode = async (model: string, latent: Float32Array) =>
    (await runGraph(model, { latent_sample: new ort.Tensor("float32", latent, [1, 4, h, w]) })).sample!.data as Float32Array;
  const path = circular("vae_decoder");
  const image = await decode(path, z);
  const shifted = await decode(path, roll(z, [1, 4, h, w], 2, 3));
  const d = maxAbsDiff(shifted, roll(image, [1, 3, 8 * h, 8 * w], 16, 24));
  assert.ok(d <= 1e-4, `circular: ${d}`);
  // Zero padding (the graph as built) does not: the test can tell the two apart.
  const plain = join(tiny.onnxDir!, "vae_decoder", "model.onnx");
  const d0 = maxAbsDiff(await decode(plain, roll(z, [1, 4, h, w], 2, 3)), roll(await decode(plain, z), [1, 3, 8 * h, 8 * w], 16, 24));
  assert.ok(d0 > 1e-2, `zero padding: ${d0}`);
  // Away from the edges the two paddings agree only where no padded value reaches: nowhere here (the
  // mid-block attention sees every cell), so the pictures differ.
  assert.ok(maxAbsDiff(image, await decode(plain, z)) > 1e-3);
});

test("the UNet commutes with rolls by whole cells of its coarsest level; a graph without padded Convs is left as it was", async () => {
  const levels = tiny.spec.unetChannels.length;
  const step = 2 ** (levels - 1);
  const h = 4 * step;
  const w = 3 * step;
  const rng = new SeededRandom(2);
  const x = rng.normalArray(4 * h * w);
  const ctx = rng.normalArray(77 * tiny.spec.textHidden);
  const path = circular("unet");
  const run = async (sample: Float32Array) =>
    (
      await runGraph(path, {
        sample: new ort.Tensor("float32", sample, [1, 4, h, w]),
        timestep: new ort.Tensor("float32", Float32Array.of(500), [1]),
        encoder_hidden_states: new ort.Tensor("float32", ctx, [1, 77, tiny.spec.textHidden]),
      })
    ).out_sample!.data as Float32Array;
  const d = maxAbsDiff(await run(roll(x, [1, 4, h, w], step, 2 * step)), roll(await run(x), [1, 4, h, w], step, 2 * step));
  assert.ok(d <= 1e-4, `unet: ${d}`);
  // The text encoder has no Conv: nothing to convert, the same bytes.
  const te = readFileSync(join(tiny.onnxDir!, "text_encoder", "model.onnx"));
  const same = withCircularPadding(te, "text_encoder");
  assert.equal(same.converted, 0);
  assert.deepEqual(Buffer.from(same.model), Buffer.from(te));
});
