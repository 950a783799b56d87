// An agent whose model evaluation is simulated: real gRPC server, real NATS heartbeats and
// progress, but each "step" is a timer instead of a UNet call. Benchmarks and load tests use it to
// measure the farm's own overhead without ONNX Runtime.
import * as grpc from "@grpc/grpc-js";
import { create, toBinary } from "@bufbuild/protobuf";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  AgentInfoSchema,
  AgentService,
  HeartbeatSchema,
  ImageSchema,
  TaskProgressSchema,
  addService,
  bindServer,
  serverOptions,
  shutdownServer,
  subjects,
  type AgentInfo,
  type HandlerContext,
  type RunTaskRequest,
} from "@latentfarm/shared";

export interface SimAgentOptions {
  id: string;
  natsUrl: string;
  models?: string[];
  slots?: number;
  /** Simulated time per sampling step, ms (0 = none). */
  stepMs?: number;
  heartbeatMs?: number;
  /** Publish step progress on NATS (as a real agent does). */
  progress?: boolean;
}

export class SimAgent {
  private readonly server = new grpc.Server(serverOptions);
  private nc: NatsConnection | undefined;
  private timer: NodeJS.Timeout | undefined;
  private busy = 0;
  address = "";
  tasksRun = 0;

  constructor(private readonly o: SimAgentOptions) {}

  private info(): AgentInfo {
    return create(AgentInfoSchema, {
      agentId: this.o.id,
      address: this.address,
      executionProvider: "simulated",
      slots: this.o.slots ?? 4,
      busySlots: this.busy,
      loadedModels: this.o.models ?? ["sim"],
      lastHeartbeatUnixMs: BigInt(Date.now()),
    });
  }

  async start(): Promise<void> {
    const png = new Uint8Array(64);
    addService(this.server, AgentService, {
      runTask: async function* (this: SimAgent, req: RunTaskRequest, ctx: HandlerContext) {
        this.busy++;
        try {
          const steps = req.params?.steps ?? 1;
          for (let s = 1; s <= steps; s++) {
            if (this.o.stepMs) await new Promise((r) => setTimeout(r, this.o.stepMs));
            if (ctx.signal.aborted) throw ctx.signal.reason;
            const step = { taskId: req.taskId, imageIndex: req.imageIndex, step: s, totalSteps: steps };
            if (this.o.progress) {
              this.nc?.publish(subjects.taskProgress(req.taskId), toBinary(TaskProgressSchema, create(TaskProgressSchema, { taskId: req.taskId, jobId: req.jobId, agentId: this.o.id, step })));
            }
            yield { kind: { case: "progress" as const, value: step } };
          }
          this.tasksRun++;
          yield { kind: { case: "result" as const, value: create(ImageSchema, { index: req.imageIndex, seed: req.seed, subseed: req.subseed, png, width: 8, height: 8, agentId: this.o.id }) } };
        } finally {
          this.busy--;
        }
      }.bind(this),
      status: async () => ({ agent: this.info(), models: this.o.models ?? ["sim"] }),
    });
    const port = await bindServer(this.server, "127.0.0.1:0");
    this.address = `127.0.0.1:${port}`;
    this.nc = await connect({ servers: this.o.natsUrl });
    const beat = (): void => {
      this.nc?.publish(
        subjects.agentHeartbeat(this.o.id),
        toBinary(HeartbeatSchema, create(HeartbeatSchema, { agent: this.info(), availableModels: (this.o.models ?? ["sim"]).map((name) => ({ name, format: "simulated" })) })),
      );
    };
    beat();
    this.timer = setInterval(beat, this.o.heartbeatMs ?? 500);
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await shutdownServer(this.server, 500);
    await this.nc?.drain().catch(() => undefined);
  }
}
