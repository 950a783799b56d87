import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { GenerationParamsSchema, TaskStage, latentHandover, readLatent, readRgb, rgbHandover, type Handover } from "@latentfarm/shared";
import { DEFAULT_HIRES_TILING, HiresImage, checkTiling, equivalentModelCalls, parsePixelCount, planHires } from "./hires-stages.js";

const params = (p: Record<string, unknown>) =>
  create(GenerationParamsSchema, { model: "m", prompt: "x", steps: 10, width: 1024, height: 1024, enableHr: true, hrScale: 2, ...p });

test("plan: no hires → one task; hires at or under the threshold → two stages; above → tiles", () => {
  assert.equal(planHires(params({ enableHr: false }), DEFAULT_HIRES_TILING), undefined);
  const small = planHires(params({ width: 512, height: 512 }), DEFAULT_HIRES_TILING)!;
  assert.deepEqual(
    [small.firstPass, small.final],
    [
      { width: 512, height: 512 },
      { width: 1024, height: 1024 },
    ],
  );
  assert.equal(small.layout, undefined);
  const big = planHires(params({ hrSecondPassSteps: 6 }), DEFAULT_HIRES_TILING)!;
  assert.deepEqual(big.final, { width: 2048, height: 2048 });
  assert.equal(big.layout?.tiles.length, 25, "2048² in 512 px tiles with ≥ 64 px overlap: 5 × 5");
  assert.equal(big.hrSteps, 6);
  // 10 first-pass steps + 6 steps over 25 tiles of 512² measured in 1024² passes.
  assert.equal(equivalentModelCalls(big, params({})), 10 + Math.ceil((6 * 25 * 512 * 512) / (1024 * 1024)));
  // Heun evaluates twice a step; a hires sampler of its own counts for the second pass only.
  assert.equal(equivalentModelCalls(big, params({ samplerName: "Heun" })), 20 + Math.ceil((12 * 25 * 512 * 512) / (1024 * 1024)));
  assert.equal(equivalentModelCalls(big, params({ hrSamplerName: "DPM2 a" })), 10 + Math.ceil((12 * 25 * 512 * 512) / (1024 * 1024)));
  assert.throws(() => planHires(params({ hrResizeX: 4, hrResizeY: 4, width: 64, height: 2048 }), DEFAULT_HIRES_TILING), /hr_scale/);
});

test("tiling config: sizes on the UNet's grid, overlap at most half a tile; thresholds as WxH or counts", () => {
  checkTiling(DEFAULT_HIRES_TILING);
  assert.throws(() => checkTiling({ ...DEFAULT_HIRES_TILING, tileSize: 500 }), /multiple of 64/);
  assert.throws(() => checkTiling({ ...DEFAULT_HIRES_TILING, tileOverlap: 300 }), /overlap/);
  assert.equal(parsePixelCount("1536x1536"), 1536 * 1536);
  assert.equal(parsePixelCount("4096"), 4096);
  assert.throws(() => parsePixelCount("big"), RangeError);
});

test("stage graph: first → up → tiles (inputs cut from the upscaled source) → assemble (every tile, in order)", () => {
  const plan = planHires(params({ width: 64, height: 64, hrScale: 1.5, steps: 4 }), {
    tileAbovePixels: 64 * 64,
    tileSize: 64,
    tileOverlap: 16,
  })!;
  assert.deepEqual(plan.layout?.xs, [0, 32]);
  const hi = new HiresImage(plan, 9n, 0n);
  assert.deepEqual(
    hi.ready().map((s) => s.name),
    ["first"],
  );
  hi.started.add("first");
  assert.deepEqual(hi.ready(), [], "a started stage is not offered again");
  const first = latentHandover(new Float32Array(4 * 8 * 8), [1, 4, 8, 8]);
  hi.check("first", first);
  hi.outputs.set("first", first);
  const [up] = hi.ready();
  assert.equal(up?.stage, TaskStage.UPSCALE);
  assert.equal(hi.request(up!).inputs?.[0], first);
  // A 96×96 latent source [1,4,12,12] whose value at (c, y, x) encodes the position.
  const src = new Float32Array(4 * 12 * 12).map((_, k) => k);
  assert.throws(() => hi.check("up", latentHandover(src.slice(0, 4 * 8 * 8), [1, 4, 8, 8])), /handed over a latent/);
  hi.outputs.set("up", latentHandover(src, [1, 4, 12, 12]));
  const tiles = hi.ready();
  assert.deepEqual(
    tiles.map((s) => s.name),
    ["t0", "t1", "t2", "t3"],
  );
  const t3 = hi.request(tiles[3]!);
  assert.equal(t3.tileIndex, 3);
  assert.deepEqual(t3.tiles?.xs, [0, 32]);
  const crop = readLatent(t3.inputs![0] as Handover);
  assert.deepEqual(crop.shape, [1, 4, 8, 8]);
  assert.equal(crop.data[0], 4 * 12 + 4, "tile 3 starts at latent (4, 4)");
  assert.throws(() => hi.check("t1", rgbHandover(new Uint8Array(32 * 32 * 3), 32, 32)), /for a 64x64 tile/);
  for (const s of tiles) {
    hi.started.add(s.name);
    const px = new Uint8Array(64 * 64 * 3).fill(s.tile!.index);
    hi.check(s.name, rgbHandover(px, 64, 64));
  }
  // Tiles arrive out of order; assembly waits for all of them and gets them in tile order.
  for (const i of [2, 0, 3]) hi.outputs.set(`t${i}`, rgbHandover(new Uint8Array(64 * 64 * 3).fill(i), 64, 64));
  assert.deepEqual(hi.ready(), []);
  hi.outputs.set("t1", rgbHandover(new Uint8Array(64 * 64 * 3).fill(1), 64, 64));
  const [asm] = hi.ready();
  assert.equal(asm?.stage, TaskStage.ASSEMBLE);
  assert.deepEqual(
    hi.request(asm!).inputs!.map((h) => readRgb(h as Handover).data[0]),
    [0, 1, 2, 3],
  );
  assert.deepEqual(
    hi.storedNames().map((n) => n.object),
    ["first", "up", "tile-0-0-64x64", "tile-32-0-64x64", "tile-0-32-64x64", "tile-32-32-64x64"],
  );
});

test("progress adds the passes up: first-pass steps, then the mean of the tiles; never backwards", () => {
  const plan = planHires(params({ width: 64, height: 64, hrScale: 1.5, steps: 4, hrSecondPassSteps: 6 }), {
    tileAbovePixels: 0,
    tileSize: 64,
    tileOverlap: 16,
  })!;
  const hi = new HiresImage(plan, 1n, 0n);
  assert.equal(hi.totalSteps, 10);
  assert.equal(hi.progress(TaskStage.FIRST_PASS, 0, 4), 4);
  assert.equal(hi.progress(TaskStage.SECOND_PASS_TILE, 0, 6), 5, "one of four tiles done: 4 + 6/4 → 5");
  assert.equal(hi.progress(TaskStage.SECOND_PASS_TILE, 0, 6), undefined, "nothing new");
  for (const t of [1, 2, 3]) hi.progress(TaskStage.SECOND_PASS_TILE, t, 6);
  assert.equal(hi.progress(TaskStage.UPSCALE, 0, 1), undefined);
  const untiled = new HiresImage(planHires(params({ width: 64, height: 64, steps: 4 }), DEFAULT_HIRES_TILING)!, 1n, 0n);
  assert.equal(untiled.progress(TaskStage.FIRST_PASS, 0, 2), 2);
  assert.equal(untiled.progress(TaskStage.SECOND_PASS, 0, 3), 7);
});
