// The metrics reference in deploy/README.md against the catalog the services build their metrics
// from (shared/src/metrics.ts), and promtool's lint of both services' metric sets filled with
// values. live.test.ts compares the same table with what running services expose.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { A1111_API_METRICS, AGENT_METRICS, COORDINATOR_METRICS, createMetrics } from "@latentfarm/shared";
import { catalog, documentedMetrics, lintExposition, needs, promtool, readmeFile } from "./deploy-helpers.js";

const documented = documentedMetrics(readFileSync(readmeFile, "utf8"));

/** Label names whose values come from small fixed sets; anything else could leak job ids or prompts. */
const BOUNDED_LABELS = new Set(["outcome", "reason", "state", "code", "tenant", "model", "route", "status"]);

test("the README's metrics reference lists exactly the catalog's metrics", () => {
  const names = documented.map((d) => d.name);
  assert.deepEqual(names.filter((n, i) => names.indexOf(n) !== i), [], "documented twice");
  assert.deepEqual([...names].sort(), catalog().map((m) => m.name).sort());
});

test("the README gives each metric its catalog type and labels, and a meaning", () => {
  for (const m of catalog()) {
    const d = documented.find((x) => x.name === m.name);
    assert.ok(d, m.name);
    assert.equal(d.type, m.kind, `${m.name} type`);
    assert.deepEqual([...d.labels].sort(), [...m.labels].sort(), `${m.name} labels`);
    assert.ok(d.meaning.length > 10, `${m.name} meaning`);
  }
});

test("the table parser reads backticked names and skips other tables", () => {
  const md = [
    "## Alerts",
    "| `NotAMetric` | x | | y |",
    "## Metrics reference",
    "| Metric | Type | Labels | Meaning |",
    "|---|---|---|---|",
    "| `a_total` | counter | `x`, `y` | Things. |",
    "| `b` | gauge | | Level. |",
    "## After",
    "| `c` | gauge | | Not in the section. |",
  ].join("\n");
  assert.deepEqual(documentedMetrics(md), [
    { name: "a_total", type: "counter", labels: ["x", "y"], meaning: "Things." },
    { name: "b", type: "gauge", labels: [], meaning: "Level." },
  ]);
});

test("labels are bounded: no job ids, prompts or seeds", () => {
  for (const m of catalog()) for (const l of m.labels) assert.ok(BOUNDED_LABELS.has(l), `${m.name}{${l}} is not a bounded label`);
});

test("promtool check metrics passes on the services' metric sets, filled", { skip: needs({ promtool }, "CI: apt-get install prometheus") }, async () => {
  const coordinator = createMetrics(COORDINATOR_METRICS);
  const c = coordinator.metrics;
  c.jobsSubmitted.inc({ tenant: "default" });
  c.jobsFinished.inc({ outcome: "failed", reason: "UNAVAILABLE" });
  c.imagesFinished.inc({ outcome: "succeeded" });
  c.jobDuration.observe({ outcome: "succeeded" }, 12);
  c.queueDepth.set(3);
  c.agents.set({ state: "ready" }, 2);
  c.taskRetries.inc({ reason: "UNAVAILABLE" });
  c.submitRejections.inc({ tenant: "default", code: "RESOURCE_EXHAUSTED" });
  c.tenantImages.inc({ tenant: "default" }, 4);
  const agent = createMetrics(AGENT_METRICS);
  const a = agent.metrics;
  a.tasks.inc({ outcome: "succeeded" });
  a.taskDuration.observe({ outcome: "succeeded" }, 4);
  a.unetSteps.inc({ model: "sd15" }, 20);
  a.unetStepDuration.observe({ model: "sd15" }, 0.08);
  a.modelLoad.observe({ model: "sd15" }, 3);
  a.modelLoadFailures.inc({ model: "sdxl" });
  const gateway = createMetrics(A1111_API_METRICS);
  gateway.metrics.apiRequests.inc({ route: "txt2img", status: "200" });
  gateway.metrics.apiRequestDuration.observe({ route: "txt2img" }, 7);
  gateway.metrics.apiCallsInFlight.set(2);
  for (const [service, registry] of [
    ["coordinator", coordinator.registry],
    ["agent", agent.registry],
    ["a1111-api", gateway.registry],
  ] as const) {
    const { status, problems } = lintExposition(await registry.metrics());
    assert.deepEqual(problems, [], `${service}: promtool check metrics`);
    assert.notEqual(status, 1, `${service}: the exposition parses`);
  }
});

test("the lint is not vacuous: a gauge named like a counter is reported", { skip: needs({ promtool }, "CI: apt-get install prometheus") }, () => {
  const { problems } = lintExposition("# HELP latentfarm_bad_total A gauge.\n# TYPE latentfarm_bad_total gauge\nlatentfarm_bad_total 1\n");
  assert.equal(problems.length, 1);
  assert.match(problems[0] ?? "", /^latentfarm_bad_total /);
});
