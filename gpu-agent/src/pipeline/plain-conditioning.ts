// TEMPORARY: plain prompts (≤ 75 tokens, no emphasis) until the conditioning package lands.
import type { ClipTokenizer } from "../conditioning/clip-tokenizer.js";
import type { TextEncoder } from "../models/sd-model.js";

export interface CondEntry {
  tensor: Float32Array;
  weight: number;
}
export interface PreparedConditioning {
  condAt(step: number): CondEntry[];
  uncondAt(step: number): CondEntry;
  warnings?: string[];
}

export class Conditioner {
  constructor(
    private readonly tok: ClipTokenizer,
    private readonly te: TextEncoder,
  ) {}

  private async encode(text: string, clipSkip: number, signal?: AbortSignal): Promise<Float32Array> {
    const ids = this.tok.encode(text).slice(0, 75);
    const batch = new Int32Array(77).fill(this.tok.eosId);
    batch[0] = this.tok.bosId;
    batch.set(ids, 1);
    batch[ids.length + 1] = this.tok.eosId;
    return this.te.encode(batch, 1, clipSkip, signal);
  }

  async prepare(
    o: { prompt: string; negativePrompt: string; steps: number; clipSkip: number },
    signal?: AbortSignal,
  ): Promise<PreparedConditioning> {
    const c = await this.encode(o.prompt, o.clipSkip, signal);
    const u = await this.encode(o.negativePrompt, o.clipSkip, signal);
    return { condAt: () => [{ tensor: c, weight: 1 }], uncondAt: () => ({ tensor: u, weight: 1 }) };
  }
}

export function combineDenoised(uncond: Float32Array, conds: Array<{ denoised: Float32Array; weight: number }>, cfg: number): Float32Array {
  const out = Float32Array.from(uncond);
  for (const c of conds) for (let i = 0; i < out.length; i++) out[i] = out[i]! + (c.denoised[i]! - uncond[i]!) * c.weight * cfg;
  return out;
}
