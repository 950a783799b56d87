import { test } from "node:test";
import assert from "node:assert/strict";
import {
  cropNchw,
  extractTile,
  featherRamp,
  layoutFromStarts,
  planTiles,
  runTiledPass,
  TileBlender,
  tileOverheadPercent,
  tileSeed,
  tileWeights,
  type TileLayout,
  type TileRect,
} from "./tiling.js";
import { cropHandover, latentHandover, readLatent, readRgb, rgbHandover } from "./handover.js";

test("layout: 2048² with 768 tiles / 64 overlap → 3×3 at 0, 640, 1280; overhead 26.5625 %", () => {
  const l = planTiles(2048, 2048, { tileSize: 768, overlap: 64 });
  assert.deepEqual(l.xs, [0, 640, 1280]);
  assert.deepEqual(l.ys, [0, 640, 1280]);
  assert.equal(l.tiles.length, 9);
  // 9·768² / 2048² − 1, by hand
  assert.equal(tileOverheadPercent(l), 26.5625);
  const l512 = planTiles(2048, 2048, { tileSize: 512, overlap: 64 });
  assert.deepEqual(l512.xs, [0, 384, 768, 1152, 1536]);
  assert.equal(tileOverheadPercent(l512), 56.25);
  const l1024 = planTiles(2048, 2048, { tileSize: 1024, overlap: 128 });
  assert.deepEqual(l1024.xs, [0, 512, 1024]);
  assert.equal(tileOverheadPercent(l1024), 125);
});

test("layout: uneven sizes snap to the latent grid and keep the overlap; small images are one tile", () => {
  const l = planTiles(1000, 600, { tileSize: 512, overlap: 64 });
  assert.deepEqual(l.xs, [0, 248, 488]);
  assert.deepEqual(l.ys, [0, 88]);
  for (const t of l.tiles) assert.ok(t.x % 8 === 0 && t.y % 8 === 0 && t.x + t.width <= 1000 && t.y + t.height <= 600, `tile ${t.index}`);
  const one = planTiles(256, 384, { tileSize: 512, overlap: 64 });
  assert.deepEqual(one.tiles, [{ index: 0, row: 0, col: 0, x: 0, y: 0, width: 256, height: 384 }]);
  assert.equal(tileOverheadPercent(one), 0);
  assert.throws(() => planTiles(1001, 600, { tileSize: 512, overlap: 64 }), RangeError);
  assert.throws(() => planTiles(1000, 600, { tileSize: 512, overlap: 260 }), RangeError);
});

test("feathers: linear (k+½)/ov ramps that are complementary across every overlap", () => {
  const r = featherRamp([0, 48], 0, 64); // overlap 16 with the next tile
  assert.equal(r[0], 1);
  assert.equal(r[63], 0.5 / 16);
  assert.equal(r[48], 15.5 / 16);
  const s = featherRamp([0, 48], 1, 64);
  for (let k = 0; k < 16; k++) assert.equal(r[48 + k]! + s[k]!, 1);
  // Where no pixel is covered by three tiles along an axis, the raw weights are a partition of unity.
  for (const layout of [planTiles(2048, 1024, { tileSize: 768, overlap: 64 }), planTiles(1024, 1024, { tileSize: 512, overlap: 64 })]) {
    const total = new Float64Array(layout.width * layout.height);
    for (const t of layout.tiles) {
      const w = tileWeights(layout, t);
      for (let y = 0; y < t.height; y++)
        for (let x = 0; x < t.width; x++) total[(t.y + y) * layout.width + t.x + x]! += w[y * t.width + x]!;
    }
    for (const v of total) assert.ok(Math.abs(v - 1) < 1e-12, `weights sum to ${v}`);
  }
  // 1000 px with 512 tiles needs three tiles that overlap by more than half: the blender normalises.
  const crowded = planTiles(1000, 600, { tileSize: 512, overlap: 64 });
  const b = new TileBlender(crowded, 1);
  for (const t of crowded.tiles) b.add(t.index, new Float32Array(t.width * t.height).fill(7));
  assert.ok(
    b.resultFloat32().every((v) => Math.abs(v - 7) < 1e-5),
    "constant in, constant out",
  );
});

function smoothImage(width: number, height: number, ch: number): Float32Array {
  const img = new Float32Array(width * height * ch);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++)
      for (let c = 0; c < ch; c++) img[(y * width + x) * ch + c] = 128 + 100 * Math.sin(x / 41 + c) * Math.cos(y / 29 - c);
  }
  return img;
}

/** 3×3 box blur with edge clamping: a "model" that looks one pixel around. */
function boxBlur(img: Float32Array, width: number, height: number, ch: number): Float32Array {
  const out = new Float32Array(img.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < ch; c++) {
        let s = 0;
        for (let dy = -1; dy <= 1; dy++) {
          for (let dx = -1; dx <= 1; dx++) {
            const yy = Math.min(Math.max(y + dy, 0), height - 1);
            const xx = Math.min(Math.max(x + dx, 0), width - 1);
            s += img[(yy * width + xx) * ch + c]!;
          }
        }
        out[(y * width + x) * ch + c] = s / 9;
      }
    }
  }
  return out;
}

test("tiled per-pixel operator equals the whole-image run", async () => {
  const layout = planTiles(640, 448, { tileSize: 256, overlap: 64 });
  const img = smoothImage(640, 448, 3);
  const op = (v: number) => v * 0.8 + 10;
  const blender = await runTiledPass(img, layout, 3, async (px) => px.map(op));
  const got = blender.resultFloat32();
  let worst = 0;
  for (let i = 0; i < img.length; i++) worst = Math.max(worst, Math.abs(got[i]! - op(img[i]!)));
  assert.ok(worst <= 1e-4, `max diff ${worst}`);
});

test("tiled local operator: ≤ 1e-4 away from seams, ≤ 1 level in the blend zone", async () => {
  const W = 640;
  const H = 448;
  const layout = planTiles(W, H, { tileSize: 256, overlap: 64 });
  const img = smoothImage(W, H, 3);
  const whole = boxBlur(img, W, H, 3);
  const blender = await runTiledPass(img, layout, 3, async (px, t) => boxBlur(px, t.width, t.height, 3), { concurrency: 3 });
  const tiledF = blender.resultFloat32();
  const tiled8 = blender.resultUint8();
  // A pixel is "away from seams" when every tile covering it has it ≥ 1 px inside its interior edges.
  const nearSeam = (x: number, y: number) =>
    layout.tiles.some(
      (t) =>
        x >= t.x &&
        x < t.x + t.width &&
        y >= t.y &&
        y < t.y + t.height &&
        ((t.x > 0 && x - t.x < 1) ||
          (t.x + t.width < W && t.x + t.width - 1 - x < 1) ||
          (t.y > 0 && y - t.y < 1) ||
          (t.y + t.height < H && t.y + t.height - 1 - y < 1)),
    );
  const inOverlap = (x: number, y: number) =>
    layout.tiles.filter((t) => x >= t.x && x < t.x + t.width && y >= t.y && y < t.y + t.height).length > 1;
  let away = 0;
  let blend = 0;
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      for (let c = 0; c < 3; c++) {
        const i = (y * W + x) * 3 + c;
        if (!nearSeam(x, y)) away = Math.max(away, Math.abs(tiledF[i]! - whole[i]!));
        if (inOverlap(x, y)) blend = Math.max(blend, Math.abs(tiled8[i]! - Math.min(255, Math.max(0, Math.floor(whole[i]! + 0.5)))));
      }
    }
  }
  assert.ok(away <= 1e-4, `away from seams: ${away}`);
  assert.ok(blend <= 1, `blend zone: ${blend} levels`);
});

test("determinism: 1 agent vs 3 agents with random finishing order give identical bytes", async () => {
  const W = 512;
  const H = 384;
  const layout = planTiles(W, H, { tileSize: 192, overlap: 32 });
  const img = smoothImage(W, H, 3);
  // A "model" whose output depends on the tile seed, as a diffusion pass does.
  const model = (seed: number) => async (px: Float32Array, t: TileRect) => {
    const out = boxBlur(px, t.width, t.height, 3);
    for (let i = 0; i < out.length; i++) out[i] = out[i]! + ((seed * 2654435761 + i * 40503) % 97) / 97;
    return out;
  };
  const runWith = async (concurrency: number, jitter: boolean) => {
    let calls = 0;
    const blender = await runTiledPass(
      img,
      layout,
      3,
      async (px, t) => {
        if (jitter) await new Promise((r) => setTimeout(r, (t.index * 7919 + calls++ * 31) % 5));
        return model(tileSeed(1234, t.index, "per-tile"))(px, t);
      },
      { concurrency },
    );
    return blender.resultUint8();
  };
  const one = await runWith(1, false);
  const three = await runWith(3, true);
  assert.deepEqual(three, one);
  // Arrival order straight into the blender, reversed and shuffled: identical float output.
  const results = await Promise.all(layout.tiles.map((t) => model(tileSeed(1234, t.index, "per-tile"))(extractTile(img, W, 3, t), t)));
  const fold = (order: number[]) => {
    const b = new TileBlender(layout, 3);
    for (const i of order) b.add(i, results[i]!);
    return b.resultFloat32();
  };
  const inOrder = fold(layout.tiles.map((t) => t.index));
  assert.deepEqual(fold(layout.tiles.map((t) => t.index).reverse()), inOrder);
  assert.equal(layout.tiles.length, 9);
  assert.deepEqual(fold([3, 0, 5, 1, 8, 4, 2, 7, 6]), inOrder);
});

test("blender: incomplete results throw, duplicates are ignored, sizes are checked", () => {
  const layout: TileLayout = planTiles(224, 128, { tileSize: 128, overlap: 32 });
  assert.deepEqual(layout.xs, [0, 96]);
  const b = new TileBlender(layout, 1);
  const ones = new Float32Array(128 * 128).fill(1);
  b.add(1, ones);
  assert.equal(b.complete, false);
  assert.throws(() => b.resultFloat32(), /waiting for tile 0/);
  b.add(0, ones);
  b.add(0, new Float32Array(128 * 128).fill(9));
  assert.ok(b.complete, "complete");
  assert.ok(
    b.resultFloat32().every((v) => Math.abs(v - 1) < 1e-12),
    "first result kept",
  );
  assert.throws(() => b.add(0, new Float32Array(3)), RangeError);
});

test("tile seed rules", () => {
  assert.equal(tileSeed(42, 5), 42);
  assert.equal(tileSeed(42, 5, "per-tile"), 47);
  assert.equal(tileSeed(0xffffffff, 1, "per-tile"), 0);
  assert.throws(() => tileSeed(-1, 0), RangeError);
});

test("a layout rebuilt from its starts (what agents receive) equals the planned one; gaps and overruns are refused", () => {
  const l = planTiles(1000, 600, { tileSize: 512, overlap: 64 });
  const rebuilt = layoutFromStarts(1000, 600, l.tileWidth, l.tileHeight, l.xs, l.ys);
  // Its overlap is the smallest one the tiles have, at least the one asked for.
  assert.ok(rebuilt.overlap >= l.overlap);
  assert.deepEqual({ ...rebuilt, overlap: l.overlap }, l);
  assert.throws(() => layoutFromStarts(1200, 600, 512, 512, [0, 688], [0, 88]), /gap/);
  assert.throws(() => layoutFromStarts(1000, 600, 512, 512, [0, 400], [0, 88]), /span/);
  assert.throws(() => layoutFromStarts(1000, 600, 1100, 512, [0], [0, 88]), /does not fit/);
});

test("hand-overs: latents crop on the latent grid, images by pixels; wrong kinds and sizes name the field", () => {
  const latent = new Float32Array(2 * 4 * 6).map((_, i) => i);
  const h = latentHandover(latent, [1, 2, 4, 6]);
  const crop = readLatent(cropHandover(h, { x: 8, y: 16, width: 24, height: 16 }));
  assert.deepEqual(crop.shape, [1, 2, 2, 3]);
  assert.deepEqual([...crop.data], [13, 14, 15, 19, 20, 21, 37, 38, 39, 43, 44, 45]);
  assert.deepEqual([...cropNchw(latent, [1, 2, 4, 6], { x: 1, y: 2, width: 3, height: 2 })], [...crop.data]);
  assert.throws(() => cropHandover(h, { x: 4, y: 0, width: 8, height: 8 }), /latent grid/);
  const rgb = rgbHandover(
    new Uint8Array(4 * 3 * 3).map((_, i) => i),
    4,
    3,
  );
  const px = readRgb(cropHandover(rgb, { x: 1, y: 1, width: 2, height: 2 }));
  assert.deepEqual([px.width, px.height, ...px.data], [2, 2, 15, 16, 17, 18, 19, 20, 27, 28, 29, 30, 31, 32]);
  assert.throws(() => readLatent(rgb, "inputs[0]"), /inputs\[0\].*expected a latent, got rgb/);
  assert.throws(() => readRgb(undefined), /expected an RGB image, got nothing/);
  assert.throws(() => latentHandover(latent, [1, 2, 4, 5]), RangeError);
});
