import { PromptSyntaxError } from "./errors.js";
import { parsePythonFloat, parsePythonInt } from "./python-float.js";

/** A `<lora:name:te:unet>` (or `<lyco:…>`) tag resolved the way extra_networks_lora.py reads it. */
export interface LoraNetwork {
  kind: "lora";
  /** File name or alias, as written in the tag. */
  name: string;
  teWeight: number;
  unetWeight: number;
  /** `dyn=` / 4th positional: LyCORIS dynamic dimension; undefined when absent. */
  dynDim?: number;
}

/** A tag of a kind this agent does not apply (e.g. `<hypernet:…>`); A1111 removes it from the text too. */
export interface UnknownExtraNetwork {
  kind: string;
  args: string[];
  raw: string;
}

export interface ExtractedExtraNetworks {
  /** The prompt with every `<kind:args>` tag replaced by "" (surrounding text untouched). */
  text: string;
  networks: LoraNetwork[];
  unknown: UnknownExtraNetwork[];
}

// `<(\w+):([^>]+)>` with Python's Unicode `\w`.
const EXTRA_NETWORK_RE = /<([\p{L}\p{N}_]+):([^>]+)>/gu;
const LORA_KINDS = new Set(["lora", "lyco"]);

function number(value: string, what: string, raw: string): number {
  const v = parsePythonFloat(value);
  if (v === undefined) throw new PromptSyntaxError(`${raw}: ${what} "${value}" is not a number`);
  return v;
}

function loraFromArgs(args: string[], raw: string): LoraNetwork {
  const positional: string[] = [];
  const named = new Map<string, string>();
  for (const item of args) {
    // Python's item.split("=", 2): exactly one "=" makes a named argument.
    const parts = item.split("=");
    if (parts.length === 2) named.set(parts[0]!, parts[1]!);
    else positional.push(item);
  }
  const name = positional[0];
  if (name === undefined) throw new PromptSyntaxError(`${raw}: a LoRA tag needs a name`);
  let teWeight = positional.length > 1 ? number(positional[1]!, "text-encoder weight", raw) : 1.0;
  const te = named.get("te");
  if (te !== undefined) teWeight = number(te, "te", raw);
  let unetWeight = positional.length > 2 ? number(positional[2]!, "UNet weight", raw) : teWeight;
  const unet = named.get("unet");
  if (unet !== undefined) unetWeight = number(unet, "unet", raw);
  const dynText = named.get("dyn") ?? positional[3];
  const network: LoraNetwork = { kind: "lora", name, teWeight, unetWeight };
  if (dynText !== undefined) {
    const dyn = parsePythonInt(dynText);
    if (dyn === undefined) throw new PromptSyntaxError(`${raw}: dyn "${dynText}" is not an integer`);
    network.dynDim = dyn;
  }
  return network;
}

/**
 * Removes `<kind:args>` extra-network tags from a positive prompt (A1111 does not scan negative
 * prompts). Throws PromptSyntaxError for a LoRA tag A1111 would fail on (no name, bad number).
 */
export function extractExtraNetworks(prompt: string): ExtractedExtraNetworks {
  const networks: LoraNetwork[] = [];
  const unknown: UnknownExtraNetwork[] = [];
  const text = prompt.replace(EXTRA_NETWORK_RE, (raw, kind: string, argText: string) => {
    const args = argText.split(":");
    if (LORA_KINDS.has(kind)) networks.push(loraFromArgs(args, raw));
    else unknown.push({ kind, args, raw });
    return "";
  });
  return { text, networks, unknown };
}

/**
 * A batch's prompts with tags removed; like A1111's parse_prompts, only the first prompt's tags
 * decide which networks are active.
 */
export function extractExtraNetworksBatch(prompts: readonly string[]): {
  texts: string[];
  networks: LoraNetwork[];
  unknown: UnknownExtraNetwork[];
} {
  const parsed = prompts.map(extractExtraNetworks);
  return {
    texts: parsed.map((p) => p.text),
    networks: parsed[0]?.networks ?? [],
    unknown: parsed[0]?.unknown ?? [],
  };
}
