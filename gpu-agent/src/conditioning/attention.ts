import { PromptSyntaxError } from "./errors.js";
import { parsePythonFloat } from "./python-float.js";
import { PY_WHITESPACE_CLASS } from "./text-cleanup.js";

/** A prompt fragment and its weight; `["BREAK", -1]` marks a forced chunk break. */
export type AttentionFragment = [text: string, weight: number];

const WS = `[${PY_WHITESPACE_CLASS}]`;
// Python's `\d` on str patterns is any Unicode decimal digit, hence \p{Nd}.
const ATTENTION_RE = new RegExp(
  [
    "\\\\\\(",
    "\\\\\\)",
    "\\\\\\[",
    "\\\\\\]",
    "\\\\\\\\",
    "\\\\",
    "\\(",
    "\\[",
    `:${WS}*([+-]?[.\\p{Nd}]+)${WS}*\\)`,
    "\\)",
    "\\]",
    "[^\\\\()\\[\\]:]+",
    ":",
  ].join("|"),
  "gu",
);
// Python's `\b` uses Unicode word characters (letters, numbers, "_"), not JS's ASCII ones.
const BREAK_RE = new RegExp(`${WS}*(?<![\\p{L}\\p{N}_])BREAK(?![\\p{L}\\p{N}_])${WS}*`, "u");
const BREAK_RE_GLOBAL = new RegExp(BREAK_RE.source, "gu");

const ROUND_MULTIPLIER = 1.1;
const SQUARE_MULTIPLIER = 1 / 1.1;

function parseWeight(literal: string): number {
  const value = parsePythonFloat(literal);
  if (value === undefined) throw new PromptSyntaxError(`emphasis weight "${literal}" is not a number`);
  return value;
}

/**
 * A1111's parse_prompt_attention: "(x)" ×1.1, "[x]" ÷1.1, "(x:w)" ×w, "\\(" literal, unbalanced
 * brackets closed at the end, BREAK as ["BREAK", -1], adjacent equal weights merged.
 * Throws PromptSyntaxError for "(x:1.2.3)"-style weights, which make A1111 raise too.
 */
export function parsePromptAttention(text: string): AttentionFragment[] {
  const res: AttentionFragment[] = [];
  const round: number[] = [];
  const square: number[] = [];
  const multiplyRange = (start: number, multiplier: number) => {
    for (let p = start; p < res.length; p++) res[p]![1] *= multiplier;
  };

  for (const m of text.matchAll(ATTENTION_RE)) {
    const token = m[0];
    const weight = m[1];
    if (token.startsWith("\\")) {
      res.push([token.slice(1), 1.0]);
    } else if (token === "(") {
      round.push(res.length);
    } else if (token === "[") {
      square.push(res.length);
    } else if (weight !== undefined && round.length > 0) {
      multiplyRange(round.pop()!, parseWeight(weight));
    } else if (token === ")" && round.length > 0) {
      multiplyRange(round.pop()!, ROUND_MULTIPLIER);
    } else if (token === "]" && square.length > 0) {
      multiplyRange(square.pop()!, SQUARE_MULTIPLIER);
    } else {
      const parts = BREAK_RE.test(token) ? token.split(BREAK_RE_GLOBAL) : [token];
      parts.forEach((part, i) => {
        if (i > 0) res.push(["BREAK", -1]);
        res.push([part, 1.0]);
      });
    }
  }
  for (const pos of round) multiplyRange(pos, ROUND_MULTIPLIER);
  for (const pos of square) multiplyRange(pos, SQUARE_MULTIPLIER);

  if (res.length === 0) return [["", 1.0]];
  let i = 0;
  while (i + 1 < res.length) {
    if (res[i]![1] === res[i + 1]![1]) {
      res[i]![0] += res[i + 1]![0];
      res.splice(i + 1, 1);
    } else {
      i++;
    }
  }
  return res;
}
