// Textual-inversion embeddings as A1111's EmbeddingDatabase uses them (modules/textual_inversion):
// a prompt names an embedding by its file stem; wherever the name's token ids occur in a prompt
// fragment, the chunker puts the embedding's vectors in their place (see chunking.ts).

/** One embedding: `vectors` rows of `hidden` values, as the file held them (widened to float32). */
export interface TextualInversionEmbedding {
  /** The file's stem, as the prompt names it. */
  readonly name: string;
  readonly vectors: number;
  readonly hidden: number;
  /** vectors × hidden, row-major. */
  readonly data: Float32Array;
  /**
   * sha256 of the file (hex); A1111's infotext writes its first 12 characters ("TI hashes"). None for an
   * embedding bundled in a LoRA: A1111 gives those no hash, and leaves them out of TI hashes.
   */
  readonly sha256?: string;
  /** The LoRA whose file carried this embedding (`bundle_emb`), where one did. */
  readonly bundledIn?: string;
}

export interface EmbeddingTokenizer {
  encode(text: string): number[];
}

/** What the chunker asks: which embedding (if any) starts at `offset` of a fragment's tokens. */
export interface EmbeddingLookup {
  findAt(tokens: readonly number[], offset: number): { embedding: TextualInversionEmbedding; length: number } | undefined;
}

/**
 * The embeddings a model can use, looked up by the token ids of their names. Among names that match at
 * one position the one of most tokens wins, as in A1111; names of equal token ids (CLIP lowercases, so
 * "Foo" and "foo") resolve to the one first by name, where A1111's depends on the folder's listing order.
 */
export class EmbeddingDatabase implements EmbeddingLookup {
  private readonly byFirstId = new Map<number, { ids: number[]; embedding: TextualInversionEmbedding }[]>();
  readonly embeddings: readonly TextualInversionEmbedding[];

  constructor(tokenizer: EmbeddingTokenizer, embeddings: readonly TextualInversionEmbedding[]) {
    this.embeddings = [...embeddings].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const embedding of this.embeddings) {
      const ids = tokenizer.encode(embedding.name);
      if (ids.length === 0) continue;
      let list = this.byFirstId.get(ids[0]!);
      if (list === undefined) this.byFirstId.set(ids[0]!, (list = []));
      list.push({ ids, embedding });
    }
    // Stable: equal lengths keep name order.
    for (const list of this.byFirstId.values()) list.sort((a, b) => b.ids.length - a.ids.length);
  }

  get size(): number {
    return this.embeddings.length;
  }

  get(name: string): TextualInversionEmbedding | undefined {
    return this.embeddings.find((e) => e.name === name);
  }

  findAt(tokens: readonly number[], offset: number): { embedding: TextualInversionEmbedding; length: number } | undefined {
    const candidates = this.byFirstId.get(tokens[offset]!);
    if (candidates === undefined) return undefined;
    for (const { ids, embedding } of candidates) {
      if (offset + ids.length > tokens.length) continue;
      let match = true;
      for (let i = 1; i < ids.length && match; i++) match = tokens[offset + i] === ids[i];
      if (match) return { embedding, length: ids.length };
    }
    return undefined;
  }
}
