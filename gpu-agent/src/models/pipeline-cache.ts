interface Slot<T> {
  value: Promise<T>;
  users: number;
  lastUsed: number;
  /** Dropped by discard(): closed when its last user releases it. */
  discarded?: boolean;
}

export interface Loaded<T> {
  readonly value: T;
  release(): void;
}

/**
 * Loaded pipelines, most recently used kept, at most `capacity` of them. A pipeline in use is
 * never evicted; the cache may exceed capacity briefly until its users release it.
 */
export class PipelineCache<T extends { close(): Promise<void> }> {
  private readonly slots = new Map<string, Slot<T>>();

  constructor(
    private readonly capacity: number,
    private readonly load: (name: string, signal?: AbortSignal) => Promise<T>,
    private readonly onChange?: (names: string[]) => void,
  ) {}

  get names(): string[] {
    return [...this.slots.keys()];
  }

  async acquire(name: string, signal?: AbortSignal): Promise<Loaded<T>> {
    let slot = this.slots.get(name);
    if (!slot) {
      const value = this.load(name, signal);
      slot = { value, users: 0, lastUsed: Date.now() };
      this.slots.set(name, slot);
      value.then(
        () => this.onChange?.(this.names),
        () => {
          // A failed load must not stay cached: the next task retries it.
          if (this.slots.get(name)?.value === value) this.slots.delete(name);
        },
      );
    }
    slot.users++;
    slot.lastUsed = Date.now();
    try {
      const value = await slot.value;
      let released = false;
      const s = slot;
      return {
        value,
        release: () => {
          if (released) return;
          released = true;
          s.users--;
          s.lastUsed = Date.now();
          if (s.discarded && s.users === 0) void value.close().catch(() => undefined);
          void this.evict();
        },
      };
    } catch (err) {
      slot.users--;
      throw err;
    }
  }

  /**
   * Forgets `value` under `name` (a pipeline that broke), so the next acquire loads it again. It is
   * closed once its current users have released it; until then they keep what they hold.
   */
  discard(name: string, value: T): void {
    const slot = this.slots.get(name);
    if (!slot) return;
    void slot.value.then(
      (v) => {
        if (v !== value || this.slots.get(name) !== slot) return;
        this.slots.delete(name);
        this.onChange?.(this.names);
        slot.discarded = true;
        if (slot.users === 0) void value.close().catch(() => undefined);
      },
      () => undefined,
    );
  }

  private async evict(): Promise<void> {
    while (this.slots.size > this.capacity) {
      const idle = [...this.slots.entries()].filter(([, s]) => s.users === 0).sort((a, b) => a[1].lastUsed - b[1].lastUsed)[0];
      if (!idle) return;
      this.slots.delete(idle[0]);
      this.onChange?.(this.names);
      await idle[1].value.then(
        (v) => v.close(),
        () => undefined,
      );
    }
  }

  async close(): Promise<void> {
    const all = [...this.slots.values()];
    this.slots.clear();
    await Promise.all(
      all.map((s) =>
        s.value.then(
          (v) => v.close(),
          () => undefined,
        ),
      ),
    );
  }
}
