// Test-only AuxiliaryRunner: ONNX Runtime in-process, so auxiliary-model tests need no SD model.
import * as ort from "onnxruntime-node";
import type { SessionInfo, WireTensor } from "../runtime/protocol.js";
import type { AuxiliaryRunner } from "./upscalers.js";

export function inProcessRunner(): AuxiliaryRunner & { runs: Map<string, number> } {
  const sessions = new Map<string, Promise<ort.InferenceSession>>();
  const runs = new Map<string, number>();
  const open = (path: string): Promise<ort.InferenceSession> => {
    let s = sessions.get(path);
    if (!s) sessions.set(path, (s = ort.InferenceSession.create(path, { executionProviders: ["cpu"], intraOpNumThreads: 1 })));
    return s;
  };
  const meta = (m: readonly ort.InferenceSession.ValueMetadata[]) =>
    m.map((v) => ({ name: v.name, type: v.isTensor ? String(v.type) : "non-tensor", shape: v.isTensor ? [...v.shape] : [] }));
  return {
    runs,
    async loadAuxiliary(path: string): Promise<SessionInfo> {
      const s = await open(path);
      return { inputs: meta(s.inputMetadata), outputs: meta(s.outputMetadata) };
    },
    async runAuxiliary(path: string, feeds: Record<string, WireTensor>, outputs: string[]): Promise<Record<string, WireTensor>> {
      const s = await open(path);
      runs.set(path, (runs.get(path) ?? 0) + 1);
      const f: Record<string, ort.Tensor> = {};
      for (const [k, v] of Object.entries(feeds)) f[k] = new ort.Tensor(v.type, v.data, v.dims);
      const out = await s.run(f, outputs);
      const r: Record<string, WireTensor> = {};
      for (const o of outputs)
        r[o] = { type: out[o]!.type as WireTensor["type"], dims: [...out[o]!.dims], data: new Float32Array(out[o]!.data as Float32Array) };
      return r;
    },
  };
}
