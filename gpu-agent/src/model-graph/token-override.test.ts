import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, describe, test } from "node:test";
import { status } from "@grpc/grpc-js";
import * as ort from "onnxruntime-node";
import { decodeModel, initializerFloat32 } from "./onnx-read.js";
import { importCheckpoint } from "./pipeline.js";
import { TOKEN_OVERRIDE_POSITIONS, TOKEN_OVERRIDE_VECTORS, withTokenOverrides } from "./token-override.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const skip = kitSkip("tiny-sd15");
const TE = kitFixture("tiny-sd15", "text_encoder", "model.onnx");
const BOS = 49406;
const EOS = 49407;

function ids(tokens: number[], rows = 1): Int32Array {
  const out = new Int32Array(77 * rows).fill(EOS);
  for (let r = 0; r < rows; r++) {
    out[r * 77] = BOS;
    out.set(tokens, r * 77 + 1);
  }
  return out;
}

async function run(
  model: string | Uint8Array,
  input: Int32Array,
  rows: number,
  overrides?: { at: Array<[number, number]>; vectors: Float32Array },
) {
  const s = typeof model === "string" ? await ort.InferenceSession.create(model) : await ort.InferenceSession.create(model);
  try {
    const feeds: Record<string, ort.Tensor> = { input_ids: new ort.Tensor("int32", input, [rows, 77]) };
    if (overrides !== undefined) {
      feeds[TOKEN_OVERRIDE_POSITIONS] = new ort.Tensor("int64", BigInt64Array.from(overrides.at.flat(), BigInt), [overrides.at.length, 2]);
      feeds[TOKEN_OVERRIDE_VECTORS] = new ort.Tensor("float32", overrides.vectors, [overrides.at.length, 32]);
    }
    const out = await s.run(feeds);
    return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, [...(v.data as Float32Array)]]));
  } finally {
    await s.release();
  }
}

/** Rows of the model's token-embedding table. */
async function tableRows(path: string, tokens: number[]): Promise<Float32Array> {
  const m = decodeModel(readFileSync(path));
  const init = m.graph.initializers.find((t) => t.dims.length === 2 && t.dims[0] === 49408)!;
  const table = await initializerFloat32(init, path);
  const out = new Float32Array(tokens.length * 32);
  tokens.forEach((t, i) => out.set(table.subarray(t * 32, (t + 1) * 32), i * 32));
  return out;
}

describe("token overrides in a CLIP text encoder graph", { skip }, () => {
  const dir = mkdtempSync(join(tmpdir(), "lf-token-override-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  const checks = async (path: string) => {
    const { model, externalData } = withTokenOverrides(readFileSync(path), path);
    // Saved beside the original, where its external data is.
    const patched = externalData ? join(dirname(path), "model.token-overrides.onnx") : model;
    if (typeof patched === "string") writeFileSync(patched, model);
    // No overrides: every output as the original graph gives it.
    const input = ids([320, 1929, 2368], 2);
    assert.deepEqual(await run(patched, input, 2, { at: [], vectors: new Float32Array(0) }), await run(path, input, 2));
    // Placeholders (token 0) overridden with the table's rows for "red car" give "red car" itself, in row 1 only.
    const words = [736, 1615];
    const vectors = await tableRows(path, words);
    const withPlaceholders = ids([320, 0, 0, 2368], 2);
    const got = await run(patched, withPlaceholders, 2, {
      at: [
        [1, 2],
        [1, 3],
      ],
      vectors,
    });
    const want = await run(path, new Int32Array([...ids([320, 0, 0, 2368]), ...ids([320, ...words, 2368])]), 2);
    assert.deepEqual(got["last_hidden_state"], want["last_hidden_state"]);
    assert.deepEqual(got["hidden_states.0"], want["hidden_states.0"]);
    // Other vectors change the encoding.
    const other = await run(patched, withPlaceholders, 2, { at: [[0, 2]], vectors: vectors.subarray(32, 64) });
    assert.notDeepEqual(other["last_hidden_state"], want["last_hidden_state"]);
  };

  test("an exported graph (the kit's diffusers ONNX text encoder)", () => checks(TE));

  test("a graph the farm built from a checkpoint", async () => {
    const built = await importCheckpoint(kitFixture("tiny-sd15.safetensors"), {
      cacheDir: dir,
      tokenizerDir: kitFixture("tiny-sd15", "tokenizer"),
      components: ["text_encoder"],
      textHeads: 4,
      unetHeads: 8,
    });
    await checks(join(built.dir, "text_encoder", "model.onnx"));
  });

  test("graphs it cannot patch are INVALID_ARGUMENT naming the file", () => {
    const patched = withTokenOverrides(readFileSync(TE), TE).model;
    const refused = (bytes: Uint8Array, why: RegExp) =>
      assert.throws(
        () => withTokenOverrides(bytes, "te.onnx"),
        (e: Error & { code?: number }) => e.code === status.INVALID_ARGUMENT && e.message.startsWith("te.onnx: ") && why.test(e.message),
      );
    refused(patched, /already takes token overrides/);
    refused(readFileSync(kitFixture("tiny-sd15", "vae_decoder", "model.onnx")), /no token-id input/);
    refused(new Uint8Array([8, 7]), /no graph/);
  });
});
