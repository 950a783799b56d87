import { parsePythonFloat } from "./python-float.js";
import { PY_WHITESPACE_CLASS } from "./text-cleanup.js";

/** One AND-separated part of a positive prompt and its composable-diffusion weight. */
export interface Subprompt {
  text: string;
  weight: number;
}

// Python's `\b` is a Unicode word boundary, so "ANDROID" or "éAND" are not split.
const AND_RE = /(?<![\p{L}\p{N}_])AND(?![\p{L}\p{N}_])/u;
const WS = `[${PY_WHITESPACE_CLASS}]`;
const WEIGHT_RE = new RegExp(`^([\\s\\S]*?)(?:${WS}*:${WS}*([-+]?(?:\\p{Nd}+\\.?|\\p{Nd}*\\.\\p{Nd}+)))?${WS}*$`, "u");

/**
 * A1111's composable-diffusion split (prompt_parser.get_multicond_prompt_list for one prompt):
 * `a cat :1.2 AND a dog:0.8` → [{text:"a cat", weight:1.2}, {text:" a dog", weight:0.8}].
 * Only positive prompts are split; the negative prompt keeps "AND" as text.
 */
export function parseComposablePrompt(prompt: string): Subprompt[] {
  return prompt.split(AND_RE).map((part) => {
    const m = WEIGHT_RE.exec(part);
    if (m === null) return { text: part, weight: 1.0 };
    const weight = m[2] === undefined ? 1.0 : parsePythonFloat(m[2]);
    return { text: m[1]!, weight: weight ?? 1.0 };
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
