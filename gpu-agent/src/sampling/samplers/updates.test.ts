import { test } from "node:test";
import assert from "node:assert/strict";
import { setImmediate as nextTurn } from "node:timers/promises";
import { adaptiveErrorSumOfSquares, eulerStep, heunStep } from "./updates.js";
import { allocateAhead, clearLatentPool, freshLatent } from "./latent-pool.js";

const f32 = Math.fround;

/** Latent-sized operands (several kernel blocks) with a spread of magnitudes, signs and zeros. */
function latent(seed: number, n = 65_536 + 6): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n }, (_, i) => {
    s = (s * 1_103_515_245 + 12_345) >>> 0;
    const v = (s / 2 ** 32 - 0.5) * 10 ** ((i % 7) - 3);
    return i % 97 === 0 ? 0 : i % 101 === 0 ? -0 : v;
  });
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
  return true;
}

test("heunStep (x₂ recomputed inside) gives the bits of the unfused Euler step and correction", () => {
  const x = latent(1);
  const den = latent(2);
  const den2 = latent(3);
  for (const [sigma, next] of [
    [14.614642, 9.7],
    [1.2, 0.03],
    [0.5, 0.49],
  ] as const) {
    const s = f32(sigma);
    const s2 = f32(next);
    const dt = f32(s2 - s);
    const x2 = eulerStep(new Float32Array(x.length), x, den, s, dt);
    const want = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) {
      const d = f32(f32(x[k]! - den[k]!) / s);
      const d2 = f32(f32(x2[k]! - den2[k]!) / s2);
      want[k] = f32(x[k]! + f32(f32(f32(d + d2) / 2) * dt));
    }
    assert.ok(sameBits(heunStep(new Float32Array(x.length), x, den, den2, s, s2, dt), want), `σ ${sigma} → ${next}`);
  }
});

test("DPM adaptive's error sum gives the float64 sum of the scalar loop it replaces", () => {
  const low = latent(4);
  const high = latent(5);
  const prev = latent(6);
  for (const [atol, rtol] of [
    [0.0078, 0.05],
    [1e-6, 0.5],
  ] as const) {
    const a = f32(atol);
    const r = f32(rtol);
    let want = 0;
    for (let k = 0; k < low.length; k++) {
      const delta = Math.max(a, f32(r * Math.max(Math.abs(low[k]!), Math.abs(prev[k]!))));
      const ratio = f32(f32(low[k]! - high[k]!) / delta);
      want += ratio * ratio;
    }
    const got = adaptiveErrorSumOfSquares(new Float32Array(low.length), low, high, prev, a, r);
    assert.ok(Object.is(got, want), `atol ${atol}: ${got} vs ${want}`);
  }
});

test("the latent pool hands out each array once, zero-filled, prepared while the event loop is free", async () => {
  clearLatentPool();
  const n = 65_536;
  const a = freshLatent(n);
  allocateAhead(n, 2);
  await nextTurn();
  const b = freshLatent(n);
  const c = freshLatent(n);
  const d = freshLatent(n);
  const all = [a, b, c, d];
  assert.equal(new Set(all.map((v) => v.buffer)).size, 4, "distinct arrays");
  for (const v of all) {
    assert.equal(v.length, n);
    assert.ok(v.every((x) => Object.is(x, 0)));
  }
  b.fill(1);
  allocateAhead(n, 1);
  await nextTurn();
  assert.ok(
    freshLatent(n).every((x) => x === 0),
    "a spare is new, not a returned array",
  );
  clearLatentPool();
});
