import { test } from "node:test";
import assert from "node:assert/strict";
import { createGenerator } from "./generator.js";
import { PHILOX_BOX_MULLER_CONSTANTS, philox4x32, philoxNormals, philoxNormalsJs } from "./philox.js";
import { philoxOutputWords } from "./philox-wasm.js";
import { Mt19937, TorchCpuGenerator } from "./torch-cpu.js";
import { FIXTURES_DIR, assertClose, fixturesAbsent, readJson } from "./test-support.js";

test("Philox4x32-10 raw block for seed 0, counter 0 (spec §3.3)", () => {
  assert.deepEqual(philox4x32([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
});

test("the WebAssembly Philox loop equals the block function and the JS loop, including high key/counter bits", () => {
  for (const [n, offset, k0, k1] of [
    [1, 0, 0, 0],
    [300, 7, 12345, 0],
    [1000, 0xfffffff0, 0x80000001, 0xdeadbeef],
  ] as const) {
    const words = philoxOutputWords(n, offset, k0, k1);
    assert.ok(words !== null, "WebAssembly is available in Node");
    for (const i of new Set([0, 1, n >> 1, n - 1].filter((k) => k < n))) {
      const [c0, c1] = philox4x32([offset, 0, i, 0], [k0, k1]);
      assert.deepEqual([words[2 * i], words[2 * i + 1]], [c0, c1], `n=${n} i=${i}`);
    }
    const viaWasm = new Float32Array(n);
    const viaJs = new Float32Array(n);
    philoxNormals(viaWasm, k0, k1, offset);
    philoxNormalsJs(viaJs, k0, k1, offset);
    assert.deepEqual(viaWasm, viaJs);
  }
});

test("NV Box–Muller constants are the float32 ones A1111 uses", () => {
  assert.equal(PHILOX_BOX_MULLER_CONSTANTS.A, 2 ** -32);
  assert.equal(PHILOX_BOX_MULLER_CONSTANTS.B, 1.462918119976564e-9);
});

test("NV seed 0: first call (3,4) and second call (offset 1) match spec vectors", () => {
  const g = createGenerator("NV", 0);
  const first = g.next([3, 4]);
  assertClose(
    first,
    [
      -0.9246624, -0.42534396, -2.6438458, 0.14518388, -0.12086651, -0.5797257, -0.6228513, -0.32838714, -1.074542, -0.3631441, -1.6710504,
      2.265505,
    ],
    1e-6,
  );
  const second = g.next(4);
  assertClose(second, [0.18082589, -0.5522627, 0.9238134, -0.73497033], 1e-6);
});

test("NV other seeds from spec §3.3", () => {
  assertClose(
    createGenerator("NV", 12345).next(8),
    [0.5786413, -0.5247555, -0.29190373, 0.01401389, -2.1647296, 0.27898726, 1.6163961, -0.1677887],
    1e-6,
  );
  assertClose(createGenerator("NV", 4294967295).next(4), [-0.03415844, 0.390445, 1.5272353, 0.18699038], 1e-6);
  const big = createGenerator("NV", 0).next([4, 64, 64]);
  assert.ok(Math.abs(big[16383]! - -2.954316) < 1e-6, `element 16383 = ${big[16383]}`);
});

test("GPU source is the NV Philox generator", () => {
  assert.deepEqual(createGenerator("GPU", 42).next(64), createGenerator("NV", 42).next(64));
});

test("NV seeds above 2^32 use the high word as the second key", () => {
  // Only k1 differs between these seeds, so the draws must differ.
  const a = createGenerator("NV", 5).next(8);
  const b = createGenerator("NV", 5 + 2 ** 32).next(8);
  assert.notDeepEqual(Array.from(a), Array.from(b));
});

test("CPU seed 0, 16 values match torch (spec §3.4)", () => {
  const values = createGenerator("CPU", 0).next(16);
  assertClose(
    values,
    [-1.1258, -1.1524, -0.2506, -0.4339, 0.8487, 0.692, -0.316, -2.1152, 0.3223, -1.2633, 0.35, 0.3081, 0.1198, 1.2377, 1.1168, -0.2473],
    1e-4,
  );
});

test("mt19937 matches the C++ standard's check value (10000th output for seed 5489)", () => {
  // The C++ standard requires the 10000th output of a default-seeded mt19937 to be 4123659995.
  const mt = new Mt19937(5489);
  let v = 0;
  for (let i = 0; i < 10000; i++) v = mt.nextUint32();
  assert.equal(v, 4123659995);
});

test("CPU randn with n % 16 ≠ 0 redraws the last 16 values from fresh uniforms (tail rule)", () => {
  const n = 20;
  const tailed = new TorchCpuGenerator(3).randn(n);
  const head = new TorchCpuGenerator(3).randn(16);
  // Elements 0..3 come from the first block of 16 and are not touched by the tail.
  assert.deepEqual(Array.from(tailed.subarray(0, 4)), Array.from(head.subarray(0, 4)));
  // Elements 4..19 are the transform of uniforms 20..35: the same as a 16-value draw after skipping 20.
  const skipped = new TorchCpuGenerator(3);
  for (let i = 0; i < n; i++) skipped.engine.nextUint32();
  assert.deepEqual(Array.from(tailed.subarray(4)), Array.from(skipped.randn(16)));
  // The tail consumed 16 more uniforms: n + 16 mt19937 outputs in total.
  const g = new TorchCpuGenerator(3);
  g.randn(n);
  const reference = new Mt19937(3);
  for (let i = 0; i < n + 16; i++) reference.nextUint32();
  assert.equal(g.engine.nextUint32(), reference.nextUint32());
});

type RandnFixture = { vectors: Record<string, number[]> };
const fixturePath = `${FIXTURES_DIR}/reference/rng/torch_randn.json`;

test("torch_randn.json: CPU draws are bit-exact, CUDA draws are reproduced by NV within 1e-5", { skip: fixturesAbsent }, () => {
  const { vectors } = readJson<RandnFixture>(fixturePath);
  let checked = 0;
  for (const [key, expected] of Object.entries(vectors)) {
    const match = /^(cpu|cuda)\/seed=(\d+)\/shape=([\dx]+)\/(first|second)$/.exec(key);
    assert.ok(match, `unexpected fixture key ${key}`);
    const [, device, seed, shape, which] = match;
    const dims = shape!.split("x").map(Number);
    const g = createGenerator(device === "cpu" ? "CPU" : "NV", Number(seed));
    let values = g.next(dims);
    if (which === "second") values = g.next(dims);
    if (device === "cpu") assert.deepEqual(Array.from(values), expected.map(Math.fround), key);
    else assertClose(values, expected, 1e-5, key);
    checked++;
  }
  assert.equal(checked, 12);
});

// Reference values printed by torch 2.11 (CPU capability AVX512, which runs the AVX2 normal kernel) on
// the project's device machine: torch.manual_seed-style generators, two consecutive randn calls.
test("torch CPU: 20 values (tail rule, n % 16 = 4), two calls, bit-exact", () => {
  const g = createGenerator("CPU", 3);
  const expected = [
    -0.07664429396390915, 0.35988152027130127, -0.7820168137550354, 0.07152773439884186, 1.0460227727890015, 0.5221869945526123,
    -0.16680915653705597, 0.05303340032696724, 0.4046071469783783, 0.6112996339797974, 0.7603904008865356, -0.03364326059818268,
    0.997922420501709, 0.45918044447898865, 2.436397075653076, -0.1468081772327423, 0.4851140081882477, 0.2052343785762787,
    0.33842819929122925, 1.35275399684906, 0.037066876888275146, -0.06768558919429779, 0.4290330410003662, -0.8681192398071289,
    0.6197021007537842, 1.9096978902816772, -1.578063726425171, 0.5071300864219666, 0.20301233232021332, -0.20442277193069458,
    -0.412137895822525, 0.6873754262924194, 0.6238451600074768, 1.1436113119125366, -0.1214367225766182, 0.6263991594314575,
    -1.9540929794311523, -1.221632480621338, -0.33041828870773315, -0.4243015944957733,
  ];
  assert.deepEqual([...g.next(20), ...g.next(20)], expected);
});

test("torch CPU: shape (4,13,13) = 676 values (tail rule), head and tail of two calls, bit-exact", () => {
  const g = createGenerator("CPU", 0);
  const first = g.next([4, 13, 13]);
  const second = g.next([4, 13, 13]);
  assert.deepEqual(Array.from(first.subarray(0, 4)), [-1.1258398294448853, -1.152360200881958, -0.2505785822868347, -0.4338788092136383]);
  assert.deepEqual(
    Array.from(first.subarray(656)),
    [
      -1.245952844619751, 2.4966132640838623, -0.7068829536437988, 1.1504485607147217, -0.17707498371601105, 0.6240478754043579,
      -1.6889100074768066, 0.8175789713859558, -0.033425863832235336, -0.3567701578140259, -0.33027055859565735, 0.40637677907943726,
      -1.0378724336624146, -0.958686888217926, 0.9181745052337646, 0.4887973666191101, -2.3601632118225098, -0.48824572563171387,
      -1.0352410078048706, 1.0566531419754028,
    ],
  );
  assert.deepEqual(Array.from(second.subarray(0, 4)), [-0.18619273602962494, -1.237442135810852, 1.1838980913162231, -0.19545401632785797]);
  assert.deepEqual(Array.from(second.subarray(672)), [-0.00716219749301672, 0.9247447848320007, 0.2025003880262375, 1.2383071184158325]);
});

// torch.randn on an NVIDIA H200 (132 SMs × 2048 threads = 270336 resident threads), seed 0.
const H200_THREADS = 270336;

test("GPU source beyond the resident thread count follows CUDA's grid-stride mapping (H200 values)", () => {
  const g = createGenerator("GPU", 0, { cudaResidentThreads: H200_THREADS });
  const first = g.next([1, 4, 320, 320]);
  const second = g.next([1, 4, 320, 320]);
  const pick = (a: Float32Array, idx: number[]): number[] => idx.map((i) => a[i]!);
  const idx = [0, 1, 270335, 270336, 270337, 409599];
  assertClose(
    pick(first, idx),
    [-0.9246624112129211, -0.42534422874450684, 0.2774116098880768, 0.9911375045776367, 1.0675898790359497, 1.1296695470809937],
    1e-5,
  );
  assertClose(
    pick(second, idx),
    [0.1808258295059204, -0.5522627830505371, -1.305648684501648, -0.1536381095647812, 0.4049665331840515, 1.1095261573791504],
    1e-5,
  );
  // 1.44M values need two iterations per thread, so the next call starts two Philox blocks later.
  const big = createGenerator("GPU", 0, { cudaResidentThreads: H200_THREADS });
  const values = big.next([4, 600, 600]);
  assertClose(
    pick(values, [0, 270336, 540672, 811008, 1081344, 1081345, 1439999]),
    [
      -0.9246624112129211, 0.9911375045776367, -0.48206859827041626, -0.6176088452339172, 0.1808258295059204, -0.5522627830505371,
      1.5390651226043701,
    ],
    1e-5,
  );
  assertClose(big.next([4, 8, 8]).subarray(0, 4), [2.5440971851348877, -0.7163488864898682, -0.493368923664093, 0.12671054899692535], 1e-5);
  // A1111's NV stays on its one-element-per-thread mapping, so it differs from the GPU there.
  const nv = createGenerator("NV", 0).next([1, 4, 320, 320]);
  assert.equal(nv[270335], first[270335]);
  assert.ok(Math.abs(nv[270336]! - first[270336]!) > 1e-3);
});
