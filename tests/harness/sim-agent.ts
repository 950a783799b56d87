// An agent whose model evaluation is simulated: real gRPC server, real NATS heartbeats and
// progress, but each "step" is a timer instead of a UNet call. Benchmarks, load tests and fault
// tests use it to measure and break the farm's own machinery without ONNX Runtime. Its "PNG" is a
// digest of what determines an image (model, prompt, size, steps, seed, subseed), so a retried or
// re-placed task must produce the same bytes, as a real agent's deterministic render does.
//
// Hires.fix stages (TaskStage) are simulated too, with real-sized hand-overs: a first-pass latent
// (or 8-bit image for a pixel upscaler), the upscaled source, tiles as 8-bit RGB, whose contents
// are pseudo-random but fixed by the stage's inputs; ASSEMBLE blends the tiles with the farm's own
// blender and digests the result, so a tiled image's bytes show whether the farm's hand-overs and
// blend order are deterministic. With `refPixels`, a step's time scales with the stage's latent
// pixels (stepMs per step at refPixels), as a GPU's does.
import * as grpc from "@grpc/grpc-js";
import { createHash } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  AgentInfoSchema,
  AgentService,
  FarmError,
  HeartbeatSchema,
  ImageSchema,
  TaskProgressSchema,
  TaskStage,
  TileBlender,
  addService,
  bindServer,
  hiresTarget,
  latentHandover,
  layoutFromStarts,
  readRgb,
  rgbHandover,
  serverOptions,
  shutdownServer,
  subjects,
  type AgentInfo,
  type GenerationParams,
  type HandlerContext,
  type Handover,
  type Image,
  type RunTaskRequest,
} from "@latentfarm/shared";
// The task-run module alone: simulated agents need its attach semantics, not ONNX Runtime.
import { DEFAULT_ORPHAN_GRACE_MS, TaskRun } from "@latentfarm/gpu-agent/task-run";

export interface SimAgentOptions {
  id: string;
  natsUrl: string;
  models?: string[];
  slots?: number;
  /** Simulated time per sampling step at speed 1, ms (0 = none). */
  stepMs?: number;
  /** Relative speed: a step takes stepMs / speed. */
  speed?: number;
  /** When > 0, stepMs is the time of a step at this many pixels, and steps scale with the task's pixels. */
  refPixels?: number;
  heartbeatMs?: number;
  /** Publish step progress on NATS (as a real agent does). */
  progress?: boolean;
  /** Tasks whose image seed is listed fail on every attempt, with this status (a poison task). */
  poisonSeeds?: readonly bigint[];
  poisonCode?: grpc.status;
  /** Called on task start and end (fault tests count executions with it). */
  onTask?: (event: "start" | "done" | "aborted" | "failed" | "attach", req: RunTaskRequest) => void;
  /** How long a task outlives a broken RunTask stream, waiting for a re-attach (ms). */
  orphanGraceMs?: number;
}

/** The bytes a simulated agent returns for an image: the same inputs always give the same bytes. */
export function simImageBytes(
  params: Pick<GenerationParams, "model" | "prompt" | "width" | "height" | "steps">,
  seed: bigint,
  subseed: bigint,
): Uint8Array {
  const h = createHash("sha256")
    .update(`${params.model}|${params.prompt}|${params.width}x${params.height}|${params.steps}|${seed}|${subseed}`)
    .digest();
  return new Uint8Array(Buffer.concat([Buffer.from("SIMPNG"), h]));
}

/** Pseudo-random bytes fixed by a digest (xorshift128, seeded from the digest's first 16 bytes). */
function fill(out: Uint8Array, digest: Buffer): Uint8Array {
  let [a, b, c, d] = [0, 4, 8, 12].map((o) => digest.readUInt32LE(o) | 1) as [number, number, number, number];
  for (let i = 0; i < out.length; i++) {
    const t = a ^ (a << 11);
    [a, b, c] = [b, c, d];
    d = (d ^ (d >>> 19) ^ t ^ (t >>> 8)) >>> 0;
    out[i] = d & 0xff;
  }
  return out;
}

const digestOf = (...parts: Array<string | Uint8Array>): Buffer => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest();
};

const handoverBytesOf = (h: Handover | undefined): Uint8Array => (h?.data.case ? h.data.value.data : new Uint8Array(0));

/** A simulated stage: the steps it samples at how many pixels, and its output. */
interface SimWork {
  steps: number;
  pixels: number;
  output: () => { case: "result"; value: Image } | { case: "handover"; value: Handover };
}

/** What a simulated agent does for a task (FULL or a Hires.fix stage). */
export function simWork(req: RunTaskRequest, agentId: string): SimWork {
  const p = req.params!;
  const steps = p.steps ?? 1;
  const image = (png: Uint8Array, width: number, height: number, infotext: string) => ({
    case: "result" as const,
    value: create(ImageSchema, { index: req.imageIndex, seed: req.seed, subseed: req.subseed, png, width, height, agentId, infotext }),
  });
  if (req.stage === TaskStage.FULL) {
    return {
      steps,
      pixels: (p.width ?? 512) * (p.height ?? 512),
      output: () => image(simImageBytes(p, req.seed, req.subseed), p.width ?? 0, p.height ?? 0, `sim seed ${req.seed}`),
    };
  }
  const target = hiresTarget({
    width: p.width ?? 512,
    height: p.height ?? 512,
    hrScale: p.hrScale ?? 2,
    hrResizeX: p.hrResizeX,
    hrResizeY: p.hrResizeY,
  });
  const latentMode = p.hrUpscaler === "" || p.hrUpscaler.startsWith("Latent");
  const hrSteps = p.hrSecondPassSteps || steps;
  const fw = target.final.width;
  const fh = target.final.height;
  const source = (width: number, height: number, digest: Buffer): Handover =>
    latentMode
      ? latentHandover(
          new Float32Array(fill(new Uint8Array(((width * height) / 64) * 4 * 4), digest).buffer).map((v) => (Number.isFinite(v) ? v : 0)),
          [1, 4, height / 8, width / 8],
        )
      : rgbHandover(fill(new Uint8Array(width * height * 3), digest), width, height);
  const key = `${p.model}|${p.prompt}|${p.hrPrompt}|${req.seed}|${req.subseed}|${steps}|${hrSteps}`;
  switch (req.stage) {
    case TaskStage.FIRST_PASS: {
      const { width, height } = target.firstPass;
      return { steps, pixels: width * height, output: () => ({ case: "handover", value: source(width, height, digestOf("first", key)) }) };
    }
    case TaskStage.UPSCALE:
      // A latent upscale is arithmetic; a pixel upscaler is a model run at the output size.
      return {
        steps: latentMode ? 0 : 1,
        pixels: fw * fh,
        output: () => ({ case: "handover", value: source(fw, fh, digestOf("up", key, handoverBytesOf(req.inputs[0]))) }),
      };
    case TaskStage.SECOND_PASS_TILE: {
      const h = req.inputs[0];
      const [w, ht] =
        h?.data.case === "latent"
          ? [h.data.value.shape[3]! * 8, h.data.value.shape[2]! * 8]
          : h?.data.case === "rgb"
            ? [h.data.value.width, h.data.value.height]
            : [0, 0];
      if (w === 0) throw FarmError.invalid("inputs", "a tile needs its input");
      return {
        steps: hrSteps,
        pixels: w * ht,
        output: () => ({
          case: "handover",
          value: rgbHandover(fill(new Uint8Array(w * ht * 3), digestOf("tile", key, String(req.tileIndex), handoverBytesOf(h))), w, ht),
        }),
      };
    }
    case TaskStage.SECOND_PASS:
      return {
        steps: hrSteps,
        pixels: fw * fh,
        output: () =>
          image(
            new Uint8Array(Buffer.concat([Buffer.from("SIMPNG"), digestOf("second", key, handoverBytesOf(req.inputs[0]))])),
            fw,
            fh,
            `sim hires seed ${req.seed}`,
          ),
      };
    case TaskStage.ASSEMBLE:
      return {
        steps: 0,
        pixels: fw * fh,
        output: () => {
          const t = req.tiles!;
          const layout = layoutFromStarts(t.width, t.height, t.tileWidth, t.tileHeight, t.xs, t.ys);
          const blender = new TileBlender(layout, 3);
          for (const tile of layout.tiles) blender.add(tile.index, readRgb(req.inputs[tile.index]).data);
          return image(
            new Uint8Array(Buffer.concat([Buffer.from("SIMPNG"), digestOf("asm", blender.resultUint8())])),
            t.width,
            t.height,
            `sim hires seed ${req.seed}`,
          );
        },
      };
    default:
      throw FarmError.invalid("stage", `unknown stage ${req.stage}`);
  }
}

export class SimAgent {
  private readonly server = new grpc.Server(serverOptions);
  private nc: NatsConnection | undefined;
  private timer: NodeJS.Timeout | undefined;
  private busy = 0;
  private draining = false;
  private readonly running = new Map<string, TaskRun>();
  address = "";
  tasksRun = 0;

  constructor(private readonly o: SimAgentOptions) {}

  get id(): string {
    return this.o.id;
  }

  private info(): AgentInfo {
    return create(AgentInfoSchema, {
      agentId: this.o.id,
      address: this.address,
      executionProvider: "simulated",
      slots: this.o.slots ?? 4,
      busySlots: this.busy,
      loadedModels: this.o.models ?? ["sim"],
      lastHeartbeatUnixMs: BigInt(Date.now()),
      draining: this.draining,
    });
  }

  async start(): Promise<void> {
    const poison = new Set((this.o.poisonSeeds ?? []).map(String));
    addService(this.server, AgentService, {
      runTask: (req: RunTaskRequest, ctx: HandlerContext) => {
        // The agent's real task-run machinery: a re-sent task id attaches to the running render.
        const existing = this.running.get(req.taskId);
        if (existing) {
          this.o.onTask?.("attach", req);
          return existing.attach(ctx.signal, req.attempt);
        }
        if (this.draining) throw new FarmError(grpc.status.UNAVAILABLE, `agent ${this.o.id} is draining`, { handBack: true });
        if (this.busy >= (this.o.slots ?? 4)) throw new FarmError(grpc.status.RESOURCE_EXHAUSTED, `agent ${this.o.id} has no free slot`);
        const run = new TaskRun({
          taskId: req.taskId,
          attempt: req.attempt,
          orphanGraceMs: this.o.orphanGraceMs ?? DEFAULT_ORPHAN_GRACE_MS,
          onExpired: (r) => {
            if (this.running.get(r.taskId) === r) this.running.delete(r.taskId);
          },
        });
        this.running.set(req.taskId, run);
        this.busy++;
        void this.simulate(run, req, poison);
        return run.attach(ctx.signal, req.attempt);
      },
      cancelTask: async (req) => {
        const run = this.running.get(req.taskId);
        if (!run || run.finished || (req.attempt !== 0 && run.attempt !== req.attempt)) return { stopped: false };
        run.cancel(new FarmError(grpc.status.CANCELLED, req.reason || "cancelled"));
        return { stopped: true };
      },
      status: async () => ({
        agent: this.info(),
        models: this.o.models ?? ["sim"],
        runningTasks: [...this.running.values()].filter((r) => !r.finished).map((r) => r.taskId),
      }),
      // A simulated agent has no LoRA folder.
      loraMetadata: async () => ({ metadataJson: {} }),
    });
    const port = await bindServer(this.server, "127.0.0.1:0");
    this.address = `127.0.0.1:${port}`;
    this.nc = await connect({ servers: this.o.natsUrl, maxReconnectAttempts: -1, reconnectTimeWait: 250 });
    this.beat();
    this.timer = setInterval(() => this.beat(), this.o.heartbeatMs ?? 500);
  }

  private async simulate(run: TaskRun, req: RunTaskRequest, poison: Set<string>): Promise<void> {
    const signal = run.abort.signal;
    this.o.onTask?.("start", req);
    let outcome: "done" | "aborted" | "failed" = "failed";
    try {
      const work = simWork(req, this.o.id);
      const steps = work.steps;
      const scale = this.o.refPixels ? work.pixels / this.o.refPixels : 1;
      const stepMs = ((this.o.stepMs ?? 0) * scale) / (this.o.speed ?? 1);
      // Steps keep to a schedule from the start, so timer lateness does not add up: a simulated
      // agent's speed is what it was given, as a GPU's is.
      const t0 = performance.now();
      for (let s = 1; s <= steps; s++) {
        if (stepMs > 0) await new Promise((r) => setTimeout(r, Math.max(0, t0 + s * stepMs - performance.now())));
        if (signal.aborted) {
          outcome = "aborted";
          throw signal.reason instanceof Error ? signal.reason : new FarmError(grpc.status.CANCELLED, "cancelled");
        }
        if (s === Math.ceil(steps / 2) && poison.has(String(req.seed))) {
          throw new FarmError(this.o.poisonCode ?? grpc.status.INTERNAL, `simulated crash rendering seed ${req.seed} on ${this.o.id}`);
        }
        const step = { taskId: req.taskId, imageIndex: req.imageIndex, step: s, totalSteps: steps };
        if (this.o.progress) {
          this.nc?.publish(
            subjects.taskProgress(req.taskId),
            toBinary(TaskProgressSchema, create(TaskProgressSchema, { taskId: req.taskId, jobId: req.jobId, agentId: this.o.id, step })),
          );
        }
        run.progress({ kind: { case: "progress", value: step } });
      }
      if (signal.aborted) {
        outcome = "aborted";
        throw signal.reason instanceof Error ? signal.reason : new FarmError(grpc.status.CANCELLED, "cancelled");
      }
      this.tasksRun++;
      const output = work.output();
      outcome = "done";
      run.finish({ output });
    } catch (err) {
      run.finish({ error: FarmError.from(err) });
    } finally {
      this.busy--;
      this.o.onTask?.(outcome, req);
    }
  }

  private beat(): void {
    if (!this.nc || this.nc.isClosed()) return;
    this.nc.publish(
      subjects.agentHeartbeat(this.o.id),
      toBinary(
        HeartbeatSchema,
        create(HeartbeatSchema, {
          agent: this.info(),
          availableModels: (this.o.models ?? ["sim"]).map((name) => ({ name, format: "simulated" })),
        }),
      ),
    );
  }

  /** As a real agent on SIGTERM: take nothing new, finish within the grace period, hand the rest back. */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    this.beat();
    const deadline = Date.now() + graceMs;
    while (this.busy > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const run of this.running.values())
      run.cancel(new FarmError(grpc.status.UNAVAILABLE, `agent ${this.o.id} is shutting down`, { handBack: true }));
    while (this.busy > 0) await new Promise((r) => setTimeout(r, 5));
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    for (const run of this.running.values())
      run.cancel(new FarmError(grpc.status.UNAVAILABLE, `agent ${this.o.id} is shutting down`, { handBack: true }));
    await shutdownServer(this.server, 500);
    for (const run of this.running.values()) run.dispose();
    await this.nc?.drain().catch(() => undefined);
  }
}
