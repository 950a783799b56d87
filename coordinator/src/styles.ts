// A1111's prompt styles (modules/styles.py): named prompt and negative-prompt texts from CSV files
// (`--styles-file`), merged into a job's prompts by name.

import { readFile, stat } from "node:fs/promises";
import { parse } from "csv-parse/sync";
import * as grpc from "@grpc/grpc-js";
import { FarmError, type GenerationParams, type Logger } from "@latentfarm/shared";

export interface PromptStyle {
  readonly name: string;
  readonly prompt: string;
  readonly negativePrompt: string;
}

/**
 * A1111's merge_prompts: a style text containing "{prompt}" has every occurrence replaced by the prompt;
 * otherwise the stripped prompt and stripped style text are joined with ", ", empty ones left out (so even
 * an empty style strips the prompt).
 */
export function mergePrompts(style: string, prompt: string): string {
  if (style.includes("{prompt}")) return style.replaceAll("{prompt}", prompt);
  return [prompt.trim(), style.trim()].filter((s) => s !== "").join(", ");
}

/** Styles in A1111's CSV layout: columns name, prompt (or the old "text") and negative_prompt; rows named "#…" are comments. */
export function parseStylesCsv(text: string, file: string): PromptStyle[] {
  let rows: Array<Record<string, string | undefined>>;
  try {
    // Python's csv.DictReader over a utf-8-sig file: a BOM is dropped, short rows leave fields empty.
    rows = parse(text, { bom: true, columns: true, relax_column_count: true, skip_empty_lines: true }) as typeof rows;
  } catch (err) {
    throw new FarmError(grpc.status.FAILED_PRECONDITION, `styles file ${file} is not valid CSV: ${(err as Error).message}`, { cause: err });
  }
  const out: PromptStyle[] = [];
  for (const row of rows) {
    const name = row["name"];
    if (name === undefined) throw new FarmError(grpc.status.FAILED_PRECONDITION, `styles file ${file} has no "name" column`);
    if (name.startsWith("#")) continue;
    out.push({ name, prompt: row["prompt"] ?? row["text"] ?? "", negativePrompt: row["negative_prompt"] ?? "" });
  }
  return out;
}

/**
 * The farm's styles: the files read in order (a name defined again keeps its first place and takes the
 * later text, as A1111's dict does), and read again when one of them changes.
 */
export class StyleLibrary {
  private loaded: { stamp: string; styles: Map<string, PromptStyle> } | undefined;
  private checkedAt = 0;

  constructor(
    readonly files: readonly string[],
    private readonly logger: Logger,
    /** How long a read is trusted before the files' modification times are checked again. */
    private readonly recheckMs = 1_000,
  ) {}

  async current(): Promise<Map<string, PromptStyle>> {
    const now = Date.now();
    if (this.loaded !== undefined && now - this.checkedAt < this.recheckMs) return this.loaded.styles;
    this.checkedAt = now;
    const stats = await Promise.all(this.files.map((f) => stat(f).catch(() => undefined)));
    const stamp = stats.map((s) => (s ? `${s.mtimeMs}:${s.size}` : "-")).join("|");
    if (this.loaded?.stamp === stamp) return this.loaded.styles;
    const styles = new Map<string, PromptStyle>();
    for (const [i, file] of this.files.entries()) {
      // A missing file has no styles, as in A1111 (which creates it when a style is saved).
      if (stats[i] === undefined) continue;
      for (const s of parseStylesCsv(await readFile(file, "utf8"), file)) styles.set(s.name, s);
    }
    if (this.loaded !== undefined) this.logger.info("styles files read again", { files: this.files, styles: styles.size });
    this.loaded = { stamp, styles };
    return styles;
  }
}

/**
 * Merges the job's styles into its prompts in place, as A1111's setup_prompts does: the prompt and the
 * negative prompt, and the Hires.fix prompts when set (an empty one is the merged prompt anyway). The
 * styles are then cleared: the job's params are what renders. A name the library lacks is NOT_FOUND
 * naming `styles[i]` (A1111 would merge an empty style).
 */
export function applyStyles(p: GenerationParams, library: ReadonlyMap<string, PromptStyle>): void {
  if (p.styles.length === 0) return;
  const chosen = p.styles.map((name, i) => {
    const s = library.get(name);
    if (s === undefined) {
      const known = [...library.keys()];
      throw FarmError.notFound(`style "${name}" is not in the farm's styles (known: ${known.join(", ") || "none"})`, `styles[${i}]`);
    }
    return s;
  });
  const merge = (text: string, of: (s: PromptStyle) => string): string => chosen.reduce((acc, s) => mergePrompts(of(s), acc), text);
  p.prompt = merge(p.prompt, (s) => s.prompt);
  p.negativePrompt = merge(p.negativePrompt, (s) => s.negativePrompt);
  if (p.hrPrompt !== "") p.hrPrompt = merge(p.hrPrompt, (s) => s.prompt);
  if (p.hrNegativePrompt !== "") p.hrNegativePrompt = merge(p.hrNegativePrompt, (s) => s.negativePrompt);
  p.styles = [];
}
