import assert from "node:assert/strict";
import { test } from "node:test";
import { getLearnedConditioningPromptSchedules, scheduledTextAt, scheduleIndexAt, scheduleSteps, type ScheduleEntry } from "./schedule.js";

const first = (p: string, base: number, hires?: number, old = false) => getLearnedConditioningPromptSchedules([p], base, hires, old)[0];

const alternating = (texts: string[], steps: number): ScheduleEntry[] =>
  Array.from({ length: steps }, (_, i): ScheduleEntry => [i + 1, texts[i % texts.length]!]);

// Spec §1.4 doctest vectors S1–S16 (S10 see below).
const DOCTESTS: Array<[string, number, number | undefined, ScheduleEntry[]]> = [
  ["test", 10, undefined, [[10, "test"]]],
  [
    "a [b:3]",
    10,
    undefined,
    [
      [3, "a "],
      [10, "a b"],
    ],
  ],
  [
    "a [b: 3]",
    10,
    undefined,
    [
      [3, "a "],
      [10, "a b"],
    ],
  ],
  [
    "a [[[b]]:2]",
    10,
    undefined,
    [
      [2, "a "],
      [10, "a [[b]]"],
    ],
  ],
  [
    "[(a:2):3]",
    10,
    undefined,
    [
      [3, ""],
      [10, "(a:2)"],
    ],
  ],
  [
    "a [b : c : 1] d",
    10,
    undefined,
    [
      [1, "a b  d"],
      [10, "a  c  d"],
    ],
  ],
  [
    "a[b:[c:d:2]:1]e",
    10,
    undefined,
    [
      [1, "abe"],
      [2, "ace"],
      [10, "ade"],
    ],
  ],
  ["a [unbalanced", 10, undefined, [[10, "a [unbalanced"]]],
  [
    "a [b:.5] c",
    10,
    undefined,
    [
      [5, "a  c"],
      [10, "a b c"],
    ],
  ],
  [
    "((a][:b:c [d:3]",
    10,
    undefined,
    [
      [3, "((a][:b:c "],
      [10, "((a][:b:c d"],
    ],
  ],
  ["[a|(b:1.1)]", 10, undefined, alternating(["a", "(b:1.1)"], 10)],
  ["[fe|]male", 10, undefined, alternating(["female", "male"], 10)],
  ["[fe|||]male", 10, undefined, alternating(["female", "male", "male", "male"], 10)],
  ["a [b:.5] c", 10, 10, [[10, "a b c"]]],
  [
    "a [b:1.5] c",
    10,
    10,
    [
      [5, "a  c"],
      [10, "a b c"],
    ],
  ],
];

for (const [prompt, base, hires, expected] of DOCTESTS) {
  test(`schedule ${JSON.stringify(prompt)} base=${base} hires=${hires ?? "-"}`, () => {
    assert.deepEqual(first(prompt, base, hires), expected);
  });
}

test("S10: a prompt lark cannot parse is used unchanged", () => {
  // A1111's doctest shows [[5,'a  c'],[10,'a {b|d{ c']] with the pinned lark 1.1.2 and is marked
  // "not handling this right now"; the grammar itself rejects the text (lark 1.3.1 does too).
  assert.deepEqual(first("a [{b|d{:.5] c", 10), [[10, "a [{b|d{:.5] c"]]);
});

// Spec §1.4 additional verified vectors.
const ADDITIONAL: Array<[string, number, number | undefined, boolean, ScheduleEntry[]]> = [
  [
    "a [b:c:0.25] d",
    10,
    undefined,
    false,
    [
      [2, "a b d"],
      [10, "a c d"],
    ],
  ],
  ["a [b:c:1.0] d", 10, undefined, false, [[10, "a b d"]]],
  [
    "a [b:c:1] d",
    10,
    undefined,
    false,
    [
      [1, "a b d"],
      [10, "a c d"],
    ],
  ],
  ["a [b:c:0] d", 10, undefined, false, [[10, "a c d"]]],
  ["a [b:c:-1] d", 10, undefined, false, [[10, "a c d"]]],
  ["a [b:c:15] d", 10, undefined, false, [[10, "a b d"]]],
  ["[a|b|c]", 10, undefined, false, alternating(["a", "b", "c"], 10)],
  [
    "[cat:dog:0.75]",
    10,
    undefined,
    false,
    [
      [7, "cat"],
      [10, "dog"],
    ],
  ],
  ["a [b:c:0.25] d", 10, 20, false, [[20, "a c d"]]],
  ["a [b:c:5] d", 10, 20, false, [[20, "a c d"]]],
  [
    "a [b:c:12] d",
    10,
    20,
    false,
    [
      [2, "a b d"],
      [20, "a c d"],
    ],
  ],
  [
    "a [b:c:1.5] d",
    10,
    20,
    false,
    [
      [10, "a b d"],
      [20, "a c d"],
    ],
  ],
  [
    "a [b:c:1.5] d",
    10,
    20,
    true,
    [
      [1, "a b d"],
      [10, "a c d"],
    ],
  ],
];

for (const [prompt, base, hires, old, expected] of ADDITIONAL) {
  test(`schedule ${JSON.stringify(prompt)} base=${base} hires=${hires ?? "-"} old=${old}`, () => {
    assert.deepEqual(first(prompt, base, hires, old), expected);
  });
}

test("prompt_parser.py header example, 100 steps", () => {
  const p =
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]" +
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]";
  assert.deepEqual(first(p, 100), [
    [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
    [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
    [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
    [75, "fantasy landscape with a lake and an oak in background masterful"],
    [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
  ]);
});

test("number forms: exponent without '.' is a step, sign, trailing dot, whitespace", () => {
  assert.deepEqual(first("[a:b:1e0]", 10), [
    [1, "a"],
    [10, "b"],
  ]);
  assert.deepEqual(first("[a:b:+2]", 10), [
    [2, "a"],
    [10, "b"],
  ]);
  assert.deepEqual(first("[a:b:3.]", 10), [[10, "a"]]);
  assert.deepEqual(first("[a:b:\u3000.3\t]", 10), [
    [3, "a"],
    [10, "b"],
  ]);
  assert.deepEqual(first("[a:b:1e999]", 10), [[10, "a"]]);
  assert.deepEqual(first("[a:b:-1e999]", 10), [[10, "b"]]);
});

test("text the grammar rejects passes through unchanged", () => {
  for (const p of ["[a:b:NaN]", "a | b", "[a:b:3] | c", "trailing \\", "[a:b:1x]", "x\\\ny [a:2]"]) {
    assert.deepEqual(first(p, 10), [[10, p]], p);
  }
  // Stray brackets are fine and the edit still applies.
  assert.deepEqual(first("a) [b:2]", 10), [
    [2, "a) "],
    [10, "a) b"],
  ]);
  // The lexer only offers the longest run of stray brackets, so ")[" swallows the "[".
  assert.deepEqual(first("a)[b:2]", 10), [[10, "a)[b:2]"]]);
  assert.deepEqual(first("[[a:b:3]", 10), [[10, "[[a:b:3]"]]);
});

test("escapes, emphasis and empty parts inside edits", () => {
  assert.deepEqual(first("\\[a:b:2\\]", 10), [[10, "\\[a:b:2\\]"]]);
  assert.deepEqual(first("[\\(x\\):y:2]", 10), [
    [2, "\\(x\\)"],
    [10, "y"],
  ]);
  assert.deepEqual(first("[(a:1.2):[b|c]:2]", 4), [
    [1, "(a:1.2)"],
    [2, "(a:1.2)"],
    [3, "b"],
    [4, "c"],
  ]);
  assert.deepEqual(first("[::3]x", 10), [
    [3, "x"],
    [10, "x"],
  ]);
  assert.deepEqual(first("[|]", 3), [
    [1, ""],
    [2, ""],
    [3, ""],
  ]);
  assert.deepEqual(first("", 10), [[10, ""]]);
});

test("identical prompts share one schedule", () => {
  const [a, b, c] = getLearnedConditioningPromptSchedules(["x [y:2]", "z", "x [y:2]"], 10);
  assert.equal(a, c);
  assert.notEqual(a, b);
});

test("§1.5: a [b:3] at 10 steps uses 'a ' for calls 0–3; [a|b] gives a, a, b, a, b", () => {
  const s = first("a [b:3]", 10)!;
  assert.deepEqual(
    [0, 1, 2, 3, 4, 9, 10].map((k) => scheduledTextAt(s, k)),
    ["a ", "a ", "a ", "a ", "a b", "a b", "a b"],
  );
  const alt = first("[a|b]", 10)!;
  assert.deepEqual(
    [0, 1, 2, 3, 4].map((k) => scheduledTextAt(alt, k)),
    ["a", "a", "b", "a", "b"],
  );
  // Past the last entry A1111's reconstruct_cond_batch falls back to entry 0.
  assert.equal(scheduleIndexAt(s, 11), 0);
  assert.equal(scheduledTextAt(s, 11), "a ");
});

test("Heun-like samplers build schedules with doubled steps", () => {
  assert.equal(scheduleSteps(20, true), 40);
  assert.equal(scheduleSteps(20, false), 20);
  // [a:b:0.5] with Heun at 10 steps switches after model call 10 of ~20, i.e. halfway.
  assert.deepEqual(first("[a:b:0.5]", scheduleSteps(10, true)), [
    [10, "a"],
    [20, "b"],
  ]);
});

test("10,000-character and deeply nested prompts do not throw", () => {
  const long = "a [b:c:0.5] (d:1.2) [e|f] ".repeat(400);
  const t0 = performance.now();
  const s = first(long, 20)!;
  assert.ok(performance.now() - t0 < 2000);
  assert.equal(s.length, 20);
  const deep = "[".repeat(5000) + "x" + "]".repeat(5000);
  assert.deepEqual(first(deep, 10), [[10, deep]]);
  const unbalanced = "[ ".repeat(5000);
  assert.deepEqual(first(unbalanced, 10), [[10, unbalanced]]);
  assert.deepEqual(first("(".repeat(300) + "[a:b:2]" + ")".repeat(300), 10), [[10, "(".repeat(300) + "[a:b:2]" + ")".repeat(300)]]);
});
