// Messages between the agent's event loop and an ONNX Runtime worker thread. Tensors travel as
// transferable ArrayBuffers so a step moves no bytes twice.

export type TensorType = "float32" | "float16" | "int32" | "int64";

export interface WireTensor {
  type: TensorType;
  dims: number[];
  /** float32 → Float32Array, float16 → Uint16Array, int32 → Int32Array, int64 → BigInt64Array. */
  data: Float32Array | Uint16Array | Int32Array | BigInt64Array;
}

export interface ValueMeta {
  name: string;
  type: string;
  shape: Array<number | string>;
}

export interface SessionInfo {
  inputs: ValueMeta[];
  outputs: ValueMeta[];
}

export type ExecutionProvider = { name: "cpu" } | { name: "cuda"; deviceId: number } | { name: "webgpu" };

export interface InitMessage {
  /** session name → model file path. */
  models: Record<string, string>;
  ep: ExecutionProvider;
  intraOpNumThreads?: number;
}

export type Request =
  | { id: number; op: "load"; name: string; model: string | Uint8Array }
  | { id: number; op: "run"; session: string; feeds: Record<string, WireTensor>; outputs: string[] }
  | { id: number; op: "close" };

export type Response =
  | {
      id: number;
      ok: true;
      info?: SessionInfo;
      outputs?: Record<string, WireTensor>;
      /** ms inside ORT's run(), for run requests. */ runMs?: number;
    }
  | { id: number; ok: false; error: string };
