import { test } from "node:test";
import assert from "node:assert/strict";
import { interpolate, latentUpscaleMode, LATENT_UPSCALE_MODES, type InterpolationMode, type Nchw } from "./interpolate.js";

// Vectors below are derived by hand from torch's definitions (align_corners=False):
// scale = in/out, src(i) = scale·(i+0.5) − 0.5 (clamped at 0 except for cubic), Keys cubic
// with A = −0.75 (plain) / −0.5 (antialias), AA window = support·max(scale,1), weights normalised.

function run1d(x: number[], outW: number, mode: InterpolationMode, antialias = false): number[] {
  const shape: Nchw = [1, 1, 1, x.length];
  return Array.from(interpolate(Float32Array.from(x), shape, { mode, size: [1, outW], antialias }).data);
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, label: string): void {
  assert.equal(actual.length, expected.length, `${label}: length`);
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    assert.ok(Math.abs(a - e) <= tol * Math.max(1, Math.abs(e)), `${label}[${i}]: got ${a}, expected ${e}`);
  }
}

test("bilinear: 3→5, 5→3, 2×, 1.5× by hand", () => {
  // 3→5: src = 0.6(i+.5)−.5 = [−.2→0, .4, 1, 1.6, 2.2→last] on [1,2,4]
  assertClose(run1d([1, 2, 4], 5, "bilinear"), [1, 1.4, 2, 3.2, 4], 1e-6, "3→5");
  // 5→3: src = [1/3, 2, 11/3] on a ramp 3i
  assertClose(run1d([0, 3, 6, 9, 12], 3, "bilinear"), [1, 6, 11], 1e-6, "5→3");
  // 2×: src = [−.25→0, .25, .75, 1.25→last]
  assertClose(run1d([0, 8], 4, "bilinear"), [0, 2, 6, 8], 0, "2x");
  // 1.5×: src = [−1/6→0, .5, 7/6→last]
  assertClose(run1d([10, 20], 3, "bilinear"), [10, 15, 20], 1e-6, "1.5x");
});

test("bicubic (A = −0.75): 2× exact dyadic weights by hand", () => {
  // src = [−.25, .25, .75, 1.25]; t = .75/.25; Keys weights at (1.75, .75, .25, 1.25) =
  // (−0.03515625, 0.26171875, 0.87890625, −0.10546875); taps clamp at the borders.
  const out = run1d([0, 1], 4, "bicubic");
  assert.deepEqual(out, [-0.10546875, 0.2265625, 0.7734375, 1.10546875]);
  const out2 = run1d([2, 6], 4, "bicubic");
  assert.deepEqual(out2, [
    2 * 1.10546875 - 6 * 0.10546875,
    2 * 0.7734375 + 6 * 0.2265625,
    2 * 0.2265625 + 6 * 0.7734375,
    -2 * 0.10546875 + 6 * 1.10546875,
  ]);
});

test("bicubic antialias: 2× upscale uses Keys −0.5 with renormalised borders; 4→2 downscale widens support", () => {
  // up 2→4: centres .25,.75,1.25,1.75, support 2, two taps in range:
  // i=0: w(.25)=111/128, w(1.25)=−9/128 → (111,−9)/102 = (37,−3)/34; i=1: w(.25), w(.75)=29/128 → (111,29)/140
  assertClose(run1d([0, 1], 4, "bicubic", true), [-3 / 34, 29 / 140, 111 / 140, 37 / 34], 1e-6, "aa up");
  // down 4→2: scale 2, support 4, invscale .5; i=0 centre 1: args (−.25,.25,.75,1.25) → (111,111,29,−9)/242
  const x = [0, 1, 2, 3];
  const o0 = (111 * 0 + 111 * 1 + 29 * 2 - 9 * 3) / 242;
  const o1 = (-9 * 0 + 29 * 1 + 111 * 2 + 111 * 3) / 242;
  assertClose(run1d(x, 2, "bicubic", true), [o0, o1], 1e-6, "aa down");
});

test("bilinear antialias: 5→3 downscale (triangle of width 5/3, normalised)", () => {
  // i=0: centre 5/6, taps 0,1 (tap 2 weight 0): (.8, .6)/1.4; i=1: centre 2.5, taps 1..3 (.4,1,.4)/1.8;
  // i=2: centre 25/6, taps 3,4 (.6,.8)/1.4
  const x = [0, 3, 6, 9, 12];
  assertClose(run1d(x, 3, "bilinear", true), [(0.6 * 3) / 1.4, 10.8 / 1.8, (0.6 * 9 + 0.8 * 12) / 1.4], 1e-6, "aa 5→3");
  // 2→1: one output, centre 1, support 2: taps 0,1 with weights (.75,.75) → mean
  assertClose(run1d([2, 6], 1, "bilinear", true), [4], 1e-6, "aa 2→1");
});

test("antialiased bilinear equals plain bilinear when upscaling", () => {
  const rnd = lcg(7);
  for (const [inW, outW] of [
    [3, 5],
    [4, 8],
    [6, 9],
    [5, 13],
  ] as const) {
    const x = Array.from({ length: inW }, () => rnd() * 2 - 1);
    assertClose(run1d(x, outW, "bilinear", true), run1d(x, outW, "bilinear"), 2e-7, `${inW}→${outW}`);
  }
});

test("nearest (legacy floor(dst·scale)) and nearest-exact", () => {
  const x = [10, 20, 30];
  assert.deepEqual(run1d(x, 5, "nearest"), [10, 10, 20, 20, 30]); // floor(.6i) = 0,0,1,1,2
  assert.deepEqual(run1d(x, 5, "nearest-exact"), [10, 10, 20, 30, 30]); // floor(.6(i+.5)) = 0,0,1,2,2
  const y = [0, 1, 2, 3, 4];
  assert.deepEqual(run1d(y, 3, "nearest"), [0, 1, 3]); // floor(5i/3)
  assert.deepEqual(run1d(y, 3, "nearest-exact"), [0, 2, 4]); // floor(5(i+.5)/3)
  assert.deepEqual(run1d([0, 1], 4, "nearest"), [0, 0, 1, 1]);
  assert.deepEqual(run1d([0, 1], 3, "nearest"), [0, 0, 1]); // floor(2i/3)
  assert.deepEqual(run1d([0, 1], 3, "nearest-exact"), [0, 1, 1]); // floor(2(i+.5)/3); 1.5·(2/3)f rounds up to 1
});

test("2D: bilinear is exact on a bilinear function (generic kernel, out_h+out_w > 128)", () => {
  // f(y,x) = (y+1)(x+1) is reproduced exactly: out = (Y+1)(X+1), Y/X the clamped source coordinates.
  const inH = 3;
  const inW = 70;
  const outH = 5;
  const outW = 131;
  const x = new Float32Array(inH * inW);
  for (let y = 0; y < inH; y++) for (let i = 0; i < inW; i++) x[y * inW + i] = (y + 1) * (i + 1);
  const out = interpolate(x, [1, 1, inH, inW], { mode: "bilinear", size: [outH, outW] }).data;
  const src = (i: number, inS: number, outS: number) => Math.min(Math.max(((i + 0.5) * inS) / outS - 0.5, 0), inS - 1);
  const expected: number[] = [];
  for (let y = 0; y < outH; y++) for (let i = 0; i < outW; i++) expected.push((src(y, inH, outH) + 1) * (src(i, inW, outW) + 1));
  assertClose(out, expected, 2e-6, "bilinear 2D");
});

test("2D: separable product inputs for every mode, batch and channels kept apart", () => {
  const rnd = lcg(11);
  const r = Array.from({ length: 5 }, () => rnd());
  const c = Array.from({ length: 7 }, () => rnd());
  const shape: Nchw = [2, 3, 5, 7];
  const plane = (k: number) => r.flatMap((ry) => c.map((cx) => ry * cx * (k + 1)));
  const input = Float32Array.from([0, 1, 2, 3, 4, 5].flatMap((k) => plane(k)));
  for (const [mode, aa] of [
    ["bilinear", false],
    ["bilinear", true],
    ["bicubic", false],
    ["bicubic", true],
    ["nearest", false],
    ["nearest-exact", false],
  ] as const) {
    for (const [oh, ow] of [
      [9, 4],
      [3, 13],
      [10, 14],
    ] as const) {
      const got = interpolate(input, shape, { mode, size: [oh, ow], antialias: aa });
      assert.deepEqual(got.shape, [2, 3, oh, ow]);
      const rr = run1d(r, oh, mode, aa);
      const cc = run1d(c, ow, mode, aa);
      for (let k = 0; k < 6; k++) {
        const exp = rr.flatMap((ry) => cc.map((cx) => ry * cx * (k + 1)));
        assertClose(got.data.subarray(k * oh * ow, (k + 1) * oh * ow), exp, 5e-6, `${mode}${aa ? " aa" : ""} ${oh}x${ow} plane ${k}`);
      }
    }
  }
});

test("A1111 hires latent sizes match an independent float64 reference (64→128, 64→96, 64→40)", () => {
  const rnd = lcg(3);
  const inH = 64;
  const inW = 64;
  const input = Float32Array.from({ length: 4 * inH * inW }, () => rnd() * 4 - 2);
  for (const [mode, aa] of [
    ["bilinear", false],
    ["bicubic", false],
    ["bilinear", true],
    ["bicubic", true],
  ] as const) {
    for (const out of [128, 96, 40]) {
      const got = interpolate(input, [1, 4, inH, inW], { mode, size: [out, out], antialias: aa }).data;
      const ref = referenceResize(input, 4, inH, inW, out, out, mode, aa);
      let worst = 0;
      for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(got[i]! - ref[i]!));
      assert.ok(worst < 2e-5, `${mode}${aa ? " aa" : ""} 64→${out}: max diff ${worst}`);
    }
  }
});

test("scaleFactor uses 1/s for positions and floor(in·s) for the size", () => {
  // 3 × 1.5 → 4 outputs; positions with scale 1/1.5 (not 3/4): src = (2/3)(i+.5) − .5 = −1/6, .5, 7/6, 11/6
  const got = interpolate(Float32Array.from([0, 3, 6]), [1, 1, 1, 3], { mode: "bilinear", scaleFactor: [1, 1.5] });
  assert.deepEqual(got.shape, [1, 1, 1, 4]);
  assertClose(got.data, [0, 1.5, 3.5, 5.5], 1e-6, "scaleFactor");
});

test("A1111 latent upscale mode names", () => {
  assert.deepEqual(latentUpscaleMode("Latent"), { mode: "bilinear", antialias: false });
  assert.deepEqual(latentUpscaleMode("Latent (antialiased)"), { mode: "bilinear", antialias: true });
  assert.deepEqual(latentUpscaleMode("Latent (bicubic)"), { mode: "bicubic", antialias: false });
  assert.deepEqual(latentUpscaleMode("Latent (bicubic antialiased)"), { mode: "bicubic", antialias: true });
  assert.deepEqual(latentUpscaleMode("Latent (nearest)"), { mode: "nearest", antialias: false });
  assert.deepEqual(latentUpscaleMode("Latent (nearest-exact)"), { mode: "nearest-exact", antialias: false });
  assert.deepEqual(latentUpscaleMode(null), { mode: "bilinear", antialias: false }, "None means Latent");
  assert.equal(latentUpscaleMode("R-ESRGAN 4x+"), undefined);
  assert.equal(latentUpscaleMode("toString"), undefined);
  assert.equal(Object.keys(LATENT_UPSCALE_MODES).length, 6);
});

test("bad arguments are rejected", () => {
  const x = new Float32Array(4);
  assert.throws(() => interpolate(x, [1, 1, 2, 3], { mode: "bilinear", size: [4, 4] }), RangeError);
  assert.throws(() => interpolate(x, [1, 1, 2, 2], { mode: "nearest", size: [4, 4], antialias: true }), RangeError);
  assert.throws(() => interpolate(x, [1, 1, 2, 2], { mode: "bilinear" }), RangeError);
  assert.throws(() => interpolate(x, [1, 1, 2, 2], { mode: "bilinear", size: [0, 4] }), RangeError);
});

// ---- independent float64 reference, written from the textbook definitions ----

function keys(x: number, a: number): number {
  const t = Math.abs(x);
  if (t <= 1) return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1;
  if (t < 2) return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a;
  return 0;
}

/** Returns, per output index, the list of (input index, weight). */
function referenceTaps(inS: number, outS: number, mode: "bilinear" | "bicubic", aa: boolean): Array<Array<[number, number]>> {
  const scale = inS / outS;
  const taps: Array<Array<[number, number]>> = [];
  for (let i = 0; i < outS; i++) {
    const row: Array<[number, number]> = [];
    if (aa) {
      const widen = Math.max(scale, 1);
      const radius = (mode === "bilinear" ? 1 : 2) * widen;
      const centre = (i + 0.5) * scale; // in "pixel edge" coordinates
      let total = 0;
      for (let p = Math.max(0, Math.floor(centre - radius - 1)); p < Math.min(inS, Math.ceil(centre + radius + 1)); p++) {
        const d = (p + 0.5 - centre) / widen;
        const w = mode === "bilinear" ? Math.max(0, 1 - Math.abs(d)) : keys(d, -0.5);
        if (Math.abs(p + 0.5 - centre) < radius + 0.5 && w !== 0) {
          row.push([p, w]);
          total += w;
        }
      }
      taps.push(row.map(([p, w]) => [p, w / total]));
    } else if (mode === "bilinear") {
      const s = Math.max((i + 0.5) * scale - 0.5, 0);
      const p0 = Math.min(Math.floor(s), inS - 1);
      const p1 = Math.min(p0 + 1, inS - 1);
      const l = Math.min(s - p0, 1);
      taps.push([
        [p0, 1 - l],
        [p1, l],
      ]);
    } else {
      const s = (i + 0.5) * scale - 0.5;
      const p = Math.floor(s);
      const t = s - p;
      for (let j = -1; j <= 2; j++) row.push([Math.min(Math.max(p + j, 0), inS - 1), keys(t - j, -0.75)]);
      taps.push(row);
    }
  }
  return taps;
}

function referenceResize(
  input: Float32Array,
  planes: number,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  mode: "bilinear" | "bicubic",
  aa: boolean,
): Float64Array {
  const th = referenceTaps(inH, outH, mode, aa);
  const tw = referenceTaps(inW, outW, mode, aa);
  const out = new Float64Array(planes * outH * outW);
  for (let p = 0; p < planes; p++) {
    for (let y = 0; y < outH; y++) {
      for (let x = 0; x < outW; x++) {
        let acc = 0;
        for (const [py, wy] of th[y]!) for (const [px, wx] of tw[x]!) acc += wy * wx * input[p * inH * inW + py * inW + px]!;
        out[p * outH * outW + y * outW + x] = acc;
      }
    }
  }
  return out;
}

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}
