import { parsePythonFloat } from "@latentfarm/shared";
import { PY_WHITESPACE_CLASS } from "./text-cleanup.js";

/** One AND-separated part of a positive prompt and its composable-diffusion weight. */
export interface Subprompt {
  text: string;
  weight: number;
}

// Python's `\b` is a Unicode word boundary, so "ANDROID" or "éAND" are not split.
const AND_RE = /(?<![\p{L}\p{N}_])AND(?![\p{L}\p{N}_])/u;
const WS = `[${PY_WHITESPACE_CLASS}]`;
// A1111 matches `^(.*?)(?:\s*:\s*(number))?\s*$` on each part. A number holds no ":", so a weight can
// only follow the last ":"; matching from there (and trimming the whitespace before it) gives the
// same split without running a lazy pattern over the whole prompt.
const WEIGHT_SUFFIX_RE = new RegExp(`^:${WS}*([-+]?(?:\\p{Nd}+\\.?|\\p{Nd}*\\.\\p{Nd}+))${WS}*$`, "u");
const IS_WS = new RegExp(`^${WS}$`);

function trimEndPythonWhitespace(text: string, end: number): string {
  while (end > 0 && IS_WS.test(text[end - 1]!)) end--;
  return text.slice(0, end);
}

/**
 * A1111's composable-diffusion split (prompt_parser.get_multicond_prompt_list for one prompt):
 * `a cat :1.2 AND a dog:0.8` → [{text:"a cat", weight:1.2}, {text:" a dog", weight:0.8}].
 * Only positive prompts are split; the negative prompt keeps "AND" as text.
 */
export function parseComposablePrompt(prompt: string): Subprompt[] {
  return prompt.split(AND_RE).map((part) => {
    const colon = part.lastIndexOf(":");
    const m = colon < 0 ? null : WEIGHT_SUFFIX_RE.exec(part.slice(colon));
    if (m === null) return { text: trimEndPythonWhitespace(part, part.length), weight: 1.0 };
    return { text: trimEndPythonWhitespace(part, colon), weight: parsePythonFloat(m[1]!) ?? 1.0 };
  });
}

export interface MulticondPromptList {
  /** Per prompt: (index into `texts`, weight) for each of its subprompts. */
  indexes: Array<Array<[index: number, weight: number]>>;
  /** Distinct subprompt texts of the whole batch, each encoded once. */
  texts: string[];
}

/** get_multicond_prompt_list over a batch of prompts. */
export function getMulticondPromptList(prompts: readonly string[]): MulticondPromptList {
  const texts: string[] = [];
  const indexOf = new Map<string, number>();
  const indexes = prompts.map((prompt) =>
    parseComposablePrompt(prompt).map(({ text, weight }): [number, number] => {
      let index = indexOf.get(text);
      if (index === undefined) {
        index = texts.length;
        texts.push(text);
        indexOf.set(text, index);
      }
      return [index, weight];
    }),
  );
  return { indexes, texts };
}
