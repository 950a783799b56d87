// Messages between the agent's event loop and a pipeline host thread. Protobuf-es messages are plain
// objects, so requests and outputs cross by structured clone as they are.
import type * as grpc from "@grpc/grpc-js";
import { FarmError, type PassCheckpoint, type RunTaskRequest } from "@latentfarm/shared";
import type { ExecutionProvider } from "../runtime/protocol.js";
import type { RenderResources } from "../pipeline/render-common.js";
import type { PipelineOutput } from "../pipeline/txt2img.js";

export interface HostInit {
  modelsDir: string;
  /** pipelineKey(model, loras). */
  key: string;
  ep: ExecutionProvider;
  intraOpNumThreads?: number;
  cacheDir: string;
  tokenizerDir?: string;
  lorasDir?: string;
  /** Textual-inversion embeddings (A1111's --embeddings-dir). */
  embeddingsDir?: string;
  maxBatchRows: number;
}

export type ToHost =
  | { op: "run"; id: number; req: RunTaskRequest; agentId: string; resources: RenderResources | undefined }
  | { op: "cancel"; id: number }
  | { op: "close" };

export type LogLevel = "debug" | "info" | "warn" | "error";

export type FromHost =
  | { type: "ready"; modelHash: string | undefined; loraHashes: string[]; warnings: string[] }
  | { type: "loadFailed"; error: WireError }
  /**
   * `at`: epoch ms (timeOrigin + now) when the step ended; `unetRunMs`: this pipeline's ORT run() ms so far;
   * `previewPng`: the step's live preview, when the request asks for one.
   */
  | { type: "step"; id: number; step: number; total: number; at: number; unetRunMs: number; previewPng?: Uint8Array }
  | { type: "warning"; id: number; message: string }
  | { type: "checkpoint"; id: number; checkpoint: PassCheckpoint }
  | { type: "done"; id: number; output: PipelineOutput }
  | { type: "failed"; id: number; error: WireError }
  | { type: "unetCall"; rows: number; seconds: number }
  | { type: "log"; level: LogLevel; msg: string; fields: Record<string, unknown> | undefined }
  | { type: "closed" };

export interface WireError {
  code: grpc.status;
  /** The message without FarmError's "field: " prefix. */
  message: string;
  field: string | undefined;
  retryable: boolean;
  handBack: boolean;
}

export function toWireError(err: unknown): WireError {
  const fe = FarmError.from(err);
  return { code: fe.code, message: fe.detail, field: fe.field, retryable: fe.retryable, handBack: fe.handBack };
}

export function fromWireError(e: WireError): FarmError {
  return new FarmError(e.code, e.message, {
    ...(e.field !== undefined && { field: e.field }),
    retryable: e.retryable,
    handBack: e.handBack,
  });
}
