import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { FarmError } from "@latentfarm/shared";
import { encodeSafetensors } from "../model-graph/index.js";
import { listLoras, loraMetadata, loraMetadataByName, recentLoras, resolveLoraFile } from "./lora-files.js";

function folder(files: Record<string, number>): string {
  const dir = mkdtempSync(join(tmpdir(), "lf-loras-"));
  for (const [path, size] of Object.entries(files)) {
    mkdirSync(join(dir, path, ".."), { recursive: true });
    writeFileSync(join(dir, path), Buffer.alloc(size));
  }
  return dir;
}

test("the LoRA folder: .safetensors files in it and its subfolders, by file name, with sizes", async () => {
  const dir = folder({
    "A.SafeTensors": 3,
    "b_style.safetensors": 10,
    "characters/hero.safetensors": 7,
    "characters/deep/villain.safetensors": 8,
    "notes.txt": 1,
    ".safetensors": 0,
    ".hidden/secret.safetensors": 5,
    "sub.safetensors/inside.safetensors": 2,
  });
  try {
    symlinkSync(join(dir, "b_style.safetensors"), join(dir, "linked.safetensors"));
    symlinkSync(join(dir, "gone"), join(dir, "dangling.safetensors"));
    const want = [
      { name: "A", sizeBytes: 3 },
      { name: "b_style", sizeBytes: 10 },
      { name: "hero", sizeBytes: 7 },
      { name: "inside", sizeBytes: 2 },
      { name: "linked", sizeBytes: 10 },
      { name: "villain", sizeBytes: 8 },
    ];
    assert.deepEqual(await listLoras(dir), want);
    assert.deepEqual(await listLoras(join(dir, "missing")), []);
    assert.deepEqual(await listLoras(undefined), []);
    // Heartbeats take a walk of the last few seconds: a file added since shows in the next fresh one.
    writeFileSync(join(dir, "c.safetensors"), "");
    assert.deepEqual(await listLoras(dir, 60_000), want, "not walked again within maxAgeMs");
    assert.deepEqual(await recentLoras(dir), want, "a heartbeat's listing, from the same walk");
    assert.ok((await listLoras(dir)).some((f) => f.name === "c"));
    // Tags name them by file name, wherever they are; with or without the extension, in any case.
    assert.equal(await resolveLoraFile(dir, "hero"), join(dir, "characters", "hero.safetensors"));
    assert.equal(await resolveLoraFile(dir, "Villain.safetensors"), join(dir, "characters", "deep", "villain.safetensors"));
    assert.equal(await resolveLoraFile(dir, "a"), join(dir, "A.SafeTensors"));
    // A file added since the last walk is found: a name the recent walk lacks is looked for afresh.
    writeFileSync(join(dir, "characters", "late.safetensors"), "");
    assert.equal(await resolveLoraFile(dir, "late"), join(dir, "characters", "late.safetensors"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a name in two folders is the file A1111 ends on: folders in natural order, later ones replacing earlier", async () => {
  // A1111 walks folders sorted by their paths' natural keys (digit runs by value, no case), and its
  // dict keeps the last file of a name: "set10" comes after "set9", and a subfolder after its parent.
  const dir = folder({
    "x.safetensors": 1,
    "set9/x.safetensors": 2,
    "set10/x.safetensors": 3,
    "Set2/y.safetensors": 4,
    "set1/y.safetensors": 5,
  });
  try {
    assert.equal(await resolveLoraFile(dir, "x"), join(dir, "set10", "x.safetensors"));
    assert.equal(await resolveLoraFile(dir, "y"), join(dir, "Set2", "y.safetensors"));
    assert.deepEqual(await listLoras(dir), [
      { name: "x", sizeBytes: 3 },
      { name: "y", sizeBytes: 4 },
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("LoRA names resolve only inside the folder: anything like a path is INVALID_ARGUMENT, an absent name NOT_FOUND", async () => {
  const dir = folder({ "Style.safetensors": 1 });
  try {
    for (const bad of ["../Style", "a/b", "/etc/passwd", "", "x\\y", "..", "a\u0000"]) {
      await assert.rejects(
        resolveLoraFile(dir, bad),
        (e: unknown) => e instanceof FarmError && e.code === status.INVALID_ARGUMENT && e.field === "lora",
        JSON.stringify(bad),
      );
    }
    await assert.rejects(
      resolveLoraFile(dir, "missing"),
      (e: unknown) => e instanceof FarmError && e.code === status.NOT_FOUND && /missing/.test(e.message),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("tags may name a LoRA by the name it was trained under (ss_output_name), unless another file took that name first", async () => {
  const dir = folder({});
  const lora = (path: string, trainedAs?: string): void => {
    mkdirSync(join(dir, path, ".."), { recursive: true });
    writeFileSync(join(dir, path), encodeSafetensors({}, trainedAs === undefined ? {} : { ss_output_name: trainedAs }));
  };
  try {
    // Renamed on download: the prompt shared with an image names it as it was trained.
    lora("detail_tweaker_v1.safetensors", "add_detail");
    // Its alias is its own name: nothing to add.
    lora("plain.safetensors", "plain");
    // "style" is a file's name first, so a later file trained as "style" does not take it.
    lora("a/style.safetensors");
    lora("b/ink_v2.safetensors", "style");
    // "none" is forbidden as an alias (A1111's seed).
    lora("c/blank.safetensors", "none");
    assert.equal(await resolveLoraFile(dir, "add_detail"), join(dir, "detail_tweaker_v1.safetensors"));
    // In another case too, as placement matches names and aliases.
    assert.equal(await resolveLoraFile(dir, "Add_Detail"), join(dir, "detail_tweaker_v1.safetensors"));
    assert.equal(await resolveLoraFile(dir, "detail_tweaker_v1"), join(dir, "detail_tweaker_v1.safetensors"));
    assert.equal(await resolveLoraFile(dir, "style"), join(dir, "a", "style.safetensors"));
    assert.equal(await resolveLoraFile(dir, "ink_v2"), join(dir, "b", "ink_v2.safetensors"));
    await assert.rejects(resolveLoraFile(dir, "none"), (e: unknown) => e instanceof FarmError && e.code === status.NOT_FOUND);
    const listed = await listLoras(dir);
    assert.deepEqual(
      listed.map((l) => [l.name, l.alias]),
      [
        ["blank", undefined],
        ["detail_tweaker_v1", "add_detail"],
        ["ink_v2", undefined],
        ["plain", undefined],
        ["style", undefined],
      ],
    );
    // A file rewritten with another alias is read again (the aliases are cached by size and mtime).
    writeFileSync(join(dir, "detail_tweaker_v1.safetensors"), encodeSafetensors({}, { ss_output_name: "more_detail_v2" }));
    assert.equal((await listLoras(dir)).find((l) => l.name === "detail_tweaker_v1")?.alias, "more_detail_v2");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("torch LoRAs (.pt, .ckpt) are listed and resolved like .safetensors ones; in one folder a .safetensors comes after a .pt of its name", async () => {
  const dir = folder({ "old.pt": 4, "older.ckpt": 6, "both.pt": 1, "both.safetensors": 2, "notes.pth": 1, ".pt": 1 });
  try {
    assert.deepEqual(await listLoras(dir), [
      { name: "both", sizeBytes: 2 },
      { name: "old", sizeBytes: 4 },
      { name: "older", sizeBytes: 6 },
    ]);
    assert.equal(await resolveLoraFile(dir, "old"), join(dir, "old.pt"));
    assert.equal(await resolveLoraFile(dir, "older.ckpt"), join(dir, "older.ckpt"));
    assert.equal(await resolveLoraFile(dir, "both"), join(dir, "both.safetensors"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("LoRA metadata as A1111's /sdapi/v1/loras gives it: JSON-looking values parsed, A1111's key order, none for torch files", async () => {
  const dir = mkdtempSync(join(tmpdir(), "lf-lora-meta-"));
  try {
    const tensors = { "lora_unet_x.lora_up.weight": { dtype: "F32" as const, shape: [1, 1], data: Float32Array.of(1) } };
    writeFileSync(
      join(dir, "styled.safetensors"),
      encodeSafetensors(tensors, {
        ss_network_dim: "2",
        ss_tag_frequency: '{"ink": {"lf": 3}}',
        modelspec_title: "{not json",
        ss_resolution: "(512, 512)",
        ss_sd_model_name: "v1-5-pruned.ckpt",
      }),
    );
    writeFileSync(join(dir, "plain.safetensors"), encodeSafetensors(tensors));
    writeFileSync(join(dir, "old.pt"), Uint8Array.of(1, 2, 3));
    const styled = await loraMetadata(join(dir, "styled.safetensors"));
    assert.deepEqual(styled, {
      ss_sd_model_name: "v1-5-pruned.ckpt",
      ss_resolution: "(512, 512)",
      ss_tag_frequency: { ink: { lf: 3 } },
      ss_network_dim: "2",
      modelspec_title: "{not json",
    });
    assert.deepEqual(Object.keys(styled), ["ss_sd_model_name", "ss_resolution", "ss_tag_frequency", "ss_network_dim", "modelspec_title"]);
    assert.deepEqual(await loraMetadata(join(dir, "old.pt")), {});
    // By the names the folder lists; a name it lacks is left out, and nothing outside it is read.
    const byName = await loraMetadataByName(dir, ["styled", "plain", "old", "gone", "../styled"]);
    assert.deepEqual([...byName.keys()].sort(), ["old", "plain", "styled"]);
    assert.deepEqual(byName.get("plain"), {});
    assert.equal((await loraMetadataByName(undefined, ["styled"])).size, 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
