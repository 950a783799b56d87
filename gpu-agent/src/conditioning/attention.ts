import { PromptSyntaxError } from "./errors.js";
import { parsePythonFloat } from "@latentfarm/shared";
import { PY_WHITESPACE_CLASS } from "./text-cleanup.js";

/** A prompt fragment and its weight; `["BREAK", -1]` marks a forced chunk break. */
export type AttentionFragment = [text: string, weight: number];

const WS = `[${PY_WHITESPACE_CLASS}]`;
// A1111's re_attention is an alternation tried in order at each position: the escapes \( \) \[ \]
// \\ and a lone \, then ( [, a weight closer ":<number>)", then ) ], a run of other text, and ":".
// Only the weight closer needs a regex; nextToken picks the rest by the first character, which
// gives the same tokens as running the whole alternation (and is several times faster).
// Python's `\d` on str patterns is any Unicode decimal digit, hence \p{Nd}.
const WEIGHT_CLOSER = new RegExp(`:${WS}*([+-]?[.\\p{Nd}]+)${WS}*\\)`, "yu");
const SPECIAL = /[\\()[\]:]/g;
const ESCAPED = "()[]\\";

/** End of the token at `i`, and the weight literal when it is a weight closer. */
function nextToken(text: string, i: number): { end: number; weight: string | undefined } {
  const c = text[i]!;
  if (c === "\\") return { end: i + 1 < text.length && ESCAPED.includes(text[i + 1]!) ? i + 2 : i + 1, weight: undefined };
  if (c === ":") {
    WEIGHT_CLOSER.lastIndex = i;
    const m = WEIGHT_CLOSER.exec(text);
    return m === null ? { end: i + 1, weight: undefined } : { end: WEIGHT_CLOSER.lastIndex, weight: m[1] };
  }
  if (c === "(" || c === "[" || c === ")" || c === "]") return { end: i + 1, weight: undefined };
  SPECIAL.lastIndex = i;
  return { end: SPECIAL.exec(text)?.index ?? text.length, weight: undefined };
}

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

  for (let i = 0; i < text.length;) {
    const { end, weight } = nextToken(text, i);
    const token = text.slice(i, end);
    i = end;
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
      const parts = token.includes("BREAK") && BREAK_RE.test(token) ? token.split(BREAK_RE_GLOBAL) : [token];
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
