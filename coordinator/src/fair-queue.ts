/** How one tenant shares the farm. */
export interface TenantPolicy {
  /** Share of the farm relative to other tenants with queued work. */
  weight: number;
  /** Queued plus running images at most; a Submit over it gets RESOURCE_EXHAUSTED. 0 = no limit. */
  maxQueuedImages: number;
  /** Images running at once at most; the rest wait in the queue. 0 = no limit. */
  maxRunningImages: number;
}

export const DEFAULT_TENANT_POLICY: TenantPolicy = { weight: 1, maxQueuedImages: 0, maxRunningImages: 0 };

/** One unit of queued work: its tenant, and its cost (relative work, e.g. steps × megapixels). */
export interface FairItem {
  readonly tenant: string;
  readonly cost: number;
}

interface Lane<T> {
  readonly priority: number;
  readonly order: number;
  readonly items: T[];
  head: number;
}

interface TenantQueue<T> {
  readonly name: string;
  /** Finish tag of the tenant's last dispatched item (start-time fair queueing). */
  finish: number;
  running: number;
  /** Retried items go first: they were dispatched once already. */
  readonly retries: T[];
  /** One lane per job, highest priority first, then submission order. */
  readonly lanes: Array<Lane<T>>;
}

/**
 * Per-tenant queues served by weighted fair queueing (start-time fair queueing: an item's start tag
 * is max(virtual time, its tenant's last finish tag), the smallest start goes next, and the tenant's
 * finish tag advances by cost / weight). A tenant that was idle gets no saved-up credit. Within a
 * tenant, higher-priority jobs go first, then older ones. Iteration is non-destructive: the
 * scheduler looks ahead in fair order and takes only the items it places.
 */
export class FairQueue<T extends FairItem> {
  private readonly tenants = new Map<string, TenantQueue<T>>();
  private virtualTime = 0;
  private laneOrder = 0;
  private count = 0;

  constructor(
    private readonly isQueued: (item: T) => boolean,
    private readonly policy: (tenant: string) => TenantPolicy,
  ) {}

  private tenant(name: string): TenantQueue<T> {
    let t = this.tenants.get(name);
    if (!t) {
      t = { name, finish: this.virtualTime, running: 0, retries: [], lanes: [] };
      this.tenants.set(name, t);
    }
    return t;
  }

  /**
   * Adds a job's items as one lane of its tenant; returns the lane's place in submission order.
   * Items a job adds later (stages that became ready) pass that place back as `order`, so they keep
   * the job's place among the tenant's jobs instead of queueing behind newer ones.
   */
  pushJob(tenant: string, priority: number, items: readonly T[], order?: number): number {
    const o = order ?? this.laneOrder++;
    if (items.length === 0) return o;
    const t = this.tenant(tenant);
    const lane: Lane<T> = { priority, order: o, items: [...items], head: 0 };
    let i = t.lanes.length;
    while (i > 0 && (t.lanes[i - 1]!.priority < priority || (t.lanes[i - 1]!.priority === priority && t.lanes[i - 1]!.order > o))) i--;
    t.lanes.splice(i, 0, lane);
    this.count += items.length;
    return o;
  }

  /** Puts an item back at the front of its tenant's queue (a retry). */
  pushRetry(item: T): void {
    this.tenant(item.tenant).retries.push(item);
    this.count++;
  }

  /**
   * Items in fair order, skipping tenants at their running limit. Does not change the queue.
   * `skip` drops items the caller cannot use now; when it skips a job's item it skips the rest of
   * that job too (a job's items are alike, e.g. one model), so a long queue of unusable work costs
   * one check per job, not per item.
   */
  *order(skip?: (item: T) => boolean): Generator<T> {
    const cursors = new Map<TenantQueue<T>, { retry: number; lane: number; item: number; finish: number; running: number }>();
    for (const t of this.tenants.values()) cursors.set(t, { retry: 0, lane: 0, item: -1, finish: t.finish, running: t.running });
    let vt = this.virtualTime;
    for (;;) {
      let best: TenantQueue<T> | undefined;
      let bestStart = Infinity;
      let bestItem: T | undefined;
      for (const [t, c] of cursors) {
        const cap = this.policy(t.name).maxRunningImages;
        if (cap > 0 && c.running >= cap) continue;
        const item = this.peek(t, c, skip);
        if (item === undefined) continue;
        const start = Math.max(vt, c.finish);
        if (start < bestStart) {
          best = t;
          bestStart = start;
          bestItem = item;
        }
      }
      if (!best || bestItem === undefined) return;
      const c = cursors.get(best)!;
      this.advance(best, c);
      c.finish = bestStart + bestItem.cost / Math.max(1e-9, this.policy(best.name).weight);
      c.running++;
      vt = bestStart;
      yield bestItem;
    }
  }

  // The next queued item at the cursor, skipping (and, at a lane's head, dropping) ones that left.
  private peek(t: TenantQueue<T>, c: { retry: number; lane: number; item: number }, skip?: (item: T) => boolean): T | undefined {
    while (c.retry < t.retries.length) {
      const it = t.retries[c.retry]!;
      if (this.isQueued(it)) {
        if (!skip?.(it)) return it;
        c.retry++;
        continue;
      }
      if (c.retry === 0) {
        t.retries.shift();
        this.count--;
      } else c.retry++;
    }
    lanes: while (c.lane < t.lanes.length) {
      const lane = t.lanes[c.lane]!;
      if (c.item < lane.head) c.item = lane.head;
      while (c.item < lane.items.length) {
        const it = lane.items[c.item]!;
        if (this.isQueued(it)) {
          if (!skip?.(it)) return it;
          c.lane++;
          c.item = -1;
          continue lanes;
        }
        if (c.item === lane.head) {
          lane.head++;
          this.count--;
        }
        c.item++;
      }
      if (lane.head >= lane.items.length) {
        t.lanes.splice(c.lane, 1);
        c.item = -1;
        continue;
      }
      c.lane++;
      c.item = -1;
    }
    return undefined;
  }

  private advance(t: TenantQueue<T>, c: { retry: number; lane: number; item: number }): void {
    if (c.retry < t.retries.length) c.retry++;
    else c.item++;
  }

  /** Commits the fair-share accounting for an item being placed (it stops being queued right after). */
  take(item: T): void {
    const t = this.tenant(item.tenant);
    const start = Math.max(this.virtualTime, t.finish);
    t.finish = start + item.cost / Math.max(1e-9, this.policy(t.name).weight);
    this.virtualTime = start;
    t.running++;
  }

  /** An item taken earlier stopped running (finished, failed or was handed back). */
  release(tenant: string): void {
    const t = this.tenants.get(tenant);
    if (t) t.running = Math.max(0, t.running - 1);
  }

  running(tenant: string): number {
    return this.tenants.get(tenant)?.running ?? 0;
  }

  /** Queued items, counting ones that left but were not yet skipped over (an upper bound). */
  get size(): number {
    return this.count;
  }

  /** Drops tenants with nothing queued or running, so the map stays small. */
  compact(): void {
    for (const [name, t] of this.tenants) {
      if (t.running === 0 && t.retries.length === 0 && t.lanes.every((l) => l.head >= l.items.length)) this.tenants.delete(name);
    }
  }
}
