import * as grpc from "@grpc/grpc-js";
import { FarmError, abortError, type LivePreviewContent } from "@latentfarm/shared";
import {
  cIn,
  cfgCombine,
  scaleLatent,
  type ImageRng,
  type ModelRequest,
  type NoiseAhead,
  type PreparedSampling,
} from "../sampling/index.js";
import type { PreparedConditioning } from "../conditioning/index.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { previewPng, type LatentSpace } from "./preview.js";

/** A request's live previews: every `every` steps, showing `content` (A1111's live_preview_content). */
export interface PreviewRequest {
  every: number;
  content: LivePreviewContent;
}

export function checkAborted(signal: AbortSignal): void {
  if (signal.aborted) throw abortError(signal);
}

export interface DenoiseInput {
  sampler: PreparedSampling;
  cond: PreparedConditioning;
  cfgScale: number;
  /** Latent size (pixels / 8). */
  h: number;
  w: number;
  /** The sampler's start latent (PreparedSampling.startLatent). */
  start: Float32Array;
  signal: AbortSignal;
  /** After each sampling step; `previewPng` on the steps `preview` asks for. */
  onStep: (step: number, totalSteps: number, previewPng?: Uint8Array) => void;
  /** Live previews; none when absent. */
  preview?: PreviewRequest | undefined;
  /**
   * The size in pixels A1111 conditions an SDXL pass on (its SdConditioning's width and height): the
   * pass's image; default 8× the latent. A Hires.fix pass gives its upscale target, which may be off the
   * latent grid.
   */
  imageSize?: { width: number; height: number };
  /** SDXL's crop conditioning in pixels (A1111's sdxl_crop_top and sdxl_crop_left); default 0, 0. */
  sdxlCrop?: { top: number; left: number };
  /**
   * The SDXL refiner's aesthetic-score conditioning: `high` for the prompts' rows, `low` for the negative
   * prompt's (A1111's sdxl_refiner_high_aesthetic_score and _low_; default 6 and 2.5).
   */
  aestheticScore?: { high: number; low: number };
  /** Inpainting UNets (9 input channels): A1111's c_concat, appended to every row unscaled. */
  imageCond?: Float32Array;
  /** Inpainting: A1111's CFGDenoiser mask blend. */
  maskBlend?: MaskBlend;
  /**
   * The generator behind the sampler's `noise()` (already past first()). Given, the run's plain draws are
   * continued from its state on the pipeline's noise thread, during the UNet calls.
   */
  noiseRng?: ImageRng;
  /** The job's refiner, when this pass may switch to it (see RefinerMode). */
  refiner?: RefinerMode | undefined;
  /** Checkpoints of this pass, and the one it resumes from (see CheckpointRun); not with a refiner. */
  checkpoint?: CheckpointRun | undefined;
}

/** A pass's recorded progress: its start latent and each model call's answer (see RunTaskRequest.resume_from). */
export interface PassProgress {
  start: Float32Array;
  /** Inpainting: the init latent the pass blends toward. */
  init: Float32Array | undefined;
  answers: readonly Float32Array[];
  uncondAnswers: readonly Float32Array[];
}

/** The answers a checkpoint adds, from call `firstCall` on; the first one also carries start and init. */
export interface CheckpointPart {
  firstCall: number;
  answers: Float32Array[];
  uncondAnswers: Float32Array[];
  start: Float32Array | undefined;
  init: Float32Array | undefined;
}

/**
 * Checkpoints: every `every` sampling steps (0: none) the run hands `emit` the answers it made since
 * the last, so that a retry elsewhere can replay them. With `resume`, the run first replays a failed
 * attempt's progress (no model calls for those answers), as a refiner's run replays the model's, and
 * carries on from there: the same arithmetic on the same values, so the same image.
 */
export interface CheckpointRun {
  every: number;
  emit: (part: CheckpointPart) => void;
  resume: PassProgress | undefined;
}

/**
 * A pass with a refiner_checkpoint. "switch": the run on the model stops before the first call the
 * sampler's switchesToRefiner takes, throwing RefinerSwitch with every answer given so far. "resume":
 * the refiner's run of the same pass starts from the model's start latent and gives the sampler those
 * answers again, so it reaches the switch in the state it left it in (its history, noise and infotext
 * entries), then evaluates the refiner from that call on; `onTakeOver` runs at that call.
 */
export type RefinerMode =
  | { mode: "switch" }
  | {
      mode: "resume";
      start: Float32Array;
      /** Inpainting: the model's init latent, which the blend (and the caller's finish) use in place of the refiner's encoding. */
      init: Float32Array | undefined;
      answers: readonly Float32Array[];
      uncondAnswers: readonly Float32Array[];
      onTakeOver: () => void;
    };

/** Thrown by a "switch" run at its switch: what the refiner's run needs (RefinerMode "resume"). */
export class RefinerSwitch extends Error {
  constructor(
    readonly start: Float32Array,
    readonly answers: Float32Array[],
    readonly uncondAnswers: Float32Array[],
    /** Inpainting: the init latent the pass blends toward. */
    readonly init: Float32Array | undefined,
    /** The model took the inpainting conditioning (a 9-channel UNet's c_concat). */
    readonly inpaintingConditioning = false,
  ) {
    super(`the pass switches to its refiner after ${answers.length} model calls`);
    this.name = "RefinerSwitch";
  }
}

/**
 * `x·nmask + init·mask`, which A1111's CFGDenoiser applies to the model input before the call for
 * timestep samplers (mask_before_denoising) and to the CFG-combined denoised after it for k-diffusion.
 * Only the model's view changes; the sampler's own latent is never blended.
 */
export interface MaskBlend {
  init: Float32Array;
  nmask: Float32Array;
  mask: Float32Array;
  beforeModel: boolean;
}

export function blendLatent(
  x: Float32Array,
  b: Pick<MaskBlend, "init" | "nmask" | "mask">,
  // Each value reads only its own index of x, so out may be x itself.
  out: Float32Array = new Float32Array(x.length),
): Float32Array {
  for (let i = 0; i < x.length; i++) out[i] = Math.fround(x[i]! * b.nmask[i]!) + Math.fround(b.init[i]! * b.mask[i]!);
  return out;
}

/**
 * Drives a sampler generator to the end: each model request becomes UNet calls through the
 * pipeline's step batcher (shared with concurrent images), then CFG as A1111 combines it.
 * Cancellation is checked before every model call.
 */
export async function denoise(pipe: LoadedPipeline, input: DenoiseInput): Promise<Float32Array> {
  // The SDE samplers' Brownian tree runs on the pipeline's tree thread; the run's state there ends with the run, however it ends.
  const ahead = input.sampler.openNoiseAhead({ brownian: pipe.brownian });
  try {
    const rng = input.noiseRng;
    if (rng !== undefined && rng.imageCount * rng.imageSize >= pipe.noiseThreadMinValues) {
      ahead.usePlainDraws(pipe.noise.open(rng.continuation()));
    }
    return await drive(pipe, input, ahead);
  } finally {
    await ahead.close();
  }
}

async function drive(pipe: LoadedPipeline, input: DenoiseInput, ahead: NoiseAhead): Promise<Float32Array> {
  const { sampler, cond, cfgScale, h, w, signal } = input;
  const plane = pipe.model.config.latentChannels * h * w;
  const dim = pipe.model.textEncoder.hiddenSize;
  const vPred = pipe.model.config.predictionType === "v_prediction";
  // One UNet input buffer for the run: the batcher copies it into its batch before the call resolves.
  const scaled = new Float32Array(plane);
  const previews = new Previews(
    input.preview?.every,
    pipe.model.config.latentChannels,
    h,
    w,
    pipe.model.pooledSize === undefined ? "sd" : "sdxl",
  );
  const previewContent = input.preview?.content;
  // SDXL's size conditions: original size = target size = the pass's image, and the crop settings.
  const size = input.imageSize ?? { width: 8 * w, height: 8 * h };
  const crop = input.sdxlCrop ?? { top: 0, left: 0 };
  // The refiner conditions on original size, crop and an aesthetic score, which differs between the
  // prompt's and the negative prompt's rows; SDXL base on original size, crop and target size.
  const refinerIds = pipe.model.timeIdsSize === 5;
  const score = input.aestheticScore ?? { high: 6, low: 2.5 };
  const idsOf = (negative: boolean): Float32Array =>
    refinerIds
      ? Float32Array.of(size.height, size.width, crop.top, crop.left, negative ? score.low : score.high)
      : Float32Array.of(size.height, size.width, crop.top, crop.left, size.height, size.width);
  const timeIds = pipe.model.pooledSize === undefined ? undefined : { prompt: idsOf(false), negative: idsOf(true) };
  const refiner = input.refiner;
  const checkpoint = input.checkpoint;
  if (refiner !== undefined && checkpoint !== undefined) throw new Error("a pass with a refiner carries its own resume, not checkpoints");
  const fromRefiner = refiner?.mode === "resume" ? refiner : undefined;
  // What the run replays before it calls the model: the model's answers (refiner) or a failed attempt's.
  const resume: PassProgress | undefined = fromRefiner ?? checkpoint?.resume;
  if (checkpoint?.resume !== undefined && checkpoint.resume.start.length !== input.start.length) {
    throw FarmError.invalid(
      "resume_from.start",
      `the checkpoint's latent has ${checkpoint.resume.start.length} values, this pass's ${input.start.length}`,
    );
  }
  if (resume !== undefined && resume.start.length !== input.start.length) {
    throw new FarmError(
      grpc.status.FAILED_PRECONDITION,
      `the refiner's latent has ${input.start.length} values where the model's run had ${resume.start.length}: the two models' latents differ`,
      { field: "refiner_checkpoint" },
    );
  }
  if (resume !== undefined && input.maskBlend !== undefined) {
    // The blend goes toward the model's encoding of the picture, as A1111's init_latent stays the model's.
    if (resume.init?.length !== input.maskBlend.init.length) {
      const field = fromRefiner ? "refiner_resume.init" : "resume_from.init";
      throw FarmError.invalid(field, "an inpainting pass's resume needs the model's init latent");
    }
    input.maskBlend.init.set(resume.init);
  }
  // A checkpointing run's answers not sent yet, and how many calls the coordinator already has.
  const every = checkpoint?.every ?? 0;
  // The first checkpoint carries the start as the pass began (the sampler may work in input.start).
  const unsent =
    every > 0
      ? {
          answers: [] as Float32Array[],
          uncond: [] as Float32Array[],
          sentUpTo: resume?.answers.length ?? 0,
          start: resume?.start ?? input.start.slice(),
        }
      : undefined;
  const sendCheckpoint = (): void => {
    if (unsent === undefined || unsent.answers.length === 0) return;
    const first = unsent.sentUpTo === 0;
    checkpoint!.emit({
      firstCall: unsent.sentUpTo,
      answers: unsent.answers,
      uncondAnswers: unsent.uncond,
      start: first ? unsent.start.slice() : undefined,
      init: first ? input.maskBlend?.init.slice() : undefined,
    });
    unsent.sentUpTo += unsent.answers.length;
    unsent.answers = [];
    unsent.uncond = [];
  };
  // What a switching run hands the refiner's: its start as it began, and each call's answer in order.
  const record =
    refiner?.mode === "switch" ? { start: input.start.slice(), answers: [] as Float32Array[], uncond: [] as Float32Array[] } : undefined;
  const gen = sampler.run(resume?.start.slice() ?? input.start);
  let r = gen.next();
  let lastStep = -1;
  let call = 0;
  try {
    while (!r.done) {
      checkAborted(signal);
      const req = r.value;
      const replayed = resume !== undefined && call < resume.answers.length;
      if (refiner !== undefined && sampler.switchesToRefiner(req) && resume === undefined) {
        throw new RefinerSwitch(
          record!.start,
          record!.answers,
          record!.uncond,
          input.maskBlend?.init.slice(),
          input.imageCond !== undefined,
        );
      }
      if (fromRefiner !== undefined && call === fromRefiner.answers.length) fromRefiner.onTakeOver();
      call++;
      if (req.step !== lastStep) {
        // A step a failed attempt made and checkpointed, that attempt reported.
        const reported = checkpoint?.resume !== undefined && call - 1 <= checkpoint.resume.answers.length;
        if (lastStep >= 0 && !replayed && !reported) input.onStep(lastStep + 1, sampler.steps, previews.take(lastStep + 1));
        // A step is done: every `every` steps, its answers go out.
        if (lastStep >= 0 && every > 0 && (lastStep + 1) % every === 0) sendCheckpoint();
        lastStep = req.step;
      }
      if (replayed) {
        r = gen.next(await replay(req, resume, fromRefiner ? "refiner_resume" : "resume_from", call - 1, sampler, ahead, signal));
        continue;
      }
      const blend = input.maskBlend;
      const x = blend?.beforeModel ? blendLatent(req.x, blend) : req.x;
      const scale = req.kind === "denoise" ? cIn(req.sigma) : req.inputScale;
      scaleLatent(x, scale, scaled);
      const conds = cond.condAt(req.call);
      // NGMS and skip_early_cond: the first prompt's output stands in for the negative's, at CFG scale 1.
      const skipUncond = sampler.skipsUncond(req);
      const uncond = skipUncond ? undefined : cond.uncondAt(req.call);
      // Cond and uncond of different lengths go in separate requests (A1111's default, without the padding options).
      const groups = new Map<number, { contexts: Float32Array[]; pooled: Float32Array[]; ids: Float32Array[] }>();
      const add = (tensor: Float32Array, pooled: Float32Array | undefined, negative: boolean): number => {
        const seq = tensor.length / dim;
        const g = groups.get(seq) ?? { contexts: [], pooled: [], ids: [] };
        g.contexts.push(tensor);
        if (pooled !== undefined) g.pooled.push(pooled);
        if (timeIds !== undefined) g.ids.push(negative ? timeIds.negative : timeIds.prompt);
        groups.set(seq, g);
        return g.contexts.length - 1;
      };
      const uIdx = uncond === undefined ? -1 : add(uncond.tensor, uncond.pooled, true);
      const cIdx = conds.map((cd) => add(cd.tensor, cd.pooled, false));
      const results = new Map<number, Float32Array[]>();
      const evaluating = Promise.all(
        [...groups.entries()].map(async ([seq, { contexts, pooled, ids }]) => {
          const concat = input.imageCond ? { concat: input.imageCond } : {};
          const added = timeIds === undefined ? {} : { added: { pooled, timeIds: refinerIds ? concatRows(ids) : timeIds.prompt } };
          results.set(seq, await pipe.batcher.evaluate({ x: scaled, t: req.timestep, contexts, h, w, seq, ...concat, ...added }, signal));
        }),
      );
      // Queued after the batcher's dispatch: draws the sampler's next noise while the UNet runs off-thread.
      setImmediate(() => ahead.drawAhead(req, signal));
      await evaluating;
      // The generator is synchronous: noise being computed off-thread for it must be here before it resumes.
      checkAborted(signal);
      if (!ahead.readyNow(req)) await ahead.ensureReady(req, signal);
      const outOf = (tensor: Float32Array, idx: number): Float32Array => results.get(tensor.length / dim)![idx]!;
      const uncondOut = uncond === undefined ? outOf(conds[0]!.tensor, cIdx[0]!) : outOf(uncond.tensor, uIdx);
      if (req.kind === "denoise") {
        const outputs = conds.map((cd, k) => ({ output: outOf(cd.tensor, cIdx[k]!), weight: cd.weight }));
        // Denoised and CFG-combined in one pass, into the sampler's slot when it offers one: its kernels
        // then read the answer where it is.
        const toDenoised = { x, sigma: req.sigma, prediction: vPred ? ("v" as const) : ("eps" as const) };
        const combined = cfgCombine(uncondOut, outputs, skipUncond ? 1 : cfgScale, toDenoised, req.into);
        const denoised = blend && !blend.beforeModel ? blendLatent(combined, blend, combined) : combined;
        if (previews.wants(req.step + 1)) {
          // A1111's live_preview_content: the prompt's or the negative prompt's own prediction, or the combined one.
          const own = previewContent === "Prompt" ? outputs[0]!.output : previewContent === "Negative prompt" ? uncondOut : undefined;
          previews.offer(req.step + 1, (into) => (own === undefined ? into.set(denoised) : cfgCombine(own, [], 1, toDenoised, into)));
        }
        record?.answers.push(denoised.slice());
        unsent?.answers.push(denoised.slice());
        r = gen.next(denoised);
      } else {
        if (blend && !blend.beforeModel) {
          throw new FarmError(
            grpc.status.UNIMPLEMENTED,
            `${sampler.choice.sampler.name} cannot blend an inpainting mask into its denoised latent yet`,
            { field: "sampler_name" },
          );
        }
        if (vPred) {
          throw new FarmError(grpc.status.UNIMPLEMENTED, `${sampler.choice.sampler.name} on v-prediction models is not implemented yet`, {
            field: "sampler_name",
          });
        }
        const eConds = conds.map((cd, k) => ({ output: outOf(cd.tensor, cIdx[k]!), weight: cd.weight }));
        const scale = skipUncond ? 1 : cfgScale * (req.cfgScaleMultiplier ?? 1);
        const output = cfgCombine(uncondOut, eConds, scale, undefined, req.into);
        if (previews.wants(req.step + 1)) {
          const eps = previewContent === "Prompt" ? eConds[0]!.output : previewContent === "Negative prompt" ? uncondOut : output;
          previews.offer(req.step + 1, (into) => predictedX0(x, eps, req.sigma, into));
        }
        record?.answers.push(output.slice());
        if (req.needUncond) record?.uncond.push(uncondOut.slice());
        unsent?.answers.push(output.slice());
        if (req.needUncond) unsent?.uncond.push(uncondOut.slice());
        r = gen.next(req.needUncond ? { output, uncond: uncondOut } : output);
      }
    }
  } finally {
    // Cancelled or failed: the run's latents go back to the kernels' memory.
    if (!r.done) gen.return(undefined as never);
  }
  if (fromRefiner !== undefined && call <= fromRefiner.answers.length) {
    throw FarmError.invalid(
      "refiner_resume",
      `${fromRefiner.answers.length} answers for a pass of ${call} model calls: it never reached the refiner`,
    );
  }
  if (checkpoint?.resume !== undefined && call < checkpoint.resume.answers.length) {
    throw FarmError.invalid("resume_from", `${checkpoint.resume.answers.length} answers for a pass of ${call} model calls`);
  }
  input.onStep(sampler.steps, sampler.steps, previews.take(sampler.steps));
  checkAborted(signal);
  // A1111's sampler writes this once its sampling is over, after what the run recorded as it went.
  if (cond.padding !== undefined) sampler.infotext[cond.padding] = true;
  return r.value;
}

function concatRows(rows: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(rows.reduce((n, r) => n + r.length, 0));
  let at = 0;
  for (const r of rows) {
    out.set(r, at);
    at += r.length;
  }
  return out;
}

/**
 * A call an earlier run answered (the model's before a refiner switch, or a failed attempt's), answered
 * again with the same values. What a call records as it is made (NGMS, Skip Early CFG) is recorded again,
 * and the noise it announced drawn.
 */
async function replay(
  req: ModelRequest,
  resume: PassProgress,
  field: "refiner_resume" | "resume_from",
  call: number,
  sampler: PreparedSampling,
  ahead: NoiseAhead,
  signal: AbortSignal,
): Promise<Float32Array | { output: Float32Array; uncond: Float32Array }> {
  sampler.skipsUncond(req);
  ahead.drawAhead(req, signal);
  if (!ahead.readyNow(req)) await ahead.ensureReady(req, signal);
  const given = resume.answers[call]!;
  if (given.length !== req.x.length) {
    throw FarmError.invalid(field, `answer ${call} has ${given.length} values, the latent ${req.x.length}`);
  }
  const output = req.into ?? new Float32Array(given.length);
  output.set(given);
  if (req.kind === "eps" && req.needUncond) {
    const uncond = resume.uncondAnswers[call];
    if (uncond?.length !== req.x.length) throw FarmError.invalid(field, `call ${call} needs the negative prompt's eps`);
    return { output, uncond: uncond.slice() };
  }
  return output;
}

/**
 * The run's live previews. On a step that shows one, each model call's denoised latent is kept (the
 * step's last call wins) and made into a picture when the step's progress is sent.
 */
class Previews {
  private pending: { step: number; latent: Float32Array } | undefined;
  private buffer: Float32Array | undefined;
  /** 0 for none. "Approx cheap" mixes SD1's four latent channels: other latents get no preview. */
  private readonly every: number;

  constructor(
    every: number | undefined,
    channels: number,
    private readonly h: number,
    private readonly w: number,
    private readonly space: LatentSpace,
  ) {
    this.every = every !== undefined && every > 0 && channels === 4 ? every : 0;
  }

  /** Whether `step` shows a preview: then offer() wants each of its calls' denoised latent. */
  wants(step: number): boolean {
    return this.every !== 0 && step % this.every === 0;
  }

  /** Keeps a copy (the sampler's next kernels may write over the answer's slot); `fill` writes it. */
  offer(step: number, fill: (into: Float32Array) => void): void {
    this.buffer ??= new Float32Array(4 * this.h * this.w);
    fill(this.buffer);
    this.pending = { step, latent: this.buffer };
  }

  take(step: number): Uint8Array | undefined {
    const p = this.pending;
    if (p === undefined || p.step !== step) return undefined;
    this.pending = undefined;
    return previewPng(p.latent, this.h, this.w, this.space);
  }
}

/**
 * x0 from a timestep sampler's VP latent and its CFG-combined eps, as A1111's get_pred_x0 makes it:
 * (x − sqrt(1 − ᾱ)·eps)/sqrt(ᾱ), with ᾱ = 1/(1 + σ²) from the call's σ equivalent.
 */
function predictedX0(x: Float32Array, eps: Float32Array, sigma: number, into: Float32Array): void {
  const scale = Math.sqrt(1 + sigma * sigma);
  for (let i = 0; i < x.length; i++) into[i] = x[i]! * scale - sigma * eps[i]!;
}
