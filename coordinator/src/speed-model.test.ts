import { test } from "node:test";
import assert from "node:assert/strict";
import { SpeedModel } from "./speed-model.js";

const k512 = { model: "m", width: 512, height: 512 };
const k1024 = { model: "m", width: 1024, height: 1024 };

test("seconds per step is an exponential moving average that converges to a new speed", () => {
  const s = new SpeedModel({ alpha: 0.3 });
  s.observe("a", k512, { secondsPerCall: 1 });
  assert.equal(s.agentCallSeconds("a", k512), 1);
  for (let i = 0; i < 30; i++) s.observe("a", k512, { secondsPerCall: 0.5 });
  const v = s.agentCallSeconds("a", k512)!;
  // After 30 samples at alpha 0.3 the old value's weight is 0.7^28 or less.
  assert.ok(Math.abs(v - 0.5) < 1e-3, `converged to ${v}`);
});

test("the first samples weigh fully (1/n), so one start-up outlier does not linger", () => {
  const s = new SpeedModel({ alpha: 0.1 });
  s.observe("a", k512, { secondsPerCall: 10 });
  s.observe("a", k512, { secondsPerCall: 1 });
  // Second sample with weight max(0.1, 1/2) = 0.5: 10 + 0.5 × (1 − 10) = 5.5.
  assert.equal(s.agentCallSeconds("a", k512), 5.5);
});

test("a resolution never measured on an agent is scaled by pixel count from its nearest measured one", () => {
  const s = new SpeedModel();
  s.observe("a", k512, { secondsPerCall: 0.2 });
  assert.ok(Math.abs(s.agentCallSeconds("a", k1024)! - 0.8) < 1e-12);
  assert.equal(s.agentCallSeconds("a", { model: "other", width: 512, height: 512 }), undefined);
});

test("task estimate: overhead + steps × seconds per step, plus the model's load time when not loaded; measured only for the agent's own data", () => {
  const s = new SpeedModel();
  s.observe("a", k512, { secondsPerCall: 0.1, overheadSeconds: 0.5, loadSeconds: 4 });
  s.observe("b", k512, { secondsPerCall: 0.3 });
  assert.deepEqual(s.taskSeconds("a", k512, 20, true), { seconds: 0.5 + 2, measured: true });
  assert.deepEqual(s.taskSeconds("a", k512, 20, false), { seconds: 0.5 + 2 + 4, measured: true });
  // Agent c has no data: the fleet mean per step (0.2) and the fleet mean overhead (0.5).
  const c = s.taskSeconds("c", k512, 10, true);
  assert.ok(Math.abs(c.seconds - (0.5 + 2)) < 1e-12);
  assert.equal(c.measured, false);
  s.forget("a");
  assert.equal(s.agentCallSeconds("a", k512), undefined);
});
