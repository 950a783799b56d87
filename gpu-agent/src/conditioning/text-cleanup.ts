// The text preparation HF's slow CLIPTokenizer applies before BPE (A1111 uses that class, with ftfy
// installed): ftfy.fix_text with its default configuration, then whitespace collapsing, strip and
// lower-casing. ftfy's mojibake repair (`fix_encoding`) is not reproduced: it needs ftfy's badness
// heuristics and only changes text that looks like UTF-8 decoded as a single-byte code page.

import { PY_WHITESPACE_CLASS } from "@latentfarm/shared";

export { PY_WHITESPACE_CLASS };

const PY_WHITESPACE_RUN = new RegExp(`[${PY_WHITESPACE_CLASS}]+`, "g");

// Printable ASCII plus tab/newline, and no "&": none of ftfy's fixes can change such text.
const ASCII_CLEAN = /^[\x20-\x25\x27-\x7e\t\n]*$/;

// sloppy-windows-1252: bytes 0x80–0x9f that cp1252 defines; the five undefined ones map to themselves.
const CP1252_C1: Record<number, number> = {
  0x80: 0x20ac,
  0x82: 0x201a,
  0x83: 0x0192,
  0x84: 0x201e,
  0x85: 0x2026,
  0x86: 0x2020,
  0x87: 0x2021,
  0x88: 0x02c6,
  0x89: 0x2030,
  0x8a: 0x0160,
  0x8b: 0x2039,
  0x8c: 0x0152,
  0x8e: 0x017d,
  0x91: 0x2018,
  0x92: 0x2019,
  0x93: 0x201c,
  0x94: 0x201d,
  0x95: 0x2022,
  0x96: 0x2013,
  0x97: 0x2014,
  0x98: 0x02dc,
  0x99: 0x2122,
  0x9a: 0x0161,
  0x9b: 0x203a,
  0x9c: 0x0153,
  0x9e: 0x017e,
  0x9f: 0x0178,
};

const LIGATURES: Record<string, string> = {
  "\u0132": "IJ",
  "\u0133": "ij",
  "\ufb00": "ff",
  "\ufb01": "fi",
  "\ufb02": "fl",
  "\ufb03": "ffi",
  "\ufb04": "ffl",
  "\ufb05": "\u017ft",
  "\ufb06": "st",
};

// ftfy builds its width map from NFKC of U+FF01..U+FFEF plus U+3000 → space; so do we.
const WIDTH_MAP: Map<number, string> = (() => {
  const map = new Map<number, string>([[0x3000, " "]]);
  for (let cp = 0xff01; cp < 0xfff0; cp++) {
    const ch = String.fromCodePoint(cp);
    const alt = ch.normalize("NFKC");
    if (alt !== ch) map.set(cp, alt);
  }
  return map;
})();

// A subset of the HTML5 named references (the ones ftfy decodes that plausibly occur in prompts).
const HTML_ENTITIES: Record<string, string> = {
  amp: "&",
  AMP: "&",
  lt: "<",
  LT: "<",
  gt: ">",
  GT: ">",
  quot: '"',
  QUOT: '"',
  apos: "'",
  nbsp: "\u00a0",
  NBSP: "\u00a0",
  copy: "\u00a9",
  COPY: "\u00a9",
  reg: "\u00ae",
  REG: "\u00ae",
  trade: "\u2122",
  TRADE: "\u2122",
  hellip: "\u2026",
  mdash: "\u2014",
  ndash: "\u2013",
  lsquo: "\u2018",
  rsquo: "\u2019",
  ldquo: "\u201c",
  rdquo: "\u201d",
  laquo: "\u00ab",
  raquo: "\u00bb",
  deg: "\u00b0",
  times: "\u00d7",
  divide: "\u00f7",
  middot: "\u00b7",
  bull: "\u2022",
  euro: "\u20ac",
  pound: "\u00a3",
  yen: "\u00a5",
  cent: "\u00a2",
  sect: "\u00a7",
  para: "\u00b6",
  plusmn: "\u00b1",
  frac12: "\u00bd",
  frac14: "\u00bc",
  frac34: "\u00be",
  sup2: "\u00b2",
  sup3: "\u00b3",
  micro: "\u00b5",
  hearts: "\u2665",
  eacute: "\u00e9",
  Eacute: "\u00c9",
  EACUTE: "\u00c9",
  egrave: "\u00e8",
  agrave: "\u00e0",
  aacute: "\u00e1",
  iacute: "\u00ed",
  oacute: "\u00f3",
  uacute: "\u00fa",
  ntilde: "\u00f1",
  Ntilde: "\u00d1",
  NTILDE: "\u00d1",
  uuml: "\u00fc",
  ouml: "\u00f6",
  auml: "\u00e4",
  Uuml: "\u00dc",
  Ouml: "\u00d6",
  Auml: "\u00c4",
  szlig: "\u00df",
  ccedil: "\u00e7",
  Ccedil: "\u00c7",
};

const HTML_ENTITY_RE = /&#?[0-9A-Za-z]{1,24};/g;

function isInvalidCodepoint(cp: number): boolean {
  return (
    (cp >= 0x1 && cp <= 0x8) ||
    cp === 0xb ||
    (cp >= 0xe && cp <= 0x1f) ||
    (cp >= 0x7f && cp <= 0x9f) ||
    (cp >= 0xfdd0 && cp <= 0xfdef) ||
    (cp & 0xfffe) === 0xfffe
  );
}

// Python's html.unescape for one numeric character reference, ending in ";".
function unescapeCharRef(ref: string): string {
  const hex = ref[2] === "x" || ref[2] === "X";
  const digits = ref.slice(hex ? 3 : 2, -1);
  if (!(hex ? /^[0-9a-fA-F]+$/ : /^[0-9]+$/).test(digits)) return ref;
  const cp = parseInt(digits, hex ? 16 : 10);
  if (cp === 0) return "\ufffd";
  if (cp === 0x0d) return "\r";
  const c1 = CP1252_C1[cp];
  if (c1 !== undefined) return String.fromCodePoint(c1);
  if (cp >= 0x80 && cp <= 0x9f) return String.fromCodePoint(cp);
  if ((cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) return "\ufffd";
  if (isInvalidCodepoint(cp)) return "";
  return String.fromCodePoint(cp);
}

function unescapeHtml(text: string): string {
  if (!text.includes("&")) return text;
  return text.replace(HTML_ENTITY_RE, (m) => {
    if (m[1] === "#") return unescapeCharRef(m);
    return HTML_ENTITIES[m.slice(1, -1)] ?? m;
  });
}

function mapChars(text: string, fn: (cp: number, ch: string) => string | undefined): string {
  let out = "";
  let changed = false;
  for (const ch of text) {
    const cp = ch.codePointAt(0)!;
    const rep = fn(cp, ch);
    if (rep === undefined) out += ch;
    else {
      out += rep;
      changed = true;
    }
  }
  return changed ? out : text;
}

function isControlToRemove(cp: number): boolean {
  return (
    cp <= 0x08 ||
    cp === 0x0b ||
    (cp >= 0x0e && cp <= 0x1f) ||
    cp === 0x7f ||
    (cp >= 0x206a && cp <= 0x206f) ||
    cp === 0xfeff ||
    (cp >= 0xfff9 && cp <= 0xfffc) ||
    (cp >= 0x1d173 && cp <= 0x1d17a) ||
    (cp >= 0xe0000 && cp <= 0xe007f)
  );
}

// ESC is the point: A1111's cleanup strips terminal escape sequences from prompts.
// eslint-disable-next-line no-control-regex
const TERMINAL_ESCAPE_RE = /\x1b\[((?:\p{Nd}|;)*)([a-zA-Z])/gu;
const LONE_SURROGATE_RE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

function fixSegmentOnce(text: string, unescape: boolean): string {
  if (unescape) text = unescapeHtml(text);
  text = mapChars(text, (cp) => {
    const c1 = cp >= 0x80 && cp <= 0x9f ? CP1252_C1[cp] : undefined;
    return c1 === undefined ? undefined : String.fromCodePoint(c1);
  });
  text = mapChars(text, (_cp, ch) => LIGATURES[ch]);
  text = mapChars(text, (cp) => WIDTH_MAP.get(cp));
  text = mapChars(text, (cp) => {
    if (cp === 0x02bc || (cp >= 0x2018 && cp <= 0x201b)) return "'";
    if (cp >= 0x201c && cp <= 0x201f) return '"';
    return undefined;
  });
  text = text
    .replace(/\r\n/g, "\n")
    .replace(/\r/g, "\n")
    .replace(/\u2028/g, "\n")
    .replace(/\u2029/g, "\n")
    .replace(/\u0085/g, "\n");
  text = text.replace(LONE_SURROGATE_RE, "\ufffd");
  text = text.replace(TERMINAL_ESCAPE_RE, "");
  text = mapChars(text, (cp) => (isControlToRemove(cp) ? "" : undefined));
  return text.normalize("NFC");
}

/** ftfy.fix_text with default settings, minus mojibake repair (see the file comment). */
export function fixText(text: string): string {
  if (ASCII_CLEAN.test(text)) return text;
  let out = "";
  let unescape = true;
  let pos = 0;
  // ftfy fixes one line at a time; once a line contains "<", HTML entities are left alone from then on.
  while (pos < text.length) {
    const nl = text.indexOf("\n", pos);
    const end = nl === -1 ? text.length : nl + 1;
    let segment = text.slice(pos, end);
    if (unescape && segment.includes("<")) unescape = false;
    for (;;) {
      const next = fixSegmentOnce(segment, unescape);
      if (next === segment) break;
      segment = next;
    }
    out += segment;
    pos = end;
  }
  return out;
}

/** `whitespace_clean(fix_text(text)).lower()` as CLIPTokenizer._tokenize does it. */
export function cleanText(text: string): string {
  return fixText(text).replace(PY_WHITESPACE_RUN, " ").trim().toLowerCase();
}
