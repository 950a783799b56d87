import { test } from "node:test";
import assert from "node:assert/strict";
import { KERNEL_BLOCK, Kernel, allocateResident, e, freeResident, isResident, type Expr } from "./kernels.js";

/** A small deterministic PRNG (xorshift32) so that failures reproduce. */
function prng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

/** float32 values of every kind: normal, tiny, huge, subnormal, ±0 and ±∞. */
function operand(random: () => number, n: number): Float32Array {
  const special = [0, -0, 1, -1, 1e-40, -3e-39, 3e38, -3e38, Infinity, -Infinity, 1e-30, 65504];
  return Float32Array.from({ length: n }, () => {
    const pick = random();
    if (pick < 0.15) return special[Math.floor(random() * special.length)]!;
    return (random() - 0.5) * 10 ** Math.floor(random() * 12 - 6);
  });
}

function randomExpr(random: () => number, inputs: number, params: number, depth: number): Expr {
  if (depth === 0 || random() < 0.2) return random() < 0.7 ? e.in(Math.floor(random() * inputs)) : e.param(Math.floor(random() * params));
  const ops = ["add", "sub", "mul", "div", "sqrt"] as const;
  const op = ops[Math.floor(random() * ops.length)]!;
  if (op === "sqrt") return e.sqrt(randomExpr(random, inputs, params, depth - 1));
  return e[op](randomExpr(random, inputs, params, depth - 1), randomExpr(random, inputs, params, depth - 1));
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
  return true;
}

test("compiled kernels give the bits of one Math.fround per operation (random expressions, all value kinds)", () => {
  const random = prng(7);
  let simd = 0;
  for (let trial = 0; trial < 60; trial++) {
    const inputs = 1 + Math.floor(random() * 4);
    const params = 1 + Math.floor(random() * 3);
    const shared = randomExpr(random, inputs, params, 3);
    const outputs = [e.add(shared, randomExpr(random, inputs, params, 3)), e.mul(shared, e.param(0))];
    const kernel = new Kernel({ inputs, params, outputs });
    if (kernel.simd) simd++;
    const n = 1 + Math.floor(random() * 70);
    const ins = Array.from({ length: inputs }, () => operand(random, n));
    const ps = Array.from({ length: params }, () => Math.fround((random() - 0.5) * 8));
    const got = [new Float32Array(n), new Float32Array(n)];
    const want = [new Float32Array(n), new Float32Array(n)];
    kernel.run(got, ins, ps);
    kernel.runReference(want, ins, ps);
    assert.ok(sameBits(got[0]!, want[0]!) && sameBits(got[1]!, want[1]!), `trial ${trial} (n=${n})`);
  }
  assert.equal(simd, 60, "WebAssembly SIMD is available in Node, so every kernel compiled");
});

test("a kernel reproduces a hand-written fused loop, and may write over its inputs", () => {
  const f32 = Math.fround;
  const x = Float32Array.from({ length: 37 }, (_, i) => Math.sin(i) * 3);
  const d = Float32Array.from({ length: 37 }, (_, i) => Math.cos(i * 1.3));
  const sigma = f32(1.37);
  const dt = f32(-0.21);
  const want = new Float32Array(37);
  for (let k = 0; k < 37; k++) want[k] = f32(x[k]! + f32(f32(f32(x[k]! - d[k]!) / sigma) * dt));
  const kernel = new Kernel({
    inputs: 2,
    params: 2,
    outputs: [e.add(e.in(0), e.mul(e.div(e.sub(e.in(0), e.in(1)), e.param(0)), e.param(1)))],
  });
  kernel.run([x], [x, d], [sigma, dt]);
  assert.ok(sameBits(x, want));
});

test("kernels refuse parameters that are not float32 values and operands of the wrong shape", () => {
  const kernel = new Kernel({ inputs: 1, params: 1, outputs: [e.mul(e.in(0), e.param(0))] });
  const out = new Float32Array(8);
  assert.throws(() => kernel.run([out], [new Float32Array(8)], [0.1]), /not a float32 value/);
  assert.throws(() => kernel.run([out], [new Float32Array(4)], [Math.fround(0.1)]), /needs 8/);
  assert.throws(() => kernel.run([out], [], [1]), /wrong number/);
  // The same with every operand resident (the short path between model calls), after a call that compiled it.
  const a = allocateResident(8)!;
  const b = allocateResident(8)!;
  const short = allocateResident(4)!;
  try {
    a.fill(2);
    kernel.run([b], [a], [Math.fround(0.5)]);
    assert.deepEqual([...b], Array<number>(8).fill(1));
    assert.throws(() => kernel.run([b], [a], [0.1]), /not a float32 value/);
    assert.throws(() => kernel.run([b], [short], [Math.fround(0.1)]), /needs 8/);
    assert.throws(() => kernel.run([b], [a], []), /wrong number/);
    kernel.run([b], [a], [NaN]);
    assert.ok(b.every(Number.isNaN), "NaN is a float32 value");
  } finally {
    for (const r of [a, b, short]) freeResident(r);
  }
});

test("abs, max and pmax match Math.abs, Math.max and a < b ? b : a, and long arrays run block by block with the same bits", () => {
  const random = prng(11);
  for (let trial = 0; trial < 12; trial++) {
    const inputs = 1 + Math.floor(random() * 3);
    const params = 1 + Math.floor(random() * 2);
    const leaf = (): Expr => (random() < 0.7 ? e.in(Math.floor(random() * inputs)) : e.param(Math.floor(random() * params)));
    const a = randomExpr(random, inputs, params, 2);
    const outputs = [e.max(e.abs(a), leaf()), e.div(e.sub(leaf(), a), e.max(e.param(0), e.abs(leaf()))), e.pmax(a, leaf())];
    const kernel = new Kernel({ inputs, params, outputs });
    // Several blocks, a partial last block, and a tail that is not a multiple of 4.
    const n = [KERNEL_BLOCK * 2 + 7, KERNEL_BLOCK, KERNEL_BLOCK + 1, 3 * KERNEL_BLOCK - 2][trial % 4]!;
    const ins = Array.from({ length: inputs }, () => operand(random, n));
    const ps = Array.from({ length: params }, () => Math.fround((random() - 0.5) * 8));
    const want = [new Float32Array(n), new Float32Array(n), new Float32Array(n)];
    kernel.runReference(want, ins, ps);
    const got = [new Float32Array(n), new Float32Array(n), new Float32Array(n)];
    kernel.run(got, ins, ps);
    assert.ok(
      got.every((g, j) => sameBits(g, want[j]!)),
      `trial ${trial} (n=${n})`,
    );
    // Writing over an input, block by block, still reads each input value before it is replaced.
    const inPlace = ins.map((x) => x.slice());
    kernel.run([inPlace[0]!, got[1]!, got[2]!], inPlace, ps);
    assert.ok(sameBits(inPlace[0]!, want[0]!) && sameBits(got[1]!, want[1]!), `in place, trial ${trial}`);
  }
  assert.equal(Math.max(-0, 0), 0);
  const signed = new Kernel({ inputs: 2, params: 0, outputs: [e.max(e.in(0), e.in(1))] });
  const out = new Float32Array(8);
  signed.run([out], [Float32Array.of(-0, 0, NaN, 1, -0, 0, -1, 2), Float32Array.of(0, -0, 1, NaN, -0, 0, -2, 2)]);
  assert.deepEqual(
    [...out].map((v) => (Object.is(v, -0) ? "-0" : String(v))),
    ["0", "0", "NaN", "NaN", "-0", "0", "-1", "2"],
  );
  // pmax is a < b ? b : a: NaN only from its first operand, and the first of two zeros.
  const pseudo = new Kernel({ inputs: 2, params: 0, outputs: [e.pmax(e.in(0), e.in(1))] });
  const pairs = [Float32Array.of(-0, 0, NaN, 1, -0, 0, -1, 2), Float32Array.of(0, -0, 1, NaN, -0, 0, -2, 3)] as const;
  const want = new Float32Array(8);
  pseudo.runReference([want], [...pairs]);
  pseudo.run([out], [...pairs]);
  const shown = (a: Float32Array): string[] => [...a].map((v) => (Object.is(v, -0) ? "-0" : String(v)));
  assert.deepEqual(shown(want), ["-0", "0", "NaN", "1", "-0", "0", "-1", "3"]);
  assert.deepEqual(shown(out), shown(want));
});

test("runSumOfSquares's order: element k into S(k mod 4), then (S0 + S1) + (S2 + S3), then the tail", () => {
  // Squares from 2^52 down to 25, where each other grouping of the additions rounds differently.
  const values = Float32Array.of(2 ** 26, 2 ** 26, 2 ** 24, 8193, 2 ** 26 + 8, 2 ** 24, 1048579, 2 ** 24, 5);
  const sq = (k: number): number => values[k]! * values[k]!;
  const [s0, s1, s2, s3] = [sq(0) + sq(4), sq(1) + sq(5), sq(2) + sq(6), sq(3) + sq(7)];
  const want = s0 + s1 + (s2 + s3) + sq(8);
  let sequential = 0;
  for (let k = 0; k < values.length; k++) sequential += sq(k);
  for (const other of [sequential, s0 + s2 + (s1 + s3) + sq(8), s0 + s3 + (s1 + s2) + sq(8), s0 + s1 + s2 + s3 + sq(8)]) {
    assert.notEqual(other, want, "the values tell the groupings apart");
  }
  const kernel = new Kernel({ inputs: 1, params: 0, outputs: [e.in(0)], sumOfSquares: e.in(0) });
  assert.ok(kernel.simd);
  assert.equal(kernel.runSumOfSquares([new Float32Array(values.length)], [values]), want);
  assert.equal(kernel.runSumOfSquaresReference([new Float32Array(values.length)], [values]), want);
});

test("runSumOfSquares adds the squares of an output, or of values it does not store, in float64 in four interleaved sums, across blocks and tails", () => {
  const random = prng(23);
  for (let trial = 0; trial < 12; trial++) {
    // The summed values stay finite (a sum of infinities or NaNs would hide its order); the other output is any.
    const finiteSum = e.add(e.mul(e.param(0), e.in(0)), e.in(1));
    const other = randomExpr(random, 2, 2, 2);
    // Trials 8 on: the summed values are no output (the second output then only reads the same inputs).
    const stored = trial < 8;
    const summed = trial % 2;
    const second = stored ? finiteSum : e.sub(e.in(1), e.in(0));
    const kernel = new Kernel({
      inputs: 2,
      params: 2,
      outputs: summed === 0 ? [second, other] : [other, second],
      sumOfSquares: finiteSum,
    });
    assert.ok(kernel.simd, "compiles to WebAssembly SIMD");
    const n = [
      KERNEL_BLOCK * 2 + 7,
      KERNEL_BLOCK,
      3 * KERNEL_BLOCK - 2,
      4099,
      5,
      3,
      KERNEL_BLOCK + 1,
      1000,
      4099,
      KERNEL_BLOCK * 2 + 7,
      6,
      65536,
    ][trial]!;
    const finite = (): Float32Array =>
      Float32Array.from({ length: n }, () => (random() < 0.05 ? 0 : (random() - 0.5) * 10 ** Math.floor(random() * 12 - 6)));
    const ins = [finite(), finite()];
    const ps = [Math.fround((random() - 0.5) * 8), Math.fround((random() - 0.5) * 8)];
    const want = [new Float32Array(n), new Float32Array(n)];
    const wantSum = kernel.runSumOfSquaresReference(want, ins, ps);
    const values = ins[0]!.map((v, k) => Math.fround(Math.fround(ps[0]! * v) + ins[1]![k]!));
    if (stored) assert.ok(sameBits(want[summed]!, values));
    const whole = n & ~3;
    const partial = [0, 0, 0, 0];
    for (let k = 0; k < whole; k++) partial[k % 4] = partial[k % 4]! + values[k]! * values[k]!;
    let loop = partial[0]! + partial[1]! + (partial[2]! + partial[3]!);
    for (let k = whole; k < n; k++) loop += values[k]! * values[k]!;
    assert.ok(Object.is(wantSum, loop), "the reference sums element k into S(k mod 4), then (S0 + S1) + (S2 + S3), then the tail");
    assert.ok(Number.isFinite(wantSum) && wantSum > 0);
    // Trials 8 and 10 write their first output over input 0, which the sum reads, tail included.
    const inPlace = !stored && summed === 0;
    const callIns = ins.map((a) => a.slice());
    const got = [inPlace ? callIns[0]! : new Float32Array(n), new Float32Array(n)];
    const gotSum = kernel.runSumOfSquares(got, callIns, ps);
    assert.ok(sameBits(got[0]!, want[0]!) && sameBits(got[1]!, want[1]!), `outputs, trial ${trial} (n=${n})`);
    assert.ok(Object.is(gotSum, wantSum), `sum, trial ${trial} (n=${n}): ${gotSum} vs ${wantSum}`);
  }
  assert.throws(() => new Kernel({ inputs: 1, params: 0, outputs: [], sumOfSquares: e.in(0) }), RangeError);
});

test("resident operands (in the kernels' memory) give the same bits as copied ones, mixed, in place and across blocks", () => {
  const random = prng(23);
  const taken: Float32Array[] = [];
  const resident = (values: Float32Array): Float32Array => {
    const a = allocateResident(values.length)!;
    assert.ok(isResident(a));
    a.set(values);
    taken.push(a);
    return a;
  };
  try {
    for (let trial = 0; trial < 24; trial++) {
      const inputs = 2 + Math.floor(random() * 3);
      const params = 1 + Math.floor(random() * 2);
      const shared = randomExpr(random, inputs, params, 3);
      // The second output reads input 0, which the in-place trials also write as output 0.
      const outputs = [e.add(shared, randomExpr(random, inputs, params, 2)), e.sub(e.in(0), e.mul(shared, e.param(0)))];
      const kernel = new Kernel({ inputs, params, outputs });
      const n = [KERNEL_BLOCK * 2 + 7, 37, 1000, KERNEL_BLOCK + 4][trial % 4]!;
      const plainIns = Array.from({ length: inputs }, () => operand(random, n));
      const ps = Array.from({ length: params }, () => Math.fround((random() - 0.5) * 8));
      const want = [new Float32Array(n), new Float32Array(n)];
      kernel.runReference(want, plainIns, ps);
      // Every other input resident; outputs resident, and in place over input 0 every third trial.
      const ins = plainIns.map((a, j) => (j % 2 === trial % 2 ? resident(a) : a.slice()));
      const inPlace = trial % 3 === 0;
      const outs = [
        inPlace ? ins[0]! : resident(new Float32Array(n)),
        trial % 2 === 0 ? resident(new Float32Array(n)) : new Float32Array(n),
      ];
      kernel.run(outs, ins, ps);
      assert.ok(sameBits(outs[0]!, want[0]!) && sameBits(outs[1]!, want[1]!), `trial ${trial} (n=${n}, in place ${inPlace})`);
    }
  } finally {
    for (const a of taken) freeResident(a);
  }
});

test("an output written over its own input is in place; one over an input shifted in the same memory is not corrupted", () => {
  // Whole vectors: an output view that is no slot of its own is written where it is only then.
  const n = 4096;
  const source = operand(prng(41), n + 8);
  // Two outputs that both read input 0: the first is written over input 0 itself.
  const kernel = new Kernel({ inputs: 2, params: 1, outputs: [e.mul(e.sub(e.in(0), e.in(1)), e.param(0)), e.add(e.in(0), e.in(1))] });
  const ps = [Math.fround(0.75)];
  const otherValues = operand(prng(42), n);
  const slot = allocateResident(n + 8)!;
  const second = allocateResident(n)!;
  const otherResident = allocateResident(n)!;
  otherResident.set(otherValues);
  try {
    // The other input copied in, or resident too (every operand resident: one call over the whole latent).
    for (const [shift, other] of [0, 4, -4].flatMap((d) => [otherValues, otherResident].map((o) => [d, o] as const))) {
      slot.set(source);
      // Input 0 at values 4…, output 0 at 4 + shift: the same place, or overlapping it a vector later or earlier.
      const input = new Float32Array(slot.buffer, slot.byteOffset + 16, n);
      const output = new Float32Array(slot.buffer, slot.byteOffset + 16 + shift * 4, n);
      const want = [new Float32Array(n), new Float32Array(n)];
      kernel.runReference(want, [input.slice(), other], ps);
      kernel.run([output, second], [input, other], ps);
      assert.ok(
        sameBits(output, want[0]!) && sameBits(second, want[1]!),
        `shift ${shift}, other ${isResident(other) ? "resident" : "copied"}`,
      );
    }
  } finally {
    freeResident(slot);
    freeResident(second);
    freeResident(otherResident);
  }
});

test("whole-latent calls (every operand resident) and copied operands in compact scratch slots give the reference's bits and sums", () => {
  const random = prng(31);
  const taken: Float32Array[] = [];
  const resident = (values: Float32Array): Float32Array => {
    const a = allocateResident(values.length)!;
    a.set(values);
    taken.push(a);
    return a;
  };
  try {
    // 300,001 values: more than the scratch region holds for even one copied operand.
    for (const n of [65536, KERNEL_BLOCK * 3 + 5, 300_001, 4099]) {
      for (const copiedInput of [-1, 0, 2]) {
        const finite = (): Float32Array => Float32Array.from({ length: n }, () => (random() - 0.5) * 10 ** Math.floor(random() * 8 - 4));
        const second = e.sub(e.in(1), e.in(2));
        const kernel = new Kernel({
          inputs: 3,
          params: 2,
          outputs: [e.add(e.mul(e.param(0), e.in(0)), e.mul(e.in(2), e.param(1))), second],
          // Summed values that are stored, and (with input 2 copied) some that are not.
          sumOfSquares: copiedInput === 2 ? e.sub(e.in(0), e.in(1)) : second,
        });
        const plain = [finite(), finite(), finite()];
        const ps = [Math.fround(random() - 0.5), Math.fround(random() * 3)];
        const want = [new Float32Array(n), new Float32Array(n)];
        const wantSum = kernel.runSumOfSquaresReference(want, plain, ps);
        const ins = plain.map((a, j) => (j === copiedInput ? a.slice() : resident(a)));
        const outs = [resident(new Float32Array(n)), resident(new Float32Array(n))];
        const gotSum = kernel.runSumOfSquares(outs, ins, ps);
        const what = `n=${n}, copied input ${copiedInput}`;
        assert.ok(sameBits(outs[0]!, want[0]!) && sameBits(outs[1]!, want[1]!), what);
        assert.ok(Object.is(gotSum, wantSum), `${what}: sum ${gotSum} vs ${wantSum}`);
        for (const a of taken.splice(0)) freeResident(a);
      }
    }
  } finally {
    for (const a of taken) freeResident(a);
  }
});

test("a resident view whose length is not whole vectors is written up to its end and not beyond", () => {
  const backing = allocateResident(64)!;
  try {
    backing.fill(7);
    const view = backing.subarray(8, 8 + 13);
    const kernel = new Kernel({ inputs: 1, params: 1, outputs: [e.mul(e.in(0), e.param(0))] });
    kernel.run([view], [Float32Array.from({ length: 13 }, (_, i) => i)], [2]);
    assert.deepEqual(
      [...view],
      Array.from({ length: 13 }, (_, i) => 2 * i),
    );
    assert.ok(backing.subarray(21).every((v) => v === 7) && backing.subarray(0, 8).every((v) => v === 7));
  } finally {
    freeResident(backing);
  }
});

test("resident arrays stay valid while more are allocated; the memory grows only while none is out", () => {
  const first = allocateResident(1000)!;
  first.fill(3);
  const more: Float32Array[] = [];
  try {
    // Until the memory is full: growing it now would detach `first`, so the answer is no instead.
    for (let a = allocateResident(65536); a !== undefined; a = allocateResident(65536)) more.push(a);
    assert.ok(more.length >= 200, `room for ${more.length} latents of 4×128×128`);
    assert.ok(first.every((v) => v === 3) && isResident(first), "earlier arrays are where they were");
    const kernel = new Kernel({ inputs: 1, params: 0, outputs: [e.add(e.in(0), e.in(0))] });
    kernel.run([more[more.length - 1]!.subarray(0, 1000)], [first]);
    assert.ok(more[more.length - 1]!.subarray(0, 1000).every((v) => v === 6));
    const at = more[5]!.byteOffset;
    freeResident(more[5]!);
    more[5] = allocateResident(65536)!;
    assert.equal(more[5].byteOffset, at, "a freed slot is handed out again");
    assert.throws(() => freeResident(new Float32Array(4)), /not an array from allocateResident/);
  } finally {
    freeResident(first);
    for (const a of more) freeResident(a);
  }
  // With nothing out, the region starts afresh: another size reuses the space, and the memory grows for a larger one.
  const other = allocateResident(1000 * 1000)!;
  assert.equal(other.byteOffset, first.byteOffset, "the space freed slots of other sizes held is used again");
  freeResident(other);
  const large = allocateResident(32 << 20);
  assert.ok(large !== undefined && isResident(large));
  large.fill(1);
  freeResident(large);
});
