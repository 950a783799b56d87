import { test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { FarmError } from "@latentfarm/shared";
import { OrtWorker } from "./ort-runtime.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const UNET = kitFixture("tiny-sd15", "unet", "model.onnx");

test(
  "a run reports its time inside ORT; a feed whose buffer was already transferred is refused instead of hanging",
  { skip: kitSkip("tiny-sd15", "unet", "model.onnx") },
  async () => {
    const w = new OrtWorker({ name: "cpu" }, { intraOpNumThreads: 1 });
    try {
      const info = await w.load("unet", UNET);
      const out = info.outputs[0]!.name;
      const sample = new Float32Array(2 * 4 * 8 * 8).fill(0.1);
      const feeds = () => ({
        sample: { type: "float32" as const, dims: [2, 4, 8, 8], data: sample },
        timestep: { type: "float32" as const, dims: [2], data: new Float32Array([500, 500]) },
        encoder_hidden_states: { type: "float32" as const, dims: [2, 77, 32], data: new Float32Array(2 * 77 * 32) },
      });
      const res = await w.run("unet", feeds(), [out]);
      assert.equal(res[out]!.data.length, 2 * 4 * 8 * 8);
      assert.equal(w.runStats.get("unet")?.runs, 1);
      assert.ok((w.runStats.get("unet")?.ms ?? 0) > 0);
      assert.equal(sample.length, 0, "the first call transferred the sample's buffer");
      await assert.rejects(
        w.run("unet", feeds(), [out]),
        (e: unknown) => e instanceof FarmError && e.code === grpc.status.INTERNAL && /already transferred/.test(e.message),
      );
    } finally {
      await w.close();
    }
  },
);
