import { test } from "node:test";
import assert from "node:assert/strict";
import { composeOnCanvas, planImg2imgResize, planPixelUpscale, resizeModeName, sharpOperations, type Image8 } from "./resize-modes.js";

function solid(width: number, height: number, value: (x: number, y: number) => number): Image8 {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data.fill(value(x, y), (y * width + x) * 3, (y * width + x) * 3 + 3);
  return { width, height, channels: 3, data };
}

const px = (img: Image8, x: number, y: number) => img.data[(y * img.width + x) * 3]!;

test("mode names", () => {
  assert.equal(resizeModeName(0), "just resize");
  assert.equal(resizeModeName(3), "just resize (latent upscale)");
  assert.throws(() => resizeModeName(4), RangeError);
  assert.throws(() => resizeModeName(1.5), RangeError);
});

test("just resize stretches to the target", () => {
  const p = planImg2imgResize(0, { width: 300, height: 200 }, { width: 512, height: 512 });
  assert.deepEqual(p.resize, { width: 512, height: 512 });
  assert.deepEqual(sharpOperations(p), [{ op: "resize", width: 512, height: 512, fit: "fill", kernel: "lanczos3" }]);
});

test("crop and resize: cover, then centre crop (W//2 − src_w//2)", () => {
  // 300×200 into 512²: src_w = 300·512//200 = 768, src_h = 512; pasted at x = 256 − 384 = −128
  const wide = planImg2imgResize(1, { width: 300, height: 200 }, { width: 512, height: 512 });
  assert.deepEqual(wide.resize, { width: 768, height: 512 });
  assert.deepEqual(wide.offset, { left: -128, top: 0 });
  assert.deepEqual(wide.visible, { left: 128, top: 0, width: 512, height: 512 });
  assert.deepEqual(sharpOperations(wide).slice(1), [{ op: "extract", left: 128, top: 0, width: 512, height: 512 }]);
  // 333×500 into 512×512: src_h = 500·512//333 = 768 (768.7), top = 256 − 384 = −128
  const tall = planImg2imgResize(1, { width: 333, height: 500 }, { width: 512, height: 512 });
  assert.deepEqual(tall.resize, { width: 512, height: 768 });
  assert.deepEqual(tall.visible, { left: 0, top: 128, width: 512, height: 512 });
  // odd overhang: 101 wide → 7 wide keeps columns 47..53 (7//2 − 101//2 = 3 − 50 = −47)
  const odd = planImg2imgResize(1, { width: 101, height: 10 }, { width: 7, height: 10 });
  assert.deepEqual(odd.visible, { left: 47, top: 0, width: 7, height: 10 });
  const resized = solid(101, 10, (x) => x);
  const out = composeOnCanvas(resized, odd);
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6].map((x) => px(out, x, 0)),
    [47, 48, 49, 50, 51, 52, 53],
  );
});

test("resize and fill: fit, centre, and bands from PIL's bicubic of the edge rows", () => {
  // 300×200 into 512²: src 512×341 at top = 256 − 170 = 86; bands 86 rows above, 85 (clipped) below
  const p = planImg2imgResize(2, { width: 300, height: 200 }, { width: 512, height: 512 });
  assert.deepEqual(p.resize, { width: 512, height: 341 });
  assert.deepEqual(p.offset, { left: 0, top: 86 });
  assert.deepEqual(
    p.fill.map((b) => [b.edge, b.rect]),
    [
      ["top", { left: 0, top: 0, width: 512, height: 86 }],
      ["bottom", { left: 0, top: 427, width: 512, height: 85 }],
    ],
  );
  assert.deepEqual(sharpOperations(p).slice(1), [
    { op: "extend", top: 86, bottom: 85, left: 0, right: 0, background: { r: 0, g: 0, b: 0 } },
  ]);
  // Edge rows: top row a, second row b → band = clamp(round-half-up(1.125a − 0.125b)).
  // x=0: a=100,b=20 → 110; x=1: a=10,b=250 → −20 → 0; x=2: a=250,b=0 → 281 → 255; x=3: a=7,b=2 → 7.625 → 8
  const tops = [100, 10, 250, 7];
  const seconds = [20, 250, 0, 2];
  const img = solid(512, 341, (x, y) => (y === 0 ? (tops[x] ?? 50) : y === 1 ? (seconds[x] ?? 50) : y === 340 ? 200 : y === 339 ? 40 : 50));
  const out = composeOnCanvas(img, p);
  for (const y of [0, 40, 85])
    assert.deepEqual(
      [0, 1, 2, 3].map((x) => px(out, x, y)),
      [110, 0, 255, 8],
      `top band row ${y}`,
    );
  assert.equal(px(out, 0, 86), 100, "image starts at row 86");
  // bottom: last row 200, one above 40 → 1.125·200 − 0.125·40 = 220
  for (const y of [427, 511]) assert.equal(px(out, 5, y), 220, `bottom band row ${y}`);
});

test("resize and fill: odd canvas with an even image leaves A1111's black last row; side bands", () => {
  // 600×200 into 512×511: src 512×170, band = 255 − 85 = 170; 170 + 170 + 170 = 510 rows covered
  const p = planImg2imgResize(2, { width: 600, height: 200 }, { width: 512, height: 511 });
  const out = composeOnCanvas(
    solid(512, 170, () => 100),
    p,
  );
  assert.equal(px(out, 0, 509), 100);
  assert.equal(px(out, 0, 510), 0);
  // tall source into a wide canvas: bands left/right repeat columns
  const side = planImg2imgResize(2, { width: 100, height: 200 }, { width: 64, height: 32 });
  assert.deepEqual(side.resize, { width: 16, height: 32 });
  assert.deepEqual(
    side.fill.map((b) => [b.edge, b.rect]),
    [
      ["left", { left: 0, top: 0, width: 24, height: 32 }],
      ["right", { left: 40, top: 0, width: 24, height: 32 }],
    ],
  );
  const o2 = composeOnCanvas(
    solid(16, 32, (x) => (x === 0 ? 80 : x === 15 ? 16 : 0)),
    side,
  );
  assert.equal(px(o2, 0, 3), 90); // 1.125·80
  assert.equal(px(o2, 63, 3), 18); // 1.125·16
  assert.equal(px(o2, 24, 3), 80);
});

test("latent upscale mode encodes as is and interpolates the latent", () => {
  const p = planImg2imgResize(3, { width: 300, height: 200 }, { width: 512, height: 768 });
  assert.equal(p.resize, undefined);
  assert.deepEqual(p.latentResize, { height: 96, width: 64 });
  assert.deepEqual(sharpOperations(p), []);
});

test("pixel upscaler passes (Upscaler.upscale)", () => {
  // R-ESRGAN 4x+ to 2×: one model pass to 2048, Lanczos down to dest 1024
  assert.deepEqual(planPixelUpscale({ width: 512, height: 512 }, { width: 1024, height: 1024 }, { name: "R-ESRGAN 4x+", modelScale: 4 }), [
    { op: "model", from: { width: 512, height: 512 }, to: { width: 2048, height: 2048 } },
    { op: "resize", kernel: "lanczos3", from: { width: 2048, height: 2048 }, to: { width: 1024, height: 1024 } },
  ]);
  // a target that is not a multiple of 8: dest = (w·scale)//8·8, then a second Lanczos to the target
  const odd = planPixelUpscale({ width: 512, height: 768 }, { width: 680, height: 1021 }, { name: "R-ESRGAN 4x+", modelScale: 4 });
  assert.deepEqual(
    odd.map((s) => [s.op, s.to]),
    [
      ["model", { width: 2048, height: 3072 }],
      ["resize", { width: 680, height: 1016 }],
      ["resize", { width: 680, height: 1021 }],
    ],
  );
  // a 2× model needs three passes for 10× and stops there
  const many = planPixelUpscale({ width: 100, height: 100 }, { width: 1000, height: 1000 }, { name: "2x model", modelScale: 2 });
  assert.deepEqual(
    many.map((s) => [s.op, s.to.width]),
    [
      ["model", 200],
      ["model", 400],
      ["model", 800],
      ["resize", 1000],
    ],
  );
  assert.deepEqual(
    planPixelUpscale({ width: 512, height: 512 }, { width: 1024, height: 1024 }, { name: "Lanczos" }).map((s) => [s.op, s.to.width]),
    [["resize", 1024]],
  );
  assert.deepEqual(
    planPixelUpscale({ width: 512, height: 512 }, { width: 1024, height: 1024 }, { name: "Nearest" }).map(
      (s) => s.op === "resize" && s.kernel,
    ),
    ["nearest"],
  );
  assert.deepEqual(
    planPixelUpscale({ width: 512, height: 512 }, { width: 256, height: 256 }, { name: "R-ESRGAN 4x+", modelScale: 4 }).map((s) => s.op),
    ["resize"],
  );
  assert.deepEqual(
    planPixelUpscale({ width: 512, height: 512 }, { width: 1024, height: 1024 }, { name: null }).map((s) => s.op),
    ["resize"],
  );
  assert.throws(() => planPixelUpscale({ width: 8, height: 8 }, { width: 16, height: 16 }, { name: "x" }), RangeError);
});
