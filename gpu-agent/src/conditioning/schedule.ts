import { PY_WHITESPACE_CLASS } from "./text-cleanup.js";

/** `[end_at_step, text]`: `text` is used while the denoiser call counter is ≤ end_at_step. */
export type ScheduleEntry = [endAtStep: number, text: string];

// Parse tree of A1111's prompt-editing grammar (modules/prompt_parser.py, lark Earley with the
// dynamic lexer). Emphasis, plain text, whitespace and stray brackets all render verbatim, so they
// are kept as strings.
type Node = string | ScheduledNode | AlternateNode;
interface ScheduledNode {
  kind: "scheduled";
  before: Node[] | null;
  after: Node[];
  /** The NUMBER token as written: "0.5" (a fraction of the run) differs from "1" (a step). */
  number: string;
}
interface AlternateNode {
  kind: "alternate";
  options: Node[][];
}

interface Parsed {
  nodes: Node[];
  end: number;
}

const STRAY = "[]():";
const NOT_PLAIN = "\\[]():|";
const WS_RUN = new RegExp(`[${PY_WHITESPACE_CLASS}]+`, "y");
// lark's SIGNED_NUMBER: FLOAT (INT _EXP | DECIMAL _EXP?) is tried before INT, and only the first
// alternative that matches is taken (Python `re`, not longest-match).
const SIGNED_NUMBER = /[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)/y;
// Deeper nesting than this makes A1111's tree transformer exceed Python's recursion limit; we treat
// it as unparseable instead of failing.
const MAX_NESTING = 256;

class NestingTooDeep extends Error {}

class ScheduleParser {
  private readonly memo = new Map<number, Parsed | null>();

  constructor(private readonly s: string) {}

  /** `start: (prompt | /[][():]/+)*`; null when the text is not in the language. */
  parseStart(): Node[] | null {
    const { s } = this;
    const nodes: Node[] = [];
    let i = 0;
    while (i < s.length) {
      const c = s[i]!;
      if (c === "[" || c === "(") {
        // Where both parse, lark resolves to the structured reading (doctests S2, S11).
        const item = this.parseItem(i, 0);
        if (item !== null) {
          nodes.push(...item.nodes);
          i = item.end;
          continue;
        }
      }
      if (STRAY.includes(c)) {
        // The dynamic lexer only offers the longest run of bracket characters.
        let j = i;
        while (j < s.length && STRAY.includes(s[j]!)) j++;
        nodes.push(s.slice(i, j));
        i = j;
        continue;
      }
      const plain = this.parsePlain(i);
      if (plain === i) return null; // "|" outside an alternation, or a backslash with nothing to escape
      nodes.push(s.slice(i, plain));
      i = plain;
    }
    return nodes;
  }

  /** End of the longest `plain` run at i: `([^\\\[\]():|]|\\.)+` (`.` excludes "\n"). */
  private parsePlain(i: number): number {
    const { s } = this;
    let j = i;
    while (j < s.length) {
      const c = s[j]!;
      if (c === "\\") {
        if (j + 1 < s.length && s[j + 1] !== "\n") {
          j += s.codePointAt(j + 1)! > 0xffff ? 3 : 2;
          continue;
        }
        break;
      }
      if (NOT_PLAIN.includes(c)) break;
      j++;
    }
    return j;
  }

  /** `prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*` — always succeeds. */
  private parsePrompt(i: number, depth: number): Parsed {
    const { s } = this;
    const nodes: Node[] = [];
    while (i < s.length) {
      const c = s[i]!;
      if (c === "(" || c === "[") {
        const item = this.parseItem(i, depth);
        if (item === null) break;
        nodes.push(...item.nodes);
        i = item.end;
        continue;
      }
      const plain = this.parsePlain(i);
      if (plain === i) break;
      nodes.push(s.slice(i, plain));
      i = plain;
    }
    return { nodes, end: i };
  }

  private parseItem(i: number, depth: number): Parsed | null {
    const cached = this.memo.get(i);
    if (cached !== undefined) return cached;
    if (depth >= MAX_NESTING) throw new NestingTooDeep();
    const result = this.s[i] === "(" ? this.parseRound(i, depth + 1) : this.parseSquare(i, depth + 1);
    this.memo.set(i, result);
    return result;
  }

  /** `"(" prompt ")" | "(" prompt ":" prompt ")"`, rendered verbatim. */
  private parseRound(i: number, depth: number): Parsed | null {
    const { s } = this;
    const first = this.parsePrompt(i + 1, depth);
    if (s[first.end] === ")") return { nodes: ["(", ...first.nodes, ")"], end: first.end + 1 };
    if (s[first.end] !== ":") return null;
    const second = this.parsePrompt(first.end + 1, depth);
    if (s[second.end] !== ")") return null;
    return { nodes: ["(", ...first.nodes, ":", ...second.nodes, ")"], end: second.end + 1 };
  }

  /** `"[" prompt "]"`, alternate `"[" prompt ("|" [prompt])+ "]"`, or scheduled. */
  private parseSquare(i: number, depth: number): Parsed | null {
    const { s } = this;
    const first = this.parsePrompt(i + 1, depth);
    const next = s[first.end];
    if (next === "]") return { nodes: ["[", ...first.nodes, "]"], end: first.end + 1 };
    if (next === "|") {
      const options: Node[][] = [first.nodes];
      let j = first.end;
      while (s[j] === "|") {
        const option = this.parsePrompt(j + 1, depth);
        options.push(option.nodes);
        j = option.end;
      }
      if (s[j] !== "]") return null;
      return { nodes: [{ kind: "alternate", options }], end: j + 1 };
    }
    if (next !== ":") return null;
    // `"[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"`: the two readings exclude
    // each other, so try "[to:when]" first and then "[from:to:when]".
    const short = this.parseWhen(first.end + 1);
    if (short !== null) {
      return { nodes: [{ kind: "scheduled", before: null, after: first.nodes, number: short.number }], end: short.end };
    }
    const second = this.parsePrompt(first.end + 1, depth);
    if (s[second.end] !== ":") return null;
    const long = this.parseWhen(second.end + 1);
    if (long === null) return null;
    return {
      nodes: [{ kind: "scheduled", before: first.nodes, after: second.nodes, number: long.number }],
      end: long.end,
    };
  }

  /** `[WHITESPACE] NUMBER [WHITESPACE] "]"` at i. */
  private parseWhen(i: number): { number: string; end: number } | null {
    const { s } = this;
    i = skip(WS_RUN, s, i);
    SIGNED_NUMBER.lastIndex = i;
    const m = SIGNED_NUMBER.exec(s);
    if (m === null) return null;
    i = skip(WS_RUN, s, i + m[0].length);
    if (s[i] !== "]") return null;
    return { number: m[0], end: i + 1 };
  }
}

function skip(re: RegExp, s: string, i: number): number {
  re.lastIndex = i;
  const m = re.exec(s);
  return m === null ? i : i + m[0].length;
}

function parseSchedule(prompt: string): Node[] | null {
  try {
    return new ScheduleParser(prompt).parseStart();
  } catch (err) {
    if (err instanceof NestingTooDeep || err instanceof RangeError) return null;
    throw err;
  }
}

export interface ScheduleOptions {
  /** Steps of the hires pass; switches to hires offsets (float `when` in (1,2], int `when` > base). */
  hiresSteps?: number;
  /** A1111's "Old prompt editing timelines": v < 1 is a fraction, else a step; hires ignored. */
  useOldScheduling?: boolean;
}

/**
 * The schedule of one prompt: sorted `[end_at_step, text]` pairs. A prompt the grammar rejects is
 * used unchanged for the whole run.
 */
export function getPromptSchedule(prompt: string, baseSteps: number, opts: ScheduleOptions = {}): ScheduleEntry[] {
  const useHires = opts.hiresSteps !== undefined && !opts.useOldScheduling;
  const steps = useHires ? opts.hiresSteps! : baseSteps;
  const intOffset = useHires ? baseSteps : 0;
  const floatOffset = useHires ? 1.0 : 0;

  const tree = parseSchedule(prompt);
  if (tree === null) return [[steps, prompt]];

  const whenOf = new Map<ScheduledNode, number>();
  const boundaries = new Set<number>([steps]);
  const collect = (nodes: readonly Node[]) => {
    for (const node of nodes) {
      if (typeof node === "string") continue;
      if (node.kind === "alternate") {
        for (let t = 1; t <= steps; t++) boundaries.add(t);
        node.options.forEach(collect);
        continue;
      }
      let v = Number(node.number);
      if (opts.useOldScheduling) v = v < 1 ? v * steps : v;
      else v = node.number.includes(".") ? (v - floatOffset) * steps : v - intOffset;
      // Python's int() raises on ±inf ("1e999"); we clamp instead: +inf → whole run, -inf → never.
      const when = Number.isFinite(v) ? Math.min(steps, Math.trunc(v)) : v > 0 ? steps : 0;
      whenOf.set(node, when);
      if (when >= 1) boundaries.add(when);
      if (node.before !== null) collect(node.before);
      collect(node.after);
    }
  };
  collect(tree);

  const render = (nodes: readonly Node[], step: number): string => {
    let out = "";
    for (const node of nodes) {
      if (typeof node === "string") out += node;
      else if (node.kind === "alternate") {
        out += render(node.options[(step - 1) % node.options.length]!, step);
      } else if (step <= whenOf.get(node)!) {
        if (node.before !== null) out += render(node.before, step);
      } else {
        out += render(node.after, step);
      }
    }
    return out;
  };
  return [...boundaries].sort((a, b) => a - b).map((t): ScheduleEntry => [t, render(tree, t)]);
}

/** A1111's get_learned_conditioning_prompt_schedules: one schedule per prompt. */
export function getLearnedConditioningPromptSchedules(
  prompts: readonly string[],
  baseSteps: number,
  hiresSteps?: number,
  useOldScheduling = false,
): ScheduleEntry[][] {
  const byPrompt = new Map<string, ScheduleEntry[]>();
  const opts: ScheduleOptions = { useOldScheduling, ...(hiresSteps === undefined ? {} : { hiresSteps }) };
  return prompts.map((prompt) => {
    let schedule = byPrompt.get(prompt);
    if (schedule === undefined) {
      schedule = getPromptSchedule(prompt, baseSteps, opts);
      byPrompt.set(prompt, schedule);
    }
    return schedule;
  });
}

/**
 * Index of the schedule entry in force at denoiser call `step` (0-based, counted per model call):
 * the first entry with `step <= end_at_step`; past the last entry A1111 falls back to entry 0.
 */
export function scheduleIndexAt(schedule: ReadonlyArray<readonly [number, unknown]>, step: number): number {
  for (let i = 0; i < schedule.length; i++) {
    if (step <= schedule[i]![0]) return i;
  }
  return 0;
}

/** The text in force at denoiser call `step` (see scheduleIndexAt). */
export function scheduledTextAt(schedule: readonly ScheduleEntry[], step: number): string {
  const entry = schedule[scheduleIndexAt(schedule, step)];
  if (entry === undefined) throw new RangeError("empty schedule");
  return entry[1];
}

/**
 * The step count schedules are built with: A1111's `sampler.total_steps(steps)`, which doubles the
 * steps of second-order samplers (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, Restart) because they
 * call the model about twice per step and the counter advances per call.
 */
export function scheduleSteps(steps: number, secondOrder: boolean): number {
  return secondOrder ? steps * 2 : steps;
}
