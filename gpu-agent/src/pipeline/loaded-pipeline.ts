import { ClipTokenizer, Conditioner } from "../conditioning/index.js";
import type { SdModel } from "../models/sd-model.js";
import { StepBatcher } from "./step-batcher.js";

/** A model with what tasks share: its tokenizer, a conditioning cache and the step batcher. */
export class LoadedPipeline {
  readonly batcher: StepBatcher;
  private conditionerPromise: Promise<Conditioner> | undefined;

  constructor(
    readonly model: SdModel,
    opts: { maxBatchRows: number; onUnetCall?: (rows: number, seconds: number) => void },
  ) {
    this.batcher = new StepBatcher(
      (s, t, c, d, signal) => model.unet(s, t, c, d, signal),
      model.config.latentChannels,
      model.textEncoder.hiddenSize,
      opts.maxBatchRows,
      opts.onUnetCall,
    );
  }

  get name(): string {
    return this.model.name;
  }

  conditioner(): Promise<Conditioner> {
    this.conditionerPromise ??= ClipTokenizer.fromDirectory(this.model.tokenizerDir).then(
      (tokenizer) => new Conditioner({ tokenizer, encoder: this.model.textEncoder }),
    );
    return this.conditionerPromise;
  }

  close(): Promise<void> {
    return this.model.close();
  }
}
