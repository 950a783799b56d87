// A1111's HTTP API (/sdapi/v1/…) in front of the farm, so that tools written against a WebUI started
// with --api (scripts, plugins, bots) render on the farm unchanged. It is a RenderService client like
// any other: a txt2img call is a Submit, then a Watch until the job ends, answered as A1111 answers
// (base64 PNGs with their infotext, `info` with every seed). The caller's Authorization header goes to
// the coordinator as it is (Basic: its password is taken as the token, as A1111's --api-auth clients
// send it), so tenants, limits and fairness apply as for gRPC clients. A call whose client goes away
// cancels its job. /progress and /interrupt act on the caller's own jobs, not the whole farm's.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { randomUUID } from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import {
  A1111_API_METRICS,
  FarmError,
  LATENT_UPSCALERS,
  createMetrics,
  startMetricsServer,
  RenderService,
  parseInfotext,
  createClient,
  isServiceError,
  statusName,
  type Image,
  type Logger,
  type ModelInfo,
} from "@latentfarm/shared";
import { InfotextFileError, imageGenerationData } from "../cli/infotext-file.js";
import { imageBase64, readApiRequest, type Endpoint } from "./request.js";
import { extrasBatchResponse, extrasResponse, generationResponse, progressResponse, type JobProgress } from "./response.js";

export interface A1111GatewayOptions {
  /** The coordinator's RenderService address (host:port). */
  coordinator: string;
  /** Listen address; A1111 listens on 127.0.0.1 unless told otherwise (--listen). */
  host?: string;
  /** 0: any free port. */
  port: number;
  /** The CA of the coordinator's TLS certificate, when it serves TLS. */
  tlsCa?: Buffer;
  /** Largest request body accepted (init images are base64 in it); default 64 MiB. */
  maxBodyBytes?: number;
  /**
   * Origins whose browser pages may call the API (A1111's --cors-allow-origins), or "*" for any; none
   * by default. Browser front ends served elsewhere (openOutpaint and the like) need them.
   */
  corsAllowOrigins?: readonly string[];
  /** Port for /metrics; undefined = none, 0 = any free port. */
  metricsPort?: number;
  metricsHost?: string;
  logger: Logger;
}

/** One call to the API, as its route handler sees it. */
interface Call {
  url: URL;
  req: IncomingMessage;
  metadata: Record<string, string>;
  signal: AbortSignal;
  /** Options for unary RenderService calls made for it. */
  o: { metadata: Record<string, string>; signal: AbortSignal; timeoutMs: number };
}

type RenderClient = ReturnType<typeof createClient<(typeof RenderService)["method"]>>;

/** An HTTP error answered in FastAPI's shapes: 422 `detail` lists for fields, else `detail` text. */
class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly body: JsonObject,
    readonly headers: Record<string, string> = {},
  ) {
    super(JSON.stringify(body));
  }
}

const fieldError = (field: string, msg: string): HttpError =>
  new HttpError(422, { detail: [{ loc: ["body", ...field.split(".")], msg, type: "value_error" }] });

/** gRPC statuses as the HTTP statuses A1111 and FastAPI clients expect. */
function httpError(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  const fe = FarmError.from(err);
  const service = isServiceError(fe.cause) ? fe.cause : undefined;
  const { field, detail: message } = fe;
  switch (fe.code) {
    case grpc.status.INVALID_ARGUMENT:
      return field ? fieldError(field, message) : new HttpError(422, { detail: message });
    case grpc.status.NOT_FOUND:
      return new HttpError(404, { detail: fe.message });
    case grpc.status.UNAUTHENTICATED:
      return new HttpError(401, { detail: fe.message }, { "www-authenticate": "Bearer" });
    case grpc.status.PERMISSION_DENIED:
      return new HttpError(403, { detail: fe.message });
    case grpc.status.RESOURCE_EXHAUSTED: {
      const after = Number(service?.metadata?.get("grpc-retry-pushback-ms")[0] ?? NaN);
      const headers: Record<string, string> = Number.isFinite(after) ? { "retry-after": String(Math.ceil(after / 1000)) } : {};
      return new HttpError(429, { detail: fe.message }, headers);
    }
    case grpc.status.FAILED_PRECONDITION:
    case grpc.status.UNIMPLEMENTED:
      return new HttpError(field ? 422 : 409, field ? fieldError(field, message).body : { detail: fe.message });
    case grpc.status.UNAVAILABLE:
      return new HttpError(503, { detail: fe.message });
    case grpc.status.DEADLINE_EXCEEDED:
      return new HttpError(504, { detail: fe.message });
    case grpc.status.CANCELLED:
      // Mostly a client that went away (nginx's 499), which nobody reads; or a job cancelled elsewhere.
      return new HttpError(499, { detail: fe.message });
    default:
      return new HttpError(500, { error: statusName(fe.code), detail: fe.message, body: "", errors: fe.message });
  }
}

/**
 * png-info: an image's text chunks, its A1111 generation data apart ("parameters", or a JPEG's or WebP's
 * EXIF UserComment) and read as parse_generation_parameters reads it (Prompt, Negative prompt, then the
 * parameter line's entries).
 */
async function pngInfo(bytes: Buffer): Promise<JsonObject> {
  const { text, comments } = await imageGenerationData(bytes, "image").catch((err: unknown) => {
    throw err instanceof InfotextFileError ? fieldError("image", err.message) : err;
  });
  const items: JsonObject = Object.fromEntries(comments.filter((c) => c.keyword !== "parameters").map((c) => [c.keyword, c.text]));
  if (text === undefined || text === "") return { info: "", items, parameters: {} };
  const parsed = parseInfotext(text);
  return {
    info: text,
    items,
    parameters: { Prompt: parsed.prompt, "Negative prompt": parsed.negativePrompt, ...Object.fromEntries(parsed.params) },
  };
}

/** The gRPC metadata of a caller: its bearer token, or a Basic password as the token. */
function callerMetadata(req: IncomingMessage): Record<string, string> {
  const auth = req.headers.authorization;
  if (!auth) return {};
  const basic = /^Basic\s+(.+)$/i.exec(auth);
  if (basic) {
    const decoded = Buffer.from(basic[1]!, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    return { authorization: `Bearer ${colon >= 0 ? decoded.slice(colon + 1) : decoded}` };
  }
  return { authorization: auth };
}

/** Progress and interrupts are per caller: its credentials, or everyone anonymous together. */
const callerKey = (metadata: Record<string, string>): string => metadata["authorization"] ?? "";

export class A1111Gateway {
  private readonly server: Server;
  private readonly client: RenderClient;
  /** Jobs being watched for API calls, by caller. */
  private readonly running = new Map<string, Set<JobProgress>>();
  private readonly calls = new Set<AbortController>();
  /**
   * Options each caller set with POST /options (A1111's global settings, such as sd_model_checkpoint),
   * applied to its later calls. Per caller, not global: one tenant switching models must not switch
   * another's.
   */
  private readonly options = new Map<string, JsonObject>();
  private boundPort = 0;
  private readonly m = createMetrics(A1111_API_METRICS, { defaultMetrics: true });
  private metricsServer: { url: string; close(): Promise<void> } | undefined;

  private constructor(private readonly opts: A1111GatewayOptions) {
    this.client = createClient(RenderService, opts.coordinator, opts.tlsCa ? { credentials: grpc.credentials.createSsl(opts.tlsCa) } : {});
    this.server = createServer((req, res) => void this.handle(req, res));
  }

  static async start(opts: A1111GatewayOptions): Promise<A1111Gateway> {
    const g = new A1111Gateway(opts);
    await new Promise<void>((resolve, reject) => {
      g.server.once("error", reject);
      g.server.listen(opts.port, opts.host ?? "127.0.0.1", () => resolve());
    });
    g.boundPort = (g.server.address() as AddressInfo).port;
    if (opts.metricsPort !== undefined) {
      try {
        g.metricsServer = await startMetricsServer(g.m.registry, opts.metricsPort, opts.metricsHost ?? "0.0.0.0");
      } catch (err) {
        await g.close();
        throw err;
      }
    }
    return g;
  }

  /** The /metrics URL, when it serves one. */
  get metricsUrl(): string | undefined {
    return this.metricsServer?.url;
  }

  /** http://host:port, the base A1111 clients are given (their calls add /sdapi/v1/…). */
  get url(): string {
    const host = this.opts.host ?? "127.0.0.1";
    return `http://${host === "0.0.0.0" ? "127.0.0.1" : host}:${this.boundPort}`;
  }

  /**
   * Stops serving. Calls in progress end as when their clients leave: their jobs are cancelled (nobody
   * is left to receive the images), for at most 10 s, before the coordinator connection closes.
   */
  async close(): Promise<void> {
    for (const c of this.calls) c.abort(new FarmError(grpc.status.UNAVAILABLE, "the A1111 API gateway is shutting down"));
    for (const deadline = Date.now() + 10_000; this.calls.size > 0 && Date.now() < deadline;) {
      await new Promise((r) => setTimeout(r, 20));
    }
    await new Promise<void>((resolve) => {
      this.server.closeAllConnections();
      this.server.close(() => resolve());
    });
    await this.metricsServer?.close();
    this.client.close();
  }

  /**
   * CORS as Starlette's CORSMiddleware answers it with A1111's settings (any method and header,
   * credentials allowed): an allowed Origin is echoed on every answer, and a preflight is answered here.
   * Returns true when the request was a preflight (answered).
   */
  private cors(req: IncomingMessage, res: ServerResponse): boolean {
    const origin = req.headers.origin;
    const allowed = this.opts.corsAllowOrigins ?? [];
    const ok = origin !== undefined && (allowed.includes("*") || allowed.includes(origin));
    if (ok) {
      res.setHeader("access-control-allow-origin", origin);
      res.setHeader("access-control-allow-credentials", "true");
      res.setHeader("vary", "Origin");
    }
    const method = req.headers["access-control-request-method"];
    if (req.method !== "OPTIONS" || method === undefined) return false;
    if (!ok) {
      res.writeHead(400, { "content-type": "text/plain" }).end("Disallowed CORS origin");
      return true;
    }
    res.writeHead(200, {
      "access-control-allow-methods": "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT",
      "access-control-allow-headers": req.headers["access-control-request-headers"] ?? "*",
      "access-control-max-age": "600",
      "content-length": "2",
      "content-type": "text/plain",
    });
    res.end("OK");
    return true;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (this.cors(req, res)) return;
    const url = new URL(req.url ?? "/", "http://gateway");
    const route = `${req.method ?? "GET"} ${url.pathname.replace(/\/+$/, "")}`;
    const metadata = callerMetadata(req);
    const call = new AbortController();
    this.calls.add(call);
    const handler = this.routes.get(route);
    const label = handler ? route.slice(route.lastIndexOf("/") + 1) : "other";
    const timer = this.m.metrics.apiRequestDuration.startTimer({ route: label });
    this.m.metrics.apiCallsInFlight.inc();
    let status = 200;
    // The client went away before its answer: stop watching (and its job, below).
    res.on("close", () => {
      if (!res.writableFinished) call.abort(new FarmError(grpc.status.CANCELLED, "the API client closed the connection"));
    });
    try {
      if (handler === undefined) throw new HttpError(404, { detail: "Not Found" });
      const body = await handler({ url, req, metadata, signal: call.signal, o: { metadata, signal: call.signal, timeoutMs: 30_000 } });
      this.send(res, 200, body);
    } catch (err) {
      const e = httpError(err);
      status = e.status;
      if (e.status >= 500) this.opts.logger.warn("A1111 API call failed", { route, status: e.status, error: e.message });
      this.send(res, e.status, e.body, e.headers);
    } finally {
      this.calls.delete(call);
      timer();
      this.m.metrics.apiCallsInFlight.dec();
      this.m.metrics.apiRequests.inc({ route: label, status: String(status) });
    }
  }

  private send(res: ServerResponse, status: number, body: JsonValue, headers: Record<string, string> = {}): void {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text), ...headers }).end(text);
  }

  /**
   * The API's routes, "METHOD /path" → handler. Their last path parts are the metric's route labels
   * (anything else is "other"), so the label set is this table's.
   */
  private readonly routes: ReadonlyMap<string, (c: Call) => Promise<JsonValue>> = new Map<string, (c: Call) => Promise<JsonValue>>([
    ["POST /sdapi/v1/txt2img", (c) => this.generate("txt2img", c)],
    ["POST /sdapi/v1/img2img", (c) => this.generate("img2img", c)],
    ["POST /sdapi/v1/extra-single-image", (c) => this.generate("extra-single-image", c)],
    ["POST /sdapi/v1/extra-batch-images", (c) => this.generate("extra-batch-images", c)],
    [
      "GET /sdapi/v1/progress",
      async (c) => {
        const mine = [...(this.running.get(callerKey(c.metadata)) ?? [])];
        return progressResponse(mine.at(-1), Date.now(), c.url.searchParams.get("skip_current_image") === "true");
      },
    ],
    ["POST /sdapi/v1/interrupt", (c) => this.interrupt(c)],
    ["POST /sdapi/v1/skip", (c) => this.interrupt(c)],
    [
      "GET /sdapi/v1/samplers",
      async (c) =>
        (await this.client.listSamplers({}, c.o)).samplers.map((s) => ({
          name: s.name,
          aliases: [...s.aliases],
          options: { ...s.options },
        })),
    ],
    [
      "GET /sdapi/v1/schedulers",
      async (c) =>
        (await this.client.listSchedulers({}, c.o)).schedulers.map((s) => ({
          name: s.name,
          label: s.label,
          aliases: [...s.aliases],
          default_rho: -1,
          need_inner_model: false,
        })),
    ],
    [
      "GET /sdapi/v1/sd-models",
      async (c) =>
        (await this.client.listModels({}, c.o)).models.map((m) => ({
          title: checkpointTitle(m),
          model_name: m.name,
          hash: m.modelHash || null,
          sha256: null,
          filename: m.name,
          config: null,
        })),
    ],
    [
      "GET /sdapi/v1/upscalers",
      async (c) =>
        (await this.client.listUpscalers({}, c.o)).upscalers
          .filter((u) => !(LATENT_UPSCALERS as readonly string[]).includes(u.name))
          .map((u) => ({ name: u.name, model_name: u.builtin ? null : u.name, model_path: null, model_url: null, scale: 4 })),
    ],
    ["GET /sdapi/v1/latent-upscale-modes", () => Promise.resolve(LATENT_UPSCALERS.map((name) => ({ name })))],
    [
      "GET /sdapi/v1/face-restorers",
      async (c) => (await this.client.listUpscalers({}, c.o)).faceRestorers.map((f) => ({ name: f.name, cmd_dir: null })),
    ],
    [
      "GET /sdapi/v1/sd-vae",
      async (c) => (await this.client.listVaes({}, c.o)).vaes.map((v) => ({ model_name: v.name, filename: v.name })),
    ],
    [
      // The Lora extension's listing: alias as get_alias() gives it (the usable ss_output_name, else the
      // name; A1111's default lora_preferred_name). Paths stay the agents' own.
      "GET /sdapi/v1/loras",
      async (c) => {
        // A1111's create_lora_json: the file's training metadata too, as the agents read it.
        const { loras } = await this.client.listLoras({ metadata: true }, c.o);
        const byName = new Map(loras.map((l) => [l.name, l]));
        return [...byName.values()].map((l) => ({
          name: l.name,
          alias: l.alias || l.name,
          path: `${l.name}.safetensors`,
          metadata: l.metadataJson === "" ? {} : (JSON.parse(l.metadataJson) as JsonValue),
        }));
      },
    ],
    // Agents read their folders on every heartbeat: there is nothing to refresh.
    ["POST /sdapi/v1/refresh-loras", () => Promise.resolve(null)],
    ["POST /sdapi/v1/refresh-checkpoints", () => Promise.resolve(null)],
    ["POST /sdapi/v1/refresh-vae", () => Promise.resolve(null)],
    // Agents load and unload pipelines as jobs need them: there is no one checkpoint to unload or reload.
    ["POST /sdapi/v1/unload-checkpoint", () => Promise.resolve(null)],
    ["POST /sdapi/v1/reload-checkpoint", () => Promise.resolve(null)],
    // What tools probe before they use an extension (ControlNet's alwayson script, say): the farm runs
    // none, and refuses a request that names one (request.ts), so these lists are empty.
    ["GET /sdapi/v1/scripts", () => Promise.resolve({ txt2img: [], img2img: [] })],
    ["GET /sdapi/v1/script-info", () => Promise.resolve([])],
    ["GET /sdapi/v1/extensions", () => Promise.resolve([])],
    ["GET /sdapi/v1/hypernetworks", () => Promise.resolve([])],
    ["GET /sdapi/v1/sd-modules", () => Promise.resolve([])],
    // The WebUI's liveness route, which clients poll before their first call.
    ["GET /internal/ping", () => Promise.resolve({})],
    [
      "GET /sdapi/v1/embeddings",
      async (c) => {
        // A1111's EmbeddingsResponse: loaded by name (step and checkpoint unknown here), skipped by file.
        const { embeddings, skipped } = await this.client.listEmbeddings({}, c.o);
        const entry = (shape: number, vectors: number): JsonObject => ({
          step: null,
          sd_checkpoint: null,
          sd_checkpoint_name: null,
          shape,
          vectors,
        });
        return {
          loaded: Object.fromEntries(embeddings.map((e) => [e.name, entry(e.width, e.vectors)])),
          skipped: Object.fromEntries(skipped.map((x) => [x.file, entry(0, 0)])),
        };
      },
    ],
    [
      "GET /sdapi/v1/prompt-styles",
      async (c) =>
        (await this.client.listStyles({}, c.o)).styles.map((s) => ({ name: s.name, prompt: s.prompt, negative_prompt: s.negativePrompt })),
    ],
    [
      "POST /sdapi/v1/png-info",
      async (c) => {
        const body = await this.body(c.req);
        const image = typeof body === "object" && body !== null ? (body as JsonObject)["image"] : undefined;
        return pngInfo(Buffer.from(imageBase64(image ?? null, "image"), "base64"));
      },
    ],
    ["GET /sdapi/v1/options", (c) => this.getOptions(c)],
    ["POST /sdapi/v1/options", (c) => this.setOptions(c)],
  ]);

  /** interrupt and skip: the caller's own jobs (A1111's act on the one job it runs). */
  private async interrupt(c: Call): Promise<null> {
    for (const job of this.running.get(callerKey(c.metadata)) ?? []) {
      await this.client.cancel({ jobId: job.jobId }, c.o).catch(() => undefined);
    }
    return null;
  }

  /** POST /options: the caller's settings for its later calls; null removes one. */
  /**
   * The caller's options. Its checkpoint, until it sets one, is the farm's default model, which its jobs
   * render with, by the title A1111 gives its loaded checkpoint: tools read it to show "the" model. Without
   * the coordinator that is unknown (null), and the call still answers.
   */
  private async getOptions(c: Call): Promise<JsonObject> {
    const mine = this.options.get(callerKey(c.metadata));
    if (typeof mine?.["sd_model_checkpoint"] === "string") return mine;
    const models = await this.client.listModels({}, c.o).then(
      (r) => r.models,
      () => [] as ModelInfo[],
    );
    const fallback = models.find((m) => m.isDefault);
    return { sd_model_checkpoint: fallback === undefined ? null : checkpointTitle(fallback), ...mine };
  }

  private async setOptions(c: Call): Promise<null> {
    const body = await this.body(c.req);
    if (typeof body !== "object" || body === null || Array.isArray(body))
      throw fieldError("body", "must be an object of A1111 option names and values");
    const key = callerKey(c.metadata);
    const next: JsonObject = { ...this.options.get(key) };
    for (const [name, value] of Object.entries(body as JsonObject)) {
      if (value === null) delete next[name];
      else next[name] = value;
    }
    // Checked now, as A1111 loads the checkpoint now: a bad setting fails here, not in every later call.
    const models = await this.modelsFor(next, c.o);
    const { params } = readApiRequest("txt2img", { override_settings: next }, models);
    if (params.model !== "" && !models.some((m) => m.name === params.model)) {
      throw new HttpError(404, { detail: `checkpoint ${JSON.stringify(next["sd_model_checkpoint"])} is not offered by any agent` });
    }
    if (Object.keys(next).length > 0) this.options.set(key, next);
    else this.options.delete(key);
    return null;
  }

  /** The request's JSON body, within the size limit. */
  private async body(req: IncomingMessage): Promise<unknown> {
    const limit = this.opts.maxBodyBytes ?? 64 << 20;
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > limit) throw new HttpError(413, { detail: `the request body is over ${limit} bytes` });
      chunks.push(chunk);
    }
    try {
      return JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (err) {
      throw new HttpError(422, { detail: [{ loc: ["body"], msg: (err as Error).message, type: "value_error.jsondecode" }] });
    }
  }

  /** The farm's models, when settings name a checkpoint to find among them (else none are needed). */
  private async modelsFor(settings: JsonObject | undefined, o: Call["o"]): Promise<ModelInfo[]> {
    return typeof settings?.["sd_model_checkpoint"] === "string" ? (await this.client.listModels({}, o)).models : [];
  }

  /** Submit, then watch the job to its end: the A1111 response, or the job's error. */
  private async generate(endpoint: Endpoint, c: Call): Promise<JsonValue> {
    const { metadata, signal, o } = c;
    const raw = await this.body(c.req);
    // The caller's options (POST /options) apply under the call's own override_settings, as A1111's
    // global options do.
    const stored = this.options.get(callerKey(metadata));
    let request = raw;
    if (stored !== undefined && !endpoint.startsWith("extra-") && typeof raw === "object" && raw !== null && !Array.isArray(raw)) {
      const own = (raw as JsonObject)["override_settings"];
      request = {
        ...(raw as JsonObject),
        override_settings: { ...stored, ...(typeof own === "object" && own !== null && !Array.isArray(own) ? own : {}) },
      };
    }
    const settings = (request as { override_settings?: JsonObject } | null)?.override_settings;
    const { params, sendImages, ignored } = readApiRequest(endpoint, request, await this.modelsFor(settings, o));
    if (ignored.length > 0) this.opts.logger.debug("A1111 API fields left out", { endpoint, fields: ignored });
    const startedAt = new Date();
    const { jobId, imageCount } = await this.client.submit({ params, requestId: randomUUID() }, o);
    const job: JobProgress = {
      jobId,
      imageCount,
      totalSteps: 0,
      steps: new Map(),
      done: 0,
      startedAt: startedAt.getTime(),
      preview: undefined,
    };
    const key = callerKey(metadata);
    let mine = this.running.get(key);
    if (!mine) this.running.set(key, (mine = new Set()));
    mine.add(job);
    const images: Image[] = [];
    let failure: FarmError | undefined;
    try {
      for await (const { event } of this.client.watch({ jobId }, { metadata, signal })) {
        const e = event?.event;
        if (e?.case === "step") {
          job.totalSteps = e.value.totalSteps;
          job.steps.set(e.value.imageIndex, e.value.step);
          if (e.value.previewPng.length > 0) job.preview = e.value.previewPng;
        } else if (e?.case === "image" && e.value.image) {
          images.push(e.value.image);
          job.done++;
        } else if (e?.case === "failed") {
          failure = new FarmError(grpc.status[e.value.code as keyof typeof grpc.status] ?? grpc.status.INTERNAL, e.value.message);
        }
      }
    } catch (err) {
      // The caller left (or the gateway is closing): the job is of no use to anyone now.
      if (signal.aborted) await this.client.cancel({ jobId }, { metadata, timeoutMs: 10_000 }).catch(() => undefined);
      throw err;
    } finally {
      mine.delete(job);
      if (mine.size === 0) this.running.delete(key);
    }
    // A job interrupted through /interrupt answers with the images made so far, as A1111 does.
    if (failure && images.length === 0) throw failure;
    images.sort((a, b) => a.index - b.index);
    if (endpoint === "extra-single-image") {
      if (!images[0]) throw new FarmError(grpc.status.INTERNAL, `job ${jobId} ended without an image`);
      return extrasResponse(images[0]);
    }
    if (endpoint === "extra-batch-images") return extrasBatchResponse(images);
    return generationResponse(raw as JsonObject, endpoint === "img2img", params, images, sendImages, startedAt);
  }
}

/** A checkpoint's title as A1111 gives it: "name [hash]" once hashed, else the name. */
function checkpointTitle(m: Pick<ModelInfo, "name" | "modelHash">): string {
  return m.modelHash ? `${m.name} [${m.modelHash}]` : m.name;
}
