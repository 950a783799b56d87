import assert from "node:assert/strict";
import { test } from "node:test";
import { benchConditioningDetailed, benchPrompt } from "./bench.js";
import { ClipTokenizer } from "./clip-tokenizer.js";
import { getPromptSchedule } from "./schedule.js";
import { kitFixture, kitSkip } from "../test-support/kit.js";

const TOKENIZER_DIR = kitFixture("tiny-sd15", "tokenizer");
const skip = kitSkip("tiny-sd15", "tokenizer");

test("bench prompt is ~300 tokens with edits; the bench times cold and cached conditioning", { skip }, async (t) => {
  const tok = await ClipTokenizer.fromDirectory(TOKENIZER_DIR);
  assert.ok(getPromptSchedule(benchPrompt(0), 20).length > 2);
  const r = await benchConditioningDetailed(tok, { iterations: 20 });
  t.diagnostic(JSON.stringify(r));
  assert.ok(r.promptTokens >= 280 && r.promptTokens <= 340, `prompt has ${r.promptTokens} tokens`);
  // The cached timing is of a cache hit, not of another encode.
  assert.equal(r.cachedEncodeCalls, 0);
  // Timing targets belong to tests/bench (`npm run bench -- conditioning`), not to a test.
  assert.ok(Number.isFinite(r.prepareMs) && r.prepareMs > 0, `prepare timed as ${r.prepareMs} ms`);
});
