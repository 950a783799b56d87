import { test } from "node:test";
import assert from "node:assert/strict";
import { ImageRng, slerp } from "./image-rng.js";
import { createGenerator, type RngSource } from "./generator.js";
import { INTERMEDIATE_DIR, assertClose, fixturesAbsent, readF32, readJson } from "./test-support.js";

interface Case {
  id: string;
  seed: number;
  batch_size?: number;
  rng: RngSource;
  width: number;
  height: number;
}
interface IntermediateIndex {
  [id: string]: { noise: { file: string; shape: number[] } };
}

test("fixture noise draws: ImageRng.first() then next() per step equal the reference draws", { skip: fixturesAbsent }, () => {
  const cases = readJson<Case[]>(`${INTERMEDIATE_DIR}/../cases.json`);
  const index = readJson<IntermediateIndex>(`${INTERMEDIATE_DIR}/index.json`);
  assert.ok(cases.length >= 5);
  for (const c of cases) {
    const entry = index[c.id];
    assert.ok(entry, `index entry for ${c.id}`);
    const [draws, batch, ch, h, w] = entry.noise.shape as [number, number, number, number, number];
    assert.equal(batch, c.batch_size ?? 1);
    assert.deepEqual([ch, h, w], [4, c.height / 8, c.width / 8]);
    const all = readF32(`${INTERMEDIATE_DIR}/${entry.noise.file}`);
    const per = batch * ch * h * w;
    const rng = new ImageRng({
      shape: [ch, h, w],
      seeds: Array.from({ length: batch }, (_, i) => c.seed + i),
      source: c.rng,
    });
    for (let k = 0; k < draws; k++) {
      const expected = all.subarray(k * per, (k + 1) * per);
      const actual = k === 0 ? rng.first() : rng.next();
      if (c.rng === "CPU") assert.deepEqual(Array.from(actual), Array.from(expected), `${c.id} draw ${k}`);
      else assertClose(actual, expected, 1e-5, `${c.id} draw ${k}`);
    }
  }
});

test("next() before first() returns the initial noise (A1111 is_first)", () => {
  const a = new ImageRng({ shape: [4, 2, 2], seeds: [9], source: "NV" });
  const b = new ImageRng({ shape: [4, 2, 2], seeds: [9], source: "NV" });
  assert.deepEqual(a.next(), b.first());
  assert.deepEqual(a.next(), b.next());
});

test("batch images use independent generators: image i equals a single-image run with seed i", () => {
  const batch = new ImageRng({ shape: [4, 3, 5], seeds: [100, 101], source: "CPU" });
  const single = new ImageRng({ shape: [4, 3, 5], seeds: [101], source: "CPU" });
  const b0 = batch.first();
  const s0 = single.first();
  assert.deepEqual(b0.subarray(60), s0);
  assert.deepEqual(batch.next().subarray(60), single.next());
});

test("ENSD: after first(), sampler noise comes from a fresh generator seeded seed+ENSD", () => {
  const rng = new ImageRng({ shape: [4, 4, 4], seeds: [1234], source: "NV", etaNoiseSeedDelta: 31337 });
  const initial = rng.first();
  assert.deepEqual(initial, createGenerator("NV", 1234).next(64));
  const g = createGenerator("NV", 1234 + 31337);
  assert.deepEqual(rng.next(), g.next(64));
  assert.deepEqual(rng.next(), g.next(64));
});

test("variation seed: strength 0 ignores the subseed, other strengths slerp noise and subnoise", () => {
  const shape = [4, 8, 8] as const;
  const plain = new ImageRng({ shape, seeds: [5], source: "NV" }).first();
  const zero = new ImageRng({ shape, seeds: [5], subseeds: [77], subseedStrength: 0, source: "NV" }).first();
  assert.deepEqual(zero, plain);
  const low = createGenerator("NV", 5).next(shape);
  const high = createGenerator("NV", 77).next(shape);
  const varied = new ImageRng({ shape, seeds: [5], subseeds: [77], subseedStrength: 0.3, source: "NV" }).first();
  assert.deepEqual(varied, slerp(0.3, low, high, shape));
  // The main generator still advanced by one draw.
  const rng = new ImageRng({ shape, seeds: [5], subseeds: [77], subseedStrength: 0.3, source: "NV" });
  rng.first();
  const g = createGenerator("NV", 5);
  g.next(shape);
  assert.deepEqual(rng.next(), g.next(shape));
});

test("slerp along H: per (c, w) column angle; strength 1 gives the subnoise, 0 the noise", () => {
  const shape = [1, 3, 2] as const;
  // Element (h, w) sits at h·2 + w: column 0 of low is (1,0,0), column 1 is (0,1,0); high swaps them.
  const lowCols = Float32Array.from([1, 0, 0, 1, 0, 0]);
  const highCols = Float32Array.from([0, 1, 1, 0, 0, 0]);
  const half = slerp(0.5, lowCols, highCols, shape);
  // ω = π/2 for both columns, so weights are sin(π/4)/sin(π/2) = √½ each.
  assertClose(half, [Math.SQRT1_2, Math.SQRT1_2, Math.SQRT1_2, Math.SQRT1_2, 0, 0], 1e-6);
  assertClose(slerp(1, lowCols, highCols, shape), highCols, 1e-6);
  assertClose(slerp(0, lowCols, highCols, shape), lowCols, 1e-6);
});

test("slerp of nearly parallel noise uses A1111's linear fallback low·val + high·(1 − val)", () => {
  const shape = [1, 2, 1] as const;
  const low = Float32Array.from([1, 1]);
  const high = Float32Array.from([2, 2]);
  assertClose(slerp(0.25, low, high, shape), [0.25 + 2 * 0.75, 0.25 + 2 * 0.75], 1e-6);
});

test("seed resize: a smaller noise is centred in the first draw of the full-size generator", () => {
  // Latent 4×4×6 (48×32 px), resize from 16×16 px → noise 4×2×2 centred at dy = 1, dx = 2.
  const rng = new ImageRng({ shape: [4, 4, 6], seeds: [3], source: "NV", seedResizeFromH: 16, seedResizeFromW: 16 });
  const x = rng.first();
  const small = createGenerator("NV", 3).next([4, 2, 2]);
  const full = createGenerator("NV", 3).next([4, 4, 6]);
  for (let c = 0; c < 4; c++) {
    for (let y = 0; y < 4; y++) {
      for (let xx = 0; xx < 6; xx++) {
        const inside = y >= 1 && y < 3 && xx >= 2 && xx < 4;
        const expected = inside ? small[(c * 2 + (y - 1)) * 2 + (xx - 2)]! : full[(c * 4 + y) * 6 + xx]!;
        assert.equal(x[(c * 4 + y) * 6 + xx], expected, `c${c} y${y} x${xx}`);
      }
    }
  }
  // The per-image generator made exactly one draw (the full-size one).
  const g = createGenerator("NV", 3);
  g.next([4, 4, 6]);
  assert.deepEqual(rng.next(), g.next([4, 4, 6]));
});

test("seed resize from a larger size crops the centre of the larger noise", () => {
  // Latent 4×2×2, resize from 32×32 px → noise 4×4×4, dx = dy = −1 → copy noise[1:3, 1:3].
  const rng = new ImageRng({ shape: [4, 2, 2], seeds: [8], source: "CPU", seedResizeFromH: 32, seedResizeFromW: 32 });
  const x = rng.first();
  const big = createGenerator("CPU", 8).next([4, 4, 4]);
  for (let c = 0; c < 4; c++) {
    for (let y = 0; y < 2; y++) {
      for (let xx = 0; xx < 2; xx++) assert.equal(x[(c * 2 + y) * 2 + xx], big[(c * 4 + y + 1) * 4 + xx + 1]);
    }
  }
});
