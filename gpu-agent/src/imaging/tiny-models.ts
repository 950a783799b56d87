/**
 * Tiny ONNX stand-ins for the auxiliary models, with the real models' input/output signatures and
 * deterministic weights, so the upscaler and face-restoration paths run end to end in tests:
 * - ESRGAN RRDBNet-shaped ("R-ESRGAN 4x+"): input [1,3,H,W] → output [1,3,4H,4W], nearest ×2 twice;
 * - SRVGGNetCompact-shaped ("realesr-general-x4v3"): convs + PReLU + pixel shuffle ×4 + nearest skip;
 * - CodeFormer-shaped: input [1,3,512,512], weight float64 [1] → output [1,3,512,512], which is
 *   exactly `w·input + (1−w)·tanh(conv(input))` (so w = 1 is the identity);
 * - YOLO-face-shaped detector: images [1,3,640,640] → output0 [1,20,N] that reports given faces.
 */
import { GraphBuilder, saveModel } from "../model-graph/index.js";

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function weights(g: GraphBuilder, name: string, dims: number[], rand: () => number, amplitude: number): string {
  const n = dims.reduce((a, b) => a * b, 1);
  const data = Float32Array.from({ length: n }, () => (rand() * 2 - 1) * amplitude);
  return g.initializer(name, "float32", dims, new Uint8Array(data.buffer));
}

function conv(g: GraphBuilder, x: string, name: string, cin: number, cout: number, rand: () => number, amplitude = 0.05): string {
  const w = weights(g, `${name}.weight`, [cout, cin, 3, 3], rand, amplitude);
  const b = weights(g, `${name}.bias`, [cout], rand, amplitude / 10);
  return g.op1("Conv", [x, w, b], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] });
}

function nearest2x(g: GraphBuilder, x: string): string {
  return g.op1("Resize", [x, "", g.constant("float32", [4], [1, 1, 2, 2], "scales")], {
    mode: "nearest",
    coordinate_transformation_mode: "asymmetric",
    nearest_mode: "floor",
  });
}

/** RRDBNet-shaped ×4 upscaler (features `nf`): conv_first, a residual body, two nearest ×2 + conv stages, conv_last. */
export async function writeTinyRrdbNet(path: string, seed = 1, nf = 4): Promise<void> {
  const g = new GraphBuilder("tiny_rrdbnet", 17);
  const rand = mulberry32(seed);
  const x = g.input("input", "float32", [1, 3, "height", "width"]);
  const feat = conv(g, x, "conv_first", 3, nf, rand);
  const body = conv(g, g.op1("LeakyRelu", [conv(g, feat, "body.0", nf, nf, rand)], { alpha: { f: 0.2 } }), "conv_body", nf, nf, rand);
  let h = g.op1("Add", [feat, body]);
  h = g.op1("LeakyRelu", [conv(g, nearest2x(g, h), "conv_up1", nf, nf, rand)], { alpha: { f: 0.2 } });
  h = g.op1("LeakyRelu", [conv(g, nearest2x(g, h), "conv_up2", nf, nf, rand)], { alpha: { f: 0.2 } });
  const delta = conv(g, h, "conv_last", nf, 3, rand);
  // A nearest-upscaled copy of the input keeps the output image-like, as a trained model's would be.
  const base = nearest2x(g, nearest2x(g, x));
  g.output(g.op1("Add", [base, delta]), "output", "float32", [1, 3, "height_out", "width_out"]);
  await saveModel(g.toSpec(), path);
}

/** SRVGGNetCompact-shaped ×4 upscaler: conv, PReLU, conv to 3·16 channels, pixel shuffle, plus nearest-upscaled input. */
export async function writeTinySrvggNet(path: string, seed = 2, nf = 4): Promise<void> {
  const g = new GraphBuilder("tiny_srvggnet", 17);
  const rand = mulberry32(seed);
  const x = g.input("input", "float32", [1, 3, "height", "width"]);
  let h = conv(g, x, "body.0", 3, nf, rand);
  h = g.op1("PRelu", [
    h,
    g.constant(
      "float32",
      [nf, 1, 1],
      Array.from({ length: nf }, () => 0.25),
      "prelu",
    ),
  ]);
  h = conv(g, h, "body.2", nf, 48, rand);
  const shuffled = g.op1("DepthToSpace", [h], { blocksize: 4, mode: "CRD" });
  const base = nearest2x(g, nearest2x(g, x));
  g.output(g.op1("Add", [shuffled, base]), "output", "float32", [1, 3, "height_out", "width_out"]);
  await saveModel(g.toSpec(), path);
}

/** CodeFormer-shaped restorer: output = w·input + (1 − w)·tanh(conv(input)), `weight` float64 [1]. */
export async function writeTinyCodeFormer(path: string, seed = 3): Promise<void> {
  const g = new GraphBuilder("tiny_codeformer", 17);
  const rand = mulberry32(seed);
  const x = g.input("input", "float32", [1, 3, 512, 512]);
  const wd = g.input("weight", "float64", [1]);
  const w = g.op1("Cast", [wd], { to: 1 });
  const restored = g.op1("Tanh", [conv(g, x, "generator", 3, 3, rand, 0.5)]);
  const oneMinus = g.op1("Sub", [g.constant("float32", [1], [1], "one"), w]);
  const out = g.op1("Add", [g.op1("Mul", [x, w]), g.op1("Mul", [restored, oneMinus])]);
  g.output(out, "output", "float32", [1, 3, 512, 512]);
  await saveModel(g.toSpec(), path);
}

/** GFPGAN-shaped restorer: one image input, output = tanh(conv(input)). */
export async function writeTinyGfpgan(path: string, seed = 5): Promise<void> {
  const g = new GraphBuilder("tiny_gfpgan", 17);
  const rand = mulberry32(seed);
  const x = g.input("input", "float32", [1, 3, 512, 512]);
  g.output(g.op1("Tanh", [conv(g, x, "stylegan_decoder", 3, 3, rand, 0.5)]), "output", "float32", [1, 3, 512, 512]);
  await saveModel(g.toSpec(), path);
}

export interface TinyDetection {
  /** cx, cy, w, h in detector (640²) pixels. */
  box: readonly [number, number, number, number];
  score: number;
  /** 5 landmarks in detector pixels. */
  landmarks: ReadonlyArray<readonly [number, number]>;
}

/**
 * YOLO-face-shaped detector whose output0 [1,20,N] lists `faces` (then zero-score candidates). The input
 * feeds the graph through ·0, so the session needs a real image tensor, but detection is fixed: this
 * tests decoding, alignment and paste-back, not detection quality.
 */
export async function writeTinyFaceDetector(path: string, faces: readonly TinyDetection[], candidates = 16): Promise<void> {
  if (faces.length > candidates) throw new RangeError("more faces than candidates");
  const g = new GraphBuilder("tiny_yoloface", 17);
  const x = g.input("images", "float32", [1, 3, 640, 640]);
  const table = new Float32Array(20 * candidates);
  faces.forEach((f, i) => {
    const values = [...f.box, f.score, ...f.landmarks.flatMap(([px, py]) => [px, py, 1])];
    values.forEach((v, k) => (table[k * candidates + i] = v));
  });
  const constant = g.initializer("detections", "float32", [1, 20, candidates], new Uint8Array(table.buffer));
  const zero = g.op1("Mul", [g.op1("ReduceMean", [x], { keepdims: 0 }), g.scalar(0)]);
  g.output(g.op1("Add", [constant, zero]), "output0", "float32", [1, 20, candidates]);
  await saveModel(g.toSpec(), path);
}
