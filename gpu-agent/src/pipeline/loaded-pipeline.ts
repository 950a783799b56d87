import { silentLogger, type Logger } from "@latentfarm/shared";
import { ClipTokenizer, Conditioner, type ClosableTextEncoder, type TextualInversionEmbedding } from "../conditioning/index.js";
import { EmbeddingsFolder, embeddingDatabase } from "../models/embedding-files.js";
import { NoiseThread } from "../sampling/index.js";
import { BrownianWorkers } from "../sampling/brownian-thread.js";
import type { SdModel } from "../models/sd-model.js";
import type { LoraUse } from "../models/model-loader.js";
import { StepBatcher } from "./step-batcher.js";
import type { VaeIdentity } from "../models/vae-files.js";

/** A model with what tasks share: its tokenizer, a conditioning cache and the step batcher. */
export class LoadedPipeline {
  readonly batcher: StepBatcher;
  private conditionerPromise:
    Promise<{ conditioner: Conditioner; tokenizer: ClipTokenizer; embeddings: EmbeddingsFolder | undefined }> | undefined;
  private readonly embeddingsDir: string | undefined;
  /** Embeddings bundled in the merged LoRAs' files, usable while this pipeline's LoRAs are (A1111 1.7+). */
  readonly bundledEmbeddings: readonly TextualInversionEmbedding[];
  private readonly logger: Logger | undefined;
  private readonly baseTextEncoder: (() => Promise<ClosableTextEncoder>) | undefined;

  /** A1111 infotext entries: "Model hash" (checkpoints) and "Lora hashes". */
  readonly modelHash: string | undefined;
  readonly loraHashes: readonly string[];
  /** The VAE file that replaced the checkpoint's own ("VAE" and "VAE hash"), if one did. */
  readonly vae: VaeIdentity | undefined;
  /** The LoRAs merged into this pipeline's weights (its pipeline key's): the only ones its prompts may name. */
  readonly loras: readonly LoraUse[];
  /** Warnings from building the model (LoRA keys that matched no layer), repeated to each task. */
  readonly loadWarnings: readonly string[];
  /** Makes the samplers' plain noise during UNet calls, for every run on this pipeline (see denoise). */
  readonly noise = new NoiseThread();
  /**
   * The SDE samplers' Brownian-tree thread and draw helpers, shared by every run on this pipeline
   * (concurrent ones too): started at the first SDE run, so later runs do not pay their start-up.
   */
  readonly brownian = new BrownianWorkers();
  /**
   * Runs whose noise draws have at least this many values use the noise thread; smaller draws (under
   * ~0.5 ms) are made in the render's thread. 16,384 = one 512×512 image.
   */
  readonly noiseThreadMinValues: number;

  constructor(
    readonly model: SdModel,
    opts: {
      maxBatchRows: number;
      onUnetCall?: (rows: number, seconds: number) => void;
      modelHash?: string | undefined;
      loraHashes?: readonly string[];
      vae?: VaeIdentity | undefined;
      /** The LoRAs merged into `model` (default none). */
      loras?: readonly LoraUse[];
      /** The base model's text encoder where LoRAs changed this one's (ModelLoader's baseTextEncoder). */
      baseTextEncoder?: (() => Promise<ClosableTextEncoder>) | undefined;
      loadWarnings?: readonly string[];
      noiseThreadMinValues?: number;
      /** Textual-inversion embeddings prompts may name; the model's text encoder must take token overrides. */
      embeddingsDir?: string;
      /** Embeddings bundled in the LoRAs merged into `model` (ModelLoader's bundledEmbeddings); the same requirement. */
      bundledEmbeddings?: readonly TextualInversionEmbedding[];
      logger?: Logger;
    },
  ) {
    this.embeddingsDir = opts.embeddingsDir;
    this.bundledEmbeddings = opts.bundledEmbeddings ?? [];
    this.logger = opts.logger;
    this.noiseThreadMinValues = opts.noiseThreadMinValues ?? 16_384;
    this.modelHash = opts.modelHash;
    this.loraHashes = opts.loraHashes ?? [];
    this.vae = opts.vae;
    this.loras = opts.loras ?? [];
    this.baseTextEncoder = opts.baseTextEncoder;
    this.loadWarnings = opts.loadWarnings ?? [];
    this.batcher = new StepBatcher(
      (s, t, c, d, signal, added) => model.unet(s, t, c, d, signal, added),
      model.config.latentChannels,
      model.textEncoder.hiddenSize,
      {
        maxRows: opts.maxBatchRows,
        ...(opts.onUnetCall !== undefined && { onCall: opts.onUnetCall }),
        ...(model.pooledSize !== undefined && { pooledSize: model.pooledSize }),
        ...(model.timeIdsSize !== undefined && { timeIdsSize: model.timeIdsSize }),
      },
    );
  }

  get name(): string {
    return this.model.name;
  }

  /**
   * The model's conditioner, with the embeddings folder as it is now: a folder changed since the last
   * task is read again (and the conditioning cache dropped) before this one encodes its prompts.
   */
  async conditioner(): Promise<Conditioner> {
    this.conditionerPromise ??= ClipTokenizer.fromDirectory(this.model.tokenizerDir).then((tokenizer) => {
      const encoder = this.model.textEncoder;
      const conditioner = new Conditioner({
        tokenizer,
        encoder,
        ...(this.baseTextEncoder !== undefined && { emptyPromptEncoder: this.baseTextEncoder }),
      });
      const wanted = this.embeddingsDir !== undefined || this.bundledEmbeddings.length > 0;
      const usable = wanted && encoder.acceptsTokenOverrides === true;
      const logger = this.logger ?? silentLogger;
      if (wanted && !usable) logger.warn("this model's text encoder takes no embeddings", { model: this.name });
      const hidden = encoder.hiddenSize;
      for (const e of this.bundledEmbeddings) {
        if (e.hidden !== hidden) {
          // A1111 puts it among its skipped embeddings: the shape is not its model's.
          logger.warn("LoRA's bundled embedding left out", { lora: e.bundledIn, embedding: e.name, width: e.hidden, model_width: hidden });
        }
      }
      const folder = usable && this.embeddingsDir !== undefined ? new EmbeddingsFolder(this.embeddingsDir, logger) : undefined;
      if (usable && folder === undefined && this.bundledEmbeddings.length > 0) {
        conditioner.setEmbeddings(embeddingDatabase(undefined, tokenizer, hidden, this.bundledEmbeddings));
      }
      return { conditioner, tokenizer, embeddings: folder };
    });
    const { conditioner, tokenizer, embeddings } = await this.conditionerPromise;
    if (embeddings !== undefined) {
      const read = await embeddings.current();
      if (read !== this.embeddingsRead) {
        conditioner.setEmbeddings(embeddingDatabase(read, tokenizer, conditioner.encoder.hiddenSize, this.bundledEmbeddings));
        this.embeddingsRead = read;
      }
    }
    return conditioner;
  }

  /** The folder's read the conditioner's embeddings come from (EmbeddingsFolder gives the same object until the folder changes). */
  private embeddingsRead: unknown;

  async close(): Promise<void> {
    await Promise.all([this.noise.close(), this.brownian.close()]);
    await this.model.close();
  }
}
