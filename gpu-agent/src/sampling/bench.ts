/**
 * Sampler overhead benchmark (not a test): what the sampling core (sampler updates, schedule, RNG,
 * Brownian tree) costs per step for a 4×128×128 latent (1024×1024 px), model evaluation excluded.
 * Two numbers per sampler:
 *
 * (a) sync — CPU time inside the sampler generator with everything synchronous: every noise draw
 *     and tree query happens when the sampler asks for it. The model's answer is computed outside
 *     the timed region.
 * (b) critical — wall time per step minus the simulated model time, with a model evaluation that
 *     really runs off-thread (a worker that computes a trivial answer and sleeps until `modelMs` have
 *     passed, like the ORT worker) and the driver calling `drawAhead` during it, as the agent's denoise
 *     loop does. This includes the harness's own cost (copying the latent to the worker and the answer
 *     back, two messages); `floorMsPerStep` is that cost alone, measured with a sampler that does nothing,
 *     and `criticalInSamplerMsPerStep` is the part spent inside the sampler itself. On a machine with
 *     fewer free cores than threads, the worker's wake-up delays also land in criticalMsPerStep.
 *     The driver is the agent's: PreparedSampling.openNoiseAhead({ brownian }), so the SDE samplers'
 *     Brownian tree runs on one long-lived BrownianWorkers service shared by every run of the bench, as
 *     a pipeline's is, with its draw helpers making each run's draws ahead; before resuming the sampler
 *     the driver checks readyNow and awaits ensureReady only when something is still on its way. The service is started once, before the first run, and that start-up
 *     is reported alone (`workerBootMs`, the same for every sampler): a pipeline pays it once, at its
 *     first SDE run, not per run. For those samplers `criticalInThreadMsPerStep` is the same run with
 *     the tree drawn ahead on the JS thread instead.
 * (c) pipeline thread — the agent's arrangement since renders run in their pipeline's thread: the
 *     simulated model blocks the driver's own thread for `modelMs` (as ONNX Runtime's run() does there),
 *     after one event-loop turn (the step batcher's). Whatever the sampler does between two model calls,
 *     including anything "ahead" that still runs on this thread, is on the critical path; the plain
 *     draws come from a NoiseThread (as the pipeline's) and the tree from the same long-lived service.
 *     `pipelineCriticalMsPerStep` = (wall − model)/steps; `pipelineFirstWaitMs` is the first wait for
 *     noise (a run's first tree answer: its trees built and its first draws made on the already running
 *     threads), `pipelineAfterStartMsPerStep` excludes it.
 */
import { Worker } from "node:worker_threads";
import { createBrownianNoiseSampler } from "./brownian.js";
import { BrownianWorkers } from "./brownian-thread.js";
import type { RngSource } from "./generator.js";
import { ImageRng, type LatentShape } from "./image-rng.js";
import { listSamplers, prepareSampling, type PreparedSampling } from "./plan.js";
import { NoiseThread } from "./noise-stream.js";
import type { NoiseAhead } from "./noise-ahead.js";
import { Kernel, e } from "./kernels.js";
import { answerSlot, freshLatent, inLatentScope, setLatentResidency } from "./samplers/latent-pool.js";
import type { ModelRequest, ModelResponse, NoiseSampler, SamplerRun } from "./samplers/types.js";

export interface BenchSamplersOptions {
  /** Sampler names to measure (default: all 20). */
  samplers?: readonly string[];
  steps?: number;
  shape?: LatentShape;
  source?: RngSource;
  /** Use the Brownian tree for the SDE samplers, as A1111 does (default true). */
  brownian?: boolean;
  /** Clock in milliseconds for (a) (injectable for tests). */
  now?: () => number;
  /** Run each sampler once untimed first, so JIT compilation is not timed (default true). */
  warmup?: boolean;
  /** Also measure (b) with a simulated off-thread model of this many milliseconds (0 = skip (b)). */
  modelMs?: number;
  /** (b) only: also measure the critical path without drawing ahead, for comparison (default true). */
  withoutPrefetch?: boolean;
  /** Measure each number this many times and keep the fastest, against noise from other load (default 3). */
  repeats?: number;
  /**
   * (b) also measure each sampler with a model that answers at once (`hotInSamplerMsPerStep`), so that
   * nothing of the sampler's goes cold between two calls (default true when modelMs > 0).
   */
  hot?: boolean;
}

export interface SamplerBenchResult {
  sampler: string;
  /** Sampler steps A1111 would report. */
  steps: number;
  modelCalls: number;
  /** Per run, before the first step: prepareSampling (σ list, Brownian trees) and the start latent. */
  setupMs: number;
  /** (a) sampler + schedule + RNG CPU time per step, all synchronous. */
  syncMsPerStep: number;
  /** Noise draws and tree queries a run makes (per image). */
  noiseCalls: number;
  /** (b) wall − model time per step, drawing ahead during the model evaluation. */
  criticalMsPerStep?: number;
  /**
   * (b) the part of criticalMsPerStep spent inside the sampler (its generator), drawing ahead: what the
   * sampling core itself still costs between two model calls, without the harness's messaging.
   */
  criticalInSamplerMsPerStep?: number;
  /**
   * criticalInSamplerMsPerStep with latent residency off (samplers/latent-pool.ts): every kernel copies its
   * operands into WebAssembly memory and its results out, as before residency. Measured side by side.
   */
  criticalInSamplerCopyingMsPerStep?: number;
  /** (b) Brownian samplers only: drawing the tree's noise ahead on the JS thread, not in a worker. */
  criticalInThreadMsPerStep?: number;
  /**
   * (b) the longest stretch the driver's JS thread spent in one synchronous call (a sampler resumption
   * or a drawAhead): how long the agent's event loop (gRPC, heartbeats, other images) is held up.
   */
  longestBlockMs?: number;
  /** (b) longestBlockMs with the tree drawn ahead on the JS thread (Brownian samplers only). */
  longestBlockInThreadMs?: number;
  /** (b) the wait for the tree's first answer (the service's threads already run: the run's own start). */
  firstWaitMs?: number;
  /**
   * (b) Brownian samplers: how long the bench's BrownianWorkers service took to start its tree thread and
   * helpers (under tsx mostly tsx's own registration), measured once per service: what a pipeline's
   * first SDE run pays on top of firstWaitMs, and no later run.
   */
  workerBootMs?: number;
  /** (b) criticalMsPerStep without firstWaitMs: the per-step cost once the run's first answer is there. */
  criticalAfterStartMsPerStep?: number;
  /** (c) wall − model time per step with the model blocking the sampler's own thread (the agent's pipeline thread). */
  pipelineCriticalMsPerStep?: number;
  /** (c) the first wait for noise made on other threads (the run's start on the already running threads). */
  pipelineFirstWaitMs?: number;
  /** (c) pipelineCriticalMsPerStep without pipelineFirstWaitMs. */
  pipelineAfterStartMsPerStep?: number;
  /** (b) the same without drawing ahead. */
  criticalNoPrefetchMsPerStep?: number;
  /** (b) of the harness alone (a do-nothing sampler making as many model calls). */
  floorMsPerStep?: number;
  /**
   * (b) the least a sampler update can cost here, per model call: a "sampler" that makes the same model
   * calls and after each answer does one pass over the latent, reading x and the answer and writing the
   * next x over x (as Euler does, resident), measured in the same rounds as the sampler. After a 30 ms
   * model call the caches are cold, so this is mostly the machine's memory: with it, a sampler's number
   * reads as how many such passes it costs, and the target as how many a step may cost here.
   */
  passFloorMsPerCall?: number;
  /** (b) noise draws or tree queries still made on the critical path (inside the sampler, not ahead). */
  criticalNoiseCalls?: number;
  /**
   * (b) criticalInSamplerMsPerStep with a model that answers at once instead of after modelMs: the same
   * driver and noise drawn ahead, but the sampler's latents, code and tables are still in the caches when
   * it resumes. Against criticalInSamplerMsPerStep it shows what the pause alone costs on this machine.
   */
  hotInSamplerMsPerStep?: number;
}

/** The trivial model: D(x, σ) = x/(1 + σ²), eps = x·σ/(1 + σ²) (scaled input), uncond 0.9·eps. */
function modelFactor(request: ModelRequest): number {
  const s2 = request.sigma * request.sigma;
  return request.kind === "denoise" ? 1 / (1 + s2) : (request.sigma / (1 + s2)) * request.inputScale;
}

function answer(request: ModelRequest, out: Float32Array): ModelResponse {
  return request.kind === "eps" && request.needUncond ? { output: out, uncond: out.map((v) => v * 0.9) } : out;
}

/** The answer goes into the sampler's slot when it offers one, as the agent's CFG combine writes it. */
function computeAnswer(request: ModelRequest): ModelResponse {
  const f = modelFactor(request);
  const x = request.x;
  const out = request.into ?? new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = x[i]! * f;
  return answer(request, out);
}

interface Counted {
  prepared: PreparedSampling;
  rng: ImageRng;
  start: Float32Array;
  setupMs: number;
  counts: { calls: number; critical: number; ahead: boolean };
}

/**
 * prepareSampling with the noise source and Brownian tree counted. With `treeInWorker` the tree comes
 * from `brownian` options, as the agent passes it, so openNoiseAhead can move it to a worker thread;
 * its queries are then counted there (NoiseAhead.queriesOnCall).
 */
/** One sampler's setting in a bench: what every measurement of it prepares. */
interface BenchCase {
  name: string;
  steps: number;
  shape: LatentShape;
  source: RngSource;
  brownian: boolean;
  now: () => number;
}

function prepare({ name, steps, shape, source, brownian, now }: BenchCase, treeInWorker = false): Counted {
  const counts = { calls: 0, critical: 0, ahead: false };
  const count = (): void => {
    counts.calls++;
    if (!counts.ahead) counts.critical++;
  };
  const started = now();
  const rng = new ImageRng({ shape, seeds: [0], source });
  const noise = (): Float32Array => (count(), rng.next());
  let noiseSampler: NoiseSampler | undefined;
  const range = prepareSampling({ samplerName: name, steps, noise }).brownianRange;
  if (brownian && range !== undefined) {
    // Built only where it is used: its constructor draws the top increment.
    let tree: NoiseSampler | undefined;
    noiseSampler = (sigma, sigmaNext) => (
      count(),
      (tree ??= createBrownianNoiseSampler({ ...range, seeds: [0], shape, source }))(sigma, sigmaNext)
    );
  }
  const tree =
    treeInWorker && noiseSampler !== undefined
      ? { brownian: { seeds: [0], shape, source } }
      : noiseSampler !== undefined
        ? { noiseSampler }
        : {};
  const prepared = prepareSampling({ samplerName: name, steps, noise, ...tree });
  const start = prepared.startLatent(rng.first());
  const setupMs = now() - started;
  counts.calls = 0;
  counts.critical = 0;
  return { prepared, rng, start, setupMs, counts };
}

function runSync(c: Counted, now: () => number): { ms: number; modelCalls: number } {
  let ms = 0;
  let t = now();
  const run = c.prepared.run(c.start);
  let r = run.next();
  ms += now() - t;
  let modelCalls = 0;
  while (!r.done) {
    modelCalls++;
    const response = computeAnswer(r.value);
    t = now();
    r = run.next(response);
    ms += now() - t;
  }
  return { ms, modelCalls };
}

const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const x = new Float32Array(workerData.x);
const out = new Float32Array(workerData.out);
const sleeper = new Int32Array(new SharedArrayBuffer(4));
parentPort.on("message", (m) => {
  const started = performance.now();
  for (let i = 0; i < m.n; i++) out[i] = x[i] * m.factor;
  const left = workerData.modelMs - (performance.now() - started);
  if (left > 0) Atomics.wait(sleeper, 0, 0, left);
  parentPort.postMessage(performance.now() - started);
});
`;

/** A simulated UNet in its own thread: the latent goes over in shared memory, the answer comes back the same way. */
class OffThreadModel {
  private readonly worker: Worker;
  private readonly x: Float32Array;
  private readonly out: Float32Array;
  private pending: ((ms: number) => void) | undefined;

  constructor(length: number, modelMs: number) {
    const xBuffer = new SharedArrayBuffer(length * 4);
    const outBuffer = new SharedArrayBuffer(length * 4);
    this.x = new Float32Array(xBuffer);
    this.out = new Float32Array(outBuffer);
    this.worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { x: xBuffer, out: outBuffer, modelMs } });
    this.worker.on("message", (ms: number) => {
      const resolve = this.pending;
      this.pending = undefined;
      resolve?.(ms);
    });
  }

  /** Starts the evaluation (synchronously posted) and resolves with the answer and the model's own time. */
  evaluate(request: ModelRequest): Promise<{ response: ModelResponse; modelMs: number }> {
    this.x.set(request.x);
    return new Promise((resolve) => {
      this.pending = (modelMs) => {
        const n = request.x.length;
        const out = request.into ?? new Float32Array(n);
        out.set(this.out.subarray(0, n));
        resolve({ response: answer(request, out), modelMs });
      };
      this.worker.postMessage({ n: request.x.length, factor: modelFactor(request) });
    });
  }

  close(): Promise<number> {
    return this.worker.terminate();
  }
}

async function runOffThread(
  run: SamplerRun,
  model: OffThreadModel,
  drawAhead: ((r: ModelRequest) => void) | undefined,
  ahead?: NoiseAhead,
): Promise<{ wallMs: number; modelMs: number; samplerMs: number; longestBlockMs: number; firstWaitMs: number }> {
  const started = performance.now();
  let modelMs = 0;
  let r = run.next();
  let samplerMs = performance.now() - started;
  let longestBlockMs = samplerMs;
  let firstWaitMs = -1;
  const timedDrawAhead =
    drawAhead &&
    ((request: ModelRequest): void => {
      const t = performance.now();
      drawAhead(request);
      longestBlockMs = Math.max(longestBlockMs, performance.now() - t);
    });
  while (!r.done) {
    const request = r.value;
    const evaluating = model.evaluate(request);
    // The request is posted (synchronously, above), then the noise is drawn while it runs. The agent
    // defers this with setImmediate because its batcher posts in one; here that deferral would let a
    // fast answer, on a loaded machine, overtake the draw and make the count flaky.
    if (timedDrawAhead !== undefined) timedDrawAhead(request);
    const { response, modelMs: ms } = await evaluating;
    modelMs += ms;
    // Waiting for the worker's answers is on the critical path, and counted in wallMs.
    const waitStarted = performance.now();
    if (ahead !== undefined && !ahead.readyNow(request)) await ahead.ensureReady(request);
    if (firstWaitMs < 0) firstWaitMs = performance.now() - waitStarted;
    const resumed = performance.now();
    r = run.next(response);
    const inSampler = performance.now() - resumed;
    samplerMs += inSampler;
    longestBlockMs = Math.max(longestBlockMs, inSampler);
  }
  return { wallMs: performance.now() - started, modelMs, samplerMs, longestBlockMs, firstWaitMs: Math.max(firstWaitMs, 0) };
}

/**
 * (c): the model blocks this thread for `modelMs` after one event-loop turn, as ONNX Runtime's run()
 * does in a pipeline thread after the step batcher's turn; the announced noise is posted just before.
 */
async function runInPipelineThread(
  run: SamplerRun,
  modelMs: number,
  ahead: NoiseAhead,
): Promise<{ wallMs: number; modelMs: number; firstWaitMs: number }> {
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const started = performance.now();
  let model = 0;
  let firstWaitMs = -1;
  let r = run.next();
  while (!r.done) {
    const request = r.value;
    ahead.drawAhead(request);
    await new Promise<void>((resolve) => setImmediate(resolve));
    const evaluating = performance.now();
    const response = computeAnswer(request);
    const left = modelMs - (performance.now() - evaluating);
    if (left > 0) Atomics.wait(sleeper, 0, 0, left);
    model += performance.now() - evaluating;
    const waitStarted = performance.now();
    if (!ahead.readyNow(request)) await ahead.ensureReady(request);
    if (firstWaitMs < 0) firstWaitMs = performance.now() - waitStarted;
    r = run.next(response);
  }
  return { wallMs: performance.now() - started, modelMs: model, firstWaitMs: Math.max(firstWaitMs, 0) };
}

async function measurePipelineThread(
  bench: BenchCase,
  modelMs: number,
  noiseThread: NoiseThread,
  service: BrownianWorkers,
): Promise<Pick<SamplerBenchResult, "pipelineCriticalMsPerStep" | "pipelineFirstWaitMs" | "pipelineAfterStartMsPerStep">> {
  const counted = prepare(bench, true);
  const reported = counted.prepared.steps;
  const ahead = counted.prepared.openNoiseAhead({ brownian: service });
  ahead.usePlainDraws(noiseThread.open(counted.rng.continuation()));
  let result: Awaited<ReturnType<typeof runInPipelineThread>>;
  try {
    result = await runInPipelineThread(counted.prepared.run(counted.start), modelMs, ahead);
  } finally {
    await ahead.close();
  }
  const critical = result.wallMs - result.modelMs;
  return {
    pipelineCriticalMsPerStep: critical / reported,
    pipelineFirstWaitMs: result.firstWaitMs,
    pipelineAfterStartMsPerStep: (critical - result.firstWaitMs) / reported,
  };
}

/** A request to replay: its answer slot was the recorded run's. */
function withoutSlot(request: ModelRequest): ModelRequest {
  if (request.into === undefined) return request;
  const copy: { into?: Float32Array } = { ...request };
  delete copy.into;
  return copy as ModelRequest;
}

/** Yields the same requests as a recorded run and does nothing else: the harness floor. */
function* replay(requests: readonly ModelRequest[]): SamplerRun {
  for (const request of requests) yield request;
  return requests[0]!.x;
}

/** x + (x − D)·c: one pass that reads the latent and the answer and writes the next latent over it. */
const barePass = new Kernel({ inputs: 2, params: 1, outputs: [e.add(e.in(0), e.mul(e.sub(e.in(0), e.in(1)), e.param(0)))] });

/**
 * The same model calls as a recorded run, with one bare pass after each answer: passFloorMsPerCall. Run in
 * a latent scope as the samplers' runs are, so its latent and the answer slot are resident as theirs.
 */
function barePasses(requests: readonly ModelRequest[]): SamplerRun {
  return inLatentScope(
    (function* (): SamplerRun {
      const x = freshLatent(requests[0]!.x.length);
      x.set(requests[0]!.x);
      const into = answerSlot(x.length);
      for (const request of requests) {
        const response = yield { ...request, x, ...(into !== undefined && { into }) };
        barePass.run([x], [x, response instanceof Float32Array ? response : response.output], [0.5]);
      }
      return x;
    })(),
  );
}

function measureSync(bench: BenchCase): SamplerBenchResult {
  const sync = prepare(bench);
  const { ms, modelCalls } = runSync(sync, bench.now);
  const reported = sync.prepared.steps;
  return {
    sampler: bench.name,
    steps: reported,
    modelCalls,
    setupMs: sync.setupMs,
    syncMsPerStep: ms / reported,
    noiseCalls: sync.counts.calls,
  };
}

type OffThreadNumbers = Pick<
  SamplerBenchResult,
  | "criticalMsPerStep"
  | "criticalInSamplerMsPerStep"
  | "criticalInSamplerCopyingMsPerStep"
  | "criticalInThreadMsPerStep"
  | "criticalNoPrefetchMsPerStep"
  | "floorMsPerStep"
  | "passFloorMsPerCall"
  | "criticalNoiseCalls"
  | "longestBlockMs"
  | "longestBlockInThreadMs"
  | "firstWaitMs"
  | "workerBootMs"
  | "criticalAfterStartMsPerStep"
  | "hotInSamplerMsPerStep"
>;

function minimum(a: OffThreadNumbers, b: OffThreadNumbers): OffThreadNumbers {
  const min = (x: number | undefined, y: number | undefined): number | undefined =>
    x === undefined ? y : y === undefined ? x : Math.min(x, y);
  return {
    criticalMsPerStep: min(a.criticalMsPerStep, b.criticalMsPerStep),
    criticalInSamplerMsPerStep: min(a.criticalInSamplerMsPerStep, b.criticalInSamplerMsPerStep),
    criticalInSamplerCopyingMsPerStep: min(a.criticalInSamplerCopyingMsPerStep, b.criticalInSamplerCopyingMsPerStep),
    criticalInThreadMsPerStep: min(a.criticalInThreadMsPerStep, b.criticalInThreadMsPerStep),
    longestBlockMs: min(a.longestBlockMs, b.longestBlockMs),
    longestBlockInThreadMs: min(a.longestBlockInThreadMs, b.longestBlockInThreadMs),
    firstWaitMs: min(a.firstWaitMs, b.firstWaitMs),
    workerBootMs: min(a.workerBootMs, b.workerBootMs),
    criticalAfterStartMsPerStep: min(a.criticalAfterStartMsPerStep, b.criticalAfterStartMsPerStep),
    criticalNoPrefetchMsPerStep: min(a.criticalNoPrefetchMsPerStep, b.criticalNoPrefetchMsPerStep),
    floorMsPerStep: min(a.floorMsPerStep, b.floorMsPerStep),
    passFloorMsPerCall: min(a.passFloorMsPerCall, b.passFloorMsPerCall),
    criticalNoiseCalls: Math.max(a.criticalNoiseCalls ?? 0, b.criticalNoiseCalls ?? 0),
    hotInSamplerMsPerStep: min(a.hotInSamplerMsPerStep, b.hotInSamplerMsPerStep),
  };
}

/** A run driven off-thread with its noise drawn ahead by the agent's driver (openNoiseAhead), as in (b). */
async function runDrawingAhead(
  c: ReturnType<typeof prepare>,
  model: OffThreadModel,
  service: BrownianWorkers,
  draw: (request: ModelRequest, drawAhead: (request: ModelRequest) => void) => void = (request, drawAhead) => drawAhead(request),
): Promise<{ run: Awaited<ReturnType<typeof runOffThread>>; queriesOnCall: number }> {
  const ahead = c.prepared.openNoiseAhead({ brownian: service });
  try {
    const run = await runOffThread(c.prepared.run(c.start), model, (request) => draw(request, (r) => ahead.drawAhead(r)), ahead);
    return { run, queriesOnCall: ahead.queriesOnCall };
  } finally {
    await ahead.close();
  }
}

async function measureOffThread(
  bench: BenchCase,
  model: OffThreadModel,
  withoutPrefetch: boolean,
  service: BrownianWorkers,
  workerBootMs: number,
  hotModel: OffThreadModel | undefined,
): Promise<OffThreadNumbers> {
  const counted = prepare(bench, true);
  const reported = counted.prepared.steps;
  const requests: ModelRequest[] = [];
  const { run: withPrefetch, queriesOnCall } = await runDrawingAhead(counted, model, service, (request, drawAhead) => {
    requests.push(withoutSlot(request));
    counted.counts.ahead = true;
    drawAhead(request);
    counted.counts.ahead = false;
  });
  const out: OffThreadNumbers = {
    criticalMsPerStep: (withPrefetch.wallMs - withPrefetch.modelMs) / reported,
    criticalInSamplerMsPerStep: withPrefetch.samplerMs / reported,
    criticalNoiseCalls: counted.counts.critical + queriesOnCall,
    longestBlockMs: withPrefetch.longestBlockMs,
    firstWaitMs: withPrefetch.firstWaitMs,
  };
  if (counted.prepared.brownianRange !== undefined && bench.brownian) {
    out.workerBootMs = workerBootMs;
    const inThread = prepare(bench);
    const drawHere = (request: ModelRequest): void => inThread.prepared.drawAhead(request);
    const here = await runOffThread(inThread.prepared.run(inThread.start), model, drawHere);
    out.criticalAfterStartMsPerStep = (withPrefetch.wallMs - withPrefetch.modelMs - withPrefetch.firstWaitMs) / reported;
    out.criticalInThreadMsPerStep = (here.wallMs - here.modelMs) / reported;
    out.longestBlockInThreadMs = here.longestBlockMs;
  }
  setLatentResidency(false);
  try {
    // The same arrangement as the resident run above (tree in the worker service), only the latents differ.
    const { run: copying } = await runDrawingAhead(prepare(bench, true), model, service);
    out.criticalInSamplerCopyingMsPerStep = copying.samplerMs / reported;
  } finally {
    setLatentResidency(true);
  }
  if (withoutPrefetch) {
    const plain = prepare(bench);
    const without = await runOffThread(plain.prepared.run(plain.start), model, undefined);
    out.criticalNoPrefetchMsPerStep = (without.wallMs - without.modelMs) / reported;
  }
  const floor = await runOffThread(replay(requests), model, undefined);
  out.floorMsPerStep = (floor.wallMs - floor.modelMs) / reported;
  // Once untimed first, with the trivial model in this thread: the samplers' runs are warmed up too.
  const warm = barePasses(requests);
  for (let r = warm.next(); !r.done; r = warm.next(computeAnswer(r.value)));
  const passes = await runOffThread(barePasses(requests), model, undefined);
  // Like a sampler's, its first resumption (the start) and its copy of the result out are in it.
  out.passFloorMsPerCall = passes.samplerMs / requests.length;
  if (hotModel !== undefined) {
    const { run: hot } = await runDrawingAhead(prepare(bench, true), hotModel, service);
    out.hotInSamplerMsPerStep = hot.samplerMs / reported;
  }
  return out;
}

/** Where pageTouchMicros's reads go, so that the engine cannot drop them (read by nothing else). */
export let pageTouchSum = 0;

/**
 * Microseconds per 4 KB page for the first read of each page of three latent-sized arrays (768 KB) after
 * this thread has waited idle for `pauseMs` (Atomics.wait: it touches no memory meanwhile, as the
 * sampler's thread waiting for the model), the median of `rounds`. A machine that keeps the pages in its
 * caches and TLBs over the pause gives about what it gives with no pause; one whose other work (other
 * tenants of a VM host, another process) evicts them gives what every sampler pays per page it first
 * touches after a model call, whatever its code does.
 */
export function pageTouchMicros(pauseMs: number, rounds = 21): number {
  const n = 4 * 128 * 128;
  const arrays = [new Float32Array(n).fill(1), new Float32Array(n).fill(2), new Float32Array(n).fill(3)];
  const perPage = 1024;
  const touch = (): number => {
    let s = 0;
    for (let i = 0; i < n; i += perPage) s += arrays[0]![i]! + arrays[1]![i]! + arrays[2]![i]!;
    return s;
  };
  for (let k = 0; k < 200; k++) touch();
  const times: number[] = [];
  const idle = new Int32Array(new SharedArrayBuffer(4));
  for (let r = 0; r < rounds; r++) {
    if (pauseMs > 0) Atomics.wait(idle, 0, 0, pauseMs);
    const t = performance.now();
    pageTouchSum += touch();
    times.push(((performance.now() - t) * 1000) / ((3 * n) / perPage));
  }
  times.sort((a, b) => a - b);
  return times[rounds >> 1]!;
}

export async function benchSamplers(options: BenchSamplersOptions = {}): Promise<SamplerBenchResult[]> {
  const shape = options.shape ?? [4, 128, 128];
  const steps = options.steps ?? 10;
  const source = options.source ?? "NV";
  const brownian = options.brownian ?? true;
  const now = options.now ?? (() => performance.now());
  const names = options.samplers ?? listSamplers().map((s) => s.name);
  const modelMs = options.modelMs ?? 0;
  const length = shape[0] * shape[1] * shape[2];
  const model = modelMs > 0 ? new OffThreadModel(length, modelMs) : undefined;
  const hotModel = model !== undefined && (options.hot ?? true) ? new OffThreadModel(length, 0) : undefined;
  const noiseThread = new NoiseThread();
  // One service for the whole bench, as one pipeline serves all its runs; its start-up is timed once, here.
  const service = new BrownianWorkers();
  let workerBootMs = 0;
  const results: SamplerBenchResult[] = [];
  const repeats = Math.max(1, options.repeats ?? 3);
  try {
    if (model !== undefined && brownian) {
      const booting = performance.now();
      await service.start();
      workerBootMs = performance.now() - booting;
    }
    for (const name of names) {
      const bench: BenchCase = { name, steps, shape, source, brownian, now };
      if (options.warmup ?? true) runSync(prepare(bench), now);
      const result = measureSync(bench);
      for (let k = 1; k < repeats; k++) {
        const again = measureSync(bench);
        result.setupMs = Math.min(result.setupMs, again.setupMs);
        result.syncMsPerStep = Math.min(result.syncMsPerStep, again.syncMsPerStep);
      }
      for (let k = 0; k < repeats && model !== undefined; k++) {
        Object.assign(
          result,
          minimum(result, await measureOffThread(bench, model, options.withoutPrefetch ?? true, service, workerBootMs, hotModel)),
        );
      }
      for (let k = 0; k < repeats && modelMs > 0; k++) {
        const c = await measurePipelineThread(bench, modelMs, noiseThread, service);
        for (const key of ["pipelineCriticalMsPerStep", "pipelineFirstWaitMs", "pipelineAfterStartMsPerStep"] as const) {
          result[key] = Math.min(result[key] ?? Infinity, c[key]!);
        }
      }
      results.push(result);
    }
  } finally {
    await Promise.all([model?.close(), hotModel?.close()]);
    await Promise.all([noiseThread.close(), service.close()]);
  }
  return results;
}
