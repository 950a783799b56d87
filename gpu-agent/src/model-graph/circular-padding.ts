// A1111's "Tiling" (seamless images): every Conv2d of the UNet and the VAE pads circularly instead of
// with zeros (sd_hijack's apply_circular sets padding_mode "circular"), so the picture wraps around at
// its edges. torch pads circularly before a convolution with no padding of its own; here each 2-D Conv
// with non-zero pads gets the same: the rows and columns it would pad with zeros are slices from the
// opposite edge, joined on with Concat, and the Conv's pads become 0. Slice and Concat exist in every
// opset since 10, so the rewrite works on exported graphs (any opset) and on the farm's own builds; the
// rest of the model is copied byte for byte.

import { ModelFileError } from "./errors.js";
import { encodeNode, type NodeSpec } from "./onnx.js";
import { decodeNode, decodeTensor, graphForRewrite } from "./onnx-read.js";
import { copyField, decodeFields, ProtoMessage } from "./protobuf.js";
import type { PatchedModel } from "./token-override.js";

/** Slice with starts/ends/axes as inputs. */
const MIN_OPSET = 10;

const text = (b: unknown): string => new TextDecoder().decode(b as Uint8Array);

function int64Constant(name: string, value: bigint): NodeSpec {
  const data = new Uint8Array(8);
  new DataView(data.buffer).setBigInt64(0, value, true);
  return {
    opType: "Constant",
    name,
    domain: "",
    inputs: [],
    outputs: [name],
    attrs: { value: { t: { name, elemType: "int64", dims: [1], data } } },
  };
}

const INT64_MAX = (1n << 63n) - 1n;

/**
 * The model with circular padding in every 2-D Conv that pads (see the file comment); `converted` says how
 * many. Throws ModelFileError for a graph older than opset 10 or a Conv with auto_pad.
 */
export function withCircularPadding(
  model: Uint8Array,
  label: string,
): PatchedModel & { converted: number; /** The external data files the graph names, relative to its folder. */ externalFiles: string[] } {
  const { top, graph } = graphForRewrite(model, label, MIN_OPSET, "Slice with inputs");
  const externalFiles = new Set<string>();
  for (const f of graph) {
    if (f.field !== 5) continue;
    const location = decodeTensor(f.value as Uint8Array).external?.["location"];
    if (location !== undefined) externalFiles.add(location);
  }
  const externalData = externalFiles.size > 0;

  // Shared constants, made once each before the first node: axes, and the bounds each pad width needs.
  const constants = new Map<string, NodeSpec>();
  const constant = (key: string, value: bigint): string => {
    const name = `circular_padding/${key}`;
    if (!constants.has(name)) constants.set(name, int64Constant(name, value));
    return name;
  };
  let converted = 0;
  const nodes = new Map<number, ProtoMessage[]>();
  graph.forEach((f, index) => {
    if (f.field !== 1) return;
    const node = decodeNode(f.value as Uint8Array);
    if (node.opType !== "Conv" || (node.domain !== "" && node.domain !== "ai.onnx")) return;
    const autoPad = node.attrs["auto_pad"];
    if (autoPad !== undefined && autoPad !== "NOTSET") {
      throw ModelFileError.invalidFile(label, `Conv ${node.name}: auto_pad ${String(autoPad)} cannot be made circular`);
    }
    const pads = node.attrs["pads"];
    if (!Array.isArray(pads) || pads.length !== 4 || pads.every((p) => p === 0)) return;
    const [top, left, bottom, right] = pads as number[];
    const base = `${node.name || node.outputs[0]}/circular`;
    const out: ProtoMessage[] = [];
    let x = node.inputs[0]!;
    // Rows first (axis 2), then columns (axis 3) of the row-padded tensor: the corners wrap both ways, as torch's do.
    for (const [axis, before, after] of [
      [2, top!, bottom!],
      [3, left!, right!],
    ] as const) {
      if (before === 0 && after === 0) continue;
      const axes = constant(`axis${axis}`, BigInt(axis));
      const parts: string[] = [];
      if (before > 0) {
        // The last `before` rows (columns) go in front.
        const tail = `${base}/axis${axis}/tail`;
        out.push(
          encodeNode({
            opType: "Slice",
            name: tail,
            domain: "",
            inputs: [x, constant(`-${before}`, BigInt(-before)), constant("max", INT64_MAX), axes],
            outputs: [tail],
            attrs: {},
          }),
        );
        parts.push(tail);
      }
      parts.push(x);
      if (after > 0) {
        const head = `${base}/axis${axis}/head`;
        out.push(
          encodeNode({
            opType: "Slice",
            name: head,
            domain: "",
            inputs: [x, constant("0", 0n), constant(`${after}`, BigInt(after)), axes],
            outputs: [head],
            attrs: {},
          }),
        );
        parts.push(head);
      }
      const joined = `${base}/axis${axis}/padded`;
      out.push(encodeNode({ opType: "Concat", name: joined, domain: "", inputs: parts, outputs: [joined], attrs: { axis } }));
      x = joined;
    }
    // The Conv itself, its input the padded tensor and its pads 0; every other field as it was.
    const conv = new ProtoMessage();
    let inputIndex = 0;
    for (const nf of decodeFields(f.value as Uint8Array)) {
      if (nf.field === 1) {
        conv.string(1, inputIndex++ === 0 ? x : text(nf.value));
        continue;
      }
      if (nf.field === 5 && text(decodeFields(nf.value as Uint8Array).find((a) => a.field === 1)?.value) === "pads") continue;
      copyField(conv, nf);
    }
    const zeroPads = new ProtoMessage().string(1, "pads");
    for (let i = 0; i < 4; i++) zeroPads.int(8, 0);
    conv.message(5, zeroPads.varint(20, 7));
    out.push(conv);
    nodes.set(index, out);
    converted++;
  });

  let constantsWritten = false;
  const writeConstants = (m: ProtoMessage): void => {
    if (constantsWritten) return;
    for (const c of constants.values()) m.message(1, encodeNode(c));
    constantsWritten = true;
  };
  const g = new ProtoMessage();
  graph.forEach((f, index) => {
    if (f.field === 1) writeConstants(g);
    const replacement = nodes.get(index);
    if (replacement === undefined) copyField(g, f);
    else for (const m of replacement) g.message(1, m);
  });
  writeConstants(g);

  const out = new ProtoMessage();
  for (const f of top) {
    if (f.field === 7) out.message(7, g);
    else copyField(out, f);
  }
  return { model: out.toBytes(), externalData, converted, externalFiles: [...externalFiles] };
}
