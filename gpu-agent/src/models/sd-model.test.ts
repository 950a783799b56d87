import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { cpSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { silentLogger } from "@latentfarm/shared";
import { GraphBuilder, encodeModel } from "../model-graph/onnx.js";
import { f16ToF32, f32ToF16 } from "../model-graph/half.js";
import { TINY_SD15 } from "../test-support/kit.js";
import { StepBatcher } from "../pipeline/step-batcher.js";
import { SdModel } from "./sd-model.js";

/**
 * A UNet with float16 inputs and output, as fp16 exports have: out = sample·t + Σ context per row,
 * computed in float32 between casts, so every value is traceable to its own row's inputs.
 */
function fp16Unet(): Uint8Array {
  const g = new GraphBuilder("fp16-unet");
  const sample = g.op1("Cast", [g.input("sample", "float16", ["batch", 4, "height", "width"])], { to: 1 });
  const t = g.op1("Cast", [g.input("timestep", "float16", ["batch"])], { to: 1 });
  const ctx = g.op1("Cast", [g.input("encoder_hidden_states", "float16", ["batch", "sequence", 32])], { to: 1 });
  const perRow = g.constant("int64", [4], [-1, 1, 1, 1]);
  const scaled = g.op1("Mul", [sample, g.op1("Reshape", [t, perRow])]);
  const sums = g.op1("ReduceSum", [ctx, g.constant("int64", [2], [1, 2])], { keepdims: 0 });
  const out = g.op1("Add", [scaled, g.op1("Reshape", [sums, perRow])]);
  g.output(g.op1("Cast", [out], { to: 10 }), "out_sample", "float16", ["batch", 4, "height", "width"]);
  return encodeModel(g.toSpec()).toBytes();
}

const DIMS = { n: 2, h: 3, w: 5, seq: 2, dim: 32 };
const PLANE = 4 * DIMS.h * DIMS.w;

function inputs(call: number): { sample: Float32Array; timesteps: Float32Array; context: Float32Array } {
  return {
    sample: Float32Array.from({ length: DIMS.n * PLANE }, (_, i) => Math.sin(i + call) * 3),
    timesteps: Float32Array.of(0.5 + call, 2 - call),
    context: Float32Array.from({ length: DIMS.n * DIMS.seq * DIMS.dim }, (_, i) => ((i * 7 + call) % 5) / 8),
  };
}

/** The graph's arithmetic on call `call`'s inputs as float16 values, rounded as its last cast rounds. */
function assertOutput(out: Float32Array, call: number): void {
  const { sample, timesteps, context } = inputs(call);
  const s16 = f16ToF32(f32ToF16(sample));
  const t16 = f16ToF32(f32ToF16(timesteps));
  const c16 = f16ToF32(f32ToF16(context));
  const expected = new Float32Array(DIMS.n * PLANE);
  for (let r = 0; r < DIMS.n; r++) {
    let sum = 0;
    for (let k = 0; k < DIMS.seq * DIMS.dim; k++) sum += c16[r * DIMS.seq * DIMS.dim + k]!;
    for (let i = 0; i < PLANE; i++) expected[r * PLANE + i] = Math.fround(s16[r * PLANE + i]! * t16[r]!) + sum;
  }
  const rounded = f16ToF32(f32ToF16(expected));
  assert.equal(out.length, DIMS.n * PLANE);
  for (let i = 0; i < out.length; i++) {
    // Summation order inside ReduceSum may move the last float32 bit, and so at most one half ulp.
    assert.ok(
      Math.abs(out[i]! - rounded[i]!) <= Math.abs(rounded[i]!) * 2 ** -10 + 1e-7,
      `call ${call}, value ${i}: ${out[i]} vs ${rounded[i]}`,
    );
  }
}

describe("fp16 UNet exports", { skip: !existsSync(TINY_SD15) && "team kit fixtures absent" }, () => {
  let dir: string;
  before(() => {
    // The kit's tiny model with its UNet swapped for the fp16 one.
    dir = mkdtempSync(join(tmpdir(), "latentfarm-fp16-"));
    cpSync(TINY_SD15, dir, { recursive: true });
    rmSync(join(dir, "unet"), { recursive: true });
    cpSync(join(TINY_SD15, "unet"), join(dir, "unet"), { recursive: true, filter: (p) => !p.includes("weights") && !p.endsWith(".pb") });
    writeFileSync(join(dir, "unet", "model.onnx"), fp16Unet());
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const sessions of ["this-thread", "worker"] as const) {
    test(`take float16 in and give float32 back, call after call and two at once (${sessions})`, async () => {
      const model = await SdModel.load(
        { name: "fp16", format: "diffusers-onnx", path: dir },
        { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, sessions },
      );
      try {
        // Each call's inputs differ, so an input kept from the call before would show.
        for (let call = 0; call < 3; call++) {
          const { sample, timesteps, context } = inputs(call);
          assertOutput(await model.unet(sample, timesteps, context, DIMS), call);
        }
        // Two calls at once: the second starts while the first waits for its run().
        const both = await Promise.all([3, 4].map((call) => inputs(call)).map((i) => model.unet(i.sample, i.timesteps, i.context, DIMS)));
        both.forEach((out, k) => assertOutput(out, 3 + k));
      } finally {
        await model.close();
      }
    });
  }

  for (const sessions of ["this-thread", "worker"] as const) {
    test(`an unchanged context is converted once, a changed one again (${sessions}, through the step batcher)`, async () => {
      const model = await SdModel.load(
        { name: "fp16", format: "diffusers-onnx", path: dir },
        { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, sessions },
      );
      try {
        const batcher = new StepBatcher(model.unet.bind(model), 4, 32);
        const x = new Float32Array(4).fill(1);
        // Contexts that sum to 1 and 3 per row: the output is x·t + that sum.
        const a = new Float32Array(64).fill(1 / 64);
        const b = new Float32Array(64).fill(3 / 64);
        const order = [
          [a, b],
          [a, b],
          [b, a],
          [b, a],
          [a, b],
          [new Float32Array(64).fill(5 / 64), b],
        ];
        for (const [k, contexts] of order.entries()) {
          const rows = await batcher.evaluate({ x, t: 1, contexts, h: 1, w: 1, seq: 2 });
          const sums = contexts.map((c) => c.reduce((p, v) => p + v, 0));
          assert.deepEqual(
            rows.map((r) => [...r]),
            sums.map((s) => new Array(4).fill(1 + s)),
            `call ${k}`,
          );
        }
      } finally {
        await model.close();
      }
    });
  }
});

/**
 * A text encoder whose token-embedding table is float16, as fp16 exports keep it: last_hidden_state is
 * the looked-up rows themselves (cast to float32), so each position shows which vector it got.
 */
function fp16TextEncoder(vocab: number): Uint8Array {
  const g = new GraphBuilder("fp16-text-encoder");
  const table = f32ToF16(Float32Array.from({ length: vocab * 32 }, (_, i) => ((i % 97) - 48) / 32));
  const rows = g.initializer("token_embedding.weight", "float16", [vocab, 32], new Uint8Array(table.buffer));
  const looked = g.op1("Gather", [rows, g.input("input_ids", "int32", ["batch", "sequence"])], { axis: 0 });
  g.output(g.op1("Cast", [looked], { to: 1 }), "last_hidden_state", "float32", ["batch", "sequence", 32]);
  return encodeModel(g.toSpec()).toBytes();
}

describe("token overrides on a float16 text encoder", { skip: !existsSync(TINY_SD15) && "team kit fixtures absent" }, () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "latentfarm-fp16-te-"));
    cpSync(TINY_SD15, dir, { recursive: true });
    writeFileSync(join(dir, "text_encoder", "model.onnx"), fp16TextEncoder(400));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const sessions of ["this-thread", "worker"] as const) {
    test(`vectors go in as float16 at their rows and positions; the table answers elsewhere (${sessions})`, async () => {
      const load = (tokenOverrides: boolean) =>
        SdModel.load(
          { name: "fp16-te", format: "diffusers-onnx", path: dir },
          { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1, sessions, tokenOverrides },
        );
      const model = await load(true);
      const plain = await load(false);
      try {
        assert.equal(model.textEncoder.acceptsTokenOverrides, true);
        assert.equal(plain.textEncoder.acceptsTokenOverrides, false);
        const ids = Int32Array.from({ length: 2 * 77 }, (_, i) => (i * 13) % 400);
        const vectors = Float32Array.from({ length: 2 * 32 }, (_, i) => 1 / 3 + i);
        const overrides = { rows: Int32Array.of(1, 0), positions: Int32Array.of(5, 76), vectors };
        const got = await model.textEncoder.encode(ids, 2, 1, undefined, overrides);
        const want = await plain.textEncoder.encode(ids, 2, 1);
        assert.deepEqual([...(await model.textEncoder.encode(ids, 2, 1))], [...want], "no overrides: the table's rows");
        const at = (row: number, position: number) => (row * 77 + position) * 32;
        const expected = Float32Array.from(want);
        expected.set(f16ToF32(f32ToF16(vectors.subarray(0, 32))), at(1, 5));
        expected.set(f16ToF32(f32ToF16(vectors.subarray(32))), at(0, 76));
        assert.deepEqual([...got], [...expected]);
        await assert.rejects(plain.textEncoder.encode(ids, 2, 1, undefined, overrides), /loaded without token overrides/);
      } finally {
        await model.close();
        await plain.close();
      }
    });
  }
});
