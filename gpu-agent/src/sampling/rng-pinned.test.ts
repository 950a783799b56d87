import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { createGenerator, restoreGenerator } from "./generator.js";
import { philoxNormals, philoxNormalsJs } from "./philox.js";
import { TorchCpuGenerator, type TorchCpuKernel } from "./torch-cpu.js";

// Digests of the generators' exact output bits, taken before the draws were optimised: any faster
// path must reproduce every bit, for odd sizes, torch's small-tensor double path and stream positions.

/** Set in the `--jitless` child, which only prints the smaller set's digests. */
const PRINT_SMALL = process.env.RNG_PINNED_PRINT_SMALL === "1";
function pinned(name: string, fn: () => void): void {
  if (!PRINT_SMALL) test(name, fn);
}

const SEEDS = [0, 1, 2, 42, 1234, 12345, 4294967295, 4294967296, 2 ** 40 + 7, 2 ** 53 - 1, -1, -2, -12345, -(2 ** 40)];
const SIZES = [...Array.from({ length: 70 }, (_, i) => i + 1), 4093, 16384, 65541];

function digest(parts: Iterable<Float32Array>): string {
  const hash = createHash("sha256");
  for (const p of parts) hash.update(new Uint8Array(p.buffer, p.byteOffset, p.byteLength));
  return hash.digest("hex").slice(0, 32);
}

const SMALL_SIZES = [...Array.from({ length: 70 }, (_, i) => i + 1), 4093];

function* nvDraws(sizes = SIZES): Generator<Float32Array> {
  for (const seed of SEEDS) {
    const g = createGenerator("NV", seed);
    for (const n of sizes) yield g.next(n);
  }
}

function* nvOffsets(fill: (out: Float32Array, k0: number, k1: number, offset: number) => void): Generator<Float32Array> {
  for (const [k0, k1] of [
    [0, 0],
    [7, 0],
    [0xffffffff, 0xffffffff],
    [0x80000000, 1],
  ] as const) {
    for (const offset of [0, 1, 2, 1000, 0x7fffffff, 0xffffffff]) {
      for (const n of [1, 3, 5, 17, 63, 4093, 16387]) {
        const out = new Float32Array(n);
        fill(out, k0, k1, offset);
        yield out;
      }
    }
  }
}

function* cudaDraws(): Generator<Float32Array> {
  for (const threads of [256, 512, 1000, 4096]) {
    for (const seed of [0, 42, -3]) {
      const g = createGenerator("GPU", seed, { cudaResidentThreads: threads });
      for (const n of [100, 257, 513, 1025, 5003, 16384, 65541]) yield g.next(n);
    }
  }
}

function* cpuDraws(kernel: TorchCpuKernel, sizes = SIZES): Generator<Float32Array> {
  for (const seed of SEEDS) {
    const g = new TorchCpuGenerator(seed, kernel);
    for (const n of sizes) yield g.randn(n);
  }
}

/** Calls interleaving both paths (the cached second double normal survives a 16+ call) and a snapshot. */
function* cpuInterleaved(): Generator<Float32Array> {
  for (const seed of [0, 3, -7]) {
    let g = createGenerator("CPU", seed);
    for (const n of [3, 16, 5, 17, 1, 1, 33, 2, 624, 7, 625, 1247, 9]) {
      yield g.next(n);
      g = restoreGenerator(g.snapshot());
    }
  }
}

pinned("NV draws: pinned bits for many seeds (negative, above 2^32) and every size 1..70, 4093, 16384, 65541", () => {
  assert.equal(digest(nvDraws()), "ec8bd421249619ab741e1eb56a284323");
});

pinned("NV draws at arbitrary offsets and keys: pinned bits, and the JS loop agrees", () => {
  assert.equal(digest(nvOffsets(philoxNormals)), "53b0f94e33b2277a6a1fc36007ecc611");
  assert.equal(digest(nvOffsets(philoxNormalsJs)), "53b0f94e33b2277a6a1fc36007ecc611");
});

pinned("GPU draws beyond the resident thread count (CUDA grid-stride mapping): pinned bits", () => {
  assert.equal(digest(cudaDraws()), "c7b5c2f01c6f48be7564eb125389ae0f");
});

pinned("CPU draws (AVX2 kernel): pinned bits for many seeds and every size 1..70, 4093, 16384, 65541", () => {
  assert.equal(digest(cpuDraws("avx2")), "ebb69eacaa522aae44381c18818c2015");
});

pinned("CPU draws (scalar kernel): pinned bits", () => {
  assert.equal(digest(cpuDraws("scalar")), "fb4c9ecc130b8407d0b935d9f129bbc2");
});

pinned("CPU draws across both torch paths and snapshots: pinned bits", () => {
  assert.equal(digest(cpuInterleaved()), "d921f38b1bd6f864d39812795c154cfa");
});

/** The smaller set a `--jitless` child (no WebAssembly) can afford. */
function smallDigests(): string {
  return [
    digest(nvDraws(SMALL_SIZES)),
    digest(cpuDraws("avx2", SMALL_SIZES)),
    digest(cpuDraws("scalar", SMALL_SIZES)),
    digest(cpuInterleaved()),
  ].join(" ");
}
const SMALL_PINNED =
  "27b3d8b9259633ddc02f403c2e580957 b02b228f076dd9e84d7f0516fd3749fb 45254707c616e6380edf27c70cd82008 d921f38b1bd6f864d39812795c154cfa";

if (PRINT_SMALL) process.stdout.write(`${smallDigests()}\n`);
pinned("smaller set: pinned bits with WebAssembly and in a --jitless child without it (the JS fallbacks)", () => {
  assert.equal(smallDigests(), SMALL_PINNED);
  const child = execFileSync(process.execPath, ["--jitless", "--no-warnings", "--import", "tsx", fileURLToPath(import.meta.url)], {
    env: { ...process.env, RNG_PINNED_PRINT_SMALL: "1" },
    encoding: "utf8",
  });
  assert.equal(child.trim(), SMALL_PINNED);
});
