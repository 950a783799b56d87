import * as grpc from "@grpc/grpc-js";
import {
  FarmError,
  RngSource as WireRng,
  abortError,
  type Image,
  type RunTaskRequest,
} from "@latentfarm/shared";
import { create } from "@bufbuild/protobuf";
import { ImageSchema } from "@latentfarm/shared";
import { ImageRng, cIn, epsToDenoised, prepareSampling, vToDenoised, type SamplingSettings } from "../sampling/index.js";
import { combineDenoised, type PreparedConditioning } from "../conditioning/index.js";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { buildInfotext } from "./infotext.js";
import { encodePng, toRgb8 } from "./png.js";

export interface RenderContext {
  signal: AbortSignal;
  agentId: string;
  onStep: (step: number, totalSteps: number) => void;
  onWarning: (message: string) => void;
}

const RNG_NAMES: Record<WireRng, "GPU" | "CPU" | "NV"> = {
  [WireRng.UNSPECIFIED]: "GPU",
  [WireRng.GPU]: "GPU",
  [WireRng.CPU]: "CPU",
  [WireRng.NV]: "NV",
};

function checkAborted(signal: AbortSignal): void {
  if (signal.aborted) throw abortError(signal);
}

/**
 * Renders one txt2img image: conditioning, the sampler's model calls through the step batcher
 * (so concurrent images share UNet calls), CFG, VAE decode and a PNG with A1111's infotext.
 */
export async function renderTask(pipe: LoadedPipeline, req: RunTaskRequest, ctx: RenderContext): Promise<Image> {
  const p = req.params!;
  const steps = p.steps ?? 50;
  const width = p.width ?? 512;
  const height = p.height ?? 512;
  const cfg = p.cfgScale ?? 7;
  const clipSkip = p.clipSkip ?? 1;
  const seed = Number(req.seed);
  const subseed = Number(req.subseed);
  const rng = RNG_NAMES[p.rng] ?? "GPU";
  const h = height / 8;
  const w = width / 8;
  const C = pipe.model.config.latentChannels;
  const plane = C * h * w;
  const ensd = Number(p.etaNoiseSeedDelta);

  const imageRng = new ImageRng({
    shape: [C, h, w],
    seeds: [seed],
    subseeds: [subseed],
    subseedStrength: p.subseedStrength,
    seedResizeFromH: p.seedResizeFromH,
    seedResizeFromW: p.seedResizeFromW,
    source: rng,
    etaNoiseSeedDelta: ensd,
  });
  const settings: SamplingSettings = {};
  if (p.eta !== undefined) settings.eta = p.eta;
  if (p.sChurn !== undefined) settings.sChurn = p.sChurn;
  if (p.sTmin !== undefined) settings.sTmin = p.sTmin;
  if (p.sTmax !== undefined) settings.sTmax = p.sTmax;
  if (p.sNoise !== undefined) settings.sNoise = p.sNoise;
  const sampler = prepareSampling({
    samplerName: p.samplerName,
    scheduler: p.scheduler,
    steps,
    noise: () => imageRng.next(),
    // SDE samplers: A1111's Brownian tree per image, seeded with the plain seed (no ENSD).
    brownian: { seeds: [seed], shape: [C, h, w], source: rng },
    settings,
  });
  const resolved = sampler.choice;

  const conditioner = await pipe.conditioner();
  checkAborted(ctx.signal);
  // Prompt schedules count denoiser calls, which second-order samplers make twice per step.
  const cond: PreparedConditioning = await conditioner.prepare({
    prompt: p.prompt,
    negativePrompt: p.negativePrompt,
    steps: sampler.promptScheduleSteps,
    clipSkip,
    signal: ctx.signal,
  });
  for (const u of cond.extraNetworks.unknown) ctx.onWarning(`unknown extra network tag ${u.raw} removed from the prompt`);
  if (cond.extraNetworks.networks.length > 0) {
    throw FarmError.unimplemented("prompt", `LoRA tags (<lora:${cond.extraNetworks.networks[0]!.name}:…>) are not implemented by this farm yet`);
  }

  const dim = pipe.model.textEncoder.hiddenSize;
  const vPred = pipe.model.config.predictionType === "v_prediction";
  const gen = sampler.run(sampler.startLatent(imageRng.first()));
  let r = gen.next();
  let lastStep = -1;
  while (!r.done) {
    checkAborted(ctx.signal);
    const req = r.value;
    if (req.step !== lastStep) {
      if (lastStep >= 0) ctx.onStep(lastStep + 1, sampler.steps);
      lastStep = req.step;
    }
    const x = req.x;
    const scale = req.kind === "denoise" ? cIn(req.sigma) : req.inputScale;
    const scaled = new Float32Array(plane);
    for (let i = 0; i < plane; i++) scaled[i] = x[i]! * scale;
    const conds = cond.condAt(req.call);
    const uncond = cond.uncondAt(req.call);
    // Cond and uncond of different lengths go in separate requests (A1111's default, no padding).
    const groups = new Map<number, Float32Array[]>();
    const add = (tensor: Float32Array): number => {
      const seq = tensor.length / dim;
      const g = groups.get(seq) ?? [];
      g.push(tensor);
      groups.set(seq, g);
      return g.length - 1;
    };
    const uIdx = add(uncond.tensor);
    const cIdx = conds.map((cd) => add(cd.tensor));
    const results = new Map<number, Float32Array[]>();
    await Promise.all(
      [...groups.entries()].map(async ([seq, contexts]) => {
        results.set(seq, await pipe.batcher.evaluate({ x: scaled, t: req.timestep, contexts, h, w, seq }, ctx.signal));
      }),
    );
    const outOf = (tensor: Float32Array, idx: number): Float32Array => results.get(tensor.length / dim)![idx]!;
    if (req.kind === "denoise") {
      const denoised = (out: Float32Array): Float32Array => (vPred ? vToDenoised(x, out, req.sigma) : epsToDenoised(x, out, req.sigma));
      const dUncond = denoised(outOf(uncond.tensor, uIdx));
      const dConds = conds.map((cd, k) => ({ denoised: denoised(outOf(cd.tensor, cIdx[k]!)), weight: cd.weight }));
      r = gen.next(combineDenoised(dConds, dUncond, cfg));
    } else {
      if (vPred) throw new FarmError(grpc.status.UNIMPLEMENTED, `${resolved.sampler.name} on v-prediction models is not implemented yet`, { field: "sampler_name" });
      const eUncond = outOf(uncond.tensor, uIdx);
      const eConds = conds.map((cd, k) => ({ denoised: outOf(cd.tensor, cIdx[k]!), weight: cd.weight }));
      const output = combineDenoised(eConds, eUncond, cfg * (req.cfgScaleMultiplier ?? 1));
      r = gen.next(req.needUncond ? { output, uncond: eUncond } : output);
    }
  }
  ctx.onStep(sampler.steps, sampler.steps);
  checkAborted(ctx.signal);
  const latent = r.value;
  const scaledLatent = new Float32Array(plane);
  for (let i = 0; i < plane; i++) scaledLatent[i] = latent[i]! / pipe.model.config.scalingFactor;
  const image = await pipe.model.vaeDecode(scaledLatent, h, w, ctx.signal);
  const rgb = toRgb8(image, width, height);
  const infotext = buildInfotext({
    prompt: p.prompt,
    negativePrompt: p.negativePrompt,
    steps,
    sampler: resolved.sampler.name,
    scheduleType: String(sampler.infotext["Schedule type"] ?? "Automatic"),
    cfgScale: cfg,
    seed,
    width,
    height,
    model: pipe.name,
    subseed,
    subseedStrength: p.subseedStrength,
    seedResizeFrom: { w: p.seedResizeFromW, h: p.seedResizeFromH },
    clipSkip,
    ensd: resolved.sampler.usesEnsd && ensd !== 0 ? ensd : undefined,
    rng,
    extra: Object.entries(sampler.infotext).filter(([k]) => k !== "Schedule type"),
  });
  const png = await encodePng(rgb, width, height, infotext);
  if (png.length === 0) throw new FarmError(grpc.status.INTERNAL, "PNG encoding produced no bytes");
  return create(ImageSchema, {
    index: req.imageIndex,
    seed: req.seed,
    subseed: req.subseed,
    png,
    infotext,
    width,
    height,
    agentId: ctx.agentId,
  });
}
