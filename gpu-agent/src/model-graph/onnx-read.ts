// Reads ONNX models back into plain objects: for tests, for inspecting exported graphs and for
// locating initializer bytes (including external data) in a built model.

import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { decodeFields, decodePackedVarints, fixed32ToFloat, toSigned64, type Field } from "./protobuf.js";
import { ModelFileError } from "./errors.js";
import { DataType } from "./onnx.js";
import type { Dim, ElemType } from "./onnx.js";

export type DecodedAttr = number | number[] | string | DecodedTensor | { graph: Uint8Array };

export interface DecodedNode {
  opType: string;
  domain: string;
  name: string;
  inputs: string[];
  outputs: string[];
  attrs: Record<string, DecodedAttr>;
}

export interface DecodedTensor {
  name: string;
  elemType: ElemType | number;
  dims: number[];
  raw?: Uint8Array;
  floatData?: number[];
  int64Data?: bigint[];
  int32Data?: number[];
  external?: Record<string, string>;
}

export interface DecodedValueInfo {
  name: string;
  elemType: ElemType | number;
  dims: Dim[] | undefined;
}

export interface DecodedModel {
  irVersion: number;
  producer: string;
  opsets: Record<string, number>;
  metadata: Record<string, string>;
  graph: {
    name: string;
    nodes: DecodedNode[];
    initializers: DecodedTensor[];
    inputs: DecodedValueInfo[];
    outputs: DecodedValueInfo[];
  };
}

const ELEM_BY_CODE = new Map<number, ElemType>(Object.entries(DataType).map(([k, v]) => [v, k as ElemType]));
const text = (b: Uint8Array): string => new TextDecoder().decode(b);
const bytes = (v: unknown): Uint8Array => v as Uint8Array;

function repeatedInts(fields: { field: number; wire: number; value: unknown }[], field: number): bigint[] {
  const out: bigint[] = [];
  for (const f of fields) {
    if (f.field !== field) continue;
    if (f.wire === 2) out.push(...decodePackedVarints(bytes(f.value)));
    else out.push(f.value as bigint);
  }
  return out.map(toSigned64);
}

export function decodeTensor(buf: Uint8Array): DecodedTensor {
  const fields = decodeFields(buf);
  const t: DecodedTensor = { name: "", elemType: 0, dims: repeatedInts(fields, 1).map(Number) };
  for (const f of fields) {
    if (f.field === 2) t.elemType = ELEM_BY_CODE.get(Number(f.value)) ?? Number(f.value);
    else if (f.field === 8) t.name = text(bytes(f.value));
    else if (f.field === 9) t.raw = bytes(f.value);
    else if (f.field === 4) {
      const b = bytes(f.value);
      if (f.wire === 2) {
        const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
        t.floatData = Array.from({ length: b.byteLength / 4 }, (_, i) => dv.getFloat32(i * 4, true));
      } else (t.floatData ??= []).push(fixed32ToFloat(f.value as number));
    } else if (f.field === 13) {
      const kv = decodeFields(bytes(f.value));
      const k = kv.find((x) => x.field === 1);
      const v = kv.find((x) => x.field === 2);
      (t.external ??= {})[k ? text(bytes(k.value)) : ""] = v ? text(bytes(v.value)) : "";
    }
  }
  const i64 = repeatedInts(fields, 7);
  if (i64.length) t.int64Data = i64;
  const i32 = repeatedInts(fields, 5);
  if (i32.length) t.int32Data = i32.map(Number);
  return t;
}

function decodeAttr(buf: Uint8Array): [string, DecodedAttr] {
  const fields = decodeFields(buf);
  let name = "";
  let type = 0;
  let value: DecodedAttr | undefined;
  const floats: number[] = [];
  const strings: string[] = [];
  for (const f of fields) {
    if (f.field === 1) name = text(bytes(f.value));
    else if (f.field === 20) type = Number(f.value);
    else if (f.field === 2) value = fixed32ToFloat(f.value as number);
    else if (f.field === 3) value = Number(toSigned64(f.value as bigint));
    else if (f.field === 4) value = text(bytes(f.value));
    else if (f.field === 5) value = decodeTensor(bytes(f.value));
    else if (f.field === 6) value = { graph: bytes(f.value) };
    else if (f.field === 7) {
      if (f.wire === 2) {
        const b = bytes(f.value);
        const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
        for (let i = 0; i < b.byteLength / 4; i++) floats.push(dv.getFloat32(i * 4, true));
      } else floats.push(fixed32ToFloat(f.value as number));
    } else if (f.field === 9) strings.push(text(bytes(f.value)));
  }
  if (type === 7) value = repeatedInts(fields, 8).map(Number);
  if (type === 6) value = floats;
  if (type === 8) value = strings.join("\u0000");
  return [name, value ?? 0];
}

export function decodeValueInfo(buf: Uint8Array): DecodedValueInfo {
  const fields = decodeFields(buf);
  const v: DecodedValueInfo = { name: "", elemType: 0, dims: undefined };
  for (const f of fields) {
    if (f.field === 1) v.name = text(bytes(f.value));
    if (f.field !== 2) continue;
    for (const tf of decodeFields(bytes(f.value))) {
      if (tf.field !== 1) continue;
      for (const tt of decodeFields(bytes(tf.value))) {
        if (tt.field === 1) v.elemType = ELEM_BY_CODE.get(Number(tt.value)) ?? Number(tt.value);
        if (tt.field === 2) {
          v.dims = decodeFields(bytes(tt.value))
            .filter((d) => d.field === 1)
            .map((d) => {
              const df = decodeFields(bytes(d.value));
              const dv = df.find((x) => x.field === 1);
              const dp = df.find((x) => x.field === 2);
              return dv ? Number(dv.value) : dp ? text(bytes(dp.value)) : "?";
            });
        }
      }
    }
  }
  return v;
}

export function decodeNode(buf: Uint8Array): DecodedNode {
  const n: DecodedNode = { opType: "", domain: "", name: "", inputs: [], outputs: [], attrs: {} };
  for (const f of decodeFields(buf)) {
    if (f.field === 1) n.inputs.push(text(bytes(f.value)));
    else if (f.field === 2) n.outputs.push(text(bytes(f.value)));
    else if (f.field === 3) n.name = text(bytes(f.value));
    else if (f.field === 4) n.opType = text(bytes(f.value));
    else if (f.field === 7) n.domain = text(bytes(f.value));
    else if (f.field === 5) {
      const [k, v] = decodeAttr(bytes(f.value));
      n.attrs[k] = v;
    }
  }
  return n;
}

export function decodeModel(buf: Uint8Array): DecodedModel {
  const m: DecodedModel = {
    irVersion: 0,
    producer: "",
    opsets: {},
    metadata: {},
    graph: { name: "", nodes: [], initializers: [], inputs: [], outputs: [] },
  };
  for (const f of decodeFields(buf)) {
    if (f.field === 1) m.irVersion = Number(f.value);
    else if (f.field === 2) m.producer = text(bytes(f.value));
    else if (f.field === 8) {
      let domain = "";
      let version = 0;
      for (const o of decodeFields(bytes(f.value))) {
        if (o.field === 1) domain = text(bytes(o.value));
        if (o.field === 2) version = Number(o.value);
      }
      m.opsets[domain] = version;
    } else if (f.field === 14) {
      const kv = decodeFields(bytes(f.value));
      const k = kv.find((x) => x.field === 1);
      const v = kv.find((x) => x.field === 2);
      m.metadata[k ? text(bytes(k.value)) : ""] = v ? text(bytes(v.value)) : "";
    } else if (f.field === 7) {
      for (const g of decodeFields(bytes(f.value))) {
        const b = bytes(g.value);
        if (g.field === 1) m.graph.nodes.push(decodeNode(b));
        else if (g.field === 2) m.graph.name = text(b);
        else if (g.field === 5) m.graph.initializers.push(decodeTensor(b));
        else if (g.field === 11) m.graph.inputs.push(decodeValueInfo(b));
        else if (g.field === 12) m.graph.outputs.push(decodeValueInfo(b));
      }
    }
  }
  return m;
}

export async function readModel(path: string): Promise<DecodedModel> {
  return decodeModel(await readFile(path));
}

/** An initializer's values as float32 (float32 tensors only), following external data relative to `modelPath`. */
export async function initializerFloat32(t: DecodedTensor, modelPath: string): Promise<Float32Array> {
  if (t.elemType !== "float32") throw new TypeError(`${t.name} is ${String(t.elemType)}, not float32`);
  if (t.floatData) return Float32Array.from(t.floatData);
  if (t.raw) return new Float32Array(Uint8Array.from(t.raw).buffer);
  if (t.external) {
    const loc = t.external.location;
    if (!loc) throw new Error(`${t.name}: external data without location`);
    const offset = Number(t.external.offset ?? 0);
    const file = await readFile(join(dirname(modelPath), loc));
    const length = t.external.length !== undefined ? Number(t.external.length) : file.byteLength - offset;
    return new Float32Array(Uint8Array.from(file.subarray(offset, offset + length)).buffer);
  }
  return new Float32Array(0);
}

/**
 * A model's top-level fields and its graph's, for a rewrite that copies byte for byte what it leaves
 * alone. A graph whose default-domain opset is below `minOpset` is refused, naming what it lacks (`needs`).
 */
export function graphForRewrite(model: Uint8Array, label: string, minOpset: number, needs: string): { top: Field[]; graph: Field[] } {
  const top = decodeFields(model);
  const graphField = top.find((f) => f.field === 7);
  if (graphField === undefined) throw ModelFileError.invalidFile(label, "not an ONNX model: no graph");
  const text = (b: unknown): string => new TextDecoder().decode(b as Uint8Array);
  for (const f of top) {
    if (f.field !== 8) continue;
    const opset = decodeFields(f.value as Uint8Array);
    const domain = opset.find((o) => o.field === 1);
    const version = Number(opset.find((o) => o.field === 2)?.value ?? 0);
    if ((domain === undefined || text(domain.value) === "" || text(domain.value) === "ai.onnx") && version < minOpset) {
      throw ModelFileError.invalidFile(label, `opset ${version} predates ${needs} (opset ${minOpset}); re-export the model`);
    }
  }
  return { top, graph: decodeFields(graphField.value as Uint8Array) };
}
