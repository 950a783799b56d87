// Seeded corpus of prompts for the tokenizer test. The texts avoid characters that ftfy rewrites
// (curly quotes, ligatures, full-width forms, C1/control characters, HTML entities), because the
// reference used to produce the expected ids (HF tokenizers' CLIP pipeline) normalizes with NFC only.
// ftfy's rewrites are covered by FTFY_CASES, each paired with the text ftfy turns it into.

export const CORPUS_SEED = 0x5eed_c11b;
export const CORPUS_SIZE = 160;

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = [
  "a",
  "photo",
  "of",
  "cat",
  "dog",
  "masterpiece",
  "best",
  "quality",
  "highly",
  "detailed",
  "portrait",
  "woman",
  "man",
  "sunset",
  "forest",
  "castle",
  "hill",
  "8k",
  "uhd",
  "RAW",
  "dslr",
  "bokeh",
  "cinematic",
  "lighting",
  "trending",
  "artstation",
  "octane",
  "render",
  "unreal",
  "engine",
  "by",
  "greg",
  "rutkowski",
  "alphonse",
  "mucha",
  "lowres",
  "bad",
  "anatomy",
  "hands",
  "text",
  "error",
  "missing",
  "fingers",
  "extra",
  "digit",
  "fewer",
  "digits",
  "cropped",
  "worst",
  "jpeg",
  "artifacts",
  "signature",
  "watermark",
  "username",
  "blurry",
  "Hyperrealistic",
  "fluffy",
  "RED",
  "Blue",
  "greenish",
  "cyberpunk",
  "steampunk",
  "anime",
  "girl",
  "boy",
  "1girl",
  "solo",
  "looking_at_viewer",
  "smile",
  "long-hair",
  "blue_eyes",
  "it's",
  "don't",
  "we'll",
  "they're",
  "I've",
  "I'm",
  "she'd",
  "DON'T",
  "O'Neil",
  "rock'n'roll",
  "e-mail",
  "x-ray",
  "f/1.8",
  "50mm",
  "3d",
  "2.5d",
  "v1.5",
  "1024x768",
  "16:9",
  "#hashtag",
  "@user",
  "naïve",
  "café",
  "über",
  "señor",
  "Ångström",
  "smörgåsbord",
  "façade",
  "jalapeño",
  "crème",
  "brûlée",
  "Москва",
  "кошка",
  "Ελλάδα",
  "γάτα",
  "東京",
  "猫",
  "かわいい",
  "カタカナ",
  "한국어",
  "고양이",
  "مرحبا",
  "שלום",
  "हिन्दी",
  "ไทย",
  "Việt",
  "İstanbul",
  "ΟΔΟΣ",
  "straße",
  "ǅ",
];

const EMOJI = ["😀", "🐱", "🔥", "✨", "❤️", "👍🏽", "👩‍💻", "🏳️‍🌈", "🇯🇵", "🤖", "🌸", "☕", "⭐", "🎨", "💯", "🦄"];

const PUNCT = [
  ",",
  ".",
  "!",
  "?",
  ";",
  ":",
  "...",
  "!!",
  "?!",
  ",,",
  "-",
  "--",
  "_",
  "/",
  "\\",
  "|",
  "(",
  ")",
  "[",
  "]",
  "{",
  "}",
  "<",
  ">",
  "*",
  "**",
  "+",
  "=",
  "~",
  "`",
  "^",
  "%",
  "$",
  "#",
  "@",
  "'",
  '"',
  "'s",
  ")(",
  "°",
  "©",
  "®",
  "™",
  "§",
  "¶",
  "•",
  "€",
  "£",
  "¥",
  "–",
  "—",
  "…",
  "«",
  "»",
  "×",
  "÷",
  "±",
];

const SPACES = [" ", " ", " ", " ", "  ", "   ", "\t", "\n", " \n ", "\t\t", "\u00a0", "\u2003", "\u3000", "\r\n"];

function pick<T>(rand: () => number, items: readonly T[]): T {
  return items[Math.floor(rand() * items.length)]!;
}

function randomLetters(rand: () => number): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
  const n = 2 + Math.floor(rand() * 12);
  let s = "";
  for (let i = 0; i < n; i++) s += alphabet[Math.floor(rand() * alphabet.length)];
  return s;
}

function randomNumber(rand: () => number): string {
  const forms = [
    () => String(Math.floor(rand() * 10)),
    () => String(Math.floor(rand() * 100000)),
    () => (rand() * 10).toFixed(1 + Math.floor(rand() * 3)),
    () => `${Math.floor(rand() * 2000)}s`,
    () => `${Math.floor(rand() * 9) + 1}:${Math.floor(rand() * 9) + 1}`,
  ];
  return pick(rand, forms)();
}

function randomPiece(rand: () => number): string {
  const r = rand();
  if (r < 0.55) return pick(rand, WORDS);
  if (r < 0.65) return randomLetters(rand);
  if (r < 0.75) return randomNumber(rand);
  if (r < 0.85) return pick(rand, EMOJI);
  if (r < 0.9) return "e\u0301" + randomLetters(rand); // decomposed accent, NFC composes it
  return pick(rand, PUNCT);
}

/** The seeded prompts, deterministic for a given seed and size. */
export function generateTokenizerCorpus(seed = CORPUS_SEED, size = CORPUS_SIZE): string[] {
  const rand = mulberry32(seed);
  const out: string[] = [];
  for (let i = 0; i < size; i++) {
    const pieces = 1 + Math.floor(rand() * 30);
    let text = rand() < 0.1 ? pick(rand, SPACES) : "";
    for (let p = 0; p < pieces; p++) {
      text += randomPiece(rand);
      const glue = rand();
      if (glue < 0.55) text += " ";
      else if (glue < 0.75) text += ", ";
      else if (glue < 0.85) text += pick(rand, SPACES);
      else if (glue < 0.92) text += pick(rand, PUNCT);
      // else: no separator, so pieces run together into one pre-token
    }
    out.push(text);
  }
  return out;
}

/** Texts ftfy changes, and what it changes each into (derived from ftfy's fix tables by hand). */
export const FTFY_CASES: ReadonlyArray<{ text: string; equivalent: string; why: string }> = [
  { text: "\u201cquoted\u201d and \u2018single\u2019", equivalent: "\"quoted\" and 'single'", why: "uncurl_quotes" },
  { text: "it\u2019s a dog\u2019s life", equivalent: "it's a dog's life", why: "uncurl_quotes then 's split" },
  { text: "\u201ebottom\u201f \u201aquote\u201b", equivalent: "\"bottom\" 'quote'", why: "uncurl_quotes U+201A-201F" },
  { text: "\ufb01ne \ufb02ower \ufb03x \ufb06", equivalent: "fine flower ffix st", why: "fix_latin_ligatures" },
  { text: "\uff26\uff35\uff2c\uff2c\u3000\uff57\uff49\uff44\uff54\uff48", equivalent: "FULL width", why: "fix_character_width" },
  {
    text: "\uff08\uff43\uff41\uff54\uff1a\uff11\uff0e\uff12\uff09\uff0c\u6708",
    equivalent: "(cat:1.2),\u6708",
    why: "full-width punctuation",
  },
  { text: "\uff76\uff80\uff76\uff85", equivalent: "\u30ab\u30bf\u30ab\u30ca", why: "half-width katakana" },
  { text: "R&amp;B &lt;3 &quot;x&quot;", equivalent: 'R&B <3 "x"', why: "unescape_html" },
  { text: "&#8217;s &#x1F600; &#65;", equivalent: "'s \u{1F600} A", why: "numeric character references" },
  { text: "<b> &amp; </b>", equivalent: "<b> &amp; </b>", why: "no unescaping in a line with <" },
  { text: "a &amp;amp; b", equivalent: "a & b", why: "ftfy repeats until nothing changes" },
  { text: "&bogus; &amp", equivalent: "&bogus; &amp", why: "unknown entity / no semicolon stay" },
  { text: "tab\u0000null\u0007bell\u007fdel", equivalent: "tabnullbelldel", why: "remove_control_chars" },
  { text: "\ufeffbom start", equivalent: "bom start", why: "BOM removed" },
  { text: "\u001b[31mred\u001b[0m text", equivalent: "red text", why: "remove_terminal_escapes" },
  { text: "\u0093smart\u0094 \u0080100", equivalent: '"smart" \u20ac100', why: "fix_c1_controls then uncurl" },
  { text: "dots\u0085more", equivalent: "dots\u2026more", why: "C1 NEL is cp1252 ellipsis" },
  { text: "zero\u200bwidth \u2066iso\u2069", equivalent: "zero\u200bwidth \u2066iso\u2069", why: "kept: not in ftfy's control list" },
  { text: "line\u2028sep\u2029para", equivalent: "line sep para", why: "line breaks become whitespace" },
  { text: "\ud800lone", equivalent: "\ufffdlone", why: "fix_surrogates" },
  { text: "\u02bcokina", equivalent: "'okina", why: "U+02BC uncurled" },
  { text: "\uffe5100 \uffe1 \uffe0", equivalent: "\u00a5100 \u00a3 \u00a2", why: "full-width currency signs" },
  { text: "CAF\u0045\u0301 <|endoftext|> x", equivalent: "caf\u00e9 <|endoftext|> x", why: "special token in text" },
];
