import { parseArgs, type ParseArgsConfig } from "node:util";
import { existsSync, readFileSync } from "node:fs";
import * as grpc from "@grpc/grpc-js";
import { fromJson, toJson, type JsonValue, type MessageInitShape } from "@bufbuild/protobuf";
import { mkdir, readFile, readdir, rename, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { execFileSync } from "node:child_process";
import {
  FarmError,
  InpaintingFill,
  RenderService,
  ResizeMode,
  RngSource,
  OverrideSettingsSchema,
  TokenAuth,
  createClient,
  jsonLogger,
  tlsFromFlags,
  type LogLevel,
  type OverrideSettings,
  type GenerationParamsSchema,
  ImageProvenanceSchema,
} from "@latentfarm/shared";
import { Coordinator, type CoordinatorConfig } from "../coordinator.js";
import { A1111Gateway } from "../a1111-api/gateway.js";
import { parsePixelCount, type HiresTiling } from "../hires-stages.js";
import { startNatsServer, type NatsServerHandle } from "./nats-server.js";

type Out = { out: (s: string) => void; err: (s: string) => void };
const io: Out = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) };

const USAGE = `latentfarm — a distributed Stable Diffusion render farm

Usage:
  latentfarm up [--models DIR] [--nats URL] [--port N] [--agents N] [--ep cpu|cuda|webgpu] [--metrics-port N]
                [--loras DIR] [--embeddings DIR] [--vae-dir DIR] [--styles-file F]... [--checkpoint-every N] [hires tiling]
                [--a1111-api-port N] (also serve A1111's HTTP API, /sdapi/v1/…, on 127.0.0.1:N)
  latentfarm a1111-api [--coordinator HOST:PORT] [--port N] [--host ADDR] [--tls-ca F] [--max-body-mib M] [--metrics-port N]
                   [--cors-allow-origins ORIGIN,...]
                   A1111's HTTP API (/sdapi/v1/txt2img, img2img, extra-single-image, extra-batch-images, progress, interrupt, samplers,
                   schedulers, sd-models, upscalers, …) in front of a coordinator; default 127.0.0.1:7860
  latentfarm demo [--models DIR] [--out DIR]           start a one-machine farm, render one image, stop
  latentfarm coordinator [--port N] [--host ADDR] [--nats URL] [--metrics-port N] [--default-model NAME]
                   [--agent-timeout-ms N] [--tls-cert F --tls-key F --tls-ca F] [--api-tokens-file F] [--health-port N]
                   [--max-attempts N] [--replicas N] [--image-ttl-hours H] [--job-retention-hours H] [--store-prefix P]
                   [--tenants-file F] [--drain-seconds N] [--no-speculate] [--memory-only] [--max-finished-in-memory N]
                   [--checkpoint-every N] [--checkpoint-max-mib M] (a retry resumes a task's sampling from its last
                   checkpoint, taken every N steps, default 5, 0 for none; the coordinator holds at most M MiB of them, default 1024)
                   [--styles-file F]... (A1111 styles.csv: name, prompt, negative_prompt)
                   [hires tiling]
  latentfarm agent --models DIR [--port N] [--nats URL] [--ep cpu|cuda|webgpu] [--device-id N] [--slots N]
                   [--metrics-port N] [--health-port N] [--advertise-address HOST:PORT] [--id ID]
                   [--threads N] [--heartbeat-ms N] [--drain-seconds N] [--orphan-grace-seconds N] [--tls-cert F --tls-key F --tls-ca F]
  latentfarm txt2img --coordinator HOST:PORT --prompt TEXT --out DIR [generation options]
  latentfarm extras  --coordinator HOST:PORT --image FILE... --out DIR [--upscaler-1 NAME] [--upscaling-resize F |
                     --upscaling-resize-w W --upscaling-resize-h H [--no-upscaling-crop]] [--upscaler-2 NAME
                     --extras-upscaler-2-visibility F] [--gfpgan-visibility F] [--codeformer-visibility F --codeformer-weight F]
  latentfarm agents  --coordinator HOST:PORT [--json]
  latentfarm models  --coordinator HOST:PORT [--json]
  latentfarm samplers   --coordinator HOST:PORT [--json]   (A1111 sampler names, aliases, options)
  latentfarm schedulers --coordinator HOST:PORT [--json]   (schedule types: API name, label, aliases)
  latentfarm embeddings --coordinator HOST:PORT [--json]   (textual-inversion embeddings in the agents' folders)
  latentfarm vaes       --coordinator HOST:PORT [--json]   (VAE files a job's sd_vae may name)
  latentfarm loras      --coordinator HOST:PORT [--json] [--metadata]   (LoRA files a prompt's <lora:name:w> may name, and their agents; with their training metadata)
  latentfarm upscalers  --coordinator HOST:PORT [--json]   (upscalers and face restorers a job may name, and their agents)
  latentfarm styles     --coordinator HOST:PORT [--json]   (prompt styles a job's --style may name)
  latentfarm prompt "<prompt>" [--steps N] [--json] [--tokenizer DIR]

Generation options (A1111's parameter names in kebab case):
  --negative-prompt TEXT  --model NAME  --seed N  --subseed N  --subseed-strength F
  --sampler-name NAME  --scheduler NAME  --steps N  --cfg-scale F  --width N  --height N
  --batch-size N  --n-iter N  --clip-skip N  --rng CPU|GPU|NV  --eta-noise-seed-delta N  --eta F  --s-noise F
  --infotext TEXT | --infotext-from FILE (an A1111 PNG, JPEG, WebP or AVIF, or a text file): A1111's generation parameters,
    filling every option this command line leaves unset, as A1111's API reads its infotext field
  --preview-every N (a live preview every N steps, written to OUT/previews/JOB-IMAGE-STEP.png)
  --s-min-uncond F (NGMS)  --override-setting KEY=VALUE (repeatable; A1111's option names, as in its
    override_settings: eta_ancestral, always_discard_next_to_last_sigma, sigma_min, sigma_max, rho,
    uni_pc_variant, uni_pc_order, skip_early_cond, sd_noise_schedule, sd_vae (a VAE file as
    "latentfarm vaes" lists it, "Automatic" or "None"), …)
  Hires.fix: --enable-hr (implied by --hr-scale/--hr-resize-*)  --hr-scale F  --hr-upscaler NAME
    --hr-second-pass-steps N  --hr-resize-x N  --hr-resize-y N  --hr-sampler-name NAME  --hr-scheduler NAME
    --hr-prompt TEXT  --hr-negative-prompt TEXT  --hr-checkpoint MODEL  --denoising-strength F
  Refiner: --refiner MODEL  --refiner-switch-at F (0..1; default: the first model call); with Hires.fix the
    second pass switches unless --override-setting hires_fix_refiner_pass="first pass"|"both passes"
  img2img: --init-image FILE (PNG/JPEG/WebP, repeatable)  --resize-mode just-resize|crop-and-resize|resize-and-fill|latent-upscale
    --initial-noise-multiplier F  --denoising-strength F
  inpainting: --mask FILE  --mask-blur N  --inpainting-fill fill|original|latent-noise|latent-nothing
    --inpaint-full-res true|false  --inpaint-full-res-padding N  --inpainting-mask-invert
  --tiling (A1111's Tiling: seamless, circularly padded convolutions)  --restore-faces  --code-former-weight F  --lora NAME[:WEIGHT[:UNET_WEIGHT]] (repeatable; or <lora:…> in the prompt)
  --style NAME (repeatable; an A1111 prompt style of the coordinator's --styles-file, merged in order)

Client options (txt2img, agents, models): --token T (or LATENTFARM_TOKEN), --tls-ca FILE, --json

Hires tiling (coordinator, up): a Hires.fix second pass of more pixels than --hires-tile-above
(WxH or a count; default 1536x1536) runs as overlapping tiles on several agents, blended without
seams: --hires-tile-size PX (default 512, a multiple of 64) --hires-tile-overlap PX (default 64).
`;

/** A flag that takes a whole number ≥ 0 (--checkpoint-every, --checkpoint-max-mib). */
function wholeNumber(flag: string, x: string): number {
  const n = Number(x);
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`--${flag} must be a whole number ≥ 0, got "${x}"`);
  return n;
}

const TILING_OPTIONS = {
  "hires-tile-above": { type: "string" },
  "hires-tile-size": { type: "string" },
  "hires-tile-overlap": { type: "string" },
} as const satisfies ParseArgsConfig["options"];

function tilingFromFlags(v: {
  "hires-tile-above"?: string | undefined;
  "hires-tile-size"?: string | undefined;
  "hires-tile-overlap"?: string | undefined;
}): Partial<HiresTiling> {
  const out: Partial<HiresTiling> = {};
  try {
    if (v["hires-tile-above"] !== undefined) out.tileAbovePixels = parsePixelCount(v["hires-tile-above"]);
  } catch (err) {
    throw new UsageError(`--hires-tile-above: ${(err as Error).message}`);
  }
  if (v["hires-tile-size"] !== undefined) out.tileSize = num("hires-tile-size", v["hires-tile-size"])!;
  if (v["hires-tile-overlap"] !== undefined) out.tileOverlap = num("hires-tile-overlap", v["hires-tile-overlap"])!;
  return out;
}

const GEN_OPTIONS = {
  coordinator: { type: "string", default: "127.0.0.1:50051" },
  prompt: { type: "string", default: "" },
  out: { type: "string", default: "outputs" },
  "negative-prompt": { type: "string", default: "" },
  model: { type: "string", default: "" },
  seed: { type: "string" },
  subseed: { type: "string" },
  "subseed-strength": { type: "string" },
  "sampler-name": { type: "string", default: "" },
  scheduler: { type: "string", default: "" },
  steps: { type: "string" },
  "cfg-scale": { type: "string" },
  width: { type: "string" },
  height: { type: "string" },
  "batch-size": { type: "string" },
  "n-iter": { type: "string" },
  "clip-skip": { type: "string" },
  rng: { type: "string" },
  "eta-noise-seed-delta": { type: "string" },
  eta: { type: "string" },
  "s-noise": { type: "string" },
  "s-min-uncond": { type: "string" },
  "preview-every": { type: "string" },
  infotext: { type: "string", default: "" },
  "infotext-from": { type: "string" },
  "override-setting": { type: "string", multiple: true },
  "enable-hr": { type: "boolean", default: false },
  "hr-scale": { type: "string" },
  "hr-upscaler": { type: "string", default: "" },
  "hr-second-pass-steps": { type: "string" },
  "hr-resize-x": { type: "string" },
  "hr-resize-y": { type: "string" },
  "hr-sampler-name": { type: "string", default: "" },
  "hr-scheduler": { type: "string", default: "" },
  "hr-prompt": { type: "string", default: "" },
  "hr-negative-prompt": { type: "string", default: "" },
  "hr-checkpoint": { type: "string", default: "" },
  refiner: { type: "string", default: "" },
  tiling: { type: "boolean", default: false },
  "refiner-switch-at": { type: "string" },
  "denoising-strength": { type: "string" },
  "init-image": { type: "string", multiple: true },
  "resize-mode": { type: "string" },
  mask: { type: "string" },
  "mask-blur": { type: "string" },
  "inpainting-fill": { type: "string" },
  "inpaint-full-res": { type: "string" },
  "inpaint-full-res-padding": { type: "string" },
  "inpainting-mask-invert": { type: "boolean", default: false },
  "initial-noise-multiplier": { type: "string" },
  "restore-faces": { type: "boolean", default: false },
  "code-former-weight": { type: "string" },
  lora: { type: "string", multiple: true },
  style: { type: "string", multiple: true },
  json: { type: "boolean", default: false },
  quiet: { type: "boolean", default: false },
  token: { type: "string", default: process.env["LATENTFARM_TOKEN"] },
  "tls-ca": { type: "string" },
} as const satisfies ParseArgsConfig["options"];

/** A RenderService client for the CLI: TLS when --tls-ca is given, a bearer token when --token is. */
function renderClient(address: string, v: { token?: string | undefined; "tls-ca"?: string | undefined }) {
  const client = createClient(
    RenderService,
    address,
    v["tls-ca"] ? { credentials: grpc.credentials.createSsl(readFileSync(v["tls-ca"])) } : {},
  );
  const metadata: Record<string, string> = v.token ? { authorization: `Bearer ${v.token}` } : {};
  return { client, metadata };
}

function num(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got "${v}"`);
  return n;
}

function big(name: string, v: string | undefined): bigint | undefined {
  if (v === undefined) return undefined;
  if (!/^-?\d+$/.test(v)) throw new UsageError(`--${name} must be an integer, got "${v}"`);
  return BigInt(v);
}

class UsageError extends Error {}

/** A1111's generation data from an image it saved (PNG, JPEG, WebP, AVIF), or a text file's contents. */
async function readInfotext(path: string): Promise<string> {
  // Loaded when asked for: sharp is a native module most commands never need.
  const { InfotextFileError, readInfotextFile } = await import("./infotext-file.js");
  return readInfotextFile(path).catch((err: unknown) => {
    throw err instanceof InfotextFileError ? new UsageError(`--infotext-from: ${err.message}`) : err;
  });
}

/** `--override-setting KEY=VALUE` flags as a OverrideSettings message: numbers, true/false, or names. */
function overrideSettingsOf(flags: readonly string[]): OverrideSettings {
  const json: Record<string, JsonValue> = {};
  for (const flag of flags) {
    const eq = flag.indexOf("=");
    if (eq < 1) throw new UsageError(`--override-setting must be KEY=VALUE, got "${flag}"`);
    const value = flag.slice(eq + 1);
    json[flag.slice(0, eq)] =
      value === "true" ? true : value === "false" ? false : value !== "" && Number.isFinite(Number(value)) ? Number(value) : value;
  }
  try {
    return fromJson(OverrideSettingsSchema, json);
  } catch (err) {
    throw new UsageError(`--override-setting: ${(err as Error).message}`);
  }
}

// A1111's API takes these as numbers; the CLI takes the number or the UI's words.
const RESIZE_MODES: Record<string, ResizeMode> = {
  "0": ResizeMode.JUST_RESIZE,
  "just-resize": ResizeMode.JUST_RESIZE,
  "1": ResizeMode.CROP_AND_RESIZE,
  "crop-and-resize": ResizeMode.CROP_AND_RESIZE,
  "2": ResizeMode.RESIZE_AND_FILL,
  "resize-and-fill": ResizeMode.RESIZE_AND_FILL,
  "3": ResizeMode.LATENT_UPSCALE,
  "latent-upscale": ResizeMode.LATENT_UPSCALE,
};
const INPAINTING_FILLS: Record<string, InpaintingFill> = {
  "0": InpaintingFill.FILL,
  fill: InpaintingFill.FILL,
  "1": InpaintingFill.ORIGINAL,
  original: InpaintingFill.ORIGINAL,
  "2": InpaintingFill.LATENT_NOISE,
  "latent-noise": InpaintingFill.LATENT_NOISE,
  "3": InpaintingFill.LATENT_NOTHING,
  "latent-nothing": InpaintingFill.LATENT_NOTHING,
};

function choice<T>(name: string, v: string | undefined, options: Record<string, T>): T | undefined {
  if (v === undefined) return undefined;
  const r = options[v.toLowerCase()];
  if (r === undefined) throw new UsageError(`--${name} must be one of ${Object.keys(options).join(", ")}; got "${v}"`);
  return r;
}

function boolFlag(name: string, v: string): boolean {
  if (/^(true|1|yes)$/i.test(v)) return true;
  if (/^(false|0|no)$/i.test(v)) return false;
  throw new UsageError(`--${name} must be true or false, got "${v}"`);
}

/** --lora NAME[:WEIGHT[:UNET_WEIGHT]], as A1111's <lora:name:te:unet> tag. */
function loraOf(v: string): { name: string; teWeight: number; unetWeight: number } {
  const [name, te, unet] = v.split(":");
  const teWeight = te === undefined || te === "" ? 1 : num("lora", te)!;
  const unetWeight = unet === undefined || unet === "" ? teWeight : num("lora", unet)!;
  if (!name) throw new UsageError(`--lora must be NAME[:WEIGHT[:UNET_WEIGHT]], got "${v}"`);
  return { name, teWeight, unetWeight };
}

function rngOf(v: string | undefined): RngSource {
  if (v === undefined) return RngSource.UNSPECIFIED;
  const m: Record<string, RngSource> = { CPU: RngSource.CPU, GPU: RngSource.GPU, NV: RngSource.NV };
  const r = m[v.toUpperCase()];
  if (r === undefined) throw new UsageError(`--rng must be CPU, GPU or NV, got "${v}"`);
  return r;
}

async function nextImageNumber(dir: string): Promise<number> {
  const names = await readdir(dir).catch(() => [] as string[]);
  let max = -1;
  for (const n of names) {
    const m = /^(\d{5})-/.exec(n);
    if (m) max = Math.max(max, Number(m[1]));
  }
  return max + 1;
}

function progressLine(done: number, total: number, images: number, imageCount: number): string {
  const width = 30;
  const filled = total > 0 ? Math.round((done / total) * width) : 0;
  return `\r[${"#".repeat(filled)}${".".repeat(width - filled)}] ${done}/${total} steps, ${images}/${imageCount} images`;
}

export async function txt2img(argv: string[], o: Out = io): Promise<number> {
  const { values: v } = parseArgs({ args: argv, options: GEN_OPTIONS, allowPositionals: false });
  const params = {
    prompt: v.prompt,
    negativePrompt: v["negative-prompt"],
    model: v.model,
    seed: big("seed", v.seed),
    subseed: big("subseed", v.subseed),
    subseedStrength: num("subseed-strength", v["subseed-strength"]) ?? 0,
    samplerName: v["sampler-name"],
    scheduler: v.scheduler,
    steps: num("steps", v.steps),
    cfgScale: num("cfg-scale", v["cfg-scale"]),
    width: num("width", v.width),
    height: num("height", v.height),
    batchSize: num("batch-size", v["batch-size"]),
    nIter: num("n-iter", v["n-iter"]),
    clipSkip: num("clip-skip", v["clip-skip"]),
    rng: rngOf(v.rng),
    etaNoiseSeedDelta: big("eta-noise-seed-delta", v["eta-noise-seed-delta"]) ?? 0n,
    eta: num("eta", v.eta),
    sNoise: num("s-noise", v["s-noise"]),
    sMinUncond: num("s-min-uncond", v["s-min-uncond"]),
    previewEveryNSteps: num("preview-every", v["preview-every"]) ?? 0,
    infotext: v["infotext-from"] !== undefined ? await readInfotext(v["infotext-from"]) : v.infotext,
    overrideSettings: overrideSettingsOf(v["override-setting"] ?? []),
    enableHr: v["enable-hr"] || v["hr-scale"] !== undefined || v["hr-resize-x"] !== undefined || v["hr-resize-y"] !== undefined,
    hrScale: num("hr-scale", v["hr-scale"]),
    hrUpscaler: v["hr-upscaler"],
    hrSecondPassSteps: num("hr-second-pass-steps", v["hr-second-pass-steps"]) ?? 0,
    hrResizeX: num("hr-resize-x", v["hr-resize-x"]) ?? 0,
    hrResizeY: num("hr-resize-y", v["hr-resize-y"]) ?? 0,
    hrSamplerName: v["hr-sampler-name"],
    hrScheduler: v["hr-scheduler"],
    hrPrompt: v["hr-prompt"],
    hrNegativePrompt: v["hr-negative-prompt"],
    hrCheckpointName: v["hr-checkpoint"],
    refinerCheckpoint: v.refiner,
    tiling: v.tiling,
    refinerSwitchAt: num("refiner-switch-at", v["refiner-switch-at"]),
    denoisingStrength: num("denoising-strength", v["denoising-strength"]),
    initImages: await Promise.all((v["init-image"] ?? []).map((f) => readFile(f))),
    resizeMode: choice("resize-mode", v["resize-mode"], RESIZE_MODES),
    ...(v.mask !== undefined && { mask: await readFile(v.mask) }),
    maskBlur: num("mask-blur", v["mask-blur"]),
    inpaintingFill: choice("inpainting-fill", v["inpainting-fill"], INPAINTING_FILLS),
    inpaintFullRes: v["inpaint-full-res"] === undefined ? undefined : boolFlag("inpaint-full-res", v["inpaint-full-res"]),
    inpaintFullResPadding: num("inpaint-full-res-padding", v["inpaint-full-res-padding"]) ?? 0,
    inpaintingMaskInvert: v["inpainting-mask-invert"],
    initialNoiseMultiplier: num("initial-noise-multiplier", v["initial-noise-multiplier"]),
    restoreFaces: v["restore-faces"],
    codeFormerWeight: num("code-former-weight", v["code-former-weight"]),
    loras: (v.lora ?? []).map(loraOf),
    styles: v.style ?? [],
  };
  return submitAndWrite(params, v, o, (n, img) => `${String(n).padStart(5, "0")}-${img.seed}.png`);
}

/** What submitAndWrite reads of a command's flags. */
interface JobFlags {
  coordinator: string;
  out: string;
  quiet?: boolean | undefined;
  json?: boolean | undefined;
  token?: string | undefined;
  "tls-ca"?: string | undefined;
}

/**
 * Submits a job, follows it with a progress line, and writes each image into the output folder under
 * `fileName` (numbered on from the folder's last image, as A1111 numbers); 0 only when every image came.
 */
async function submitAndWrite(
  params: MessageInitShape<typeof GenerationParamsSchema>,
  v: JobFlags,
  o: Out,
  fileName: (n: number, img: { seed: bigint }) => string,
): Promise<number> {
  const { client, metadata } = renderClient(v.coordinator, v);
  const ac = new AbortController();
  const onSigint = (): void => ac.abort();
  process.once("SIGINT", onSigint);
  try {
    const { jobId, imageCount } = await client.submit({ params }, { signal: ac.signal, timeoutMs: 30_000, metadata });
    const dir = resolve(v.out);
    await mkdir(dir, { recursive: true });
    let n = await nextImageNumber(dir);
    const steps = new Map<number, number>();
    let totalSteps = 0;
    let written = 0;
    const paths: string[] = [];
    const provenance: unknown[] = [];
    let ok = false;
    let failure = "";
    for await (const { event } of client.watch({ jobId }, { signal: ac.signal, metadata })) {
      const e = event?.event;
      if (!e) continue;
      if (e.case === "step") {
        steps.set(e.value.imageIndex, e.value.step);
        totalSteps = e.value.totalSteps * imageCount;
        if (e.value.previewPng.length > 0) {
          await mkdir(join(dir, "previews"), { recursive: true });
          await writeFile(
            join(dir, "previews", `${jobId}-${e.value.imageIndex}-${String(e.value.step).padStart(4, "0")}.png`),
            e.value.previewPng,
          );
        }
      } else if (e.case === "image" && e.value.image) {
        const img = e.value.image;
        const path = join(dir, fileName(n++, img));
        await writeFile(path, img.png);
        paths.push(path);
        provenance.push(img.provenance ? toJson(ImageProvenanceSchema, img.provenance) : null);
        written++;
        steps.set(img.index, totalSteps / Math.max(1, imageCount));
      } else if (e.case === "warning") {
        o.err(`\nwarning: ${e.value.message}\n`);
      } else if (e.case === "done") {
        ok = true;
      } else if (e.case === "failed") {
        failure = `${e.value.code}: ${e.value.message}`;
      } else if (e.case === "cancelled") {
        failure = "cancelled";
      }
      if (!v.quiet && !v.json) {
        const done = [...steps.values()].reduce((a, b) => a + b, 0);
        o.err(progressLine(done, totalSteps, written, imageCount));
      }
    }
    if (!v.quiet && !v.json) o.err("\n");
    if (v.json) o.out(JSON.stringify({ jobId, images: paths, provenance, ok, error: failure || undefined }) + "\n");
    else for (const p of paths) o.out(p + "\n");
    if (!ok || written !== imageCount) {
      o.err(`job ${jobId} ${failure ? `failed: ${failure}` : `wrote ${written} of ${imageCount} images`}\n`);
      return 1;
    }
    return 0;
  } catch (err) {
    const fe = FarmError.from(err);
    o.err(`error: ${fe.codeName}: ${fe.message}\n`);
    return 1;
  } finally {
    process.off("SIGINT", onSigint);
    client.close();
  }
}

const EXTRAS_OPTIONS = {
  coordinator: { type: "string", default: "127.0.0.1:50051" },
  out: { type: "string", default: "outputs" },
  image: { type: "string", multiple: true },
  "upscaler-1": { type: "string", default: "None" },
  "upscaler-2": { type: "string", default: "None" },
  "extras-upscaler-2-visibility": { type: "string" },
  "upscaling-resize": { type: "string" },
  "upscaling-resize-w": { type: "string" },
  "upscaling-resize-h": { type: "string" },
  "no-upscaling-crop": { type: "boolean", default: false },
  "gfpgan-visibility": { type: "string" },
  "codeformer-visibility": { type: "string" },
  "codeformer-weight": { type: "string" },
  json: { type: "boolean", default: false },
  quiet: { type: "boolean", default: false },
  token: { type: "string", default: process.env["LATENTFARM_TOKEN"] },
  "tls-ca": { type: "string" },
} as const satisfies ParseArgsConfig["options"];

/**
 * `latentfarm extras`: A1111's Extras tab over the farm. Scale to a size when --upscaling-resize-w or -h
 * is given, else by --upscaling-resize; each --image is one image of the job, written as NNNNN.png.
 */
export async function extras(argv: string[], o: Out = io): Promise<number> {
  const { values: v } = parseArgs({ args: argv, options: EXTRAS_OPTIONS, allowPositionals: false });
  const images = v.image ?? [];
  if (images.length === 0) throw new UsageError("extras needs at least one --image FILE");
  const to = v["upscaling-resize-w"] !== undefined || v["upscaling-resize-h"] !== undefined;
  const params = {
    initImages: await Promise.all(images.map((f) => readFile(f))),
    extras: {
      resizeMode: to ? 1 : 0,
      upscalingResize: num("upscaling-resize", v["upscaling-resize"]),
      upscalingResizeW: num("upscaling-resize-w", v["upscaling-resize-w"]),
      upscalingResizeH: num("upscaling-resize-h", v["upscaling-resize-h"]),
      upscalingCrop: !v["no-upscaling-crop"],
      upscaler1: v["upscaler-1"],
      upscaler2: v["upscaler-2"],
      extrasUpscaler2Visibility: num("extras-upscaler-2-visibility", v["extras-upscaler-2-visibility"]) ?? 0,
      gfpganVisibility: num("gfpgan-visibility", v["gfpgan-visibility"]) ?? 0,
      codeformerVisibility: num("codeformer-visibility", v["codeformer-visibility"]) ?? 0,
      codeformerWeight: num("codeformer-weight", v["codeformer-weight"]) ?? 0,
    },
  };
  return submitAndWrite(params, v, o, (n) => `${String(n).padStart(5, "0")}.png`);
}

async function listCommand(
  kind: "agents" | "models" | "samplers" | "schedulers" | "embeddings" | "vaes" | "loras" | "styles" | "upscalers",
  argv: string[],
  o: Out = io,
): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      coordinator: { type: "string", default: "127.0.0.1:50051" },
      json: { type: "boolean", default: false },
      // loras only: each file's training metadata, read from an agent that has it.
      metadata: { type: "boolean", default: false },
      token: { type: "string", default: process.env["LATENTFARM_TOKEN"] },
      "tls-ca": { type: "string" },
    },
  });
  if (v.metadata && kind !== "loras") {
    o.err(`latentfarm ${kind}: --metadata is for \`latentfarm loras\` only\n`);
    return 2;
  }
  const { client, metadata } = renderClient(v.coordinator, v);
  try {
    if (kind === "agents") {
      const { agents } = await client.listAgents({}, { timeoutMs: 10_000, metadata });
      if (v.json) {
        o.out(
          JSON.stringify(
            agents.map((a) => ({
              id: a.agentId,
              address: a.address,
              ep: a.executionProvider,
              device: a.device,
              runtime: a.runtime,
              slots: a.slots,
              busy: a.busySlots,
              loadedModels: a.loadedModels,
              draining: a.draining,
            })),
          ) + "\n",
        );
      } else {
        for (const a of agents)
          o.out(
            `${a.agentId}\t${a.address}\t${a.executionProvider}\t${a.busySlots}/${a.slots} busy\t${a.draining ? "draining" : "ready"}\t${a.loadedModels.join(",") || "-"}\t${a.device || "-"}\n`,
          );
      }
    } else if (kind === "samplers") {
      const { samplers } = await client.listSamplers({}, { timeoutMs: 10_000, metadata });
      if (v.json) o.out(JSON.stringify(samplers.map((s) => ({ name: s.name, aliases: s.aliases, options: s.options }))) + "\n");
      else
        for (const s of samplers)
          o.out(
            `${s.name}\t${s.aliases.join(",") || "-"}\t${
              Object.entries(s.options)
                .map(([k, val]) => `${k}=${val}`)
                .join(" ") || "-"
            }\n`,
          );
    } else if (kind === "schedulers") {
      const { schedulers } = await client.listSchedulers({}, { timeoutMs: 10_000, metadata });
      if (v.json) o.out(JSON.stringify(schedulers.map((s) => ({ name: s.name, label: s.label, aliases: s.aliases }))) + "\n");
      else for (const s of schedulers) o.out(`${s.name}\t${s.label}\t${s.aliases.join(",") || "-"}\n`);
    } else if (kind === "embeddings") {
      const { embeddings, skipped } = await client.listEmbeddings({}, { timeoutMs: 10_000, metadata });
      const rows = embeddings.map((e) => ({ name: e.name, vectors: e.vectors, width: e.width, hash: e.hash, agents: e.agents }));
      const left = skipped.map((s) => ({ file: s.file, reason: s.reason, agents: s.agents }));
      if (v.json) o.out(JSON.stringify({ embeddings: rows, skipped: left }) + "\n");
      else {
        for (const e of rows) o.out(`${e.name}\t${e.vectors} vectors\twidth ${e.width}\t${e.hash}\t${e.agents.join(",")}\n`);
        for (const s of left) o.out(`skipped\t${s.file}\t${s.reason}\t${s.agents.join(",")}\n`);
      }
    } else if (kind === "styles") {
      const { styles } = await client.listStyles({}, { timeoutMs: 10_000, metadata });
      const rows = styles.map((st) => ({ name: st.name, prompt: st.prompt, negativePrompt: st.negativePrompt }));
      if (v.json) o.out(JSON.stringify(rows) + "\n");
      else for (const st of rows) o.out(`${st.name}\t${st.prompt || "-"}\t${st.negativePrompt || "-"}\n`);
    } else if (kind === "upscalers") {
      const { upscalers, faceRestorers } = await client.listUpscalers({}, { timeoutMs: 10_000, metadata });
      const rows = (list: typeof upscalers) => list.map((u) => ({ name: u.name, builtin: u.builtin, agents: u.agents }));
      if (v.json) o.out(JSON.stringify({ upscalers: rows(upscalers), faceRestorers: rows(faceRestorers) }) + "\n");
      else {
        for (const u of upscalers) o.out(`${u.name}\t${u.builtin ? "built in" : u.agents.join(",")}\n`);
        for (const f of faceRestorers) o.out(`face restorer\t${f.name}\t${f.agents.join(",")}\n`);
      }
    } else if (kind === "loras") {
      const { loras } = await client.listLoras({ metadata: v.metadata }, { timeoutMs: v.metadata ? 60_000 : 10_000, metadata });
      const rows = loras.map((l) => ({
        name: l.name,
        ...(l.alias !== "" && { alias: l.alias }),
        sizeBytes: Number(l.sizeBytes),
        agents: l.agents,
        ...(v.metadata && { metadata: (l.metadataJson === "" ? null : JSON.parse(l.metadataJson)) as JsonValue }),
      }));
      if (v.json) o.out(JSON.stringify(rows) + "\n");
      else {
        for (const l of rows) {
          const extra = v.metadata ? `\t${JSON.stringify(l.metadata ?? null)}` : "";
          o.out(`${l.name}\t${l.alias ?? "-"}\t${l.sizeBytes} bytes\t${l.agents.join(",")}${extra}\n`);
        }
      }
    } else if (kind === "vaes") {
      const { vaes } = await client.listVaes({}, { timeoutMs: 10_000, metadata });
      const rows = vaes.map((f) => ({ name: f.name, sizeBytes: Number(f.sizeBytes), agents: f.agents }));
      if (v.json) o.out(JSON.stringify(rows) + "\n");
      else for (const f of rows) o.out(`${f.name}\t${f.sizeBytes} bytes\t${f.agents.join(",")}\n`);
    } else {
      const { models } = await client.listModels({}, { timeoutMs: 10_000, metadata });
      if (v.json) {
        o.out(
          JSON.stringify(
            models.map((m) => ({ name: m.name, format: m.format, family: m.family, modelHash: m.modelHash, loadedOn: m.loadedOn })),
          ) + "\n",
        );
      } else {
        for (const m of models) {
          o.out(`${m.name}\t${m.family || "-"}\t${m.loadedOn.length ? `loaded on ${m.loadedOn.join(",")}` : "not loaded"}\n`);
        }
      }
    }
    return 0;
  } catch (err) {
    const fe = FarmError.from(err);
    o.err(`error: ${fe.codeName}: ${fe.message}\n`);
    return 1;
  } finally {
    client.close();
  }
}

function logLevel(): LogLevel {
  return (process.env["LATENTFARM_LOG_LEVEL"] as LogLevel | undefined) ?? "info";
}

async function runCoordinator(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      port: { type: "string", default: "50051" },
      host: { type: "string", default: "0.0.0.0" },
      nats: { type: "string", default: process.env["NATS_URL"] ?? "nats://127.0.0.1:4222" },
      "metrics-port": { type: "string", default: "9464" },
      "default-model": { type: "string" },
      "agent-timeout-ms": { type: "string", default: "5000" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "tls-ca": { type: "string" },
      "api-tokens-file": { type: "string" },
      "health-port": { type: "string" },
      "max-attempts": { type: "string", default: "3" },
      "memory-only": { type: "boolean", default: false },
      replicas: { type: "string", default: "1" },
      "image-ttl-hours": { type: "string", default: "24" },
      "job-retention-hours": { type: "string", default: "168" },
      "store-prefix": { type: "string", default: "lf" },
      "tenants-file": { type: "string" },
      "no-speculate": { type: "boolean", default: false },
      "drain-seconds": { type: "string", default: "30" },
      "max-finished-in-memory": { type: "string" },
      "styles-file": { type: "string", multiple: true },
      "checkpoint-every": { type: "string", default: "5" },
      "checkpoint-max-mib": { type: "string", default: "1024" },
      ...TILING_OPTIONS,
    },
  });
  const tls = tlsFromFlags(v);
  const logger = jsonLogger({ level: logLevel(), base: { service: "coordinator" } });
  const hours = (name: string, x: string): number => {
    const n = num(name, x)!;
    if (n <= 0) throw new UsageError(`--${name} must be positive`);
    return n * 3_600_000;
  };
  const c = new Coordinator({
    listen: `${v.host}:${v.port}`,
    natsUrl: v.nats,
    metricsPort: Number(v["metrics-port"]),
    agentTimeoutMs: Number(v["agent-timeout-ms"]),
    maxAttempts: num("max-attempts", v["max-attempts"])!,
    durable: v["memory-only"]
      ? false
      : {
          replicas: num("replicas", v.replicas)!,
          imageTtlMs: hours("image-ttl-hours", v["image-ttl-hours"]),
          jobRetentionMs: hours("job-retention-hours", v["job-retention-hours"]),
          prefix: v["store-prefix"],
        },
    speculate: !v["no-speculate"],
    checkpointEverySteps: wholeNumber("checkpoint-every", v["checkpoint-every"]),
    checkpointMaxBytes: wholeNumber("checkpoint-max-mib", v["checkpoint-max-mib"]) * 1024 * 1024,
    hires: tilingFromFlags(v),
    ...(v["tenants-file"] ? { tenants: JSON.parse(readFileSync(v["tenants-file"], "utf8")) as CoordinatorConfig["tenants"] } : {}),
    ...(v["max-finished-in-memory"] ? { maxFinishedInMemory: num("max-finished-in-memory", v["max-finished-in-memory"])! } : {}),
    ...(v["default-model"] ? { defaultModel: v["default-model"] } : {}),
    ...(v["styles-file"] ? { stylesFiles: v["styles-file"].map((f) => resolve(f)) } : {}),
    ...(tls ? { tls } : {}),
    ...(v["api-tokens-file"] ? { auth: TokenAuth.fromFile(v["api-tokens-file"]) } : {}),
    ...(v["health-port"] !== undefined ? { healthPort: Number(v["health-port"]) } : {}),
    logger,
  });
  await c.start();
  process.stdout.write(JSON.stringify({ ready: true, port: c.port, metrics: c.metricsUrl }) + "\n");
  await untilSignal();
  // SIGTERM: stop admitting, let running tasks finish within the grace period, store everything.
  await c.drain(num("drain-seconds", v["drain-seconds"])! * 1000);
  await c.close();
  return 0;
}

function untilSignal(): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      process.off("SIGINT", done);
      process.off("SIGTERM", done);
      resolve();
    };
    process.once("SIGINT", done);
    process.once("SIGTERM", done);
  });
}

const binPath = fileURLToPath(new URL("../../../bin/latentfarm.js", import.meta.url));

function gpuCount(): number {
  try {
    return execFileSync("nvidia-smi", ["-L"], { encoding: "utf8" })
      .split("\n")
      .filter((l) => l.startsWith("GPU ")).length;
  } catch {
    return 0;
  }
}

export interface Farm {
  coordinatorAddress: string;
  metricsUrl: string | undefined;
  agents: ChildProcess[];
  close(): Promise<void>;
}

/** A whole farm on one machine: NATS (given or started), a coordinator, one agent process per GPU. */
export async function startFarm(opts: {
  models: string;
  nats?: string;
  port?: number;
  agents?: number;
  ep?: string;
  metricsPort?: number;
  hires?: Partial<HiresTiling>;
  /** The agents' LoRA and textual-inversion embedding folders. */
  loras?: string;
  embeddings?: string;
  /** The agents' VAE folder (A1111's models/VAE). */
  vaeDir?: string;
  /** The coordinator's A1111 styles files. */
  stylesFiles?: readonly string[];
  /** Checkpoints of each task's sampling pass every this many steps (0: none; default 5). */
  checkpointEverySteps?: number;
  onLog?: (line: string) => void;
}): Promise<Farm> {
  let nats: NatsServerHandle | undefined;
  const natsUrl = opts.nats ?? (nats = await startNatsServer()).url;
  const logger = jsonLogger({ level: logLevel(), base: { service: "coordinator" } });
  const coordinator = new Coordinator({
    listen: `0.0.0.0:${opts.port ?? 50051}`,
    natsUrl,
    ...(opts.metricsPort !== undefined ? { metricsPort: opts.metricsPort } : {}),
    ...(opts.hires ? { hires: opts.hires } : {}),
    ...(opts.stylesFiles ? { stylesFiles: opts.stylesFiles.map((f) => resolve(f)) } : {}),
    ...(opts.checkpointEverySteps !== undefined ? { checkpointEverySteps: opts.checkpointEverySteps } : {}),
    logger,
  });
  await coordinator.start();
  const ep = opts.ep ?? "cpu";
  const gpus = ep === "cpu" ? 0 : gpuCount();
  const count = ep === "cpu" ? (opts.agents ?? 1) : (opts.agents ?? Math.max(1, gpus));
  const agents: ChildProcess[] = [];
  const ready: Array<Promise<void>> = [];
  for (let i = 0; i < count; i++) {
    const args = [binPath, "agent", "--models", resolve(opts.models), "--nats", natsUrl, "--port", "0", "--ep", ep, "--id", `agent-${i}`];
    if (ep === "cuda") args.push("--device-id", String(i));
    if (opts.loras !== undefined) args.push("--loras", resolve(opts.loras));
    if (opts.embeddings !== undefined) args.push("--embeddings", resolve(opts.embeddings));
    if (opts.vaeDir !== undefined) args.push("--vae-dir", resolve(opts.vaeDir));
    // Each CPU agent gets its share of the cores, so agents on one machine do not oversubscribe.
    if (ep === "cpu") args.push("--threads", String(Math.max(1, Math.floor((await import("node:os")).availableParallelism() / count))));
    const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
    agents.push(child);
    ready.push(
      new Promise<void>((res, rej) => {
        let buf = "";
        child.stdout!.on("data", (d: Buffer) => {
          buf += d.toString();
          if (buf.includes('"ready":true')) res();
        });
        child.once("exit", (code) => rej(new Error(`agent ${i} exited with ${code} before it was ready`)));
      }),
    );
  }
  await Promise.all(ready);
  // Wait until the coordinator has heard every agent's heartbeat.
  const client = createClient(RenderService, `127.0.0.1:${coordinator.port}`);
  for (const deadline = Date.now() + 15_000; Date.now() < deadline;) {
    const { agents: seen } = await client.listAgents({});
    if (seen.length >= count) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  client.close();
  return {
    coordinatorAddress: `127.0.0.1:${coordinator.port}`,
    metricsUrl: coordinator.metricsUrl,
    agents,
    close: async () => {
      await Promise.all(
        agents.map(
          (a) =>
            new Promise<void>((r) => {
              if (a.exitCode !== null || a.signalCode !== null) return r();
              a.once("exit", () => r());
              a.kill("SIGTERM");
              setTimeout(() => a.kill("SIGKILL"), 10_000).unref();
            }),
        ),
      );
      await coordinator.close();
      await nats?.stop();
    },
  };
}

const UP_OPTIONS = {
  models: { type: "string", default: "models" },
  nats: { type: "string" },
  port: { type: "string", default: "50051" },
  agents: { type: "string" },
  ep: { type: "string", default: "cpu" },
  "metrics-port": { type: "string", default: "9464" },
  loras: { type: "string" },
  embeddings: { type: "string" },
  "vae-dir": { type: "string" },
  "styles-file": { type: "string", multiple: true },
  "checkpoint-every": { type: "string", default: "5" },
  "a1111-api-port": { type: "string" },
  ...TILING_OPTIONS,
} as const satisfies ParseArgsConfig["options"];

/** A1111's HTTP API in front of a coordinator, until SIGINT or SIGTERM. */
async function a1111Api(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      coordinator: { type: "string", default: process.env["LATENTFARM_COORDINATOR"] ?? "127.0.0.1:50051" },
      port: { type: "string", default: "7860" },
      host: { type: "string", default: "127.0.0.1" },
      "tls-ca": { type: "string" },
      "max-body-mib": { type: "string", default: "64" },
      "metrics-port": { type: "string" },
      "cors-allow-origins": { type: "string" },
    },
  });
  const gateway = await A1111Gateway.start({
    coordinator: v.coordinator,
    host: v.host,
    port: wholeNumber("port", v.port),
    maxBodyBytes: wholeNumber("max-body-mib", v["max-body-mib"]) * 1024 * 1024,
    ...(v["tls-ca"] ? { tlsCa: readFileSync(v["tls-ca"]) } : {}),
    ...(v["metrics-port"] !== undefined && { metricsPort: wholeNumber("metrics-port", v["metrics-port"]) }),
    ...(v["cors-allow-origins"] !== undefined && {
      corsAllowOrigins: v["cors-allow-origins"]
        .split(",")
        .map((o) => o.trim())
        .filter((o) => o !== ""),
    }),
    logger: jsonLogger({ level: logLevel(), base: { service: "a1111-api" } }),
  });
  io.out(JSON.stringify({ ready: true, url: gateway.url, metrics: gateway.metricsUrl }) + "\n");
  await untilSignal();
  await gateway.close();
  return 0;
}

async function up(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({ args: argv, options: UP_OPTIONS });
  if (!["cpu", "cuda", "webgpu"].includes(v.ep)) throw new UsageError(`--ep must be cpu, cuda or webgpu, got "${v.ep}"`);
  const farm = await startFarm({
    models: v.models,
    ...(v.nats ? { nats: v.nats } : {}),
    port: Number(v.port),
    ...(v.agents ? { agents: Number(v.agents) } : {}),
    ep: v.ep,
    metricsPort: Number(v["metrics-port"]),
    hires: tilingFromFlags(v),
    ...(v.loras !== undefined && { loras: v.loras }),
    ...(v.embeddings !== undefined && { embeddings: v.embeddings }),
    ...(v["vae-dir"] !== undefined && { vaeDir: v["vae-dir"] }),
    ...(v["styles-file"] !== undefined && { stylesFiles: v["styles-file"] }),
    checkpointEverySteps: wholeNumber("checkpoint-every", v["checkpoint-every"]),
  });
  const gateway =
    v["a1111-api-port"] === undefined
      ? undefined
      : await A1111Gateway.start({
          coordinator: farm.coordinatorAddress,
          port: wholeNumber("a1111-api-port", v["a1111-api-port"]),
          logger: jsonLogger({ level: logLevel(), base: { service: "a1111-api" } }),
        }).catch(async (err: unknown) => {
          await farm.close();
          throw err;
        });
  io.out(
    `farm up: coordinator ${farm.coordinatorAddress}, ${farm.agents.length} agent(s)` +
      (gateway ? `, A1111 API ${gateway.url}/sdapi/v1/` : "") +
      `; Ctrl-C stops it\n`,
  );
  await untilSignal();
  await gateway?.close();
  await farm.close();
  return 0;
}

/**
 * Without --models, the demo renders with a tiny random-weight model generated once into
 * .latentfarm/models (by the agent's make-tiny-model command, run as a child process so this
 * package never imports agent code).
 */
async function demoModels(): Promise<string> {
  const root = resolve(".latentfarm");
  const models = join(root, "models");
  if (existsSync(join(models, "tiny", "unet", "model.onnx"))) return models;
  io.err("generating a tiny demo model into .latentfarm/models/tiny\n");
  const build = join(root, "build");
  const r = spawnSync(process.execPath, [binPath, "make-tiny-model", "--out", build, "--seed", "0", "--config", "small"], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  if (r.status !== 0) throw new Error("make-tiny-model failed");
  await mkdir(models, { recursive: true });
  await rename(join(build, "onnx"), join(models, "tiny"));
  return models;
}

async function demo(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      models: { type: "string" },
      out: { type: "string", default: "outputs/demo" },
      prompt: { type: "string", default: "a photo of a cat" },
    },
  });
  // The demo's own output is the progress bar; service logs only when something goes wrong.
  process.env["LATENTFARM_LOG_LEVEL"] ??= "warn";
  const modelsDir = v.models ?? (await demoModels());
  const farm = await startFarm({ models: modelsDir, port: 0, agents: 1, ep: "cpu" });
  try {
    const client = createClient(RenderService, farm.coordinatorAddress);
    const { models } = await client.listModels({});
    client.close();
    const model = models[0]?.name;
    if (!model) throw new UsageError(`no models in ${resolve(modelsDir)}`);
    io.err(`rendering "${v.prompt}" with ${model} on a one-machine farm\n`);
    return await txt2img([
      "--coordinator",
      farm.coordinatorAddress,
      "--prompt",
      v.prompt,
      "--model",
      model,
      "--out",
      v.out,
      "--width",
      "64",
      "--height",
      "64",
      "--steps",
      "20",
      "--sampler-name",
      "Euler a",
      "--seed",
      "42",
    ]);
  } finally {
    await farm.close();
  }
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case "up":
        return await up(rest);
      case "demo":
        return await demo(rest);
      case "coordinator":
        return await runCoordinator(rest);
      case "a1111-api":
        return await a1111Api(rest);
      case "txt2img":
      case "img2img":
        return await txt2img(rest);
      case "extras":
        return await extras(rest);
      case "agents":
      case "models":
      case "samplers":
      case "schedulers":
      case "embeddings":
      case "vaes":
      case "loras":
      case "styles":
      case "upscalers":
        return await listCommand(cmd, rest);
      case undefined:
      case "help":
      case "--help":
      case "-h":
        io.out(USAGE);
        return cmd === undefined ? 2 : 0;
      default:
        io.err(`unknown command "${cmd}"\n\n${USAGE}`);
        return 2;
    }
  } catch (err) {
    if (
      err instanceof UsageError ||
      (err instanceof TypeError && "code" in err && String((err as { code: unknown }).code).startsWith("ERR_PARSE_ARGS"))
    ) {
      io.err(`${err.message}\n`);
      return 2;
    }
    io.err(`error: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  }
}
