// The conditioning of the reference txt2img cases against the tensors A1111's text pipeline
// produced for them (shared/fixtures/reference/txt2img/intermediate), using the fixture's CLIP.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { ClipTokenizer } from "./clip-tokenizer.js";
import { Conditioner } from "./conditioner.js";
import { ConditioningPreconditionError } from "./errors.js";
import { scheduleSteps } from "./schedule.js";
import { OnnxClipTextEncoder } from "./test-support/onnx-text-encoder.js";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";

const FIXTURES = KIT_FIXTURES;
const MODEL = join(FIXTURES, "tiny-sd15");
const REFERENCE = join(FIXTURES, "reference/txt2img");
const skip = kitSkip("reference", "txt2img", "intermediate", "index.json");

interface Case {
  id: string;
  prompt: string;
  negative_prompt: string;
  steps: number;
  sampler_name: string;
  clip_skip?: number;
}
interface TensorRef {
  file: string;
  shape: number[];
}

let encoder: OnnxClipTextEncoder | undefined;
let conditioner: Conditioner | undefined;

before(async () => {
  if (skip) return;
  encoder = await OnnxClipTextEncoder.load(join(MODEL, "text_encoder/model.onnx"));
  conditioner = new Conditioner({ tokenizer: await ClipTokenizer.fromDirectory(join(MODEL, "tokenizer")), encoder });
});
after(async () => {
  await encoder?.dispose();
});

function loadF32(file: string): Float32Array {
  const bytes = readFileSync(join(REFERENCE, "intermediate", file));
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

const SECOND_ORDER = new Set(["Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"]);

test("cond and uncond of every reference case match A1111's tensors", { skip }, async (t) => {
  const cases = JSON.parse(readFileSync(join(REFERENCE, "cases.json"), "utf8")) as Case[];
  const index = JSON.parse(readFileSync(join(REFERENCE, "intermediate/index.json"), "utf8")) as Record<
    string,
    { cond: TensorRef; uncond: TensorRef }
  >;
  assert.ok(cases.length >= 5);
  for (const c of cases) {
    const ref = index[c.id]!;
    const prepared = await conditioner!.prepare({
      prompt: c.prompt,
      negativePrompt: c.negative_prompt,
      steps: scheduleSteps(c.steps, SECOND_ORDER.has(c.sampler_name)),
      clipSkip: c.clip_skip ?? 1,
    });
    for (const step of [0, c.steps - 1]) {
      const [cond, ...rest] = prepared.condAt(step);
      assert.equal(rest.length, 0);
      assert.equal(cond!.weight, 1);
      assert.equal(cond!.tokens, ref.cond.shape[1], `${c.id} cond tokens`);
      const expected = loadF32(ref.cond.file);
      const diff = maxAbsDiff(cond!.tensor, expected);
      assert.ok(diff < 1e-5, `${c.id} cond max |Δ| = ${diff}`);

      const uncond = prepared.uncondAt(step);
      assert.equal(uncond.tokens, ref.uncond.shape[1], `${c.id} uncond tokens`);
      const udiff = maxAbsDiff(uncond.tensor, loadF32(ref.uncond.file));
      assert.ok(udiff < 1e-5, `${c.id} uncond max |Δ| = ${udiff}`);
      if (step === 0) t.diagnostic(`${c.id}: cond max |Δ| ${diff.toExponential(2)}, uncond ${udiff.toExponential(2)}`);
    }
  }
});

test("emphasis and CLIP skip are not no-ops (the reference comparison can fail)", { skip }, async () => {
  const cases = JSON.parse(readFileSync(join(REFERENCE, "cases.json"), "utf8")) as Case[];
  const index = JSON.parse(readFileSync(join(REFERENCE, "intermediate/index.json"), "utf8")) as Record<string, { cond: TensorRef }>;
  const p3 = cases.find((c) => c.id.startsWith("p3"))!;
  const p4 = cases.find((c) => c.id.startsWith("p4"))!;
  const noNorm = await conditioner!.prepare({ prompt: p3.prompt, steps: p3.steps, emphasis: "No norm" });
  assert.ok(maxAbsDiff(noNorm.condAt(0)[0]!.tensor, loadF32(index[p3.id]!.cond.file)) > 1e-4);
  const skip1 = await conditioner!.prepare({ prompt: p4.prompt, steps: p4.steps, clipSkip: 1 });
  assert.ok(maxAbsDiff(skip1.condAt(0)[0]!.tensor, loadF32(index[p4.id]!.cond.file)) > 1e-3);
});

test("clip skip beyond the encoder's layers is FAILED_PRECONDITION", { skip }, async () => {
  assert.equal(encoder!.maxClipSkip, 3);
  await assert.rejects(
    conditioner!.prepare({ prompt: "a cat", steps: 10, clipSkip: 4 }),
    (err: unknown) =>
      err instanceof ConditioningPreconditionError && err.codeName === "FAILED_PRECONDITION" && /at most 3/.test(err.message),
  );
  const prepared = await conditioner!.prepare({ prompt: "a cat", steps: 10, clipSkip: 3 });
  assert.equal(prepared.condAt(0)[0]!.tokens, 77);
});
