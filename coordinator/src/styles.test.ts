import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { FarmError, GenerationParamsSchema, silentLogger } from "@latentfarm/shared";
import { applyStyles, mergePrompts, parseStylesCsv, StyleLibrary, type PromptStyle } from "./styles.js";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "lf-styles-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

test("merge_prompts: {prompt} is replaced everywhere it occurs; otherwise the stripped texts join with ', ', empty ones left out", () => {
  assert.equal(mergePrompts("masterpiece, {prompt}, 8k", "a cat"), "masterpiece, a cat, 8k");
  assert.equal(mergePrompts("{prompt} and {prompt}", " a cat "), " a cat  and  a cat ");
  assert.equal(mergePrompts(" film grain ", " a cat  "), "a cat, film grain");
  assert.equal(mergePrompts("film grain", ""), "film grain");
  // An empty style (a style with only a negative prompt) still strips the prompt, as A1111's does.
  assert.equal(mergePrompts("", "  a cat "), "a cat");
  assert.equal(mergePrompts("", ""), "");
});

test("A1111's styles.csv: a BOM, quoted commas and newlines, the old 'text' column, comment rows, short rows", () => {
  const csv =
    "\ufeffname,prompt,negative_prompt\n" +
    '"Cinematic","cinematic still of {prompt}, bokeh","cartoon, ""anime"""\n' +
    '"#Disabled","x","y"\n' +
    '"Two lines","line one\nline two",\n' +
    "Short,just a prompt\n";
  assert.deepEqual(parseStylesCsv(csv, "styles.csv"), [
    { name: "Cinematic", prompt: "cinematic still of {prompt}, bokeh", negativePrompt: 'cartoon, "anime"' },
    { name: "Two lines", prompt: "line one\nline two", negativePrompt: "" },
    { name: "Short", prompt: "just a prompt", negativePrompt: "" },
  ]);
  assert.deepEqual(parseStylesCsv("name,text\nOld,old style\n", "old.csv"), [{ name: "Old", prompt: "old style", negativePrompt: "" }]);
  assert.throws(() => parseStylesCsv('name,prompt\n"unterminated,x\n', "bad.csv"), /bad\.csv is not valid CSV/);
  assert.throws(() => parseStylesCsv("title,prompt\nx,y\n", "bad.csv"), /no "name" column/);
});

test("a job's styles merge in order into its prompts and set Hires.fix prompts; an unknown name is NOT_FOUND naming styles[i]", () => {
  const library = new Map<string, PromptStyle>([
    ["Cinematic", { name: "Cinematic", prompt: "cinematic still of {prompt}", negativePrompt: "cartoon" }],
    ["Grain", { name: "Grain", prompt: "film grain", negativePrompt: "" }],
  ]);
  const p = create(GenerationParamsSchema, {
    prompt: " a cat ",
    negativePrompt: "blurry",
    hrPrompt: "a cat, detailed",
    styles: ["Cinematic", "Grain"],
  });
  applyStyles(p, library);
  assert.equal(p.prompt, "cinematic still of  a cat, film grain");
  assert.equal(p.negativePrompt, "blurry, cartoon");
  assert.equal(p.hrPrompt, "cinematic still of a cat, detailed, film grain");
  // An empty hires prompt stays empty: the second pass takes the merged prompt, as A1111's does.
  assert.equal(p.hrNegativePrompt, "");
  assert.deepEqual(p.styles, []);
  const unknown = create(GenerationParamsSchema, { prompt: "x", styles: ["Grain", "Noir"] });
  assert.throws(
    () => applyStyles(unknown, library),
    (err: unknown) =>
      err instanceof FarmError && err.code === 5 && err.field === "styles[1]" && err.message.includes("known: Cinematic, Grain"),
  );
});

test("the style library reads its files in order and again when one changes; a later file's row replaces a name in place", async () => {
  const a = join(dir, "a.csv");
  const b = join(dir, "b.csv");
  writeFileSync(a, "name,prompt,negative_prompt\nOne,first,\nTwo,second,\n");
  writeFileSync(b, "name,prompt,negative_prompt\nOne,replaced,neg\nThree,third,\n");
  const lib = new StyleLibrary([a, b, join(dir, "missing.csv")], silentLogger, 0);
  const styles = await lib.current();
  assert.deepEqual(
    [...styles.values()].map((s) => [s.name, s.prompt]),
    [
      ["One", "replaced"],
      ["Two", "second"],
      ["Three", "third"],
    ],
  );
  writeFileSync(b, "name,prompt,negative_prompt\nFour,fourth,\n");
  utimesSync(b, new Date(), new Date(Date.now() + 5_000));
  assert.deepEqual([...(await lib.current()).keys()], ["One", "Two", "Four"]);
  assert.equal((await lib.current()).get("One")?.prompt, "first");
});
