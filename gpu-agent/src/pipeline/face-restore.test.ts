import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FFHQ_TEMPLATE_512, alignmentMatrix, applyAffine, type Image8, type Point } from "../imaging/index.js";
import { writeTinyCodeFormer, writeTinyFaceDetector, writeTinyGfpgan } from "../imaging/tiny-models.js";
import { inProcessRunner } from "./aux-runner.test-support.js";
import {
  CODEFORMER_FILE,
  DETECTOR_FILE,
  GFPGAN_FILES,
  decodeYoloFaces,
  detectFaces,
  faceModelPaths,
  listFaceRestorers,
  restoreFaces,
} from "./face-restore.js";

const signal = new AbortController().signal;
const W = 160;
const H = 128;
// A face at scale 0.2 of the 512 template, rotated 10°, placed at (40, 20).
const angle = (10 * Math.PI) / 180;
const k = 0.2;
const LANDMARKS: Point[] = FFHQ_TEMPLATE_512.map(
  ([x, y]) => [k * (Math.cos(angle) * x - Math.sin(angle) * y) + 40, k * (Math.sin(angle) * x + Math.cos(angle) * y) + 20] as const,
);

function smoothImage(): Image8 {
  const data = new Uint8Array(W * H * 3);
  for (let i = 0; i < W * H; i++) {
    const x = i % W;
    const y = Math.floor(i / W);
    data[i * 3] = Math.round(120 + 60 * Math.sin(x / 13));
    data[i * 3 + 1] = Math.round(120 + 60 * Math.cos(y / 11));
    data[i * 3 + 2] = Math.round(100 + x / 4 + y / 4);
  }
  return { width: W, height: H, channels: 3, data };
}

/** The largest red change near the nose landmark, and far outside the face's aligned crop. */
function changeAroundFace(before: Image8, after: Image8): { inside: number; outside: number } {
  let inside = 0;
  let outside = 0;
  const toCrop = alignmentMatrix(LANDMARKS);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const d = Math.abs(after.data[(y * W + x) * 3]! - before.data[(y * W + x) * 3]!);
      const [cx, cy] = LANDMARKS[2]!;
      if (Math.hypot(x - cx, y - cy) < 15) inside = Math.max(inside, d);
      const [u, v] = applyAffine(toCrop, [x, y]);
      if (u < -4 || v < -4 || u > 516 || v > 516) outside = Math.max(outside, d);
    }
  }
  return { inside, outside };
}

test("YOLO-face decoding: detector pixels back to the image, score threshold, NMS, tiny faces dropped", () => {
  const n = 4;
  const out = new Float32Array(20 * n);
  const put = (i: number, values: number[]): void => values.forEach((v, f) => (out[f * n + i] = v));
  const lm = (dx: number) => [100 + dx, 100, 1, 140 + dx, 100, 1, 120 + dx, 120, 1, 105 + dx, 140, 1, 135 + dx, 140, 1];
  put(0, [120, 120, 80, 80, 0.9, ...lm(0)]);
  put(1, [122, 121, 80, 80, 0.8, ...lm(2)]); // overlaps face 0 → suppressed
  put(2, [400, 400, 40, 40, 0.3, ...lm(280)]); // below threshold
  put(3, [300, 300, 8, 8, 0.95, 299, 300, 1, 301, 300, 1, 300, 301, 1, 299, 302, 1, 301, 302, 1]); // eyes 2 px apart (0.5 px in the image)
  const faces = decodeYoloFaces(out, [1, 20, n], 4);
  assert.equal(faces.length, 1);
  assert.deepEqual(faces[0]!.box, [20, 20, 40, 40]);
  assert.deepEqual(faces[0]!.landmarks[0], [25, 25]);
});

describe("CodeFormer face restoration with tiny generated models", () => {
  const dir = mkdtempSync(join(tmpdir(), "faces-"));
  before(async () => {
    const scale = Math.min(640 / W, 640 / H);
    await writeTinyFaceDetector(join(dir, DETECTOR_FILE), [
      {
        box: [80 * scale, 64 * scale, 100 * scale, 100 * scale],
        score: 0.9,
        landmarks: LANDMARKS.map(([x, y]) => [x * scale, y * scale] as const),
      },
    ]);
    await writeTinyCodeFormer(join(dir, CODEFORMER_FILE));
  });

  test("the detector's landmarks come back in image pixels", async () => {
    const faces = await detectFaces(inProcessRunner(), join(dir, DETECTOR_FILE), smoothImage(), signal);
    assert.equal(faces.length, 1);
    for (let i = 0; i < 5; i++) {
      assert.ok(Math.abs(faces[0]!.landmarks[i]![0] - LANDMARKS[i]![0]) < 1e-3);
      assert.ok(Math.abs(faces[0]!.landmarks[i]![1] - LANDMARKS[i]![1]) < 1e-3);
    }
  });

  test("fidelity 1 (identity network) keeps the image; fidelity 0 changes only the face region", async () => {
    const img = smoothImage();
    const paths = faceModelPaths(dir);
    const same = await restoreFaces(inProcessRunner(), paths, img, 1, signal);
    let maxSame = 0;
    for (let i = 0; i < img.data.length; i++) maxSame = Math.max(maxSame, Math.abs(same.image.data[i]! - img.data[i]!));
    assert.ok(maxSame <= 6, `identity restoration moved pixels by ${maxSame} levels`);
    const changed = await restoreFaces(inProcessRunner(), paths, img, 0, signal);
    const { inside, outside } = changeAroundFace(img, changed.image);
    assert.ok(inside > 10, `face region changed by only ${inside}`);
    assert.ok(outside <= 1, `pixels far from the face changed by ${outside}`);
  });

  test("GFPGAN restores the face region only, from either of its published file names", async () => {
    const img = smoothImage();
    assert.throws(
      () => faceModelPaths(dir, "GFPGAN"),
      (e: Error & { codeName?: string; field?: string }) =>
        e.codeName === "FAILED_PRECONDITION" &&
        e.field === "override_settings.face_restoration_model" &&
        e.message.includes(GFPGAN_FILES[0]),
    );
    assert.deepEqual(await listFaceRestorers(dir), ["CodeFormer"]);
    await writeTinyGfpgan(join(dir, GFPGAN_FILES[1]));
    assert.deepEqual(await listFaceRestorers(dir), ["CodeFormer", "GFPGAN"]);
    assert.deepEqual(await listFaceRestorers(mkdtempSync(join(tmpdir(), "nofaces-"))), [], "no detector, no restorer");
    const paths = faceModelPaths(dir, "GFPGAN");
    assert.equal(paths.network, join(dir, GFPGAN_FILES[1]));
    const out = await restoreFaces(inProcessRunner(), paths, img, 1, signal);
    const { inside, outside } = changeAroundFace(img, out.image);
    assert.ok(inside > 10, `face region changed by only ${inside}`);
    assert.ok(outside <= 1, `pixels far from the face changed by ${outside}`);
    // CodeFormer's file is still the default restorer's.
    assert.equal(faceModelPaths(dir).network, join(dir, CODEFORMER_FILE));
  });

  test("missing model files are FAILED_PRECONDITION naming the file", () => {
    const empty = mkdtempSync(join(tmpdir(), "nofaces-"));
    assert.throws(
      () => faceModelPaths(empty),
      (e: Error & { codeName?: string }) =>
        e.codeName === "FAILED_PRECONDITION" && e.message.includes(DETECTOR_FILE) && e.message.includes("restore_faces"),
    );
    assert.throws(() => faceModelPaths(undefined), /--face-models/);
  });
});
