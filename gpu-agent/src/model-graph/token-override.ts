// Gives a CLIP text encoder ONNX graph two more inputs, so that chosen token positions take vectors
// from the caller instead of the token-embedding table: textual-inversion embeddings, which A1111
// writes over the embedding layer's output (EmbeddingsWithFixes) before the position embeddings are
// added. The token-embedding Gather's output goes through a ScatterND:
//   token_override_positions  int64 [P, 2]   (batch row, token position)
//   token_override_vectors    [P, hidden]    in the table's element type
// P = 0 leaves every position as the table has it. The rest of the model is copied byte for byte:
// this works on exported graphs (the diffusers ONNX layout) as well as on the farm's own builds.

import { ModelFileError } from "./errors.js";
import { DataType, encodeNode, encodeValueInfo, type ElemType } from "./onnx.js";
import { decodeNode, decodeTensor, decodeValueInfo, graphForRewrite, type DecodedNode } from "./onnx-read.js";
import { copyField, decodeFields, ProtoMessage } from "./protobuf.js";

export const TOKEN_OVERRIDE_POSITIONS = "token_override_positions";
export const TOKEN_OVERRIDE_VECTORS = "token_override_vectors";

/** ScatterND's first opset. */
const MIN_OPSET = 11;

const ELEM_BY_CODE = new Map<number, ElemType>(Object.entries(DataType).map(([k, v]) => [v, k as ElemType]));

export interface PatchedModel {
  readonly model: Uint8Array;
  /**
   * The model keeps weights in external data files, named relative to its own folder: it must be saved
   * in that folder to load (ONNX Runtime finds no external data for a model given as bytes).
   */
  readonly externalData: boolean;
}

/**
 * The model with token overrides (see the file comment). Throws ModelFileError when the graph has no
 * token-embedding lookup from its input ids, or already has the inputs.
 */
export function withTokenOverrides(model: Uint8Array, label: string): PatchedModel {
  const { top, graph } = graphForRewrite(model, label, MIN_OPSET, "ScatterND");
  const inputs = graph.filter((f) => f.field === 11).map((f) => decodeValueInfo(f.value as Uint8Array));
  if (inputs.some((i) => i.name === TOKEN_OVERRIDE_POSITIONS || i.name === TOKEN_OVERRIDE_VECTORS)) {
    throw ModelFileError.invalidFile(label, "the text encoder already takes token overrides");
  }
  const ids = inputs.find((i) => i.name === "input_ids") ?? inputs.find((i) => i.elemType === "int32" || i.elemType === "int64");
  if (ids === undefined) throw ModelFileError.invalidFile(label, "the text encoder has no token-id input");

  const tables = new Map<string, { elemType: ElemType | number; dims: number[] }>();
  let externalData = false;
  for (const f of graph) {
    if (f.field !== 5) continue;
    const t = decodeTensor(f.value as Uint8Array);
    if (t.external !== undefined) externalData = true;
    if (t.dims.length === 2) tables.set(t.name, { elemType: t.elemType, dims: t.dims });
  }

  // The ids reach the lookup directly or through dtype casts (torch exports cast int32 ids to int64).
  const fromIds = new Set([ids.name]);
  let target: { index: number; node: DecodedNode; elemType: ElemType; hidden: number } | undefined;
  graph.forEach((f, index) => {
    if (target !== undefined || f.field !== 1) return;
    const node = decodeNode(f.value as Uint8Array);
    if ((node.opType === "Cast" || node.opType === "Identity") && fromIds.has(node.inputs[0] ?? "")) {
      node.outputs.forEach((o) => fromIds.add(o));
      return;
    }
    // The farm's builds of fp16 checkpoints keep the table in fp16 and Cast it to the compute type.
    const castFrom = node.opType === "Cast" ? tables.get(node.inputs[0] ?? "") : undefined;
    if (castFrom !== undefined && node.outputs[0] !== undefined) {
      const to = Number(node.attrs["to"]);
      tables.set(node.outputs[0], { elemType: ELEM_BY_CODE.get(to) ?? to, dims: castFrom.dims });
      return;
    }
    const table = tables.get(node.inputs[0] ?? "");
    const axis = node.attrs["axis"] ?? 0;
    if (node.opType !== "Gather" || table === undefined || axis !== 0 || !fromIds.has(node.inputs[1] ?? "")) return;
    if (table.elemType !== "float32" && table.elemType !== "float16") {
      throw ModelFileError.invalidFile(label, `the token-embedding table is ${String(table.elemType)}, not float32 or float16`);
    }
    target = { index, node, elemType: table.elemType, hidden: table.dims[1]! };
  });
  if (target === undefined) {
    throw ModelFileError.invalidFile(label, `no token-embedding lookup (a Gather from a [vocab, hidden] table) reads ${ids.name}`);
  }

  const { node, elemType, hidden } = target;
  const looked = node.outputs[0]!;
  const beforeOverrides = `${looked}/before_token_overrides`;
  const out = new ProtoMessage();
  graph.forEach((f, index) => {
    if (index !== target!.index) {
      copyField(out, f);
      return;
    }
    const gather = new ProtoMessage();
    for (const nf of decodeFields(f.value as Uint8Array)) {
      if (nf.field === 2) continue;
      copyField(gather, nf);
    }
    gather.string(2, beforeOverrides);
    out.message(1, gather);
    out.message(
      1,
      encodeNode({
        opType: "ScatterND",
        name: `${node.name || looked}/token_overrides`,
        domain: "",
        inputs: [beforeOverrides, TOKEN_OVERRIDE_POSITIONS, TOKEN_OVERRIDE_VECTORS],
        outputs: [looked],
        attrs: {},
      }),
    );
  });
  out.message(11, encodeValueInfo({ name: TOKEN_OVERRIDE_POSITIONS, elemType: "int64", dims: ["overrides", 2] }));
  out.message(11, encodeValueInfo({ name: TOKEN_OVERRIDE_VECTORS, elemType, dims: ["overrides", hidden] }));

  const model2 = new ProtoMessage();
  for (const f of top) {
    if (f.field === 7) model2.message(7, out);
    else copyField(model2, f);
  }
  return { model: model2.toBytes(), externalData };
}
