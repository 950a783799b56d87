// The Prometheus alert and recording rules: promtool parses and type-checks them and runs their unit
// tests; every alert has a test that fires it and one that does not; they use only metrics the
// services export; and the prometheus-operator copy says the same as the plain rule file.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { parse as parseYaml } from "yaml";
import {
  catalog,
  defaultMetricNames,
  metricNamesIn,
  needs,
  prometheusRuleFile,
  prometheusRuleFromRules,
  promtool,
  ruleTestsDir,
  rulesFile,
  runTool,
  seriesNames,
} from "./deploy-helpers.js";

const skip = needs({ promtool }, "CI: apt-get install prometheus");

interface Rule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}
const groups = (parseYaml(readFileSync(rulesFile, "utf8")) as { groups: { name: string; rules: Rule[] }[] }).groups;
const rules = groups.flatMap((g) => g.rules);
const alerts = rules.filter((r) => r.alert);
const testFiles = readdirSync(ruleTestsDir)
  .filter((f) => f.endsWith(".yaml") || f.endsWith(".yml"))
  .sort()
  .map((f) => join(ruleTestsDir, f));

interface AlertTest {
  alertname: string;
  exp_alerts?: unknown[];
}
interface UnitTestFile {
  rule_files: string[];
  tests: { name: string; alert_rule_test?: AlertTest[] }[];
}

test("promtool check rules: every rule parses and type-checks", { skip }, () => {
  const r = runTool(promtool as string, ["check", "rules", rulesFile]);
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, new RegExp(`SUCCESS: ${rules.length} rules found`));
});

test("promtool test rules: the unit tests under deploy/prometheus/tests pass", { skip }, () => {
  assert.ok(testFiles.length > 0, "unit test files exist");
  const r = runTool(promtool as string, ["test", "rules", ...testFiles]);
  assert.equal(r.status, 0, r.stdout + r.stderr);
});

test("every alert of the issue exists, with a severity, a summary and a description", () => {
  const names = alerts.map((a) => a.alert);
  for (const wanted of [
    "LatentfarmDown", // farm down
    "LatentfarmNoAgents", // no agents
    "LatentfarmQueueGrowing", // queue growing
    "LatentfarmAgentFlapping", // agent flapping
    "LatentfarmHighFailureRatio", // high failure ratio
    "LatentfarmJobLatencySLOBurnFast", // job latency SLO burn
    "LatentfarmJobLatencySLOBurnSlow",
    "LatentfarmModelLoadFailures", // model load failures
  ]) {
    assert.ok(names.includes(wanted), `alert ${wanted}`);
  }
  for (const a of alerts) {
    assert.match(a.labels?.["severity"] ?? "", /^(critical|warning)$/, `${a.alert} severity`);
    assert.ok(a.annotations?.["summary"], `${a.alert} summary`);
    assert.ok(a.annotations?.["description"], `${a.alert} description`);
  }
});

test("every alert has a unit test in which it fires and one in which it stays silent", () => {
  const fires = new Set<string>();
  const silent = new Set<string>();
  for (const f of testFiles) {
    const unit = parseYaml(readFileSync(f, "utf8")) as UnitTestFile;
    assert.deepEqual(unit.rule_files, ["../rules/latentfarm.rules.yaml"], `${f} tests the shipped rule file`);
    for (const t of unit.tests) {
      for (const a of t.alert_rule_test ?? []) (a.exp_alerts?.length ? fires : silent).add(a.alertname);
    }
  }
  for (const a of alerts) {
    assert.ok(fires.has(a.alert as string), `a test fires ${a.alert}`);
    assert.ok(silent.has(a.alert as string), `a test expects ${a.alert} to stay silent`);
  }
});

test("rules use only metrics the services export", async () => {
  const known = new Set([
    ...catalog().flatMap((m) => seriesNames(m.name, m.kind)),
    ...(await defaultMetricNames()).flatMap((n) => [n, `${n}_bucket`, `${n}_sum`, `${n}_count`]),
    "up", // Prometheus' own, per target
    ...rules.filter((r) => r.record).map((r) => r.record as string),
  ]);
  for (const r of rules) {
    for (const name of metricNamesIn(r.expr)) assert.ok(known.has(name), `${r.alert ?? r.record}: unknown metric ${name}`);
  }
});

test("deploy/prometheus/prometheusrule.yaml wraps exactly the rule file", () => {
  const shipped = parseYaml(readFileSync(prometheusRuleFile, "utf8")) as unknown;
  assert.deepEqual(shipped, prometheusRuleFromRules(), "stale: run `node --import tsx tests/deploy/render-prometheusrule.ts`");
});
