import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createBrownianNoiseSampler } from "./brownian.js";
import type { RngSource } from "./generator.js";
import { ImageRng, type LatentShape } from "./image-rng.js";
import { prepareSampling } from "./plan.js";
import { runSynchronously } from "./test-support.js";

// Reference answers of torchsde's BrownianInterval logic with numpy's own SeedSequence: see the file's "about".
interface ReferenceCase {
  name: string;
  sampler: string;
  scheduler?: string;
  steps: number;
  seeds: number[];
  source: RngSource;
  shape: LatentShape;
  sigmaMin: number;
  sigmaMax: number;
  queries: [sigma: number, sigmaNext: number, sha256: string, first: number[]][];
}

const reference = JSON.parse(readFileSync(new URL("./testdata/brownian-torchsde.json", import.meta.url), "utf8")) as {
  cases: ReferenceCase[];
};

const bitsHash = (v: Float32Array): string =>
  createHash("sha256")
    .update(new Uint8Array(v.buffer, v.byteOffset, v.byteLength))
    .digest("hex");

for (const c of reference.cases) {
  test(`Brownian-tree noise equals torchsde's for every query of ${c.sampler} (${c.source}, seeds ${c.seeds.join(", ")}), bit for bit`, () => {
    const tree = createBrownianNoiseSampler({
      sigmaMin: c.sigmaMin,
      sigmaMax: c.sigmaMax,
      seeds: c.seeds,
      shape: c.shape,
      source: c.source,
    });
    c.queries.forEach(([sigma, sigmaNext, sha256, first], i) => {
      const noise = tree(sigma, sigmaNext);
      assert.deepEqual(Array.from(noise.subarray(0, 4)), first, `query ${i} (${sigma} → ${sigmaNext}): first values`);
      assert.equal(bitsHash(noise), sha256, `query ${i} (${sigma} → ${sigmaNext}): all bits`);
    });
  });

  test(`${c.sampler}${c.scheduler === undefined ? "" : ` (${c.scheduler})`}, ${c.steps} steps, asks the tree exactly the reference's queries over the reference's range`, () => {
    const rng = new ImageRng({ shape: c.shape, seeds: c.seeds, source: c.source });
    const noise = (): Float32Array => rng.next();
    const asked: [number, number][] = [];
    const prepared = prepareSampling({
      samplerName: c.sampler,
      ...(c.scheduler !== undefined && { scheduler: c.scheduler }),
      steps: c.steps,
      noise,
      noiseSampler: (sigma, sigmaNext) => (asked.push([sigma, sigmaNext]), new Float32Array(rng.imageSize * c.seeds.length)),
    });
    assert.deepEqual(prepared.brownianRange, { sigmaMin: c.sigmaMin, sigmaMax: c.sigmaMax });
    runSynchronously(prepared, prepared.startLatent(rng.first()));
    assert.deepEqual(
      asked,
      c.queries.map(([sigma, sigmaNext]) => [sigma, sigmaNext]),
    );
  });
}
