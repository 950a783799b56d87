import assert from "node:assert/strict";
import { test } from "node:test";
import { parsePromptAttention } from "./attention.js";
import { PromptSyntaxError } from "./errors.js";

// Spec §1.2: A1111's doctests (A1–A6) and the additional verified vectors, copied from the spec table.
const VECTORS: Array<[string, Array<[string, number]>]> = [
  ["normal text", [["normal text", 1.0]]],
  [
    "an (important) word",
    [
      ["an ", 1.0],
      ["important", 1.1],
      [" word", 1.0],
    ],
  ],
  ["(unbalanced", [["unbalanced", 1.1]]],
  ["\\(literal\\]", [["(literal]", 1.0]]],
  ["(unnecessary)(parens)", [["unnecessaryparens", 1.1]]],
  [
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    [
      ["a ", 1.0],
      ["house", 1.5730000000000004],
      [" ", 1.1],
      ["on", 1.0],
      [" a ", 1.1],
      ["hill", 0.55],
      [", sun, ", 1.1],
      ["sky", 1.4641000000000006],
      [".", 1.1],
    ],
  ],
  ["(a:1.5)", [["a", 1.5]]],
  ["((a))", [["a", 1.2100000000000002]]],
  ["[[a]]", [["a", 0.8264462809917354]]],
  [
    "(a b:1.2) c",
    [
      ["a b", 1.2],
      [" c", 1.0],
    ],
  ],
  ["(a:-1)", [["a", -1.0]]],
  ["(a:1.2:1.3)", [["a:1.2", 1.3]]],
  ["(a:1e2)", [["a:1e2", 1.1]]],
  ["[a:1.5]", [["a:1.5", 0.9090909090909091]]],
  ["a: b", [["a: b", 1.0]]],
  [
    "a ( b",
    [
      ["a ", 1.0],
      [" b", 1.1],
    ],
  ],
  ["a ] b", [["a ] b", 1.0]]],
  [
    "(a [b] c)",
    [
      ["a ", 1.1],
      ["b", 1.0],
      [" c", 1.1],
    ],
  ],
  ["(a)(b:1.1)", [["ab", 1.1]]],
  [
    "a BREAK b",
    [
      ["a", 1.0],
      ["BREAK", -1],
      ["b", 1.0],
    ],
  ],
  [
    "a BREAK BREAK b",
    [
      ["a", 1.0],
      ["BREAK", -1],
      ["", 1.0],
      ["BREAK", -1],
      ["b", 1.0],
    ],
  ],
  [
    "BREAK a",
    [
      ["", 1.0],
      ["BREAK", -1],
      ["a", 1.0],
    ],
  ],
  [
    "(a BREAK b)",
    [
      ["a", 1.1],
      ["BREAK", -1.1],
      ["b", 1.1],
    ],
  ],
];

for (const [input, expected] of VECTORS) {
  test(`parse_prompt_attention ${JSON.stringify(input)}`, () => {
    assert.deepEqual(parsePromptAttention(input), expected);
  });
}

test("escapes, empty input, unmatched closers", () => {
  assert.deepEqual(parsePromptAttention(""), [["", 1.0]]);
  assert.deepEqual(parsePromptAttention("a\\b"), [["ab", 1.0]]);
  assert.deepEqual(parsePromptAttention("\\\\(x)"), [
    ["\\", 1.0],
    ["x", 1.1],
  ]);
  assert.deepEqual(parsePromptAttention("x:1.5)"), [["x:1.5)", 1.0]]);
  assert.deepEqual(parsePromptAttention("(x: 2 )"), [["x", 2]]);
  // A weight closer inside square brackets only closes a round bracket.
  assert.deepEqual(parsePromptAttention("[(x:2)]"), [["x", 2 / 1.1]]);
});

test("BREAK uses Unicode word boundaries like Python's re", () => {
  assert.deepEqual(parsePromptAttention("aBREAK b"), [["aBREAK b", 1.0]]);
  assert.deepEqual(parsePromptAttention("éBREAK b"), [["éBREAK b", 1.0]]);
  assert.deepEqual(parsePromptAttention("BREAKING news"), [["BREAKING news", 1.0]]);
  assert.deepEqual(parsePromptAttention("a,BREAK,b"), [
    ["a,", 1.0],
    ["BREAK", -1],
    [",b", 1.0],
  ]);
  assert.deepEqual(parsePromptAttention("a\u3000BREAK\nb"), [
    ["a", 1.0],
    ["BREAK", -1],
    ["b", 1.0],
  ]);
});

test("float64 weight products match Python", () => {
  // ((((a)))) = 1.1^4 computed by repeated multiplication, as Python does.
  assert.deepEqual(parsePromptAttention("((((a))))"), [["a", 1.1 * 1.1 * 1.1 * 1.1]]);
  assert.equal(parsePromptAttention("((((a))))")[0]![1], 1.4641000000000006);
  assert.deepEqual(parsePromptAttention("(a:١٫)"), [["a:١٫", 1.1]]);
  assert.deepEqual(parsePromptAttention("(a:١.٥)"), [["a", 1.5]]);
});

test("weights Python's float() rejects raise PromptSyntaxError", () => {
  assert.throws(() => parsePromptAttention("(a:1.2.3)"), PromptSyntaxError);
  assert.throws(() => parsePromptAttention("(a:.)"), /not a number/);
});

test("10,000 characters of nesting and brackets parse", () => {
  const deep = "(".repeat(5000) + "x" + ")".repeat(5000);
  const parsed = parsePromptAttention(deep);
  assert.equal(parsed.length, 1);
  assert.equal(parsed[0]![0], "x");
  let expected = 1;
  for (let i = 0; i < 5000; i++) expected *= 1.1;
  assert.equal(parsed[0]![1], expected);
  assert.deepEqual(parsePromptAttention("]".repeat(10_000)), [["]".repeat(10_000), 1.0]]);
});
