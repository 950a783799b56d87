import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FarmError } from "@latentfarm/shared";
import { listVaes, resolveVae, VaeList, type VaeFile } from "./vae-files.js";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "lf-vae-list-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const touch = (path: string, bytes = 4): void => {
  mkdirSync(join(path, ".."), { recursive: true });
  writeFileSync(path, Buffer.alloc(bytes, 1));
};

test("the VAE list: *.vae.* under the models folder, every VAE file under the VAE folder, by A1111's patterns", async () => {
  const models = join(dir, "list", "models");
  const vae = join(dir, "list", "VAE");
  touch(join(models, "anime.safetensors"), 64); // a checkpoint, not a VAE
  touch(join(models, "anime.vae.pt"));
  touch(join(models, "sub", "real.vae.safetensors"));
  touch(join(models, "other.vae.ckpt"));
  touch(join(vae, "vae-ft-mse-840000-ema-pruned.safetensors"), 10);
  touch(join(vae, "nested", "kl-f8-anime2.ckpt"));
  touch(join(vae, "orangemix.vae.pt"));
  touch(join(vae, "notes.txt"));
  touch(join(vae, ".hidden.safetensors"));
  writeFileSync(join(vae, "empty.safetensors"), "");
  // A name in both folders keeps its first place and the VAE folder's file, as A1111's dict does.
  touch(join(vae, "anime.vae.pt"), 7);
  symlinkSync(join(vae, "nested"), join(vae, "linked"));
  const files = await listVaes({ modelsDir: models, vaeDir: vae });
  assert.deepEqual(
    files.map((f) => f.name),
    [
      "other.vae.ckpt",
      "anime.vae.pt",
      "real.vae.safetensors",
      "kl-f8-anime2.ckpt",
      "orangemix.vae.pt",
      "vae-ft-mse-840000-ema-pruned.safetensors",
    ],
  );
  const anime = files.find((f) => f.name === "anime.vae.pt")!;
  assert.equal(anime.path, join(vae, "anime.vae.pt"));
  assert.equal(anime.sizeBytes, 7);
  // Without a VAE folder, only the models folder's *.vae.* files.
  assert.deepEqual(
    (await listVaes({ modelsDir: models })).map((f) => f.name),
    ["other.vae.ckpt", "anime.vae.pt", "real.vae.safetensors"],
  );
  assert.deepEqual(await listVaes({ modelsDir: join(dir, "no-such-folder") }), []);
});

test("resolveVae: a named file wins, None keeps the checkpoint's VAE, Automatic takes the first file starting with the checkpoint's name", () => {
  const files: VaeFile[] = [
    { name: "sd15.vae.pt", path: "/m/sd15.vae.pt" },
    { name: "vae-ft-mse.safetensors", path: "/v/vae-ft-mse.safetensors" },
    { name: "sd15-anime.safetensors", path: "/v/sd15-anime.safetensors" },
  ];
  assert.deepEqual(resolveVae("vae-ft-mse.safetensors", "sd15", files), { file: files[1], source: "setting" });
  assert.deepEqual(resolveVae("None", "sd15", files), { file: undefined, source: "checkpoint" });
  for (const automatic of ["", "Automatic", "auto"]) {
    assert.deepEqual(resolveVae(automatic, "sd15", files), { file: files[0], source: "near checkpoint" });
    assert.deepEqual(resolveVae(automatic, "dreamshaper_8", files), { file: undefined, source: "checkpoint" });
  }
  // The checkpoint's user metadata ("vae" in its .json) comes before a VAE near it, for Automatic only; a
  // name the list lacks is passed over, "None" keeps the checkpoint's own.
  assert.deepEqual(resolveVae("Automatic", "sd15", files, "vae-ft-mse.safetensors"), { file: files[1], source: "user metadata" });
  assert.deepEqual(resolveVae("Automatic", "sd15", files, "None"), { file: undefined, source: "user metadata" });
  assert.deepEqual(resolveVae("Automatic", "sd15", files, "gone.pt"), { file: files[0], source: "near checkpoint" });
  assert.deepEqual(resolveVae("Automatic", "sd15", files, "Automatic"), { file: files[0], source: "near checkpoint" });
  assert.deepEqual(resolveVae("sd15-anime.safetensors", "sd15", files, "vae-ft-mse.safetensors").file, files[2]);
  assert.deepEqual(resolveVae("None", "sd15", files, "vae-ft-mse.safetensors").file, undefined);
  // A1111 matches by prefix, so "sd1" takes sd15's VAE too.
  assert.equal(resolveVae("Automatic", "sd1", files).file?.name, "sd15.vae.pt");
  assert.throws(
    () => resolveVae("vae-ft-mse-840000-ema-pruned.safetensors", "sd15", files),
    (err: unknown) =>
      err instanceof FarmError &&
      err.code === 5 &&
      err.field === "override_settings.sd_vae" &&
      err.message.includes("known: sd15.vae.pt, vae-ft-mse.safetensors, sd15-anime.safetensors"),
  );
});

test("A1111's --vae-path: one file decodes for every checkpoint whatever sd_vae says, and is listed", async () => {
  const models = join(dir, "forced", "models");
  const forced = join(dir, "forced", "elsewhere", "house.vae.pt");
  touch(join(models, "m.vae.safetensors"));
  touch(forced, 9);
  const list = new VaeList({ modelsDir: models, forced }, 0);
  for (const setting of ["", "Automatic", "None", "m.vae.safetensors", "not-listed.pt"]) {
    assert.deepEqual(await list.resolve(setting, "m"), { file: { name: "house.vae.pt", path: forced }, source: "forced" }, setting);
  }
  assert.deepEqual(
    (await list.current()).map((f) => [f.name, f.sizeBytes]),
    [
      ["m.vae.safetensors", 4],
      ["house.vae.pt", 9],
    ],
  );
});

test("VaeList reads the folders again when a task names a file it has not seen", async () => {
  const models = join(dir, "fresh", "models");
  mkdirSync(models, { recursive: true });
  const list = new VaeList({ modelsDir: models }, 60_000);
  assert.deepEqual(await list.current(), []);
  touch(join(models, "new.vae.safetensors"));
  // Within its age the list is kept; a name it lacks makes it look again.
  assert.deepEqual(await list.current(), []);
  assert.equal((await list.resolve("new.vae.safetensors", "x")).file?.name, "new.vae.safetensors");
  assert.equal((await list.current()).length, 1);
  // Automatic reads the checkpoint's user metadata (<models>/<name>.json, beside the farm's architecture hints).
  writeFileSync(join(models, "x.json"), JSON.stringify({ unetHeads: 4, vae: "new.vae.safetensors" }));
  assert.deepEqual(await list.resolve("Automatic", "x"), { file: (await list.current())[0], source: "user metadata" });
  writeFileSync(join(models, "x.json"), "{ not json");
  assert.deepEqual(await list.resolve("", "x"), { file: undefined, source: "checkpoint" });
});
