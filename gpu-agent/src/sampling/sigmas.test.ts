import { test } from "node:test";
import assert from "node:assert/strict";
import {
  cIn,
  discreteSigmas,
  epsToDenoised,
  rescaleZeroTerminalSnr,
  scaleModelInput,
  sd1AlphasCumprod,
  sd1Schedule,
  sd1ScheduleWith,
  sigmaToT,
  tToSigma,
  vScalings,
  vToDenoised,
  vToEps,
} from "./sigmas.js";
import { samplerSigmas } from "./schedules.js";
import { roundToF16 } from "../model-graph/half.js";
import { INTERMEDIATE_DIR, assertClose, assertRelClose, fixturesAbsent, readJson } from "./test-support.js";

test("SD1 ᾱ and σ table match spec §4.1", () => {
  const a = sd1AlphasCumprod();
  assert.ok(Math.abs(a[0]! - 0.99915) < 1e-6);
  assert.ok(Math.abs(a[999]! - 0.0046600983) < 1e-9);
  const s = discreteSigmas();
  assert.equal(s.length, 1000);
  assert.equal(s[0], 0.029167532920837402);
  assert.equal(s[999], 14.614642143249512);
  assertRelClose([s[1]!, s[249]!, s[499]!, s[749]!, s[998]!], [0.041314479, 0.69320494, 1.6128862, 4.0817294, 14.526276], 1e-7);
});

test("sigma_to_t is fractional and t_to_sigma inverts it", () => {
  assert.ok(Math.abs(sigmaToT(1.0) - 353.8904) < 1e-3);
  assert.equal(sigmaToT(discreteSigmas()[999]!), 999);
  assert.equal(sigmaToT(discreteSigmas()[0]!), 0);
  // Above σmax the index clamps to 998 and w to 1; below σmin w clamps to 0.
  assert.equal(sigmaToT(100), 999);
  assert.equal(sigmaToT(0.001), 0);
  for (const t of [0, 12.25, 353.8904, 500, 998.5]) assert.ok(Math.abs(sigmaToT(tToSigma(t)) - t) < 2e-3, `t=${t}`);
});

test("Karras 20-step UNet timesteps match spec §4.3", () => {
  const { sigmas } = samplerSigmas({ steps: 20, scheduleType: "karras" });
  const ts = Array.from(sigmas.subarray(0, 19), (s) => sigmaToT(s));
  const expected = [
    999, 961.7328, 921.0421, 876.3138, 826.7906, 771.552, 709.5298, 639.6147, 560.9753, 473.7491, 380.1319, 285.3177, 197.0808, 123.3954,
    69.2571, 34.6975, 15.4816, 5.9918, 1.7829,
  ];
  assertClose(ts, expected, 2e-3, "karras timesteps");
});

interface IndexEntry {
  sigmas: number[];
  timesteps: number[];
}
interface CaseSpec {
  id: string;
  steps: number;
  sampler_name: string;
  scheduler?: string;
}

test("fixture sigma lists and UNet timesteps (index.json)", { skip: fixturesAbsent }, () => {
  const index = readJson<Record<string, IndexEntry>>(`${INTERMEDIATE_DIR}/index.json`);
  const cases = readJson<CaseSpec[]>(`${INTERMEDIATE_DIR}/../cases.json`);
  for (const c of cases) {
    const entry = index[c.id]!;
    const karras = c.scheduler === "Karras";
    const { sigmas } = samplerSigmas({ steps: c.steps, scheduleType: karras ? "karras" : undefined });
    // torch's vectorised CPU exp/log differ from correctly rounded ones by up to 1 ulp here and there.
    assertRelClose(sigmas, entry.sigmas, 2.5e-7, `${c.id} sigmas`);
    const ts = entry.sigmas.slice(0, -1).map((s) => sigmaToT(s));
    assertClose(ts, entry.timesteps, 1e-4, `${c.id} timesteps`);
  }
});

test("eps denoiser: c_in = 1/sqrt(σ²+1), denoised = x − σ·eps", () => {
  assert.equal(cIn(0), 1);
  assert.ok(Math.abs(cIn(14.614643) - 1 / Math.sqrt(14.614643 ** 2 + 1)) < 1e-8);
  const x = Float32Array.from([1, -2, 3]);
  const eps = Float32Array.from([0.5, 0.25, -1]);
  assertClose(scaleModelInput(x, 2), [1 / Math.sqrt(5), -2 / Math.sqrt(5), 3 / Math.sqrt(5)], 1e-6);
  assertClose(epsToDenoised(x, eps, 2), [0, -2.5, 5], 1e-6);
});

test("v denoiser: x0 = c_skip·x + c_out·v recovers the data for a consistent (x, v)", () => {
  // With x = x0 + σ·n and v = (n − σ·x0)/sqrt(σ²+1) (VP v-parameterisation in σ terms), D must give x0.
  const sigma = 1.7;
  const x0 = [0.3, -1.2];
  const n = [1.1, 0.4];
  const x = Float32Array.from(x0.map((v, i) => v + sigma * n[i]!));
  const v = Float32Array.from(x0.map((v, i) => (n[i]! - sigma * v) / Math.sqrt(sigma * sigma + 1)));
  assertClose(vToDenoised(x, v, sigma), x0, 1e-6);
  const { cSkip, cOut, cIn: ci } = vScalings(sigma);
  assert.ok(
    Math.abs(cSkip - 1 / (sigma ** 2 + 1)) < 1e-7 &&
      Math.abs(cOut + sigma / Math.sqrt(sigma ** 2 + 1)) < 1e-7 &&
      Math.abs(ci - cIn(sigma)) < 1e-7,
  );
  // VP form: x_t = sqrt(ᾱ)x0 + sqrt(1−ᾱ)ε, v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 ⇒ ε = sqrt(ᾱ)v + sqrt(1−ᾱ)x_t.
  const a = 0.64;
  const xt = Float32Array.from(x0.map((v, i) => 0.8 * v + 0.6 * n[i]!));
  const vv = Float32Array.from(x0.map((v, i) => 0.8 * n[i]! - 0.6 * v));
  assertClose(vToEps(xt, vv, a), n, 1e-6);
});

test("zero terminal SNR rescale keeps ᾱ₀ and pins the last value", () => {
  const a = sd1AlphasCumprod();
  const r = rescaleZeroTerminalSnr(a);
  assert.ok(Math.abs(r[0]! - a[0]!) < 1e-6);
  assert.equal(r[999], Math.fround(4.8973451890853435e-8));
  for (let i = 1; i < 999; i++) assert.ok(r[i]! < r[i - 1]!);
  assert.equal(sd1Schedule().sigmas.length, 1000);
});

test("downcast ᾱ (A1111 before 1.7.0-225): σ and log σ tables made in float16, as numpy's float16 arithmetic makes them", () => {
  const h = sd1ScheduleWith("Default", "float16");
  // numpy: ac = cumprod(1 − linspace(√0.00085, √0.012, 1000)²) as float32 → float16; σ = sqrt((1 − ac)/ac), log σ, each op in float16.
  const at = [0, 1, 10, 100, 500, 998, 999];
  assert.deepEqual(
    at.map((i) => h.sigmas[i]),
    [0.03125, 0.038299560546875, 0.09930419921875, 0.34423828125, 1.6181640625, 14.5234375, 14.609375],
  );
  assert.deepEqual(
    at.map((i) => h.logSigmas[i]),
    [-3.46484375, -3.26171875, -2.30859375, -1.06640625, 0.481201171875, 2.67578125, 2.681640625],
  );
  assert.deepEqual([h.alphasCumprod[0], h.alphasCumprod[999]], [0.9990234375, 0.00466156005859375]);
  for (const table of [h.alphasCumprod, h.sigmas, h.logSigmas]) assert.ok(table.every((v) => roundToF16(v) === v));
  // The float32 schedule is untouched, and one instance serves each variant.
  assert.equal(sd1ScheduleWith("Default", "float32"), sd1Schedule());
  assert.equal(sd1ScheduleWith("Default", "float16"), h);
  assert.ok(Math.abs(sd1Schedule().sigmaMin - 0.0291675) < 1e-6);
  // σ → t compares log σ (float32) with the float16 log σ table: a table σ lands next to its own timestep,
  // not on it (log 1.6181640625 = 0.48128…, its table entry 0.481201171875).
  assert.ok(Math.abs(h.sigmaToT(h.sigmas[500]!) - 500) < 0.05);
  assert.notEqual(h.sigmaToT(h.sigmas[500]!), 500);
});
