import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { GenerationParamsSchema, silentLogger } from "@latentfarm/shared";
import { Job, JobStore } from "./job-store.js";

test("the log keeps each image's latest live preview; an earlier one leaves the in-memory log once stored", () => {
  const store = new JobStore(undefined, { logger: silentLogger });
  const job = new Job({
    id: "j",
    params: create(GenerationParamsSchema, { model: "m", steps: 4 }),
    tenant: "t",
    requestId: "",
    imageCount: 2,
    createdAt: Date.now(),
    deadlineUnixMs: 0,
    priority: 0,
  });
  const png = (n: number) => Uint8Array.from([0x89, n]);
  const step = (imageIndex: number, s: number, preview?: Uint8Array) =>
    store.emit(job, { case: "step", value: { taskId: "t", imageIndex, step: s, totalSteps: 4, ...(preview && { previewPng: preview }) } });
  step(0, 1);
  step(0, 2, png(2));
  step(1, 2, png(20));
  step(0, 3);
  step(0, 4, png(4));
  const previews = job.events.map((e) =>
    e.event.case === "step" ? [e.event.value.imageIndex, e.event.value.step, [...e.event.value.previewPng]] : [],
  );
  assert.deepEqual(previews, [
    [0, 1, []],
    // Superseded by image 0's step 4: the step stays, its picture goes.
    [0, 2, []],
    // Another image's preview is its own.
    [1, 2, [0x89, 20]],
    [0, 3, []],
    [0, 4, [0x89, 4]],
  ]);
  assert.deepEqual(
    job.events.map((e) => e.sequence),
    [1n, 2n, 3n, 4n, 5n],
  );
});
