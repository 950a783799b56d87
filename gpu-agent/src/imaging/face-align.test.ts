import { test } from "node:test";
import assert from "node:assert/strict";
import {
  alignFace,
  alignmentMatrix,
  ALIGN_BORDER_RGB,
  applyAffine,
  boxFeatherMask,
  decomposeSimilarity,
  estimateSimilarity,
  faceToTensor,
  FFHQ_TEMPLATE_512,
  invertAffine,
  parseMask,
  pasteFaces,
  tensorToFace,
  warpAffine,
  type Affine,
  type Point,
} from "./face-align.js";
import type { Image8 } from "./resize-modes.js";

/** Similarity with scale s, rotation θ (radians), translation t. */
function similarity(s: number, theta: number, tx: number, ty: number): Affine {
  const c = s * Math.cos(theta);
  const d = s * Math.sin(theta);
  return [c, -d, tx, d, c, ty];
}

function rgb(width: number, height: number, f: (x: number, y: number, c: number) => number): Image8 {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) for (let c = 0; c < 3; c++) data[(y * width + x) * 3 + c] = f(x, y, c);
  return { width, height, channels: 3, data };
}

/** A smooth synthetic "face" in crop coordinates. */
const faceColor = (x: number, y: number, c: number) => Math.round(128 + 90 * Math.sin(x / 23 + c) * Math.cos(y / 31 - c));

test("template points are facexlib's 512 template", () => {
  assert.equal(FFHQ_TEMPLATE_512.length, 5);
  assert.deepEqual(FFHQ_TEMPLATE_512[0], [192.98138, 239.94708]);
  assert.deepEqual(FFHQ_TEMPLATE_512[4], [313.08905, 371.15118]);
});

test("a known similarity is recovered from its 5 landmarks", () => {
  // crop → image: scale 0.6, rotated 25°, placed at (400, 150)
  const T = similarity(0.6, (25 * Math.PI) / 180, 400, 150);
  const landmarks = FFHQ_TEMPLATE_512.map((p) => applyAffine(T, p));
  const M = alignmentMatrix(landmarks);
  const expected = invertAffine(T);
  M.forEach((v, i) => assert.ok(Math.abs(v - expected[i]!) < 1e-9, `M[${i}] = ${v}, expected ${expected[i]}`));
  const d = decomposeSimilarity(M);
  assert.ok(Math.abs(d.scale - 1 / 0.6) < 1e-9, `scale ${d.scale}`);
  assert.ok(Math.abs(d.rotation + (25 * Math.PI) / 180) < 1e-9, `rotation ${d.rotation}`);
  for (let i = 0; i < 5; i++) {
    const [x, y] = applyAffine(M, landmarks[i]!);
    assert.ok(Math.hypot(x - FFHQ_TEMPLATE_512[i]![0], y - FFHQ_TEMPLATE_512[i]![1]) < 1e-6, `landmark ${i}`);
  }
});

test("with noisy landmarks the estimate is the least-squares similarity", () => {
  const T = similarity(1.3, -0.2, -40, 30);
  const noise = [
    [1.5, -0.7],
    [-0.4, 0.9],
    [0.8, 0.3],
    [-1.1, -0.6],
    [0.2, 1.2],
  ];
  const src = FFHQ_TEMPLATE_512.map((p, i) => {
    const [x, y] = applyAffine(T, p);
    return [x + noise[i]![0]!, y + noise[i]![1]!] as Point;
  });
  const M = estimateSimilarity(src, FFHQ_TEMPLATE_512);
  const sse = (m: Affine) =>
    src.reduce((s, p, i) => {
      const [x, y] = applyAffine(m, p);
      return s + (x - FFHQ_TEMPLATE_512[i]![0]) ** 2 + (y - FFHQ_TEMPLATE_512[i]![1]) ** 2;
    }, 0);
  const best = sse(M);
  // any nudge of the 4 similarity parameters (a, b, tx, ty) makes it worse
  for (const [k, eps] of [
    [0, 1e-4],
    [0, -1e-4],
    [3, 1e-4],
    [3, -1e-4],
    [2, 1e-2],
    [2, -1e-2],
    [5, 1e-2],
    [5, -1e-2],
  ] as const) {
    const m = [...M] as number[];
    m[k] = m[k]! + eps;
    if (k === 0) m[4] = m[4]! + eps;
    if (k === 3) m[1] = m[1]! - eps;
    assert.ok(sse(m as unknown as Affine) > best, `nudge ${k} ${eps}`);
  }
  // mirrored landmarks still give a proper rotation (positive determinant): no reflections
  const mirrored = FFHQ_TEMPLATE_512.map(([x, y]) => [512 - x, y] as Point);
  const R = estimateSimilarity(mirrored, FFHQ_TEMPLATE_512);
  assert.ok(R[0] * R[4] - R[1] * R[3] > 0, "positive determinant");
});

test("warpAffine: identity, integer shift with constant border, half-pixel shift rounds (a+b+1)/2", () => {
  const src = rgb(6, 5, (x, y, c) => 10 * x + y + c * 60);
  assert.deepEqual(warpAffine(src, [1, 0, 0, 0, 1, 0], 6, 5).data, src.data);
  const shifted = warpAffine(src, [1, 0, 3, 0, 1, 2], 6, 5, [7, 8, 9]);
  const at = (img: Image8, x: number, y: number, c = 0) => img.data[(y * img.width + x) * 3 + c]!;
  assert.equal(at(shifted, 3, 2), at(src, 0, 0));
  assert.equal(at(shifted, 5, 4, 2), at(src, 2, 2, 2));
  assert.equal(at(shifted, 1, 1, 1), 8, "border");
  // dst(x) = src(x − 0.5): source position quantised to fx = 16/32 → (a + b + 1) >> 1
  const half = warpAffine(src, [1, 0, 0.5, 0, 1, 0], 6, 5);
  for (let x = 1; x < 6; x++) assert.equal(at(half, x, 2), (at(src, x - 1, 2) + at(src, x, 2) + 1) >> 1, `x=${x}`);
  // float images use the same positions with float weights
  const f = warpAffine({ width: 6, height: 1, channels: 1, data: Float64Array.from([0, 1, 2, 3, 4, 5]) }, [1, 0, 0.25, 0, 1, 0], 6, 1);
  assert.deepEqual(Array.from(f.data).slice(1), [0.75, 1.75, 2.75, 3.75, 4.75]);
});

test("synthetic face: align recovers the crop; paste-back restores it and leaves the rest untouched", () => {
  const face = rgb(512, 512, faceColor);
  const T = similarity(0.55, (-15 * Math.PI) / 180, 260, 180); // crop → image
  const W = 800;
  const H = 700;
  const scene = warpAffine(face, T, W, H, ALIGN_BORDER_RGB);
  const landmarks = FFHQ_TEMPLATE_512.map((p) => applyAffine(T, p));
  const aligned = alignFace(scene, landmarks);
  assert.equal(aligned.face.width, 512);
  // Compare where the crop maps inside the scene and away from the crop border (two bilinear resamplings).
  let sum = 0;
  let n = 0;
  let worst = 0;
  for (let y = 64; y < 448; y++) {
    for (let x = 64; x < 448; x++) {
      for (let c = 0; c < 3; c++) {
        const d = Math.abs(aligned.face.data[(y * 512 + x) * 3 + c]! - face.data[(y * 512 + x) * 3 + c]!);
        sum += d;
        worst = Math.max(worst, d);
        n++;
      }
    }
  }
  assert.ok(sum / n < 2, `mean abs diff ${sum / n}`);
  assert.ok(worst <= 12, `max diff ${worst}`);

  // Paste the true face back into a different background with the feathered box mask.
  const background = rgb(W, H, (x, y, c) => (x + 2 * y + 40 * c) % 256);
  const mask = boxFeatherMask();
  const out = pasteFaces(background, [{ face, inverse: aligned.inverse, mask }]);
  const centre = applyAffine(T, [256, 256]);
  const cx = Math.round(centre[0]);
  const cy = Math.round(centre[1]);
  for (let dy = -40; dy <= 40; dy += 20) {
    for (let dx = -40; dx <= 40; dx += 20) {
      for (let c = 0; c < 3; c++) {
        const i = ((cy + dy) * W + cx + dx) * 3 + c;
        assert.ok(Math.abs(out.data[i]! - scene.data[i]!) <= 3, `centre (${dx},${dy}) ${out.data[i]} vs ${scene.data[i]}`);
      }
    }
  }
  // Far from the face the mask is 0 and the background is kept byte for byte.
  for (const [x, y] of [
    [5, 5],
    [790, 690],
    [10, 600],
    [700, 20],
  ] as const) {
    for (let c = 0; c < 3; c++) assert.equal(out.data[(y * W + x) * 3 + c], background.data[(y * W + x) * 3 + c]);
  }
});

test("network tensors: (v/255 − .5)/.5 in, clamp → (x+1)/2·255 truncated out", () => {
  const face = rgb(512, 512, (x) => x % 256);
  const t = faceToTensor(face);
  assert.equal(t[0], -1); // v = 0
  assert.equal(t[255], 1); // v = 255, R plane
  assert.equal(t[512 * 512 + 255], 1); // G plane
  const out = new Float32Array(3 * 512 * 512);
  out[0] = 0; // → 127.5 → 127 (A1111 truncates)
  out[1] = 1.5; // clamped → 255
  out[2] = -3; // → 0
  out[3] = 0.5; // 0.75·255 = 191.25 → 191
  const img = tensorToFace(out);
  assert.deepEqual(
    [0, 1, 2, 3].map((i) => img.data[i * 3]),
    [127, 255, 0, 191],
  );
  const back = tensorToFace(t);
  for (let i = 0; i < face.data.length; i += 97) assert.ok(Math.abs(back.data[i]! - face.data[i]!) <= 1, `round trip at ${i}`);
});

test("masks: feathered box is 1 inside, 0 at the frame, smooth and symmetric; parse mask blurs the face region", () => {
  const box = boxFeatherMask();
  const at = (m: Float64Array, x: number, y: number) => m[y * 512 + x]!;
  assert.ok(at(box, 256, 256) > 0.9999, `centre ${at(box, 256, 256)}`);
  // margin 51 px ≈ 4σ: the crop border carries no visible weight, so no square edge shows after paste-back
  assert.ok(at(box, 0, 0) < 1e-6 && at(box, 0, 256) < 1e-4, `border ${at(box, 0, 0)} ${at(box, 0, 256)}`);
  assert.ok(Math.abs(at(box, 100, 256) - at(box, 411, 256)) < 1e-12, "symmetric");
  for (let x = 1; x <= 256; x++) assert.ok(at(box, x, 256) >= at(box, x - 1, 256) - 1e-12, "rises towards the centre");
  assert.equal(boxFeatherMask(), box, "cached");

  // Left half "skin" (class 1), right half background (class 0): a blurred step, ½ at the edge.
  const classes = new Uint8Array(512 * 512);
  for (let y = 0; y < 512; y++) for (let x = 0; x < 256; x++) classes[y * 512 + x] = 1;
  const pm = parseMask(classes);
  assert.ok(Math.abs(at(pm, 255, 256) + at(pm, 256, 256) - 1) < 1e-9, "symmetric around the step");
  assert.ok(at(pm, 190, 256) > 0.999 && at(pm, 320, 256) < 1e-3, "step is soft but narrow");
  assert.equal(at(pm, 5, 256), 0, "10 px frame");
  assert.equal(at(pm, 100, 505), 0);
  assert.ok(at(pm, 100, 256) > 0.999, "inside the face region");
});
