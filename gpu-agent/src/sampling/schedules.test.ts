import { test } from "node:test";
import assert from "node:assert/strict";
import { samplerSigmas, scheduleSigmas, type ScheduleType } from "./schedules.js";
import { sd1Schedule } from "./sigmas.js";
import { assertRelClose } from "./test-support.js";

// Spec §4.3 reference values (n = 20, float32 emulation, printed to 6 significant digits).
const REFERENCE: Record<string, number[]> = {
  uniform: [
    14.6146, 10.7468, 8.08152, 6.20493, 4.85565, 3.86538, 3.12376, 2.55717, 2.11566, 1.76482, 1.48058, 1.24581, 1.04814, 0.878428, 0.729719,
    0.596434, 0.473585, 0.355545, 0.232164, 0.0291675, 0,
  ],
  karras: [
    14.6146, 11.7254, 9.34021, 7.38363, 5.78942, 4.49984, 3.46475, 2.64085, 1.99092, 1.48322, 1.09079, 0.790949, 0.564725, 0.396392,
    0.27304, 0.184169, 0.121342, 0.0778608, 0.0484819, 0.0291675, 0,
  ],
  exponential: [
    14.6146, 10.5363, 7.59608, 5.47634, 3.94812, 2.84637, 2.05207, 1.47942, 1.06658, 0.768942, 0.554363, 0.399664, 0.288135, 0.207729,
    0.14976, 0.107969, 0.0778391, 0.0561175, 0.0404575, 0.0291675, 0,
  ],
  sgm_uniform: [
    14.6146, 10.9073, 8.30717, 6.44769, 5.09241, 4.08608, 3.32507, 2.73908, 2.27973, 1.91321, 1.61558, 1.36964, 1.16286, 0.985955, 0.831884,
    0.69515, 0.571189, 0.455736, 0.343705, 0.225452, 0,
  ],
  simple: [
    14.6146, 10.9042, 8.3028, 6.44296, 5.08776, 4.08173, 3.32108, 2.73547, 2.27646, 1.91025, 1.61289, 1.36717, 1.16058, 0.983817, 0.82986,
    0.693205, 0.569285, 0.453819, 0.341674, 0.223003, 0,
  ],
  ddim: [
    11.0283, 8.39068, 6.5064, 5.13443, 4.1167, 3.34776, 2.7562, 2.29285, 1.92344, 1.62369, 1.37618, 1.16822, 0.990409, 0.835653, 0.698398,
    0.57405, 0.458333, 0.346187, 0.228147, 0.0413145, 0,
  ],
  kl_optimal: [
    14.6146, 6.99566, 4.56504, 3.35945, 2.63289, 2.14274, 1.78645, 1.51315, 1.29477, 1.11448, 0.961588, 0.828962, 0.711627, 0.606002,
    0.50942, 0.419837, 0.335638, 0.255509, 0.178347, 0.103189, 0.0291675,
  ],
  align_your_steps: [
    14.615, 9.52171, 6.30118, 4.80002, 3.7179, 3.07814, 2.54891, 2.11152, 1.77025, 1.51101, 1.26604, 1.0413, 0.851409, 0.693412, 0.544092,
    0.420168, 0.265765, 0.15992, 0.0693511, 0.029, 0,
  ],
  beta: [
    14.6146, 14.4152, 13.9863, 13.3927, 12.6674, 11.8355, 10.9186, 9.9368, 8.90907, 7.85399, 6.78982, 5.73474, 4.70701, 3.72519, 2.80831,
    1.97637, 1.25107, 0.657488, 0.228567, 0.0291675, 0,
  ],
};
REFERENCE["normal"] = REFERENCE["uniform"]!;
// Polyexponential with ρ = 1 is the exponential schedule.
REFERENCE["polyexponential"] = REFERENCE["exponential"]!;

/** The reference is printed to 6 significant digits, so compare at 1e-5 relative (plus exact zeros). */
function check(actual: Float32Array, expected: number[], what: string): void {
  assertRelClose(actual, expected, 1e-5, what);
}

for (const [type, expected] of Object.entries(REFERENCE)) {
  test(`${type}: 20-step sigmas match spec §4.3`, () => {
    const model = sd1Schedule();
    const sigmas = scheduleSigmas(type as ScheduleType, 20, { sigmaMin: model.sigmaMin, sigmaMax: model.sigmaMax, model });
    check(sigmas, expected, type);
  });
}

test("Align Your Steps at n = 10 and n = 11 (table itself)", () => {
  const model = sd1Schedule();
  const p = { sigmaMin: model.sigmaMin, sigmaMax: model.sigmaMax, model };
  check(
    scheduleSigmas("align_your_steps", 10, p),
    [14.615, 6.11351, 3.56511, 2.39387, 1.64996, 1.13579, 0.742518, 0.445007, 0.169205, 0.029, 0],
    "AYS 10",
  );
  check(
    scheduleSigmas("align_your_steps", 11, p),
    [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0],
    "AYS 11",
  );
});

test("DPM2's Automatic schedule: Karras built for 21 steps with the penultimate sigma discarded", () => {
  const { sigmas, infotext } = samplerSigmas({ steps: 20, scheduleType: "karras", discardNextToLastSigma: true });
  check(
    sigmas,
    [
      14.6146, 11.8572, 9.55827, 7.65249, 6.08216, 4.79654, 3.75126, 2.90764, 2.23216, 1.69591, 1.2741, 0.94562, 0.692574, 0.499939,
      0.355185, 0.247952, 0.169758, 0.11373, 0.0743636, 0.0473062, 0,
    ],
    "DPM2",
  );
  assert.equal(infotext["Schedule type"], "Karras");
  assert.equal(infotext["Discard penultimate sigma"], undefined);
});

test("forced discard (always_discard_next_to_last_sigma) is reported in the infotext", () => {
  const { sigmas, infotext } = samplerSigmas({ steps: 20, scheduleType: undefined, alwaysDiscardNextToLastSigma: true });
  assert.equal(sigmas.length, 21);
  assert.equal(infotext["Discard penultimate sigma"], true);
  assert.equal(infotext["Schedule type"], undefined);
  const uniform21 = sd1Schedule().getSigmas(21);
  assert.equal(sigmas[20], 0);
  assert.equal(sigmas[19], uniform21[19]);
});

test("KL Optimal has no trailing zero; DDIM at 30 steps yields 31 sigmas + 0", () => {
  const model = sd1Schedule();
  const p = { sigmaMin: model.sigmaMin, sigmaMax: model.sigmaMax, model };
  const kl = scheduleSigmas("kl_optimal", 20, p);
  assert.equal(kl.length, 21);
  assert.equal(kl[20], Math.fround(Math.tan(Math.fround(Math.atan(model.sigmaMin)))));
  assert.equal(scheduleSigmas("ddim", 30, p).length, 32);
});

test("sigma overrides and rho are applied only when non-zero and different, and reported", () => {
  const base = samplerSigmas({ steps: 10, scheduleType: "karras" });
  const sameRho = samplerSigmas({ steps: 10, scheduleType: "karras", rhoOverride: 7 });
  assert.deepEqual(sameRho.sigmas, base.sigmas);
  assert.equal(sameRho.infotext["Schedule rho"], undefined);
  const custom = samplerSigmas({ steps: 10, scheduleType: "karras", rhoOverride: 5, sigmaMaxOverride: 10, sigmaMinOverride: 0.1 });
  assert.equal(custom.infotext["Schedule rho"], 5);
  assert.equal(custom.infotext["Schedule max sigma"], 10);
  assert.equal(custom.infotext["Schedule min sigma"], 0.1);
  assert.ok(Math.abs(custom.sigmas[0]! - 10) < 1e-5);
  assert.ok(Math.abs(custom.sigmas[9]! - 0.1) < 1e-6);
  const old = samplerSigmas({ steps: 10, scheduleType: "exponential", useOldKarrasSchedulerSigmas: true });
  assert.equal(old.sigmas[0], 10);
});

test("Beta schedule reports its alpha/beta and takes an injected quantile function", () => {
  const calls: number[] = [];
  const { sigmas, infotext } = samplerSigmas({
    steps: 3,
    scheduleType: "beta",
    betaQuantile: (p) => {
      calls.push(p);
      return p;
    },
  });
  assert.deepEqual(calls, [1, 0.5, 0]);
  assert.equal(infotext["Beta schedule alpha"], 0.6);
  const m = sd1Schedule();
  assert.equal(sigmas[1], Math.fround(m.sigmaMin + 0.5 * (m.sigmaMax - m.sigmaMin)));
});
