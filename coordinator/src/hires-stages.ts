/**
 * The planner's view of a Hires.fix image: a small graph of stage tasks that may run on different
 * agents, joined by hand-overs the coordinator keeps (in memory, and in the object store so that a
 * restart re-runs only what is missing).
 *
 *   untiled:  first ──► second (the image)
 *   tiled:    first ──► up ──► t0 … tN-1 ──► asm (the image)
 *
 * A second pass above `tileAbovePixels` is tiled: the upscaled source is made once, cut into
 * overlapping tiles (the layout is decided here, once, and sent to the agents), and the tiles are
 * blended by one ASSEMBLE task in tile order, so the image is the same whichever agents ran which
 * tiles. Progress adds the passes up as A1111 does: first-pass steps, then second-pass steps (for
 * tiles, the mean progress of the tiles).
 */
import * as grpc from "@grpc/grpc-js";
import {
  FarmError,
  TaskStage,
  cropHandover,
  hiresTarget,
  passWork,
  planTiles,
  secondPassSamplerName,
  type GenerationParams,
  type Handover,
  type TileLayout,
  type TileRect,
} from "@latentfarm/shared";
import type { StageRequest } from "./scheduler.js";

export interface HiresTiling {
  /** A second pass of more pixels than this is tiled. */
  tileAbovePixels: number;
  /** Tile edge in px (a multiple of 64: the UNet's latent grid halves three times). */
  tileSize: number;
  /** Minimum overlap between neighbouring tiles in px (a multiple of 8: one latent cell). */
  tileOverlap: number;
}

/** SD1.5 works at 512 px; 64 px of overlap leaves room for a feathered blend. */
export const DEFAULT_HIRES_TILING: HiresTiling = { tileAbovePixels: 1536 * 1536, tileSize: 512, tileOverlap: 64 };

export function checkTiling(t: HiresTiling): void {
  if (!Number.isSafeInteger(t.tileAbovePixels) || t.tileAbovePixels < 0)
    throw new RangeError(`tile threshold must be a pixel count ≥ 0, got ${t.tileAbovePixels}`);
  if (!Number.isInteger(t.tileSize) || t.tileSize < 64 || t.tileSize % 64 !== 0)
    throw new RangeError(`tile size must be a multiple of 64 px, got ${t.tileSize}`);
  if (!Number.isInteger(t.tileOverlap) || t.tileOverlap < 8 || t.tileOverlap % 8 !== 0 || t.tileOverlap * 2 > t.tileSize) {
    throw new RangeError(`tile overlap must be a multiple of 8 px from 8 to half the tile size, got ${t.tileOverlap}`);
  }
}

/** "1536x1536" or a plain pixel count. */
export function parsePixelCount(v: string): number {
  const m = /^(\d+)\s*[x×]\s*(\d+)$/i.exec(v.trim());
  const n = m ? Number(m[1]) * Number(m[2]) : Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`"${v}" is not a pixel count (N or WxH)`);
  return n;
}

export interface HiresPlan {
  firstPass: { width: number; height: number };
  final: { width: number; height: number };
  steps: number;
  hrSteps: number;
  /** The tile layout when the second pass is tiled. */
  layout: TileLayout | undefined;
}

/** The stages of a Hires.fix image, or undefined for an image that is one task. Bad sizes are INVALID_ARGUMENT. */
export function planHires(p: GenerationParams, tiling: HiresTiling): HiresPlan | undefined {
  if (!p.enableHr || p.initImages.length > 0) return undefined;
  let target;
  try {
    target = hiresTarget({
      width: p.width ?? 512,
      height: p.height ?? 512,
      hrScale: p.hrScale ?? 2,
      hrResizeX: p.hrResizeX,
      hrResizeY: p.hrResizeY,
    });
  } catch (err) {
    throw FarmError.invalid("hr_scale", (err as Error).message);
  }
  const { final } = target;
  let layout: TileLayout | undefined;
  if (final.width * final.height > tiling.tileAbovePixels) {
    layout = planTiles(final.width, final.height, { tileSize: tiling.tileSize, overlap: tiling.tileOverlap });
    if (layout.tiles.length < 2) layout = undefined;
  }
  const steps = p.steps ?? 50;
  return { firstPass: target.firstPass, final, steps, hrSteps: p.hrSecondPassSteps || steps, layout };
}

/**
 * Work of an image in first-pass model calls (for admission estimates): the second pass's calls scaled by
 * its pixels, tile overlaps included.
 */
export function equivalentModelCalls(plan: HiresPlan, p: Pick<GenerationParams, "samplerName" | "hrSamplerName">): number {
  const px1 = plan.firstPass.width * plan.firstPass.height;
  const px2 = plan.layout ? plan.layout.tiles.reduce((n, t) => n + t.width * t.height, 0) : plan.final.width * plan.final.height;
  const second = passWork(plan.hrSteps, secondPassSamplerName(p)).modelCalls;
  return passWork(plan.steps, p.samplerName).modelCalls + Math.ceil((second * px2) / px1);
}

/** The kinds of task an image of this plan runs, in order (FULL: the image is one task). */
export function stageKinds(plan: HiresPlan | undefined): TaskStage[] {
  if (!plan) return [TaskStage.FULL];
  if (!plan.layout) return [TaskStage.FIRST_PASS, TaskStage.SECOND_PASS];
  return [TaskStage.FIRST_PASS, TaskStage.UPSCALE, TaskStage.SECOND_PASS_TILE, TaskStage.ASSEMBLE];
}

export interface StageSpec {
  /** "first", "second", "up", "t<n>", "asm": the task id's suffix and the hand-over's name. */
  readonly name: string;
  readonly stage: TaskStage;
  readonly tile: TileRect | undefined;
  /** Size the stage samples at, and its sampling steps (0: none). */
  readonly width: number;
  readonly height: number;
  readonly steps: number;
}

/** One Hires.fix image of a live job: its plan, the hand-overs received so far, and its open stage tasks. */
export class HiresImage<T = unknown> {
  readonly outputs = new Map<string, Handover>();
  /** Stages that have a task (queued, running or finished). */
  readonly started = new Set<string>();
  /** Open (queued or running) stage tasks. */
  readonly tasks = new Set<T>();
  /** The last stage's result arrived: the image is being stored. */
  finishing = false;
  private readonly tileSteps: number[];
  private shown = 0;

  constructor(
    readonly plan: HiresPlan,
    readonly seed: bigint,
    readonly subseed: bigint,
  ) {
    this.tileSteps = new Array<number>(plan.layout?.tiles.length ?? 0).fill(0);
  }

  get totalSteps(): number {
    return this.plan.steps + this.plan.hrSteps;
  }

  private spec(name: string): StageSpec {
    const { plan } = this;
    const f = plan.final;
    if (name === "first") return { name, stage: TaskStage.FIRST_PASS, tile: undefined, ...plan.firstPass, steps: plan.steps };
    if (name === "second") return { name, stage: TaskStage.SECOND_PASS, tile: undefined, ...f, steps: plan.hrSteps };
    if (name === "up") return { name, stage: TaskStage.UPSCALE, tile: undefined, ...f, steps: 0 };
    if (name === "asm") return { name, stage: TaskStage.ASSEMBLE, tile: undefined, ...f, steps: 0 };
    const tile = plan.layout?.tiles[Number(name.slice(1))];
    if (!name.startsWith("t") || !tile) throw new RangeError(`no stage ${name}`);
    return { name, stage: TaskStage.SECOND_PASS_TILE, tile, width: tile.width, height: tile.height, steps: plan.hrSteps };
  }

  /** Stages whose inputs are all here and that have no task yet. */
  ready(): StageSpec[] {
    const out: StageSpec[] = [];
    const add = (name: string): void => {
      if (!this.started.has(name) && !this.outputs.has(name)) out.push(this.spec(name));
    };
    const { layout } = this.plan;
    if (!this.outputs.has("first")) add("first");
    else if (!layout) add("second");
    else if (!this.outputs.has("up")) add("up");
    else {
      let all = true;
      for (const t of layout.tiles) {
        if (this.outputs.has(`t${t.index}`)) continue;
        all = false;
        add(`t${t.index}`);
      }
      if (all) add("asm");
    }
    return out;
  }

  /** The request fields of a stage task: its inputs cut from what earlier stages handed over. */
  request(spec: StageSpec): StageRequest {
    const { layout } = this.plan;
    const get = (name: string): Handover => {
      const h = this.outputs.get(name);
      if (!h) throw new Error(`stage ${spec.name} started before ${name} was handed over`);
      return h;
    };
    const tiles = layout && {
      width: layout.width,
      height: layout.height,
      tileWidth: layout.tileWidth,
      tileHeight: layout.tileHeight,
      xs: layout.xs,
      ys: layout.ys,
    };
    switch (spec.stage) {
      case TaskStage.FIRST_PASS:
        return { stage: spec.stage };
      case TaskStage.SECOND_PASS:
      case TaskStage.UPSCALE:
        return { stage: spec.stage, inputs: [get("first")] };
      case TaskStage.SECOND_PASS_TILE:
        return { stage: spec.stage, inputs: [cropHandover(get("up"), spec.tile!)], tileIndex: spec.tile!.index, ...(tiles && { tiles }) };
      default:
        return { stage: spec.stage, inputs: layout!.tiles.map((t) => get(`t${t.index}`)), ...(tiles && { tiles }) };
    }
  }

  /**
   * Checks a stage's hand-over before it is kept: what later stages cut and blend must have the
   * sizes the plan says (an agent that disagrees is a bug; its output must not reach the image).
   */
  check(name: string, h: Handover): void {
    const spec = this.spec(name);
    const fail: (msg: string) => never = (msg) => {
      throw new FarmError(grpc.status.INTERNAL, `stage ${name} handed over ${msg}`);
    };
    const d = h.data;
    if (d.case === undefined) fail("nothing");
    if (spec.stage === TaskStage.FIRST_PASS) {
      const { width, height } = this.plan.firstPass;
      if (d.case === "rgb" && (d.value.width !== width || d.value.height !== height))
        fail(`a ${d.value.width}x${d.value.height} image, not ${width}x${height}`);
      if (d.case === "latent" && (d.value.shape[2] !== height / 8 || d.value.shape[3] !== width / 8))
        fail(`a latent [${d.value.shape.join(",")}]`);
    } else if (spec.stage === TaskStage.UPSCALE) {
      const { width, height } = this.plan.final;
      if (d.case === "rgb" && (d.value.width !== width || d.value.height !== height))
        fail(`a ${d.value.width}x${d.value.height} image, not ${width}x${height}`);
      if (d.case === "latent" && (d.value.shape.length !== 4 || d.value.shape[2] !== height / 8 || d.value.shape[3] !== width / 8))
        fail(`a latent [${d.value.shape.join(",")}]`);
    } else if (spec.stage === TaskStage.SECOND_PASS_TILE) {
      if (
        d.case !== "rgb" ||
        d.value.width !== spec.width ||
        d.value.height !== spec.height ||
        d.value.data.length !== spec.width * spec.height * 3
      ) {
        fail(`${d.case === "rgb" ? `a ${d.value.width}x${d.value.height} image` : `a ${d.case}`} for a ${spec.width}x${spec.height} tile`);
      }
    } else fail("a result for a stage that returns the image");
  }

  /** Object names of the hand-overs this image keeps; tiles are named by their rectangle, so a changed layout never reuses one. */
  storedNames(): Array<{ name: string; object: string }> {
    const out = [{ name: "first", object: "first" }];
    if (this.plan.layout) {
      out.push({ name: "up", object: "up" });
      for (const t of this.plan.layout.tiles) out.push({ name: `t${t.index}`, object: `tile-${t.x}-${t.y}-${t.width}x${t.height}` });
    }
    return out;
  }

  /** The image's progress after a stage's step, if it moved: first-pass steps, then the second pass (tiles: their mean). */
  progress(stage: TaskStage | undefined, tileIndex: number, step: number): number | undefined {
    let v: number;
    if (stage === TaskStage.FIRST_PASS) v = step;
    else if (stage === TaskStage.SECOND_PASS) v = this.plan.steps + step;
    else if (stage === TaskStage.SECOND_PASS_TILE && tileIndex < this.tileSteps.length) {
      this.tileSteps[tileIndex] = Math.max(this.tileSteps[tileIndex]!, step);
      v = this.plan.steps + Math.floor(this.tileSteps.reduce((a, b) => a + b, 0) / this.tileSteps.length);
    } else return undefined;
    v = Math.min(v, this.totalSteps);
    if (v <= this.shown) return undefined;
    this.shown = v;
    return v;
  }
}
