import { test } from "node:test";
import assert from "node:assert/strict";
import { RANDOM_SEED_LIMIT, seedsForJob } from "./seeds.js";
import { InvalidSamplingParameter } from "./errors.js";

test("batch seeds: seed + i per image without variation (spec §10.10)", () => {
  const r = seedsForJob({ seed: 100, subseed: 7, count: 4 });
  assert.deepEqual(r.seeds, [100, 101, 102, 103]);
  assert.deepEqual(r.subseeds, [7, 8, 9, 10]);
  assert.equal(r.seed, 100);
});

test("with a variation strength every image keeps the seed, subseeds still count up", () => {
  const r = seedsForJob({ seed: 100, subseed: 500, subseedStrength: 0.3, count: 4 });
  assert.deepEqual(r.seeds, [100, 100, 100, 100]);
  assert.deepEqual(r.subseeds, [500, 501, 502, 503]);
});

test("-1, empty, missing and unparsable seeds are drawn from 0..4294967293 and reported", () => {
  const limits: number[] = [];
  let next = 41;
  const random = (limit: number): number => {
    limits.push(limit);
    return next++;
  };
  assert.equal(seedsForJob({ seed: -1, subseed: 3, count: 2, random }).seeds.join(), "41,42");
  assert.equal(seedsForJob({ seed: "", subseed: 3, count: 1, random }).seed, 42);
  assert.equal(seedsForJob({ seed: "abc", subseed: 3, count: 1, random }).seed, 43);
  const both = seedsForJob({ seed: null, subseed: undefined, count: 1, random });
  assert.deepEqual([both.seed, both.subseed], [44, 45]);
  assert.ok(limits.every((l) => l === RANDOM_SEED_LIMIT));
  assert.equal(RANDOM_SEED_LIMIT, 4294967294);
});

test("the default random source stays in A1111's range", () => {
  for (let i = 0; i < 50; i++) {
    const { seed } = seedsForJob({ seed: -1, count: 1 });
    assert.ok(Number.isInteger(seed) && seed >= 0 && seed <= 4294967293);
  }
});

test("numeric strings parse like Python int(); other negatives are kept", () => {
  assert.equal(seedsForJob({ seed: " 42 ", count: 1 }).seed, 42);
  assert.equal(seedsForJob({ seed: "1_000", count: 1 }).seed, 1000);
  assert.equal(seedsForJob({ seed: -5, count: 1 }).seed, -5);
});

test("invalid counts and non-finite numbers name the field", () => {
  assert.throws(
    () => seedsForJob({ seed: 1, count: 0 }),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "batch_size",
  );
  assert.throws(
    () => seedsForJob({ seed: Number.NaN, count: 1 }),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "seed",
  );
  assert.throws(
    () => seedsForJob({ seed: 1, count: 1, subseedStrength: Infinity }),
    (e: unknown) => e instanceof InvalidSamplingParameter && e.field === "subseed_strength",
  );
});
