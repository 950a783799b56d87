import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ModelFileError } from "./errors.js";
import { factorization, importCheckpointWithLoras, loadLora, loraTransform } from "./lora.js";
import { initializerFloat32, readModel } from "./onnx-read.js";
import { buildPipelineFromCheckpoint } from "./pipeline.js";
import { SeededRandom } from "./random.js";
import { encodeSafetensors, readSafetensors, writeSafetensors } from "./safetensors.js";
import type { TensorToWrite } from "./safetensors.js";
import { makeTinyModel } from "./tiny-model.js";
import type { TinyModel } from "./tiny-model.js";
import { detectArchitecture } from "./architecture.js";
import { SafetensorsWeights } from "./weights.js";

const dir = mkdtempSync(join(tmpdir(), "lora-test-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const rng = new SeededRandom(21);
const U = "model.diffusion_model.";
const T = "cond_stage_model.transformer.text_model.";

function t(shape: number[], std = 0.3): TensorToWrite {
  return {
    dtype: "F32",
    shape,
    data: rng.normalArray(
      shape.reduce((a, b) => a * b, 1),
      std,
    ),
  };
}
const scalar = (v: number): TensorToWrite => ({ dtype: "F32", shape: [], data: new Float32Array([v]) });
const data = (x: TensorToWrite): Float32Array => x.data as Float32Array;

/** Reference up·down product, written independently of lora.ts: out[i][j] = Σ_r up[i][r]·down[r][j]. */
function product(up: TensorToWrite, down: TensorToWrite): Float64Array {
  const out = up.shape[0]!;
  const rank = down.shape[0]!;
  const cols = data(down).length / rank;
  const res = new Float64Array(out * cols);
  for (let i = 0; i < out; i++)
    for (let j = 0; j < cols; j++) for (let r = 0; r < rank; r++) res[i * cols + j]! += data(up)[i * rank + r]! * data(down)[r * cols + j]!;
  return res;
}

async function baseWeights(m: TinyModel): Promise<Map<string, Float32Array>> {
  const f = await readSafetensors(m.checkpointPath);
  const out = new Map<string, Float32Array>();
  for (const k of f.keys()) out.set(k, await f.float32(k));
  await f.close();
  return out;
}

/** All float initializers of the built text encoder and UNet, by name. */
async function builtWeights(onnxDir: string): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const c of ["text_encoder", "unet"]) {
    const path = join(onnxDir, c, "model.onnx");
    const m = await readModel(path);
    for (const init of m.graph.initializers)
      if (init.elemType === "float32" && !init.name.startsWith("/")) out.set(init.name, await initializerFloat32(init, path));
  }
  return out;
}

function assertDelta(merged: Float32Array, base: Float32Array, expected: ArrayLike<number>, label: string, offset = 0): void {
  for (let i = 0; i < base.length; i++) {
    const e = i >= offset && i < offset + expected.length ? expected[i - offset]! : 0;
    const got = merged[i]! - base[i]!;
    assert.ok(Math.abs(got - e) <= 1e-5 + 1e-5 * Math.abs(e), `${label}[${i}]: Δ ${got}, expected ${e}`);
  }
}

let tiny: TinyModel;
let base: Map<string, Float32Array>;
const A: Record<string, TensorToWrite> = {};
const B: Record<string, TensorToWrite> = {};

test.before(async () => {
  tiny = await makeTinyModel({ outDir: join(dir, "tiny"), seed: 1, checkpointOnly: true });
  base = await baseWeights(tiny);
  // LoRA A: attention linear, conv 1x1 proj_in, GEGLU, 3x3 LoCon conv, mid resnet, upsampler, text encoder.
  const add = (o: Record<string, TensorToWrite>, layer: string, upShape: number[], downShape: number[], alpha?: number): void => {
    o[`${layer}.lora_up.weight`] = t(upShape);
    o[`${layer}.lora_down.weight`] = t(downShape);
    if (alpha !== undefined) o[`${layer}.alpha`] = scalar(alpha);
  };
  add(A, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", [32, 4], [4, 32], 2);
  add(A, "lora_unet_down_blocks_0_attentions_0_proj_in", [32, 4, 1, 1], [4, 32, 1, 1], 8);
  add(A, "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj", [256, 2], [2, 32], 1);
  add(A, "lora_unet_down_blocks_1_resnets_0_conv1", [64, 4, 1, 1], [4, 32, 3, 3], 4);
  add(A, "lora_unet_mid_block_resnets_1_conv2", [64, 2, 1, 1], [2, 64, 3, 3]);
  add(A, "lora_unet_up_blocks_0_upsamplers_0_conv", [64, 2, 1, 1], [2, 64, 3, 3], 1);
  add(A, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", [32, 4], [4, 32], 3);
  add(A, "lora_te_text_model_encoder_layers_1_mlp_fc1", [64, 4], [4, 32], 4);
  add(A, "lora_unet_down_blocks_9_attentions_0_proj_in", [32, 4], [4, 32], 4);
  // LoRA B overlaps A on to_q and adds to_v.
  add(B, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", [32, 8], [8, 32], 16);
  add(B, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v", [32, 8], [8, 32], 4);
  await writeSafetensors(join(dir, "A.safetensors"), A, { ss_network_dim: "4" });
  await writeSafetensors(join(dir, "B.safetensors"), B);
});

const EXPECT_A: [string, string, number][] = [
  [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    `${U}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`,
    2 / 4,
  ],
  ["lora_unet_down_blocks_0_attentions_0_proj_in", `${U}input_blocks.1.1.proj_in.weight`, 8 / 4],
  [
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
    `${U}output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight`,
    1 / 2,
  ],
  ["lora_unet_down_blocks_1_resnets_0_conv1", `${U}input_blocks.3.0.in_layers.2.weight`, 4 / 4],
  ["lora_unet_mid_block_resnets_1_conv2", `${U}middle_block.2.out_layers.3.weight`, 1],
  ["lora_unet_up_blocks_0_upsamplers_0_conv", `${U}output_blocks.1.1.conv.weight`, 1 / 2],
  ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", `${T}encoder.layers.0.self_attn.q_proj.weight`, 3 / 4],
  ["lora_te_text_model_encoder_layers_1_mlp_fc1", `${T}encoder.layers.1.mlp.fc1.weight`, 4 / 4],
];

test("kohya keys map onto the LDM layers A1111 maps them to; unmatched layers are warnings", async () => {
  const f = await readSafetensors(tiny.checkpointPath);
  const shapes = new Map(f.keys().map((k) => [k, f.info(k).shape] as const));
  const arch = detectArchitecture(new SafetensorsWeights(f), tiny.hints);
  await f.close();
  const lora = await loadLora(join(dir, "A.safetensors"), arch, shapes);
  const targets = new Map(lora.modules.map((m) => [m.layer, m]));
  for (const [layer, key, scale] of EXPECT_A) {
    assert.equal(targets.get(layer)?.target, key, layer);
    assert.equal(targets.get(layer)?.scale, scale, `${layer} scale = alpha / rank`);
  }
  assert.equal(targets.get("lora_te_text_model_encoder_layers_0_self_attn_q_proj")?.isText, true);
  assert.equal(lora.warnings.length, 1);
  assert.match(lora.warnings[0]!, /down_blocks_9.*matches no layer/);
  assert.equal(lora.metadata.ss_network_dim, "4");
});

test("merged weight = base + up·down·(alpha/rank)·w, with separate UNet and text weights", async () => {
  const out = join(dir, "merged-A");
  const res = await importCheckpointWithLoras(
    tiny.checkpointPath,
    [{ path: join(dir, "A.safetensors"), unetWeight: 0.8, textWeight: 0.5 }],
    { cacheDir: join(dir, "cache"), ...tiny.hints, components: ["text_encoder", "unet"] },
  );
  assert.equal(res.loraWarnings[0]?.warnings.length, 1);
  const merged = await builtWeights(res.dir);
  const touched = new Set<string>();
  for (const [layer, key, scale] of EXPECT_A) {
    const w = key.startsWith(T) ? 0.5 : 0.8;
    const expected = Array.from(product(A[`${layer}.lora_up.weight`]!, A[`${layer}.lora_down.weight`]!), (v) => v * scale * w);
    assertDelta(merged.get(key)!, base.get(key)!, expected, key);
    touched.add(key);
  }
  let untouched = 0;
  for (const [key, values] of merged) {
    if (touched.has(key)) continue;
    assert.deepEqual(values, base.get(key), `${key} must equal the base`);
    untouched++;
  }
  assert.ok(untouched > 100);
  void out;
});

test("two LoRAs add; weight 0 equals the base; the set is cached regardless of order", async () => {
  const cacheDir = join(dir, "cache2");
  const opts = { cacheDir, ...tiny.hints, components: ["text_encoder", "unet"] as ("text_encoder" | "unet")[] };
  const pa = join(dir, "A.safetensors");
  const pb = join(dir, "B.safetensors");
  const both = await importCheckpointWithLoras(
    tiny.checkpointPath,
    [
      { path: pa, unetWeight: 1 },
      { path: pb, unetWeight: 1 },
    ],
    opts,
  );
  const merged = await builtWeights(both.dir);
  const q = `${U}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`;
  const layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
  const da = product(A[`${layer}.lora_up.weight`]!, A[`${layer}.lora_down.weight`]!);
  const db = product(B[`${layer}.lora_up.weight`]!, B[`${layer}.lora_down.weight`]!);
  assertDelta(
    merged.get(q)!,
    base.get(q)!,
    Array.from(da, (v, i) => v * (2 / 4) + db[i]! * (16 / 8)),
    "A+B to_q",
  );

  const swapped = await importCheckpointWithLoras(
    tiny.checkpointPath,
    [
      { path: pb, unetWeight: 1 },
      { path: pa, unetWeight: 1 },
    ],
    opts,
  );
  assert.equal(swapped.dir, both.dir);
  assert.equal(swapped.cached, true);

  const zero = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: pa, unetWeight: 0, textWeight: 0 }], opts);
  const plain = await buildPipelineFromCheckpoint(tiny.checkpointPath, join(dir, "plain"), {
    ...tiny.hints,
    components: ["text_encoder", "unet"],
  });
  const sha = (p: string): string => createHash("sha256").update(readFileSync(p)).digest("hex");
  assert.equal(sha(join(zero.dir, "unet", "model.onnx")), sha(join(plain.dir, "unet", "model.onnx")));
  assert.equal(sha(join(zero.dir, "text_encoder", "model.onnx")), sha(join(plain.dir, "text_encoder", "model.onnx")));
  const zeroWeights = await builtWeights(zero.dir);
  for (const [k, v] of zeroWeights) assert.deepEqual(v, base.get(k), k);
  // A merged build copies only the layers the LoRAs change; the rest points into the checkpoint.
  const unetInfo = both.manifest.components.unet!;
  assert.ok(unetInfo.externalBytes > 0 && unetInfo.externalBytes < unetInfo.linkedBytes / 4, JSON.stringify(unetInfo));
  // The base checkpoint file is never modified.
  const again = await baseWeights(tiny);
  for (const [k, v] of base) assert.deepEqual(again.get(k), v, k);
});

test("PEFT lora_A/lora_B, LoHa and LoKr deltas", async () => {
  const key = `${U}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`;
  const peftA = t([4, 32]);
  const peftB = t([32, 4]);
  const w1a = t([32, 2]);
  const w1b = t([2, 32]);
  const w2a = t([32, 2]);
  const w2b = t([2, 32]);
  const k1 = t([4, 2]);
  const k2a = t([8, 2]);
  const k2b = t([2, 16]);
  await writeSafetensors(join(dir, "peft.safetensors"), {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": peftA,
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": peftB,
  });
  await writeSafetensors(join(dir, "loha.safetensors"), {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.hada_w1_a": w1a,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.hada_w1_b": w1b,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.hada_w2_a": w2a,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.hada_w2_b": w2b,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.alpha": scalar(1),
  });
  await writeSafetensors(join(dir, "lokr.safetensors"), {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lokr_w1": k1,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lokr_w2_a": k2a,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lokr_w2_b": k2b,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.alpha": scalar(4),
  });
  const cpUp = t([64, 2, 1, 1]);
  const cpDown = t([2, 64, 1, 1]);
  const cpMid = t([2, 2, 3, 3]);
  // Rank 8 on a 64×64×3×3 conv: big enough that the product runs through ONNX Runtime's MatMul.
  const bigUp = t([64, 8, 1, 1]);
  const bigDown = t([8, 64, 3, 3]);
  await writeSafetensors(join(dir, "cp.safetensors"), {
    "lora_unet_down_blocks_1_resnets_0_conv2.lora_up.weight": cpUp,
    "lora_unet_down_blocks_1_resnets_0_conv2.lora_down.weight": cpDown,
    "lora_unet_down_blocks_1_resnets_0_conv2.lora_mid.weight": cpMid,
    "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": bigUp,
    "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": bigDown,
    "lora_unet_mid_block_resnets_0_conv1.alpha": scalar(4),
  });
  const res = await importCheckpointWithLoras(
    tiny.checkpointPath,
    ["peft", "loha", "lokr", "cp"].map((n) => ({ path: join(dir, `${n}.safetensors`), unetWeight: 1 })),
    { cacheDir: join(dir, "cache3"), ...tiny.hints, components: ["unet"] },
  );
  const m = await readModel(join(res.dir, "unet", "model.onnx"));
  const get = async (k: string): Promise<Float32Array> =>
    initializerFloat32(
      m.graph.initializers.find((i) => i.name === k)!,
      join(res.dir, "unet", "model.onnx"),
    );
  // PEFT: B·A, no alpha → scale 1.
  assertDelta(await get(key), base.get(key)!, product(peftB, peftA), "peft");
  // LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank(w1b).
  const h1 = product(w1a, w1b);
  const h2 = product(w2a, w2b);
  const vKey = `${U}input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight`;
  assertDelta(
    await get(vKey),
    base.get(vKey)!,
    Array.from(h1, (v, i) => v * h2[i]! * (1 / 2)),
    "loha",
  );
  // LoKr: kron(w1 [4,2], w2a·w2b [8,16]) → [32, 32], scale alpha / rank(w2b) = 4 / 2.
  const w2 = product(k2a, k2b);
  const kron = new Float64Array(32 * 32);
  for (let i = 0; i < 4; i++)
    for (let j = 0; j < 2; j++)
      for (let k = 0; k < 8; k++)
        for (let l = 0; l < 16; l++) kron[(i * 8 + k) * 32 + (j * 16 + l)] = data(k1)[i * 2 + j]! * w2[k * 16 + l]! * 2;
  const kKey = `${U}input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight`;
  assertDelta(await get(kKey), base.get(kKey)!, kron, "lokr");
  // LoCon with CP decomposition: ΔW[i,j,k,l] = Σ_{n,m} mid[n,m,k,l]·up[i,n]·down[m,j].
  const cp = new Float64Array(64 * 64 * 9);
  for (let i = 0; i < 64; i++)
    for (let j = 0; j < 64; j++)
      for (let k = 0; k < 9; k++)
        for (let n = 0; n < 2; n++)
          for (let q = 0; q < 2; q++)
            cp[(i * 64 + j) * 9 + k]! += data(cpMid)[(n * 2 + q) * 9 + k]! * data(cpUp)[i * 2 + n]! * data(cpDown)[q * 64 + j]!;
  const cKey = `${U}input_blocks.3.0.out_layers.3.weight`;
  assertDelta(await get(cKey), base.get(cKey)!, cp, "lora_mid");
  const mKey = `${U}middle_block.0.in_layers.2.weight`;
  assertDelta(
    await get(mKey),
    base.get(mKey)!,
    Array.from(product(bigUp, bigDown), (v) => v * (4 / 8)),
    "large LoCon",
  );
});

test("DoRA rescales each input column of W + ΔW to dora_scale; a Tucker-form LoHa half is the CP product of its core", async () => {
  const L = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0";
  const up = t([32, 4]);
  const down = t([4, 32]);
  const doraScale = { dtype: "F32" as const, shape: [1, 32], data: rng.uniformArray(32, 0.5, 2) };
  const [tuckerA, tuckerB, plainA, plainB, core] = [t([2, 32]), t([2, 32]), t([32, 2]), t([2, 32]), t([2, 2, 1, 1])];
  await writeSafetensors(join(dir, "dora.safetensors"), {
    [`${L}.lora_up.weight`]: up,
    [`${L}.lora_down.weight`]: down,
    [`${L}.alpha`]: scalar(2),
    [`${L}.dora_scale`]: doraScale,
    // With its core, a half's w_a is [rank, out] (LyCORIS's use_tucker); the other half stays w_a·w_b.
    "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_a": tuckerA,
    "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_b": tuckerB,
    "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w2_a": plainA,
    "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w2_b": plainB,
    "lora_unet_down_blocks_0_attentions_0_proj_out.hada_t1": core,
  });
  const mult = 0.7;
  const res = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: join(dir, "dora.safetensors"), unetWeight: mult }], {
    cacheDir: join(dir, "cache-dora"),
    ...tiny.hints,
    components: ["unet"],
  });
  assert.deepEqual(res.loraWarnings[0]!.warnings, []);
  const key = `${U}input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight`;
  const w = base.get(key)!;
  const d = product(up, down);
  const merged = Array.from(w, (v, i) => v + d[i]! * (2 / 4));
  const norms = Array.from({ length: 32 }, (_, j) => Math.sqrt(merged.filter((_, i) => i % 32 === j).reduce((a, v) => a + v * v, 0)));
  const expected = merged.map((v, i) => (v * data(doraScale)[i % 32]!) / norms[i % 32]! - w[i]!).map((x) => x * mult);
  const m = await readModel(join(res.dir, "unet", "model.onnx"));
  const got = await initializerFloat32(
    m.graph.initializers.find((i) => i.name === key)!,
    join(res.dir, "unet", "model.onnx"),
  );
  assertDelta(got, w, expected, "dora");
  // make_weight_cp: half1[p, r] = Σ_i Σ_j core[i, j]·w_b[j, r]·w_a[i, p]; ΔW = half1 ⊙ (w2_a·w2_b), no alpha: scale 1.
  const po = `${U}input_blocks.1.1.proj_out.weight`;
  const half2 = product(plainA, plainB);
  const tucker = Array.from({ length: 32 * 32 }, (_, k) => {
    const [row, col] = [Math.floor(k / 32), k % 32];
    let sum = 0;
    for (let i = 0; i < 2; i++)
      for (let j = 0; j < 2; j++) sum += data(core)[i * 2 + j]! * data(tuckerB)[j * 32 + col]! * data(tuckerA)[i * 32 + row]!;
    return sum * half2[k]! * mult;
  });
  assertDelta(
    await initializerFloat32(
      m.graph.initializers.find((i) => i.name === po)!,
      join(res.dir, "unet", "model.onnx"),
    ),
    base.get(po)!,
    tucker,
    "tucker loha",
  );
});

test("a Tucker-form LoKr: w2 is the CP product of lokr_t2 on a 3×3 conv, kron'd with w1 as A1111's make_kron", async () => {
  const L = "lora_unet_down_blocks_0_resnets_0_conv1";
  const key = `${U}input_blocks.1.0.in_layers.2.weight`;
  const [w1, w2a, w2b, t2] = [t([2, 2]), t([2, 16]), t([2, 16]), t([2, 2, 3, 3])];
  await writeSafetensors(join(dir, "lokr-tucker.safetensors"), {
    [`${L}.lokr_w1`]: w1,
    [`${L}.lokr_w2_a`]: w2a,
    [`${L}.lokr_w2_b`]: w2b,
    [`${L}.lokr_t2`]: t2,
    [`${L}.alpha`]: scalar(1),
  });
  const res = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: join(dir, "lokr-tucker.safetensors"), unetWeight: 1 }], {
    cacheDir: join(dir, "cache-lokr-tucker"),
    ...tiny.hints,
    components: ["unet"],
  });
  assert.deepEqual(res.loraWarnings[0]!.warnings, []);
  assert.equal(base.get(key)!.length, 32 * 32 * 9, "the tiny UNet's first resnet conv is 32×32×3×3");
  // w2[p, r, k, l] = Σ_i Σ_j t2[i, j, k, l]·w2_b[j, r]·w2_a[i, p]; ΔW[(a·16 + p), (b·16 + r), k, l] = w1[a, b]·w2[p, r, k, l];
  // scale alpha / rank(w2_b) = 1 / 2.
  const expected = new Float64Array(32 * 32 * 9);
  for (let a = 0; a < 2; a++)
    for (let b = 0; b < 2; b++)
      for (let p = 0; p < 16; p++)
        for (let r = 0; r < 16; r++)
          for (let tap = 0; tap < 9; tap++) {
            let w2 = 0;
            for (let i = 0; i < 2; i++)
              for (let j = 0; j < 2; j++) w2 += data(t2)[(i * 2 + j) * 9 + tap]! * data(w2b)[j * 16 + r]! * data(w2a)[i * 16 + p]!;
            expected[((a * 16 + p) * 32 + (b * 16 + r)) * 9 + tap] = data(w1)[a * 2 + b]! * w2 * 0.5;
          }
  const m = await readModel(join(res.dir, "unet", "model.onnx"));
  const got = await initializerFloat32(
    m.graph.initializers.find((i) => i.name === key)!,
    join(res.dir, "unet", "model.onnx"),
  );
  assertDelta(got, base.get(key)!, expected, "tucker lokr");
});

test("A1111's other LyCORIS modules: full (diff, diff_b), norm (w_norm, b_norm), IA3 both ways, GLoRA; alpha unused", async () => {
  const P = "lora_unet_down_blocks_0_attentions_0";
  const TB = `${P}_transformer_blocks_0`;
  const K = `${U}input_blocks.1.1.`;
  const [diff, diffB, wNorm, bNorm, ia3In, ia3Out] = [t([32, 32, 1, 1]), t([32]), t([32]), t([32]), t([32]), t([32])];
  const [b2, b1, a2, a1] = [t([32, 2]), t([2, 32]), t([32, 3]), t([3, 32])];
  const flag = (v: boolean): TensorToWrite => ({ dtype: "BOOL", shape: [], data: new Uint8Array([v ? 1 : 0]) });
  await writeSafetensors(join(dir, "lycoris.safetensors"), {
    [`${P}_proj_in.diff`]: diff,
    [`${P}_proj_in.diff_b`]: diffB,
    [`${P}_proj_in.alpha`]: scalar(8),
    [`${TB}_norm1.w_norm`]: wNorm,
    [`${TB}_norm1.b_norm`]: bNorm,
    [`${TB}_attn2_to_k.weight`]: ia3In,
    [`${TB}_attn2_to_k.on_input`]: flag(true),
    [`${TB}_attn2_to_v.weight`]: ia3Out,
    [`${TB}_attn2_to_v.on_input`]: scalar(0),
    [`${TB}_attn1_to_q.a1.weight`]: a1,
    [`${TB}_attn1_to_q.a2.weight`]: a2,
    [`${TB}_attn1_to_q.b1.weight`]: b1,
    [`${TB}_attn1_to_q.b2.weight`]: b2,
    [`${TB}_attn1_to_q.alpha`]: scalar(4),
    // to_k has no bias: its diff_b is left out with a warning, its diff merged.
    [`${TB}_attn1_to_k.diff`]: diff,
    [`${TB}_attn1_to_k.diff_b`]: diffB,
  });
  const mult = 0.8;
  const res = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: join(dir, "lycoris.safetensors"), unetWeight: mult }], {
    cacheDir: join(dir, "cache-lycoris"),
    ...tiny.hints,
    components: ["unet"],
  });
  assert.deepEqual(res.loraWarnings[0]!.warnings, [
    `layer ${TB}_attn1_to_k: its bias delta fits no bias of ${K}transformer_blocks.0.attn1.to_k.weight; bias left out`,
  ]);
  const m = await readModel(join(res.dir, "unet", "model.onnx"));
  const got = (key: string) =>
    initializerFloat32(
      m.graph.initializers.find((i) => i.name === key)!,
      join(res.dir, "unet", "model.onnx"),
    );
  const times = (x: ArrayLike<number>) => Array.from(x, (v) => v * mult);
  // full and norm: the stored ΔW, and the bias's, times the multiplier (no alpha/dim scale: A1111 sets no dim).
  assertDelta(await got(`${K}proj_in.weight`), base.get(`${K}proj_in.weight`)!, times(data(diff)), "full");
  assertDelta(await got(`${K}proj_in.bias`), base.get(`${K}proj_in.bias`)!, times(data(diffB)), "full bias");
  assertDelta(
    await got(`${K}transformer_blocks.0.norm1.weight`),
    base.get(`${K}transformer_blocks.0.norm1.weight`)!,
    times(data(wNorm)),
    "norm",
  );
  assertDelta(
    await got(`${K}transformer_blocks.0.norm1.bias`),
    base.get(`${K}transformer_blocks.0.norm1.bias`)!,
    times(data(bNorm)),
    "norm bias",
  );
  assertDelta(
    await got(`${K}transformer_blocks.0.attn1.to_k.weight`),
    base.get(`${K}transformer_blocks.0.attn1.to_k.weight`)!,
    times(data(diff)),
    "full, no bias",
  );
  // IA3: W ⊙ w per input column (on_input) or per output row.
  const wk = base.get(`${K}transformer_blocks.0.attn2.to_k.weight`)!;
  assertDelta(
    await got(`${K}transformer_blocks.0.attn2.to_k.weight`),
    wk,
    times(Array.from(wk, (v, i) => v * data(ia3In)[i % 32]!)),
    "ia3 on input",
  );
  const wv = base.get(`${K}transformer_blocks.0.attn2.to_v.weight`)!;
  assertDelta(
    await got(`${K}transformer_blocks.0.attn2.to_v.weight`),
    wv,
    times(Array.from(wv, (v, i) => v * data(ia3Out)[Math.floor(i / 32)]!)),
    "ia3 on output",
  );
  // GLoRA: b2·b1 + W·a2·a1.
  const wq = base.get(`${K}transformer_blocks.0.attn1.to_q.weight`)!;
  const wq64 = { dtype: "F32" as const, shape: [32, 32], data: wq };
  const wa2 = product(wq64, a2);
  const glora = product(b2, b1).map((v, i) => {
    const [r, c] = [Math.floor(i / 32), i % 32];
    let x = 0;
    for (let k = 0; k < 3; k++) x += wa2[r * 3 + k]! * data(a1)[k * 32 + c]!;
    return v + x;
  });
  assertDelta(await got(`${K}transformer_blocks.0.attn1.to_q.weight`), wq, times(glora), "glora");
});

test("LyCORIS's factorization, as A1111's lyco_helpers has it", () => {
  const cases: Array<[number, number, [number, number]]> = [
    [320, 4, [4, 80]],
    [32, 8, [4, 8]],
    [127, 4, [1, 127]],
    [360, -1, [18, 20]],
    [360, 7, [6, 60]],
    [1024, -1, [32, 32]],
    [250, 8, [5, 50]],
  ];
  for (const [d, f, expected] of cases) assert.deepEqual(factorization(d, f), expected, `${d}, ${f}`);
});

test("OFT rotates blocks of output rows: kohya's oft_blocks and LyCORIS's oft_diag, multiplier inside the rotation", async () => {
  const TB = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0";
  const K = `${U}input_blocks.1.1.transformer_blocks.0.`;
  const conv = `${U}input_blocks.1.0.out_layers.3.weight`;
  const [kohya, diag, convDiag, misfit] = [t([4, 8, 8]), t([8, 4, 4]), t([8, 4, 4]), t([4, 8, 8])];
  await writeSafetensors(join(dir, "oft.safetensors"), {
    [`${TB}_attn1_to_q.oft_blocks`]: kohya,
    [`${TB}_attn1_to_q.alpha`]: scalar(1e-3),
    [`${TB}_attn1_to_v.oft_diag`]: diag,
    "lora_unet_down_blocks_0_resnets_0_conv2.oft_diag": convDiag,
    // Blocks of 8 over 32 rows: LyCORIS's layout is 8 blocks of 4, so A1111 cannot apply it.
    [`${TB}_attn2_to_v.oft_diag`]: misfit,
  });
  const mult = 0.6;
  const res = await importCheckpointWithLoras(tiny.checkpointPath, [{ path: join(dir, "oft.safetensors"), unetWeight: mult }], {
    cacheDir: join(dir, "cache-oft"),
    ...tiny.hints,
    components: ["unet"],
  });
  assert.equal(res.loraWarnings[0]!.warnings.length, 1);
  assert.match(res.loraWarnings[0]!.warnings[0]!, /attn2_to_v: delta .* does not fit .*layer skipped/);
  const m = await readModel(join(res.dir, "unet", "model.onnx"));
  const got = (key: string) =>
    initializerFloat32(
      m.graph.initializers.find((i) => i.name === key)!,
      join(res.dir, "unet", "model.onnx"),
    );
  // Row k·size + j of the result: Σ_n R_k[n][j]·W[k·size + n], R_k = (B_k − B_kᵀ)·mult + I.
  const rotated = (w: Float32Array, blocks: TensorToWrite, size: number): number[] => {
    const rest = w.length / 32;
    return Array.from(w, (v, i) => {
      const [row, c] = [Math.floor(i / rest), i % rest];
      const [k, j] = [Math.floor(row / size), row % size];
      let sum = 0;
      for (let n = 0; n < size; n++) {
        const b = data(blocks);
        const r = (b[(k * size + n) * size + j]! - b[(k * size + j) * size + n]!) * mult + (n === j ? 1 : 0);
        sum += r * w[(k * size + n) * rest + c]!;
      }
      return sum - v;
    });
  };
  for (const [key, blocks, size] of [
    [`${K}attn1.to_q.weight`, kohya, 8],
    [`${K}attn1.to_v.weight`, diag, 4],
    [conv, convDiag, 4],
  ] as const) {
    assertDelta(await got(key), base.get(key)!, rotated(base.get(key)!, blocks, size), key);
  }
  assert.deepEqual(await got(`${K}attn2.to_v.weight`), base.get(`${K}attn2.to_v.weight`));
});

test("SD2 text-encoder q/k/v LoRAs land in slices of OpenCLIP's fused in_proj; inpainting conv_in deltas are zero-padded", async () => {
  const sd2 = await makeTinyModel({ outDir: join(dir, "sd2"), seed: 3, checkpointOnly: true, overrides: { family: "sd2" } });
  const up = t([32, 2]);
  const down = t([2, 32]);
  await writeSafetensors(join(dir, "te2.safetensors"), {
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight": up,
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight": down,
  });
  const r2 = await importCheckpointWithLoras(sd2.checkpointPath, [{ path: join(dir, "te2.safetensors"), unetWeight: 1, textWeight: 1 }], {
    cacheDir: join(dir, "cache4"),
    ...sd2.hints,
    components: ["text_encoder"],
  });
  const key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
  const m = await readModel(join(r2.dir, "text_encoder", "model.onnx"));
  const merged = await initializerFloat32(
    m.graph.initializers.find((i) => i.name === key)!,
    join(r2.dir, "text_encoder", "model.onnx"),
  );
  assertDelta(merged, (await baseWeights(sd2)).get(key)!, product(up, down), "v slice", 2 * 32 * 32);

  const inp = await makeTinyModel({ outDir: join(dir, "inp"), seed: 3, checkpointOnly: true, overrides: { inChannels: 9 } });
  const cu = t([32, 2, 1, 1]);
  const cd = t([2, 4, 3, 3]);
  await writeSafetensors(join(dir, "convin.safetensors"), {
    "lora_unet_conv_in.lora_up.weight": cu,
    "lora_unet_conv_in.lora_down.weight": cd,
  });
  const r3 = await importCheckpointWithLoras(inp.checkpointPath, [{ path: join(dir, "convin.safetensors"), unetWeight: 1 }], {
    cacheDir: join(dir, "cache5"),
    ...inp.hints,
    components: ["unet"],
  });
  const um = await readModel(join(r3.dir, "unet", "model.onnx"));
  const ck = `${U}input_blocks.0.0.weight`;
  const got = await initializerFloat32(
    um.graph.initializers.find((i) => i.name === ck)!,
    join(r3.dir, "unet", "model.onnx"),
  );
  const d = product(cu, cd); // [32, 4·3·3]
  const expected = new Float64Array(32 * 9 * 9);
  for (let o = 0; o < 32; o++) for (let j = 0; j < 36; j++) expected[o * 81 + j] = d[o * 36 + j]!;
  assertDelta(got, (await baseWeights(inp)).get(ck)!, expected, "conv_in padded");
});

test("fuzz: 1,200 corrupted LoRA files load or fail with ModelFileError, never crash", async () => {
  const f = await readSafetensors(tiny.checkpointPath);
  const shapes = new Map(f.keys().map((k) => [k, f.info(k).shape] as const));
  const arch = detectArchitecture(new SafetensorsWeights(f), tiny.hints);
  await f.close();
  const fr = new SeededRandom(99);
  const L = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1";
  const valid: Record<string, TensorToWrite> = {
    [`${L}_to_q.lora_up.weight`]: t([32, 4]),
    [`${L}_to_q.lora_down.weight`]: t([4, 32]),
    [`${L}_to_q.alpha`]: scalar(2),
    "lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight": t([64, 2, 1, 1]),
    "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight": t([2, 32, 1, 1]),
    "lora_unet_down_blocks_1_resnets_0_conv1.lora_mid.weight": t([2, 2, 3, 3]),
    [`${L}_to_v.hada_w1_a`]: t([32, 2]),
    [`${L}_to_v.hada_w1_b`]: t([2, 32]),
    [`${L}_to_v.hada_w2_a`]: t([32, 2]),
    [`${L}_to_v.hada_w2_b`]: t([2, 32]),
    [`${L}_to_k.lokr_w1`]: t([4, 2]),
    [`${L}_to_k.lokr_w2_a`]: t([8, 2]),
    [`${L}_to_k.lokr_w2_b`]: t([2, 16]),
    "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": t([32, 2]),
    "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": t([2, 64]),
  };
  const keys = Object.keys(valid);
  const dims = [0, 1, 2, 3, 4, 8, 9, 16, 32, 64];
  const p = join(dir, "fuzz.safetensors");
  let ok = 0;
  let rejected = 0;
  let mergedModules = 0;
  const started = Date.now();
  for (let i = 0; i < 1200; i++) {
    const tensors: Record<string, TensorToWrite> = { ...valid };
    for (let k = fr.int(3); k > 0; k--) {
      const key = keys[fr.int(keys.length)]!;
      const cur = tensors[key];
      if (!cur) continue;
      const what = fr.int(5);
      if (what === 0) delete tensors[key];
      else if (what === 1) {
        // Reshape: change, drop or add one dimension.
        const shape = [...cur.shape];
        const at = fr.int(shape.length + 1);
        if (fr.next() < 0.5 && shape.length > 0) shape.splice(Math.min(at, shape.length - 1), 1, dims[fr.int(dims.length)]!);
        else shape.splice(at, 0, dims[fr.int(4)]!);
        tensors[key] = t(shape);
      } else if (what === 2) {
        tensors[key] = { dtype: "I32", shape: cur.shape, data: new Int32Array(cur.data.byteLength / 4) };
      } else if (what === 3) {
        tensors[key] = { ...cur, data: Float32Array.from(cur.data as Float32Array, () => [NaN, Infinity, 0, -1e30][fr.int(4)]!) };
      } else {
        tensors[key.replace(/\.[^.]*$/, ".bogus")] = cur;
        delete tensors[key];
      }
    }
    writeFileSync(p, encodeSafetensors(tensors));
    try {
      const lora = await loadLora(p, arch, shapes);
      // Whatever loads must also merge.
      const merge = loraTransform([{ lora, unetWeight: 1, textWeight: 1 }]);
      for (const m of lora.modules) {
        const shape = shapes.get(m.target)!;
        const merged = await merge(m.target, new Float32Array(shape.reduce((a, b) => a * b, 1)), shape);
        assert.equal(
          merged.length,
          shape.reduce((a, b) => a * b, 1),
        );
        mergedModules++;
      }
      ok++;
    } catch (err) {
      assert.ok(err instanceof ModelFileError, `case ${i}: ${String(err)}`);
      rejected++;
    }
  }
  assert.ok(ok > 50 && rejected > 50, `ok ${ok}, rejected ${rejected}`);
  assert.ok(mergedModules > 1000, `only ${mergedModules} modules were merged`);
  assert.ok(Date.now() - started < 20_000);
});

test("a layer whose ΔW does not fit the layer it names (a LoRA made for another model) is skipped with a warning, as A1111 skips it", async () => {
  const f = await readSafetensors(tiny.checkpointPath);
  const shapes = new Map(f.keys().map((k) => [k, f.info(k).shape] as const));
  const arch = detectArchitecture(new SafetensorsWeights(f), tiny.hints);
  await f.close();
  const other: Record<string, TensorToWrite> = {
    // to_q is 32×32 here; this one was made for a 48-wide model.
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": t([48, 4]),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": t([4, 48]),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight": t([32, 4]),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight": t([4, 32]),
  };
  await writeSafetensors(join(dir, "other.safetensors"), other);
  const lora = await loadLora(join(dir, "other.safetensors"), arch, shapes);
  assert.deepEqual(
    lora.modules.map((m) => m.layer),
    ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"],
  );
  assert.equal(lora.warnings.length, 1);
  assert.match(lora.warnings[0]!, /attn1_to_q: delta of shape \[48,48\] does not fit .*attn1\.to_q\.weight \[32,32\]; layer skipped/);
  // Factors that do not fit each other are a broken file, not another model's layer.
  await writeSafetensors(join(dir, "broken.safetensors"), {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": t([32, 4]),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": t([8, 32]),
  });
  await assert.rejects(loadLora(join(dir, "broken.safetensors"), arch, shapes), (e: unknown) => e instanceof ModelFileError);
});
