import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { GraphBuilder, encodeModel, f, saveModel } from "./onnx.js";
import { decodeModel, initializerFloat32, readModel } from "./onnx-read.js";
import { ProtoMessage, decodeFields } from "./protobuf.js";

const dir = mkdtempSync(join(tmpdir(), "onnx-test-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const f32 = (a: number[]): Uint8Array => new Uint8Array(new Float32Array(a).buffer);

test("varints follow the protobuf wire format", () => {
  // Examples from the protobuf encoding guide: 150 → 96 01, field 1.
  assert.deepEqual(Array.from(new ProtoMessage().varint(1, 150).toBytes()), [0x08, 0x96, 0x01]);
  // Negative int64 is ten bytes of two's complement.
  const neg = new ProtoMessage().int(1, -1).toBytes();
  assert.deepEqual(Array.from(neg), [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
  const big = new ProtoMessage().int(2, 2 ** 40 + 3).toBytes();
  const [field] = decodeFields(big);
  assert.equal(field?.field, 2);
  assert.equal(field?.value, 2n ** 40n + 3n);
  const s = new ProtoMessage().string(3, "héllo").toBytes();
  assert.deepEqual(Array.from(s.subarray(0, 2)), [0x1a, 6]);
});

test("a built graph loads in ONNX Runtime and computes Gemm(transB) + Conv + Resize by size", async () => {
  const g = new GraphBuilder("t");
  const x = g.input("x", "float32", ["batch", 3]);
  // W is [out=2, in=3] as a torch Linear stores it.
  const w = g.initializer("lin.weight", "float32", [2, 3], f32([1, 2, 3, -1, 0, 1]));
  const b = g.initializer("lin.bias", "float32", [2], f32([0.5, -0.5]));
  const y = g.op1("Gemm", [x, w, b], { transB: 1, alpha: f(1) });
  g.output(y, "y", "float32", ["batch", 2]);
  const img = g.input("img", "float32", [1, 1, 2, 2]);
  const k = g.initializer("conv.weight", "float32", [1, 1, 3, 3], f32([0, 0, 0, 0, 2, 0, 0, 0, 0]));
  const conv = g.op1("Conv", [img, k], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] });
  const target = g.input("target", "float32", [1, 1, "h", "w"]);
  const sizes = g.op1("Shape", [target]);
  const up = g.op1("Resize", [conv, "", "", sizes], {
    mode: "nearest",
    coordinate_transformation_mode: "asymmetric",
    nearest_mode: "floor",
  });
  g.output(up, "up", "float32", [1, 1, "h", "w"]);
  const bytes = encodeModel(g.toSpec()).toBytes();
  const s = await ort.InferenceSession.create(bytes);
  const out = await s.run({
    x: new ort.Tensor("float32", new Float32Array([1, 1, 1, 2, 0, -1]), [2, 3]),
    img: new ort.Tensor("float32", new Float32Array([1, 2, 3, 4]), [1, 1, 2, 2]),
    target: new ort.Tensor("float32", new Float32Array(9), [1, 1, 3, 3]),
  });
  // y = x·Wᵀ + b computed by hand.
  assert.deepEqual(Array.from(out.y!.data as Float32Array), [6.5, -0.5, -0.5, -3.5]);
  // conv doubles; nearest 2→3 with floor(i·2/3) picks rows/cols 0,0,1.
  assert.deepEqual(Array.from(out.up!.data as Float32Array), [2, 2, 4, 2, 2, 4, 6, 6, 8]);
  await s.release();
});

test("encode → decode keeps nodes, attributes of every kind, I/O and metadata", () => {
  const g = new GraphBuilder("roundtrip", 17);
  const x = g.input("x", "float32", ["n", 4]);
  const c = g.constant("int64", [2], [-1, 4]);
  const r = g.op1("Reshape", [x, c]);
  const n = g.op1("LayerNormalization", [r, g.scalar(1), g.scalar(0)], { axis: -1, epsilon: f(1e-5) });
  g.op1("Identity", [n], { ints: [1, -2, 3], floats: { floats: [0.5, 2] }, s: "text" });
  g.output(n, "out", "float32", ["n", 4]);
  const spec = g.toSpec({ metadata: { k: "v" } });
  const m = decodeModel(encodeModel(spec).toBytes());
  assert.equal(m.irVersion, 8);
  assert.deepEqual(m.opsets, { "": 17 });
  assert.deepEqual(m.metadata, { k: "v" });
  assert.deepEqual(m.graph.inputs, [{ name: "x", elemType: "float32", dims: ["n", 4] }]);
  assert.equal(m.graph.outputs[0]?.name, "out");
  assert.deepEqual(
    m.graph.nodes.map((nd) => nd.opType),
    ["Reshape", "LayerNormalization", "Identity", "Identity"],
  );
  const ln = m.graph.nodes[1]!;
  assert.equal(ln.attrs.axis, -1);
  assert.ok(Math.abs((ln.attrs.epsilon as number) - 1e-5) < 1e-12);
  const id = m.graph.nodes[2]!;
  assert.deepEqual(id.attrs.ints, [1, -2, 3]);
  assert.deepEqual(id.attrs.floats, [0.5, 2]);
  assert.equal(id.attrs.s, "text");
  const shape = m.graph.initializers.find((t) => t.name === c)!;
  assert.deepEqual(shape.dims, [2]);
  assert.deepEqual(Array.from(new BigInt64Array(Uint8Array.from(shape.raw!).buffer)), [-1n, 4n]);
  const bad = new GraphBuilder("bad");
  bad.op1("Identity", [bad.input("y", "float32", [1])], { alpha: 0.5 });
  assert.throws(() => encodeModel(bad.toSpec()), /wrap floats with f\(\)/);
});

test("external data: big float tensors go to weights.pb at aligned offsets, small ones stay inline", async () => {
  const g = new GraphBuilder("ext");
  const x = g.input("x", "float32", [1, 4096]);
  const big = new Float32Array(4096 * 2).map((_, i) => ((i % 7) - 3) / 8);
  const w = g.initializer("big.weight", "float32", [2, 4096], new Uint8Array(big.buffer));
  // Lazy data is only produced while the file is written.
  let loads = 0;
  const lazyBias = { byteLength: 8, load: () => (loads++, Promise.resolve(f32([1, 2]))) };
  const b = g.initializer("big.bias", "float32", [2], lazyBias);
  g.output(g.op1("Gemm", [x, w, b], { transB: 1 }), "y", "float32", [1, 2]);
  const path = join(dir, "ext.onnx");
  const saved = await saveModel(g.toSpec(), path, { weights: "external" });
  assert.equal(loads, 1);
  assert.equal(saved.externalPath, join(dir, "weights.pb"));
  assert.equal(saved.layout.get("big.weight")?.offset, 0);
  assert.equal(saved.layout.has("big.bias"), false);
  assert.equal(statSync(join(dir, "weights.pb")).size, big.byteLength);
  const m = await readModel(path);
  const wt = m.graph.initializers.find((t) => t.name === "big.weight")!;
  assert.deepEqual(wt.external, { location: "weights.pb", offset: "0", length: String(big.byteLength) });
  assert.deepEqual(Array.from(await initializerFloat32(wt, path)), Array.from(big));
  const s = await ort.InferenceSession.create(path);
  const xs = new Float32Array(4096).fill(1);
  const out = (await s.run({ x: new ort.Tensor("float32", xs, [1, 4096]) })).y!.data as Float32Array;
  const expect = [0, 1].map((r) => big.subarray(r * 4096, (r + 1) * 4096).reduce((a, v) => a + v, 0) + (r + 1));
  assert.ok(Math.abs(out[0]! - expect[0]!) < 1e-3 && Math.abs(out[1]! - expect[1]!) < 1e-3, `${out} vs ${expect}`);
  await s.release();
});

test("initializers with a wrong byte count and duplicate value names are refused", () => {
  const g = new GraphBuilder("bad");
  assert.throws(() => g.initializer("w", "float32", [2, 2], new Uint8Array(12)), /needs 16 bytes/);
  g.input("a", "float32", [1]);
  assert.throws(() => g.input("a", "float32", [1]), /used twice/);
});
