import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, isMessage, toBinary } from "@bufbuild/protobuf";
import type { DescMessage, DescMethod, DescService, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { HealthImplementation } from "grpc-health-check";
import { ReflectionService } from "@grpc/reflection";
import { loadFileDescriptorSetFromBuffer } from "@grpc/proto-loader";
import { FarmError } from "./errors.js";
import { file_latentfarm_v1_agent } from "./gen/latentfarm/v1/agent_pb.js";
import { file_latentfarm_v1_generation } from "./gen/latentfarm/v1/generation_pb.js";
import { file_latentfarm_v1_render } from "./gen/latentfarm/v1/render_pb.js";

/** Images exceed grpc-js's 4 MiB receive default; both directions get the same explicit limit. */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

export const channelOptions: grpc.ChannelOptions = {
  "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  // Detect black-holed peers on idle channels within ~40 s (infra-notes §1.5).
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
  "grpc.keepalive_permit_without_calls": 1,
};

export const serverOptions: grpc.ServerOptions = {
  "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
};

/** Turns a protobuf-es service descriptor into a grpc-js ServiceDefinition. */
export function grpcServiceDefinition(svc: DescService): grpc.ServiceDefinition {
  const def: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  const ser = (s: DescMessage) => (m: unknown) =>
    Buffer.from(toBinary(s, isMessage(m, s) ? m : create(s, m as MessageInitShape<DescMessage>)));
  const de = (s: DescMessage) => (b: Buffer) => fromBinary(s, b);
  for (const m of svc.methods) {
    def[m.localName] = {
      path: `/${svc.typeName}/${m.name}`,
      originalName: m.name,
      requestStream: m.methodKind === "client_streaming" || m.methodKind === "bidi_streaming",
      responseStream: m.methodKind === "server_streaming" || m.methodKind === "bidi_streaming",
      requestSerialize: ser(m.input),
      requestDeserialize: de(m.input),
      responseSerialize: ser(m.output),
      responseDeserialize: de(m.output),
    };
  }
  return def as grpc.ServiceDefinition;
}

type In<M> = M extends { input: infer I extends DescMessage } ? MessageShape<I> : never;
type Out<M> = M extends { output: infer O extends DescMessage } ? MessageShape<O> : never;
type OutInit<M> = M extends { output: infer O extends DescMessage } ? MessageInitShape<O> : never;

/** Context a handler gets: the call's cancellation as an AbortSignal, its deadline, and metadata. */
export interface HandlerContext {
  readonly signal: AbortSignal;
  readonly metadata: grpc.Metadata;
  readonly peer: string;
}

/**
 * Typed async handlers: unary methods return the response; server-streaming methods are async
 * generators. A thrown FarmError becomes its gRPC status; anything else becomes INTERNAL.
 */
export type ServiceHandlers<S extends GenServiceMethods> = {
  [K in keyof S]: S[K] extends { methodKind: "unary" }
    ? (req: In<S[K]>, ctx: HandlerContext) => Promise<OutInit<S[K]>>
    : S[K] extends { methodKind: "server_streaming" }
      ? (req: In<S[K]>, ctx: HandlerContext) => AsyncIterable<OutInit<S[K]>>
      : never;
};

function contextOf(call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>): {
  ctx: HandlerContext;
  done: () => void;
} {
  const ac = new AbortController();
  const onCancel = (): void => ac.abort(new FarmError(grpc.status.CANCELLED, "call cancelled by the client"));
  call.on("cancelled", onCancel);
  return {
    ctx: { signal: ac.signal, metadata: call.metadata, peer: call.getPeer() },
    done: () => call.off("cancelled", onCancel),
  };
}

export function addService<S extends GenServiceMethods>(
  server: grpc.Server,
  svc: GenService<S>,
  handlers: ServiceHandlers<S>,
  onError?: (method: string, err: FarmError) => void,
): void {
  const impl: grpc.UntypedServiceImplementation = {};
  const fail = (method: string, err: unknown): Partial<grpc.StatusObject> => {
    const fe = FarmError.from(err);
    onError?.(method, fe);
    return fe.toStatus();
  };
  for (const m of svc.methods as DescMethod[]) {
    const h = (handlers as Record<string, (req: unknown, ctx: HandlerContext) => unknown>)[m.localName];
    if (!h) throw new Error(`no handler for ${svc.typeName}.${m.name}`);
    if (m.methodKind === "unary") {
      impl[m.localName] = ((call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const { ctx, done } = contextOf(call);
        (h(call.request, ctx) as Promise<unknown>).then(
          (res) => {
            done();
            cb(null, res);
          },
          (err: unknown) => {
            done();
            cb(fail(m.name, err));
          },
        );
      }) as grpc.handleUnaryCall<unknown, unknown>;
    } else if (m.methodKind === "server_streaming") {
      impl[m.localName] = ((call: grpc.ServerWritableStream<unknown, unknown>) => {
        const { ctx, done } = contextOf(call);
        void (async () => {
          try {
            for await (const msg of h(call.request, ctx) as AsyncIterable<unknown>) {
              if (call.cancelled) break;
              if (!call.write(msg)) await new Promise((r) => call.once("drain", r));
            }
            if (!call.cancelled) call.end();
          } catch (err) {
            if (!call.cancelled) call.emit("error", fail(m.name, err));
          } finally {
            done();
          }
        })();
      }) as grpc.handleServerStreamingCall<unknown, unknown>;
    } else {
      throw new Error(`${m.methodKind} methods are not used by latentfarm`);
    }
  }
  server.addService(grpcServiceDefinition(svc), impl);
}

export interface CallOptions {
  signal?: AbortSignal;
  /** Milliseconds from now. */
  timeoutMs?: number;
  metadata?: Record<string, string>;
}

/** A typed client: unary methods return promises; server-streaming methods return async iterables. */
export type ServiceClient<S extends GenServiceMethods> = {
  [K in keyof S]: S[K] extends { methodKind: "unary" }
    ? (req: MessageInitShape<S[K]["input"]>, opts?: CallOptions) => Promise<Out<S[K]>>
    : S[K] extends { methodKind: "server_streaming" }
      ? (req: MessageInitShape<S[K]["input"]>, opts?: CallOptions) => AsyncIterable<Out<S[K]>>
      : never;
} & { close(): void; readonly channel: grpc.Client };

function callArgs(opts: CallOptions | undefined): { md: grpc.Metadata; co: grpc.CallOptions } {
  const md = new grpc.Metadata();
  for (const [k, v] of Object.entries(opts?.metadata ?? {})) md.set(k, v);
  const co: grpc.CallOptions = {};
  if (opts?.timeoutMs !== undefined) co.deadline = Date.now() + opts.timeoutMs;
  return { md, co };
}

export function createClient<S extends GenServiceMethods>(
  svc: GenService<S>,
  address: string,
  opts: { credentials?: grpc.ChannelCredentials; channelOptions?: grpc.ChannelOptions } = {},
): ServiceClient<S> {
  const Ctor = grpc.makeGenericClientConstructor(grpcServiceDefinition(svc), svc.typeName);
  const client = new Ctor(address, opts.credentials ?? grpc.credentials.createInsecure(), {
    ...channelOptions,
    ...opts.channelOptions,
  });
  const out: Record<string, unknown> = {
    close: () => client.close(),
    channel: client,
  };
  for (const m of svc.methods as DescMethod[]) {
    const fn = (client as unknown as Record<string, (...a: unknown[]) => unknown>)[m.localName]!.bind(client);
    if (m.methodKind === "unary") {
      out[m.localName] = (req: unknown, o?: CallOptions) =>
        new Promise((resolve, reject) => {
          o?.signal?.throwIfAborted();
          const { md, co } = callArgs(o);
          const call = fn(req, md, co, (err: grpc.ServiceError | null, res: unknown) => {
            o?.signal?.removeEventListener("abort", onAbort);
            if (err) reject(FarmError.from(err));
            else resolve(res);
          }) as grpc.ClientUnaryCall;
          const onAbort = (): void => call.cancel();
          o?.signal?.addEventListener("abort", onAbort, { once: true });
        });
    } else if (m.methodKind === "server_streaming") {
      out[m.localName] = (req: unknown, o?: CallOptions) => ({
        async *[Symbol.asyncIterator]() {
          o?.signal?.throwIfAborted();
          const { md, co } = callArgs(o);
          const call = fn(req, md, co) as grpc.ClientReadableStream<unknown>;
          const onAbort = (): void => call.cancel();
          o?.signal?.addEventListener("abort", onAbort, { once: true });
          try {
            for await (const msg of call) yield msg;
          } catch (err) {
            throw FarmError.from(err);
          } finally {
            o?.signal?.removeEventListener("abort", onAbort);
            call.cancel();
          }
        },
      });
    }
  }
  return out as ServiceClient<S>;
}

// Reflection serves the descriptors embedded in the generated code, so no descriptor file ships.
function descriptorSet(): Buffer {
  const files = [file_latentfarm_v1_generation, file_latentfarm_v1_render, file_latentfarm_v1_agent].map((f) => f.proto);
  return Buffer.from(toBinary(FileDescriptorSetSchema, create(FileDescriptorSetSchema, { file: files })));
}

/** Adds grpc.health.v1 and server reflection (v1 and v1alpha) for the given services. */
export function addHealthAndReflection(server: grpc.Server, serviceNames: readonly string[]): HealthImplementation {
  const initial: Record<string, "SERVING" | "NOT_SERVING"> = { "": "NOT_SERVING", liveness: "SERVING" };
  for (const s of serviceNames) initial[s] = "NOT_SERVING";
  const health = new HealthImplementation(initial);
  health.addToServer(server);
  const pkg = loadFileDescriptorSetFromBuffer(descriptorSet());
  new ReflectionService(pkg).addToServer(server);
  return health;
}

export function setServing(health: HealthImplementation, serviceNames: readonly string[], serving: boolean): void {
  const s = serving ? "SERVING" : "NOT_SERVING";
  health.setStatus("", s);
  for (const n of serviceNames) health.setStatus(n, s);
}

/** Binds a server and resolves with the port actually bound (for port 0). */
export function bindServer(server: grpc.Server, address: string, credentials = grpc.ServerCredentials.createInsecure()): Promise<number> {
  return new Promise((resolve, reject) => {
    server.bindAsync(address, credentials, (err, port) => (err ? reject(err) : resolve(port)));
  });
}

/** Graceful shutdown, forced after a grace period so close() always ends. */
export function shutdownServer(server: grpc.Server, graceMs = 2000): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(t);
      resolve();
    });
  });
}
