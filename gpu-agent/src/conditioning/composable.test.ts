import assert from "node:assert/strict";
import { test } from "node:test";
import { getMulticondPromptList, parseComposablePrompt } from "./composable.js";
import { PromptSyntaxError } from "./errors.js";
import { extractExtraNetworks, extractExtraNetworksBatch } from "@latentfarm/shared";

test("§1.6 AND split with weights (spec vectors)", () => {
  assert.deepEqual(parseComposablePrompt("a cat :1.2 AND a dog:0.8"), [
    { text: "a cat", weight: 1.2 },
    { text: " a dog", weight: 0.8 },
  ]);
  assert.deepEqual(parseComposablePrompt("cat AND dog : -0.5"), [
    { text: "cat", weight: 1.0 },
    { text: " dog", weight: -0.5 },
  ]);
});

test("AND needs word boundaries; weights need a number; trailing whitespace is dropped", () => {
  assert.deepEqual(parseComposablePrompt("ANDROID and ANDY"), [{ text: "ANDROID and ANDY", weight: 1 }]);
  assert.deepEqual(parseComposablePrompt("éAND x"), [{ text: "éAND x", weight: 1 }]);
  assert.deepEqual(parseComposablePrompt("a AND"), [
    { text: "a", weight: 1 },
    { text: "", weight: 1 },
  ]);
  assert.deepEqual(parseComposablePrompt("(x:1.2):.5 \n"), [{ text: "(x:1.2)", weight: 0.5 }]);
  assert.deepEqual(parseComposablePrompt("x:1.2.3"), [{ text: "x:1.2.3", weight: 1 }]);
  assert.deepEqual(parseComposablePrompt("x :2."), [{ text: "x", weight: 2 }]);
  assert.deepEqual(parseComposablePrompt(""), [{ text: "", weight: 1 }]);
});

test("get_multicond_prompt_list dedupes subprompt texts across a batch", () => {
  const list = getMulticondPromptList(["cat AND dog:0.5", "dog AND cat"]);
  assert.deepEqual(list.texts, ["cat", " dog", "dog", " cat"]);
  assert.deepEqual(list.indexes, [
    [
      [0, 1],
      [1, 0.5],
    ],
    [
      [2, 1],
      [3, 1],
    ],
  ]);
});

test("§1.7 LoRA tags (spec examples) and text removal", () => {
  assert.deepEqual(extractExtraNetworks("<lora:x:0.8>").networks, [{ kind: "lora", name: "x", teWeight: 0.8, unetWeight: 0.8 }]);
  assert.deepEqual(extractExtraNetworks("<lora:x:0.8:0.5>").networks, [{ kind: "lora", name: "x", teWeight: 0.8, unetWeight: 0.5 }]);
  assert.deepEqual(extractExtraNetworks("<lora:x:unet=0.3>").networks, [{ kind: "lora", name: "x", teWeight: 1.0, unetWeight: 0.3 }]);
  assert.deepEqual(extractExtraNetworks("<lyco:y:te=0.2:dyn=4>").networks, [
    { kind: "lora", name: "y", teWeight: 0.2, unetWeight: 0.2, dynDim: 4 },
  ]);
  assert.equal(extractExtraNetworks("a cat, <lora:x:1>, sky").text, "a cat, , sky");
  const unknown = extractExtraNetworks("a <hypernet:h:0.5> <foo:bar> b");
  assert.equal(unknown.text, "a   b");
  assert.deepEqual(unknown.unknown, [
    { kind: "hypernet", args: ["h", "0.5"], raw: "<hypernet:h:0.5>" },
    { kind: "foo", args: ["bar"], raw: "<foo:bar>" },
  ]);
  assert.equal(extractExtraNetworks("<no args> <:x> <a-b:c>").text, "<no args> <:x> <a-b:c>");
  assert.deepEqual(extractExtraNetworks("<lora:a=b=c:0.5>").networks[0]!.name, "a=b=c");
});

test("malformed LoRA tags fail clearly", () => {
  assert.throws(() => extractExtraNetworks("<lora:te=0.5>"), PromptSyntaxError);
  assert.throws(() => extractExtraNetworks("<lora:x:abc>"), /not a number/);
  assert.throws(() => extractExtraNetworks("<lora:x:1:1:1.5>"), /dyn/);
});

test("only the first prompt of a batch decides the networks", () => {
  const batch = extractExtraNetworksBatch(["a <lora:x:1>", "b <lora:y:1>"]);
  assert.deepEqual(batch.texts, ["a ", "b "]);
  assert.deepEqual(
    batch.networks.map((n) => n.name),
    ["x"],
  );
});
