// Layer helpers shared by the architecture builders. Weights enter the graph under their checkpoint key
// and in their checkpoint layout (Linear [out, in], Conv [out, in, kh, kw]); the graph adapts to the
// weights (Gemm transB, Reshape of 1x1 kernels), never the reverse, so a LoRA delta computed in the
// checkpoint's layout applies to the initializer as-is.

import { ModelFileError } from "./errors.js";
import { f } from "./onnx.js";
import { f32ToF16Bits } from "./half.js";
import type { ElemType, GraphBuilder } from "./onnx.js";
import type { WeightSource, WeightType } from "./weights.js";

export class Net {
  /** Keys of the checkpoint that ended up in the graph. */
  readonly used = new Set<string>();

  constructor(
    readonly g: GraphBuilder,
    readonly weights: WeightSource,
    /** Storage and compute type of the graph's float tensors. */
    readonly floatType: WeightType = "float32",
    /** Emit com.microsoft MultiHeadAttention for unmasked attention (CPU and CUDA EPs implement it). */
    readonly fusedAttention = false,
    /**
     * Keep weights in the type the checkpoint stores them in and Cast in the graph (ONNX Runtime folds the
     * Cast when it loads the model). Lets the model reference the checkpoint's bytes instead of copying them.
     */
    readonly castStoredWeights = false,
  ) {}

  get elem(): ElemType {
    return this.floatType;
  }

  has(key: string): boolean {
    return this.weights.has(key);
  }

  shapeOf(key: string): readonly number[] {
    const s = this.weights.shape(key);
    if (!s) throw ModelFileError.invalidFile(this.weights.label, `checkpoint lacks tensor ${key}`);
    return s;
  }

  private readonly casts = new Map<string, string>();

  /** The checkpoint tensor `key` as an initializer of the same name and shape (Cast to the compute type if stored otherwise). */
  param(key: string): string {
    const cast = this.casts.get(key);
    if (cast) return cast;
    if (this.g.hasInitializer(key)) return key;
    const shape = this.shapeOf(key);
    this.used.add(key);
    const stored = this.castStoredWeights ? this.weights.storedType(key) : undefined;
    // Only widening casts: an fp16 build from an fp32 checkpoint converts once, at build time.
    if (stored === "float16" && this.floatType === "float32") {
      this.g.initializer(key, stored, shape, this.weights.lazy(key, stored));
      const v = this.g.op1("Cast", [key], { to: 1 });
      this.casts.set(key, v);
      return v;
    }
    return this.g.initializer(key, this.floatType, shape, this.weights.lazy(key, this.floatType));
  }

  /**
   * A float32 graph input converted to the compute type. Graph I/O stays float32 in fp16 builds (as with
   * ORT's keep_io_types), so callers never handle halves.
   */
  input(name: string, dims: readonly (number | string)[]): string {
    const x = this.g.input(name, "float32", dims);
    return this.floatType === "float32" ? x : this.op1("Cast", [x], { to: 10 });
  }

  /** Marks `value` as a float32 graph output called `name`. */
  output(value: string, name: string, dims: readonly (number | string)[]): void {
    this.g.output(this.floatType === "float32" ? value : this.op1("Cast", [value], { to: 1 }), name, "float32", dims);
  }

  /** Casts a float32 value to the compute type (no-op in fp32 builds). */
  fromFloat32(x: string): string {
    return this.floatType === "float32" ? x : this.op1("Cast", [x], { to: 10 });
  }

  /** A float scalar in the graph's float type. */
  scalar(v: number): string {
    if (this.floatType === "float32") return this.g.scalar(v);
    return this.g.constant("float16", [], [f32ToF16Bits(v)], "scalar");
  }

  floats(dims: readonly number[], values: ArrayLike<number>): string {
    if (this.floatType === "float32") return this.g.constant("float32", dims, values);
    return this.g.constant("float16", dims, Array.from(values, f32ToF16Bits));
  }

  op1(op: string, inputs: readonly string[], attrs: Parameters<GraphBuilder["op1"]>[2] = {}): string {
    return this.g.op1(op, inputs, attrs);
  }

  add(a: string, b: string): string {
    return this.op1("Add", [a, b]);
  }

  mul(a: string, b: string): string {
    return this.op1("Mul", [a, b]);
  }

  silu(x: string): string {
    return this.mul(x, this.op1("Sigmoid", [x]));
  }

  /** Exact (erf) GELU, as torch's default. */
  gelu(x: string): string {
    const e = this.op1("Erf", [this.op1("Div", [x, this.scalar(Math.SQRT2)])]);
    return this.mul(this.mul(x, this.add(e, this.scalar(1))), this.scalar(0.5));
  }

  /** CLIP's x·sigmoid(1.702x). */
  quickGelu(x: string): string {
    return this.mul(x, this.op1("Sigmoid", [this.mul(x, this.scalar(1.702))]));
  }

  /** Linear on a 2-D input [N, in] → [N, out]. Bias is used when the checkpoint has one. */
  gemm(x: string, prefix: string): string {
    return this.gemmKeys(x, `${prefix}.weight`, `${prefix}.bias`);
  }

  /** Linear with explicit weight and bias keys (OpenCLIP's `in_proj_weight`/`in_proj_bias`). */
  gemmKeys(x: string, weightKey: string, biasKey: string): string {
    const shape = this.shapeOf(weightKey);
    if (shape.length !== 2)
      throw ModelFileError.invalidFile(this.weights.label, `${weightKey} should be a matrix, is ${JSON.stringify(shape)}`);
    const inputs = [x, this.param(weightKey)];
    if (this.has(biasKey)) inputs.push(this.param(biasKey));
    return this.op1("Gemm", inputs, { transB: 1 });
  }

  /** Output features of a linear layer. */
  outFeatures(prefix: string): number {
    return this.shapeOf(`${prefix}.weight`)[0]!;
  }

  /**
   * Conv2d with the checkpoint kernel. `pads` is ONNX order [top, left, bottom, right]; default keeps the
   * size for odd kernels. A rank-2 weight (a 1x1 conv stored as Linear) is reshaped in the graph.
   */
  conv(x: string, prefix: string, opts: { stride?: number; pads?: readonly number[] } = {}): string {
    const key = `${prefix}.weight`;
    const shape = this.shapeOf(key);
    let w = this.param(key);
    let k = shape[2] ?? 1;
    if (shape.length === 2) {
      w = this.op1("Reshape", [w, this.g.ints([shape[0]!, shape[1]!, 1, 1])]);
      k = 1;
    } else if (shape.length !== 4) {
      throw ModelFileError.invalidFile(this.weights.label, `${key} should be a conv kernel, is ${JSON.stringify(shape)}`);
    }
    const p = Math.floor(k / 2);
    const inputs = [x, w];
    if (this.has(`${prefix}.bias`)) inputs.push(this.param(`${prefix}.bias`));
    const s = opts.stride ?? 1;
    return this.op1("Conv", inputs, {
      kernel_shape: [shape[2] ?? 1, shape[3] ?? 1],
      pads: opts.pads ?? [p, p, p, p],
      strides: [s, s],
      dilations: [1, 1],
      group: 1,
    });
  }

  /** GroupNorm over NCHW as Reshape → InstanceNormalization → Reshape → affine (what torch exports, and ORT runs well). */
  groupNorm(x: string, prefix: string, groups: number, eps: number): string {
    const c = this.shapeOf(`${prefix}.weight`)[0]!;
    if (c % groups !== 0)
      throw ModelFileError.invalidFile(this.weights.label, `${prefix}: ${c} channels do not split into ${groups} groups`);
    const grouped = this.op1("Reshape", [x, this.g.ints([0, groups, -1])]);
    const ones = this.floats([groups], new Array<number>(groups).fill(1));
    const zeros = this.floats([groups], new Array<number>(groups).fill(0));
    const normed = this.op1("InstanceNormalization", [grouped, ones, zeros], { epsilon: f(eps) });
    const back = this.op1("Reshape", [normed, this.op1("Shape", [x])]);
    const axes = this.g.ints([1, 2]);
    const gamma = this.op1("Unsqueeze", [this.param(`${prefix}.weight`), axes]);
    const beta = this.op1("Unsqueeze", [this.param(`${prefix}.bias`), axes]);
    return this.add(this.mul(back, gamma), beta);
  }

  layerNorm(x: string, prefix: string, eps: number): string {
    return this.op1("LayerNormalization", [x, this.param(`${prefix}.weight`), this.param(`${prefix}.bias`)], {
      axis: -1,
      epsilon: f(eps),
    });
  }

  /**
   * Scaled dot-product attention on 2-D token matrices. q2 is [B·Nq, heads·d], k2/v2 [B·Nk, heads·d];
   * `batch` is a 1-D int64 tensor holding B. Returns [B·Nq, heads·d]. `mask` is added to the scores.
   */
  attention(q2: string, k2: string, v2: string, batch: string, heads: number, headDim: number, mask?: string): string {
    if (this.fusedAttention && !mask) {
      const width = heads * headDim;
      const bnc = this.op1("Concat", [batch, this.g.ints([-1, width])], { axis: 0 });
      const [q, k, v] = [q2, k2, v2].map((t) => this.op1("Reshape", [t, bnc])) as [string, string, string];
      const o = this.g.op1(
        "MultiHeadAttention",
        [q, k, v],
        { num_heads: heads, scale: f(1 / Math.sqrt(headDim)) },
        { domain: "com.microsoft" },
      );
      return this.op1("Reshape", [o, this.g.ints([-1, width])]);
    }
    const split = this.op1("Concat", [batch, this.g.ints([-1, heads, headDim])], { axis: 0 });
    const q = this.op1("Transpose", [this.op1("Reshape", [q2, split])], { perm: [0, 2, 1, 3] });
    const kT = this.op1("Transpose", [this.op1("Reshape", [k2, split])], { perm: [0, 2, 3, 1] });
    const v = this.op1("Transpose", [this.op1("Reshape", [v2, split])], { perm: [0, 2, 1, 3] });
    let scores = this.mul(this.op1("MatMul", [q, kT]), this.scalar(1 / Math.sqrt(headDim)));
    if (mask) scores = this.add(scores, mask);
    const probs = this.op1("Softmax", [scores], { axis: -1 });
    const out = this.op1("Transpose", [this.op1("MatMul", [probs, v])], { perm: [0, 2, 1, 3] });
    return this.op1("Reshape", [out, this.g.ints([-1, heads * headDim])]);
  }
}
