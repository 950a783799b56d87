// AutoencoderKL of SD (LDM `first_stage_model.*` layout): the decoder (latent → image) and the encoder
// (image → posterior mean, the "mode" that diffusers' ONNX export returns as latent_sample).

import { ModelFileError } from "./errors.js";
import type { Net } from "./nn.js";
import type { WeightSource } from "./weights.js";

export const VAE_PREFIX = "first_stage_model.";

export interface VaeConfig {
  readonly prefix: string;
  readonly latentChannels: number;
  readonly imageChannels: number;
  /** Channels of each level, from the highest resolution down. */
  readonly levelChannels: readonly number[];
  readonly layersPerBlock: number;
  readonly normGroups: number;
  readonly hasEncoder: boolean;
}

export function detectVaeConfig(w: WeightSource, prefix = VAE_PREFIX): VaeConfig {
  const need = (k: string): readonly number[] => {
    const s = w.shape(prefix + k);
    if (!s) throw ModelFileError.invalidFile(w.label, `no VAE found: missing ${prefix + k}`);
    return s;
  };
  const latentChannels = need("decoder.conv_in.weight")[1]!;
  const imageChannels = need("decoder.conv_out.weight")[0]!;
  const levelChannels: number[] = [];
  for (let i = 0; w.has(`${prefix}decoder.up.${i}.block.0.conv1.weight`); i++) {
    levelChannels.push(need(`decoder.up.${i}.block.0.conv1.weight`)[0]!);
  }
  let blocks = 0;
  while (w.has(`${prefix}decoder.up.0.block.${blocks}.conv1.weight`)) blocks++;
  if (levelChannels.length === 0 || blocks < 2) throw ModelFileError.invalidFile(w.label, "VAE decoder has no up blocks");
  return {
    prefix,
    latentChannels,
    imageChannels,
    levelChannels,
    layersPerBlock: blocks - 1,
    normGroups: 32,
    hasEncoder: w.has(`${prefix}encoder.conv_in.weight`),
  };
}

const EPS = 1e-6;

function resBlock(net: Net, cfg: VaeConfig, x: string, p: string): string {
  let h = net.conv(net.silu(net.groupNorm(x, `${p}.norm1`, cfg.normGroups, EPS)), `${p}.conv1`);
  h = net.conv(net.silu(net.groupNorm(h, `${p}.norm2`, cfg.normGroups, EPS)), `${p}.conv2`);
  const skip = net.has(`${p}.nin_shortcut.weight`) ? net.conv(x, `${p}.nin_shortcut`) : x;
  return net.add(skip, h);
}

/** Single-head self-attention over all pixels, with the 1x1-conv projections kept as convs. */
function attnBlock(net: Net, cfg: VaeConfig, x: string, p: string): string {
  const g = net.g;
  const c = net.shapeOf(`${p}.norm.weight`)[0]!;
  const n = net.groupNorm(x, `${p}.norm`, cfg.normGroups, EPS);
  const flat = (v: string): string => g.op1("Reshape", [v, g.ints([0, 0, -1])]);
  const q = flat(net.conv(n, `${p}.q`));
  const k = flat(net.conv(n, `${p}.k`));
  const v = flat(net.conv(n, `${p}.v`));
  const scores = net.mul(g.op1("MatMul", [g.op1("Transpose", [q], { perm: [0, 2, 1] }), k]), net.scalar(1 / Math.sqrt(c)));
  const probs = g.op1("Softmax", [scores], { axis: -1 });
  const out = g.op1("MatMul", [v, g.op1("Transpose", [probs], { perm: [0, 2, 1] })]);
  const h = net.conv(g.op1("Reshape", [out, g.op1("Shape", [x])]), `${p}.proj_out`);
  return net.add(x, h);
}

function mid(net: Net, cfg: VaeConfig, x: string, p: string): string {
  return net.g.withScope("mid", () => {
    let h = resBlock(net, cfg, x, `${p}.mid.block_1`);
    h = attnBlock(net, cfg, h, `${p}.mid.attn_1`);
    return resBlock(net, cfg, h, `${p}.mid.block_2`);
  });
}

/** latent_sample [B, 4, h, w] → sample [B, 3, 8h, 8w]; the caller divides by the scaling factor first. */
export function buildVaeDecoder(net: Net, cfg: VaeConfig): void {
  const g = net.g;
  const p = `${cfg.prefix}decoder`;
  const z = net.input("latent_sample", ["batch", cfg.latentChannels, "height", "width"]);
  let h = net.conv(z, `${cfg.prefix}post_quant_conv`);
  h = net.conv(h, `${p}.conv_in`);
  h = mid(net, cfg, h, p);
  for (let i = cfg.levelChannels.length - 1; i >= 0; i--) {
    h = g.withScope(`up.${i}`, () => {
      let x = h;
      for (let j = 0; j <= cfg.layersPerBlock; j++) x = resBlock(net, cfg, x, `${p}.up.${i}.block.${j}`);
      if (i > 0) {
        x = g.op1("Resize", [x, "", net.g.constant("float32", [4], [1, 1, 2, 2])], {
          mode: "nearest",
          coordinate_transformation_mode: "asymmetric",
          nearest_mode: "floor",
        });
        x = net.conv(x, `${p}.up.${i}.upsample.conv`);
      }
      return x;
    });
  }
  h = net.conv(net.silu(net.groupNorm(h, `${p}.norm_out`, cfg.normGroups, EPS)), `${p}.conv_out`);
  net.output(h, "sample", ["batch", cfg.imageChannels, "image_height", "image_width"]);
}

/** sample [B, 3, H, W] → latent_sample: the posterior mean (unscaled). */
export function buildVaeEncoder(net: Net, cfg: VaeConfig): void {
  const g = net.g;
  const p = `${cfg.prefix}encoder`;
  const x = net.input("sample", ["batch", cfg.imageChannels, "image_height", "image_width"]);
  let h = net.conv(x, `${p}.conv_in`);
  const levels = cfg.levelChannels.length;
  for (let i = 0; i < levels; i++) {
    h = g.withScope(`down.${i}`, () => {
      let y = h;
      for (let j = 0; j < cfg.layersPerBlock; j++) y = resBlock(net, cfg, y, `${p}.down.${i}.block.${j}`);
      // LDM pads right and bottom by one, then convolves with stride 2 and no padding.
      if (i < levels - 1) y = net.conv(y, `${p}.down.${i}.downsample.conv`, { stride: 2, pads: [0, 0, 1, 1] });
      return y;
    });
  }
  h = mid(net, cfg, h, p);
  h = net.conv(net.silu(net.groupNorm(h, `${p}.norm_out`, cfg.normGroups, EPS)), `${p}.conv_out`);
  const moments = net.conv(h, `${cfg.prefix}quant_conv`);
  const mean = g.op1("Slice", [moments, g.ints([0]), g.ints([cfg.latentChannels]), g.ints([1])]);
  net.output(mean, "latent_sample", ["batch", cfg.latentChannels, "height", "width"]);
}
