// What textual-inversion embeddings cost the text encoder, measured side by side in one run on a CLIP
// text encoder of SD1.5's width and depth (768 wide, 12 layers, 12 heads, MLP 3072; random weights and
// the tiny model's small vocabulary), built by the farm's importer, on ONNX Runtime's CPU EP:
//   encode_ms_original:       one batch of 2×77 tokens through the graph as built;
//   encode_ms_no_overrides:   the same through the graph with token overrides (withTokenOverrides), none given:
//                             what every prompt pays on an agent with an embeddings folder;
//   encode_ms_8_vectors:      the same with 8 placeholder positions overridden (an 8-vector embedding);
//   overhead_no_overrides / overhead_8_vectors: those over encode_ms_original (each a median over rounds
//                             that alternate the three graphs);
//   patch_ms_sd15_width / model_mb_sd15_width: withTokenOverrides on that model's bytes (read beforehand),
//                             paid once per pipeline load: its weights sit inside the file (under ONNX's 2 GB
//                             limit, as an SD1.5 text encoder's 492 MB do), and the patch copies the file;
//   patch_ms_kit:             the same on the kit's exported text encoder (6.4 MB).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import {
  makeTinyModel,
  withTokenOverrides,
  TOKEN_OVERRIDE_POSITIONS,
  TOKEN_OVERRIDE_VECTORS,
} from "../../gpu-agent/src/model-graph/index.js";
import { TINY_SD15 } from "../harness/farm.js";
import { median } from "./stats.js";

export async function benchEmbeddings(opts: { rounds?: number } = {}): Promise<Record<string, number>> {
  const rounds = opts.rounds ?? 15;
  const dir = mkdtempSync(join(tmpdir(), "lf-bench-embeddings-"));
  try {
    const tiny = await makeTinyModel({
      outDir: dir,
      config: "sd15-topology",
      overrides: { textHidden: 768, textLayers: 12, textHeads: 12, textIntermediate: 3072 },
    });
    const path = join(tiny.onnxDir!, "text_encoder", "model.onnx");
    const bytes = readFileSync(path);
    let started = performance.now();
    const patched = withTokenOverrides(bytes, path);
    const patchWide = performance.now() - started;
    const patchedPath = join(tiny.onnxDir!, "text_encoder", "model.token-overrides.onnx");
    if (patched.externalData) writeFileSync(patchedPath, patched.model);
    const options: ort.InferenceSession.SessionOptions = {
      executionProviders: ["cpu"],
      graphOptimizationLevel: "all",
      intraOpNumThreads: 1,
    };
    const original = await ort.InferenceSession.create(path, options);
    const withOverrides = patched.externalData
      ? await ort.InferenceSession.create(patchedPath, options)
      : await ort.InferenceSession.create(patched.model, options);

    const ids = new Int32Array(2 * 77).fill(tiny.eosId);
    for (let r = 0; r < 2; r++) {
      ids[r * 77] = tiny.bosId;
      for (let t = 1; t < 20; t++) ids[r * 77 + t] = 5 + ((t * 7 + r) % 50);
    }
    const feeds = (count: number): Record<string, ort.Tensor> => {
      const at = new BigInt64Array(count * 2);
      for (let i = 0; i < count; i++) [at[2 * i], at[2 * i + 1]] = [0n, BigInt(3 + i)];
      return {
        input_ids: new ort.Tensor("int32", ids, [2, 77]),
        [TOKEN_OVERRIDE_POSITIONS]: new ort.Tensor("int64", at, [count, 2]),
        [TOKEN_OVERRIDE_VECTORS]: new ort.Tensor("float32", new Float32Array(count * 768).fill(0.01), [count, 768]),
      };
    };
    const time = async (s: ort.InferenceSession, f: Record<string, ort.Tensor>): Promise<number> => {
      const t0 = performance.now();
      await s.run(f, ["last_hidden_state"]);
      return performance.now() - t0;
    };
    const plain = { input_ids: new ort.Tensor("int32", ids, [2, 77]) };
    const samples = { original: [] as number[], none: [] as number[], eight: [] as number[] };
    for (let i = 0; i < rounds + 2; i++) {
      const o = await time(original, plain);
      const n = await time(withOverrides, feeds(0));
      const e = await time(withOverrides, feeds(8));
      // The first rounds warm the sessions up.
      if (i < 2) continue;
      samples.original.push(o);
      samples.none.push(n);
      samples.eight.push(e);
    }
    await original.release();
    await withOverrides.release();

    const kitPath = join(TINY_SD15, "text_encoder", "model.onnx");
    const kit = readFileSync(kitPath);
    const kitTimes: number[] = [];
    for (let i = 0; i < 5; i++) {
      started = performance.now();
      withTokenOverrides(kit, kitPath);
      kitTimes.push(performance.now() - started);
    }
    const [o, n, e] = [median(samples.original), median(samples.none), median(samples.eight)];
    const kitMs = median(kitTimes);
    return {
      encode_ms_original: o,
      encode_ms_no_overrides: n,
      encode_ms_8_vectors: e,
      overhead_no_overrides: n / o,
      overhead_8_vectors: e / o,
      patch_ms_sd15_width: patchWide,
      model_mb_sd15_width: bytes.byteLength / 1e6,
      patch_ms_kit: kitMs,
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
