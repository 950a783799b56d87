/** Characters for which Python's `str.isspace()` is true; `re`'s `\s` and `str.strip()` use this set. */
export const PY_WHITESPACE_CLASS = "\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

const PY_FLOAT_RE = /^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)$/i;
const ASCII_DECIMAL = /^[+-]?(?:\d+\.?\d*|\.\d+)$/;
const EDGE_WS = new RegExp(`^[${PY_WHITESPACE_CLASS}]+|[${PY_WHITESPACE_CLASS}]+$`, "g");

/** Python's float(str) for the forms prompts use; undefined where Python raises ValueError. */
export function parsePythonFloat(literal: string): number | undefined {
  // Most weights are plain ASCII like "1.2": Number() reads those exactly as Python's float() does.
  if (ASCII_DECIMAL.test(literal)) return Number(literal);
  let s = literal.replace(EDGE_WS, "");
  // Python accepts any Unicode decimal digit and single underscores between digits.
  s = s.replace(/\p{Nd}/gu, (d) => String(unicodeDigitValue(d)));
  if (/(^|[^0-9])_|_($|[^0-9])/.test(s)) return undefined;
  s = s.replaceAll("_", "");
  if (!PY_FLOAT_RE.test(s)) return undefined;
  const lower = s.toLowerCase();
  if (lower.endsWith("nan")) return NaN;
  if (lower.endsWith("inf") || lower.endsWith("infinity")) return s.startsWith("-") ? -Infinity : Infinity;
  return Number(s);
}

/** Python's int(str); undefined where Python raises ValueError. */
export function parsePythonInt(literal: string): number | undefined {
  let s = literal.replace(EDGE_WS, "");
  s = s.replace(/\p{Nd}/gu, (d) => String(unicodeDigitValue(d)));
  if (!/^[+-]?\d+(?:_\d+)*$/.test(s)) return undefined;
  return Number(s.replaceAll("_", ""));
}

/** Value of a Unicode decimal digit: digits come in runs of ten starting at zero (some runs adjoin). */
export function unicodeDigitValue(ch: string): number {
  const cp = ch.codePointAt(0)!;
  if (cp >= 0x30 && cp <= 0x39) return cp - 0x30;
  let start = cp;
  while (/\p{Nd}/u.test(String.fromCodePoint(start - 1))) start--;
  return (cp - start) % 10;
}
