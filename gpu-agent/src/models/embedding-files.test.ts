import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { silentLogger } from "@latentfarm/shared";
import { encodeSafetensors, f32ToF16 } from "../model-graph/index.js";
import {
  EmbeddingsFolder,
  bundledEmbeddingsOf,
  embeddingDatabase,
  readBundledEmbeddings,
  readEmbeddingFile,
  readEmbeddingsFolder,
} from "./embedding-files.js";
import { encodeTorchFile } from "../test-support/torch-writer.js";

const FIXTURES = join(import.meta.dirname, "..", "test-support", "embeddings");
const dir = mkdtempSync(join(tmpdir(), "lf-embeddings-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const value = (k: number) => (((k * 37) % 101) - 50) / 64;
const f32 = (shape: number[], first = 0) => ({
  dtype: "F32" as const,
  shape,
  data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, k) => value(first + k)),
});
/** An encoder that knows one word per character, enough to name embeddings. */
const letters = { encode: (text: string) => [...text].map((c) => c.charCodeAt(0)) };

test("each layout A1111 reads: its own .pt, the textual_inversion repository's, diffusers' .bin, emb_params .safetensors", async () => {
  const pt = await readEmbeddingFile(join(FIXTURES, "a1111-style.pt"));
  assert.deepEqual([pt.name, pt.vectors, pt.hidden], ["a1111-style", 2, 32]);
  assert.deepEqual(
    [...pt.data],
    Array.from({ length: 64 }, (_, k) => value(k)),
  );
  assert.equal(
    pt.sha256,
    createHash("sha256")
      .update(readFileSync(join(FIXTURES, "a1111-style.pt")))
      .digest("hex"),
  );

  const ldm = await readEmbeddingFile(join(FIXTURES, "ldm-style.pt"));
  assert.deepEqual([ldm.vectors, ldm.hidden], [3, 32]);
  assert.equal(ldm.data[0], value(1000));

  const concept = await readEmbeddingFile(join(FIXTURES, "concept.bin"));
  assert.deepEqual([concept.name, concept.vectors, concept.hidden], ["concept", 1, 32]);

  const st = join(dir, "neg-style.safetensors");
  writeFileSync(st, encodeSafetensors({ emb_params: f32([4, 32]) }));
  const safe = await readEmbeddingFile(st);
  assert.deepEqual([safe.name, safe.vectors, safe.hidden], ["neg-style", 4, 32]);
  // float16 files widen exactly.
  const half = join(dir, "half.safetensors");
  writeFileSync(half, encodeSafetensors({ emb_params: { dtype: "F16", shape: [1, 32], data: f32ToF16(f32([32]).data) } }));
  assert.deepEqual([...(await readEmbeddingFile(half)).data], [...f32([32]).data]);
});

test("an SDXL embedding: each vector is its clip_l part, then its clip_g part", async () => {
  const path = join(dir, "xl-style.safetensors");
  const l = f32([2, 3]);
  const g = f32([2, 5], 100);
  writeFileSync(path, encodeSafetensors({ clip_g: g, clip_l: l }));
  const e = await readEmbeddingFile(path);
  assert.deepEqual([e.name, e.vectors, e.hidden], ["xl-style", 2, 8]);
  assert.deepEqual([...e.data], [...l.data.subarray(0, 3), ...g.data.subarray(0, 5), ...l.data.subarray(3), ...g.data.subarray(5)]);
});

test("files that are not one embedding are INVALID_ARGUMENT naming the file and the reason", async () => {
  const bad = async (name: string, tensors: Parameters<typeof encodeSafetensors>[0], why: RegExp) => {
    const path = join(dir, name);
    writeFileSync(path, encodeSafetensors(tensors));
    await assert.rejects(readEmbeddingFile(path), (e: Error & { code?: number }) => {
      return e.code === status.INVALID_ARGUMENT && e.message.startsWith(path) && why.test(e.message);
    });
  };
  await bad("sdxl-mismatch.safetensors", { clip_l: f32([2, 8]), clip_g: f32([3, 12]) }, /2 clip_l vectors and 3 clip_g vectors/);
  await bad("two.safetensors", { a: f32([1, 32]), b: f32([1, 32]) }, /holds 2 tensors/);
  await bad("long.safetensors", { emb_params: f32([76, 32]) }, /76 vectors; a prompt chunk holds at most 75/);
  await bad("cube.safetensors", { emb_params: f32([1, 2, 32]) }, /not a vector or a matrix/);
  const nan = f32([1, 32]);
  nan.data[3] = Number.NaN;
  await bad("nan.safetensors", { emb_params: nan }, /NaN/);
  await assert.rejects(readEmbeddingFile(join(FIXTURES, "runs-a-command.pt")), /not a vector or a matrix/);
});

test("a folder: nested and linked files by stem, the model's width only, one file per name, unreadable ones reported", async () => {
  const root = join(dir, "folder");
  mkdirSync(join(root, "negative"), { recursive: true });
  copyFileSync(join(FIXTURES, "a1111-style.pt"), join(root, "a1111-style.pt"));
  copyFileSync(join(FIXTURES, "concept.bin"), join(root, "negative", "concept.bin"));
  symlinkSync(join(FIXTURES, "ldm-style.pt"), join(root, "linked.pt"));
  writeFileSync(join(root, "wide.safetensors"), encodeSafetensors({ emb_params: f32([1, 768]) }));
  writeFileSync(join(root, "broken.pt"), "not a zip");
  writeFileSync(join(root, "empty.pt"), "");
  writeFileSync(join(root, "notes.txt"), "ignored");
  mkdirSync(join(root, "again"));
  copyFileSync(join(FIXTURES, "concept.bin"), join(root, "again", "concept.bin"));

  const { embeddings, skipped } = await readEmbeddingsFolder(root, 32);
  assert.deepEqual(
    embeddings.map((e) => e.name),
    ["a1111-style", "concept", "linked"],
  );
  assert.deepEqual(
    skipped.map((s) => [s.file.slice(root.length + 1), s.reason.replace(root, "")]),
    [
      [
        "broken.pt",
        "/broken.pt: not a torch zip archive: files saved by torch before 1.6 (or not by torch.save) are not read; convert it to .safetensors",
      ],
      ["negative/concept.bin", `the name concept is already ${join(root, "again", "concept.bin")}'s`.replace(root, "")],
      ["wide.safetensors", "vectors of 768 values; this model's text encoder takes 32"],
    ],
  );
  assert.deepEqual(await readEmbeddingsFolder(join(dir, "missing"), 32), { embeddings: [], skipped: [] });
});

test("EmbeddingsFolder reads again only when the folder changed; a model's database takes its width", async () => {
  const root = join(dir, "live");
  mkdirSync(join(root, "sub"), { recursive: true });
  const folder = new EmbeddingsFolder(root, silentLogger);
  const first = await folder.current();
  assert.equal(first.embeddings.length, 0);
  assert.equal(await folder.current(), first, "unchanged: the same read");
  copyFileSync(join(FIXTURES, "concept.bin"), join(root, "sub", "concept.bin"));
  // mtimes can be coarse: move the subfolder's forward so the change shows.
  utimesSync(join(root, "sub"), new Date(), new Date(Date.now() + 5_000));
  // A name may be taken once per width: an SD2-wide "concept" beside the SD1 one.
  writeFileSync(join(root, "concept.safetensors"), encodeSafetensors({ emb_params: f32([1, 1024]) }));
  const second = await folder.current();
  assert.notEqual(second, first);
  assert.deepEqual(
    second.embeddings.map((e) => [e.name, e.hidden]),
    [
      ["concept", 1024],
      ["concept", 32],
    ],
  );
  const db = embeddingDatabase(second, letters, 32);
  assert.equal(db.findAt(letters.encode("a concept"), 2)?.embedding.hidden, 32);
  assert.equal(embeddingDatabase(second, letters, 768).size, 0);
});

test("embeddings bundled in a LoRA, read as A1111 1.7 reads bundle_emb keys: each layout, by name, without a hash", async () => {
  const lora = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
  const path = join(dir, "bundle.safetensors");
  writeFileSync(
    path,
    encodeSafetensors({
      [`${lora}.lora_up.weight`]: f32([32, 2]),
      [`${lora}.lora_down.weight`]: f32([2, 32]),
      // Two string_to_param entries: A1111 keeps the last, and prefers it to the embedding's other tensors.
      "bundle_emb.trig.string_to_param.old": f32([1, 32], 500),
      "bundle_emb.trig.string_to_param.*": f32([2, 32], 100),
      "bundle_emb.trig.extra": f32([3, 32], 900),
      "bundle_emb.solo.emb_params": f32([32], 200),
      "bundle_emb.xl.clip_l": f32([1, 4], 300),
      "bundle_emb.xl.clip_g": f32([1, 6], 400),
    }),
  );
  const read = await readBundledEmbeddings(path, "bundle");
  const byName = new Map(read.map((e) => [e.name, e]));
  assert.deepEqual([...byName.keys()].sort(), ["solo", "trig", "xl"]);
  const trig = byName.get("trig")!;
  assert.deepEqual([trig.vectors, trig.hidden, trig.sha256, trig.bundledIn], [2, 32, undefined, "bundle"]);
  assert.deepEqual([...trig.data], [...f32([2, 32], 100).data]);
  // A 1-D tensor is one vector; clip_l and clip_g are SDXL's, L's part first.
  assert.deepEqual([byName.get("solo")!.vectors, byName.get("solo")!.hidden], [1, 32]);
  const xl = byName.get("xl")!;
  assert.deepEqual([xl.vectors, xl.hidden], [1, 10]);
  assert.deepEqual([...xl.data], [...f32([1, 4], 300).data, ...f32([1, 6], 400).data]);

  // A torch .pt LoRA carries them under the same keys.
  const pt = join(dir, "bundle.pt");
  writeFileSync(pt, encodeTorchFile({ "bundle_emb.trig.string_to_param.*": { shape: [2, 32], data: f32([2, 32], 100).data } }));
  assert.deepEqual([...(await readBundledEmbeddings(pt, "bundle_pt"))[0]!.data], [...trig.data]);

  // A LoRA without a bundle has none; a bundle A1111 cannot read (two plain tensors, no tensor name) throws.
  const plain = join(dir, "plain.safetensors");
  writeFileSync(plain, encodeSafetensors({ [`${lora}.lora_up.weight`]: f32([32, 2]), [`${lora}.lora_down.weight`]: f32([2, 32]) }));
  assert.deepEqual(await readBundledEmbeddings(plain, "plain"), []);
  const two = join(dir, "two.safetensors");
  writeFileSync(two, encodeSafetensors({ "bundle_emb.t.a": f32([1, 32]), "bundle_emb.t.b": f32([1, 32]) }));
  await assert.rejects(readBundledEmbeddings(two, "two"), { code: status.INVALID_ARGUMENT, message: /holds 2 tensors/ });
  const bare = join(dir, "bare.safetensors");
  writeFileSync(bare, encodeSafetensors({ "bundle_emb.t": f32([1, 32]) }));
  await assert.rejects(readBundledEmbeddings(bare, "bare"), /names no embedding and tensor/);

  // Several LoRAs: the later one's embedding of a name replaces the earlier one's.
  const again = join(dir, "again.safetensors");
  writeFileSync(again, encodeSafetensors({ "bundle_emb.trig.emb_params": f32([1, 32], 700) }));
  const merged = await bundledEmbeddingsOf([
    { name: "bundle", path },
    { name: "again", path: again },
  ]);
  const last = merged.find((e) => e.name === "trig")!;
  assert.deepEqual([last.bundledIn, last.vectors], ["again", 1]);
  assert.equal(merged.filter((e) => e.name === "trig").length, 1);
});

test("a database with bundled embeddings: the folder's embedding of a name wins, other widths are left out", async () => {
  const folderDir = join(dir, "folder-vs-bundle");
  mkdirSync(folderDir);
  writeFileSync(join(folderDir, "trig.safetensors"), encodeSafetensors({ emb_params: f32([1, 32], 5) }));
  const read = await readEmbeddingsFolder(folderDir);
  const bundled = [
    { name: "trig", vectors: 1, hidden: 32, data: f32([1, 32], 6).data, bundledIn: "l" },
    { name: "only", vectors: 1, hidden: 32, data: f32([1, 32], 7).data, bundledIn: "l" },
    { name: "wide", vectors: 1, hidden: 768, data: f32([1, 768], 8).data, bundledIn: "l" },
  ];
  const db = embeddingDatabase(read, letters, 32, bundled);
  assert.deepEqual(db.embeddings.map((e) => [e.name, e.bundledIn]).sort(), [
    ["only", "l"],
    ["trig", undefined],
  ]);
  assert.ok(db.get("trig")!.sha256 !== undefined);
  // Without a folder: the bundle alone.
  assert.deepEqual(
    embeddingDatabase(undefined, letters, 32, bundled)
      .embeddings.map((e) => e.name)
      .sort(),
    ["only", "trig"],
  );
});
