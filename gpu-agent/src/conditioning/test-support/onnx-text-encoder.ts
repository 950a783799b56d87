// A TextEncoder over the fixture's CLIP text model (diffusers ONNX export) for tests. CLIP skip uses
// the `hidden_states.N` outputs; those are taken before the final LayerNorm, which the graph only
// applies inside to produce last_hidden_state. So the weight and bias of
// `text_model.final_layer_norm` are read from the model's initializers and the LayerNorm is applied
// here, in float32 like torch: (x − mean) / sqrt(var + 1e-5) · weight + bias.
import { readFile } from "node:fs/promises";
import * as ort from "onnxruntime-node";
import type { TextEncoder } from "../conditioner.js";

/** CLIP's layer_norm_eps. */
const LAYER_NORM_EPS = 1e-5;

interface Field {
  field: number;
  wire: number;
  value?: bigint;
  start?: number;
  end?: number;
}

function readVarint(buf: Uint8Array, pos: number): [bigint, number] {
  let result = 0n;
  let shift = 0n;
  for (;;) {
    const byte = buf[pos++]!;
    result |= BigInt(byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return [result, pos];
    shift += 7n;
  }
}

// Just enough protobuf to walk ModelProto → GraphProto → TensorProto.
function fields(buf: Uint8Array, start: number, end: number): Field[] {
  const out: Field[] = [];
  let pos = start;
  while (pos < end) {
    const [key, p] = readVarint(buf, pos);
    pos = p;
    const field = Number(key >> 3n);
    const wire = Number(key & 7n);
    if (wire === 0) {
      const [value, q] = readVarint(buf, pos);
      out.push({ field, wire, value });
      pos = q;
    } else if (wire === 2) {
      const [len, q] = readVarint(buf, pos);
      out.push({ field, wire, start: q, end: q + Number(len) });
      pos = q + Number(len);
    } else if (wire === 5) {
      out.push({ field, wire, start: pos, end: pos + 4 });
      pos += 4;
    } else if (wire === 1) {
      out.push({ field, wire, start: pos, end: pos + 8 });
      pos += 8;
    } else {
      throw new Error(`unsupported protobuf wire type ${wire}`);
    }
  }
  return out;
}

/** Float32 initializers of an ONNX model whose names match `wanted` (raw_data or float_data). */
export function readFloatInitializers(model: Uint8Array, wanted: (name: string) => boolean): Map<string, Float32Array> {
  const decoder = new TextDecoder();
  const result = new Map<string, Float32Array>();
  const graph = fields(model, 0, model.length).find((f) => f.field === 7);
  if (graph === undefined) throw new Error("ONNX model has no graph");
  for (const init of fields(model, graph.start!, graph.end!)) {
    if (init.field !== 5) continue;
    const tensor = fields(model, init.start!, init.end!);
    const nameField = tensor.find((f) => f.field === 8);
    if (nameField === undefined) continue;
    const name = decoder.decode(model.subarray(nameField.start!, nameField.end!));
    if (!wanted(name)) continue;
    const dataType = tensor.find((f) => f.field === 2)?.value;
    if (dataType !== 1n) throw new Error(`initializer ${name} is not float32 (data_type ${dataType})`);
    const raw = tensor.find((f) => f.field === 9);
    if (raw !== undefined) {
      const bytes = model.slice(raw.start!, raw.end!);
      result.set(name, new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4));
      continue;
    }
    const packed = tensor.find((f) => f.field === 4 && f.wire === 2);
    if (packed !== undefined) {
      const bytes = model.slice(packed.start!, packed.end!);
      result.set(name, new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4));
      continue;
    }
    throw new Error(`initializer ${name} keeps its data outside the model file`);
  }
  return result;
}

export class OnnxClipTextEncoder implements TextEncoder {
  readonly hiddenSize: number;
  readonly maxClipSkip: number;
  /** Number of hidden_states.N outputs (embeddings + one per layer). */
  private readonly hiddenStates: number;

  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly lnWeight: Float32Array,
    private readonly lnBias: Float32Array,
  ) {
    this.hiddenSize = lnWeight.length;
    this.hiddenStates = session.outputNames.filter((n) => /^hidden_states\.\d+$/.test(n)).length;
    this.maxClipSkip = this.hiddenStates > 1 ? this.hiddenStates - 1 : 1;
  }

  static async load(modelPath: string): Promise<OnnxClipTextEncoder> {
    const bytes = new Uint8Array(await readFile(modelPath));
    const inits = readFloatInitializers(bytes, (n) => n.endsWith("final_layer_norm.weight") || n.endsWith("final_layer_norm.bias"));
    const weight = [...inits].find(([n]) => n.endsWith("weight"))?.[1];
    const bias = [...inits].find(([n]) => n.endsWith("bias"))?.[1];
    if (weight === undefined || bias === undefined) throw new Error("final_layer_norm weights not found in the model");
    const session = await ort.InferenceSession.create(bytes);
    return new OnnxClipTextEncoder(session, weight, bias);
  }

  async encode(batch: Int32Array, n: number, clipSkip: number): Promise<Float32Array> {
    const input = new ort.Tensor("int32", batch, [n, batch.length / n]);
    if (clipSkip <= 1) {
      const out = await this.session.run({ input_ids: input }, ["last_hidden_state"]);
      return out.last_hidden_state!.data as Float32Array;
    }
    // hidden_states[-N] of a tuple with L+1 entries is entry L+1−N.
    const name = `hidden_states.${this.hiddenStates - clipSkip}`;
    const out = await this.session.run({ input_ids: input }, [name]);
    return this.finalLayerNorm(out[name]!.data as Float32Array);
  }

  dispose(): Promise<void> {
    return this.session.release();
  }

  private finalLayerNorm(x: Float32Array): Float32Array {
    const h = this.hiddenSize;
    const out = new Float32Array(x.length);
    for (let o = 0; o < x.length; o += h) {
      let mean = 0;
      for (let i = 0; i < h; i++) mean += x[o + i]!;
      mean /= h;
      let variance = 0;
      for (let i = 0; i < h; i++) variance += (x[o + i]! - mean) ** 2;
      variance /= h;
      const inv = 1 / Math.sqrt(variance + LAYER_NORM_EPS);
      for (let i = 0; i < h; i++) out[o + i] = (x[o + i]! - mean) * inv * this.lnWeight[i]! + this.lnBias[i]!;
    }
    return out;
  }
}
