// Lints the Grafana dashboards the way grafana/dashboard-linter would (a templated datasource used
// by every panel, $__rate_interval in rates), parses and type-checks every panel query with
// promtool, and checks that the panels the issue asks for exist and name only exported metrics.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  allPanels,
  catalog,
  dashboards,
  defaultMetricNames,
  isDcgm,
  metricNamesIn,
  needs,
  panelTargets,
  promtool,
  runTool,
  seriesNames,
  substituteGrafanaVariables,
  type Dashboard,
} from "./deploy-helpers.js";

const boards = dashboards();
const byUid = (uid: string): Dashboard => {
  const d = boards.find((b) => b.json.uid === uid);
  assert.ok(d, `dashboard ${uid}`);
  return d;
};
const exprs = (uid: string): string[] => panelTargets(byUid(uid)).map((t) => t.expr);

/** dcgm-exporter's default counters the dashboards may use (infra-notes §3.2). */
const DCGM_METRICS = new Set(["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"]);

test("three dashboards with stable, distinct uids", () => {
  assert.deepEqual(boards.map((b) => b.json.uid).sort(), ["latentfarm-agents", "latentfarm-overview", "latentfarm-tenants"]);
  for (const b of boards) {
    assert.ok(b.json.title.startsWith("latentfarm / "), `${b.file} title`);
    assert.equal(typeof b.json["schemaVersion"], "number", `${b.file} schemaVersion`);
    assert.equal(b.json["__inputs"], undefined, `${b.file}: __inputs only work through the UI's import, not provisioning`);
  }
});

test("every panel and query variable uses the templated datasource", () => {
  for (const b of boards) {
    assert.doesNotMatch(JSON.stringify(b.json), /\$\{DS_/, `${b.file}: no \${DS_...} placeholders`);
    const vars = b.json.templating.list;
    const ds = vars.find((v) => v.type === "datasource");
    assert.ok(ds && ds.name === "datasource" && ds.query === "prometheus", `${b.file}: a "datasource" variable of type prometheus`);
    for (const v of vars.filter((x) => x.type === "query")) {
      assert.deepEqual(v.datasource, { type: "prometheus", uid: "${datasource}" }, `${b.file} variable ${v.name}`);
    }
    for (const p of allPanels(b).filter((x) => x.type !== "row")) {
      assert.deepEqual(p.datasource, { type: "prometheus", uid: "${datasource}" }, `${b.file} panel ${p.id} "${p.title}"`);
      assert.ok(p.targets?.length, `${b.file} panel ${p.id} "${p.title}" has queries`);
      for (const t of p.targets ?? []) assert.deepEqual(t.datasource, p.datasource, `${b.file} panel ${p.id} target ${t.refId}`);
    }
  }
});

test("panel ids are unique and panels sit on the 24-column grid without overlapping", () => {
  for (const b of boards) {
    const panels = allPanels(b);
    const ids = panels.map((p) => p.id);
    assert.deepEqual(ids.filter((id, i) => ids.indexOf(id) !== i), [], `${b.file}: duplicate panel ids`);
    const boxes = panels.map((p) => ({ p, g: p.gridPos }));
    for (const { p, g } of boxes) {
      assert.ok(g && g.x >= 0 && g.w > 0 && g.x + g.w <= 24 && g.h > 0, `${b.file} panel ${p.id} gridPos`);
    }
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i]?.g;
        const c = boxes[j]?.g;
        if (!a || !c) continue;
        const overlap = a.x < c.x + c.w && c.x < a.x + a.w && a.y < c.y + c.h && c.y < a.y + a.h;
        assert.ok(!overlap, `${b.file}: panels ${boxes[i]?.p.id} and ${boxes[j]?.p.id} overlap`);
      }
    }
  }
});

test("time-series rates use $__rate_interval and every farm selector is scoped by $namespace", () => {
  for (const b of boards) {
    for (const t of panelTargets(b)) {
      const where = `${b.file} panel ${t.panelId} "${t.panelTitle}" ${t.refId}`;
      if (t.panelType === "timeseries") {
        for (const m of t.expr.matchAll(/\b(?:rate|irate|increase)\s*\([^[]*\[([^\]]+)\]/g)) assert.equal(m[1], "$__rate_interval", `${where}: ${m[0]}`);
      }
      for (const m of t.expr.matchAll(/\b((?:latentfarm|process|nodejs)_\w+)\s*(\{[^}]*\})?/g)) {
        assert.match(m[2] ?? "", /namespace=~"\$namespace"/, `${where}: ${m[1]} without the namespace matcher`);
      }
    }
  }
});

test("every panel query parses and type-checks (promtool check rules)", { skip: needs({ promtool }, "CI: apt-get install prometheus") }, () => {
  const targets = boards.flatMap((b) => panelTargets(b));
  const recordName = (t: (typeof targets)[number]): string => `panel:${t.dashboard.replace(/-/g, "_")}_${t.panelId}:${t.refId}`;
  const file = {
    groups: [{ name: "dashboard-panels", rules: targets.map((t) => ({ record: recordName(t), expr: substituteGrafanaVariables(t.expr) })) }],
  };
  const dir = mkdtempSync(join(tmpdir(), "latentfarm-panels-"));
  try {
    const path = join(dir, "panels.rules.json");
    writeFileSync(path, JSON.stringify(file, null, 1));
    const r = runTool(promtool as string, ["check", "rules", path]);
    assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
    assert.match(r.stdout, new RegExp(`SUCCESS: ${targets.length} rules found`));
    // Guard against a vacuous pass: a broken query must fail the same way.
    writeFileSync(path, JSON.stringify({ groups: [{ name: "x", rules: [{ record: "broken", expr: "sum(rate(latentfarm_queue_depth[1m])" }] }] }));
    assert.notEqual(runTool(promtool as string, ["check", "rules", path]).status, 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("panels name only metrics the services, prom-client or dcgm-exporter export", async () => {
  const known = new Set([
    ...catalog().flatMap((m) => seriesNames(m.name, m.kind)),
    ...(await defaultMetricNames()).flatMap((n) => [n, `${n}_bucket`, `${n}_sum`, `${n}_count`]),
    ...DCGM_METRICS,
  ]);
  for (const b of boards) {
    for (const t of panelTargets(b)) {
      for (const name of metricNamesIn(t.expr)) assert.ok(known.has(name), `${b.file} panel ${t.panelId} "${t.panelTitle}": unknown metric ${name}`);
    }
  }
});

test("every latentfarm metric is on some dashboard", () => {
  const used = new Set(boards.flatMap((b) => panelTargets(b).flatMap((t) => metricNamesIn(t.expr))));
  for (const m of catalog()) assert.ok(seriesNames(m.name, m.kind).some((s) => used.has(s)), `${m.name} is on no panel`);
});

test("the farm overview shows queue depth, jobs and images per minute, p50/p95/p99 latency and failures by reason", () => {
  const e = exprs("latentfarm-overview");
  assert.ok(e.some((x) => /latentfarm_queue_depth/.test(x)), "queue depth");
  assert.ok(e.some((x) => /rate\(latentfarm_jobs_(finished|submitted)_total[^)]*\)\)\s*\*\s*60/.test(x)), "jobs per minute");
  assert.ok(e.some((x) => /rate\(latentfarm_images_finished_total[^)]*\)\)\s*\*\s*60/.test(x)), "images per minute");
  for (const q of ["0.5", "0.95", "0.99"]) {
    assert.ok(e.some((x) => x.startsWith(`histogram_quantile(${q}, sum by (le) (rate(latentfarm_job_duration_seconds_bucket`)), `job latency p${Number(q) * 100}`);
  }
  assert.ok(e.some((x) => /sum by \(reason\) \(rate\(latentfarm_jobs_finished_total\{[^}]*outcome="failed"/.test(x)), "failures by reason");
});

test("the agent dashboard shows it/s, UNet step time, utilization, loaded models, model load time, memory and DCGM GPU panels", () => {
  const e = exprs("latentfarm-agents");
  const has = (re: RegExp, what: string): void => assert.ok(e.some((x) => re.test(x)), what);
  has(/sum by \(instance\) \(rate\(latentfarm_unet_steps_total/, "it/s per agent");
  has(/latentfarm_unet_step_duration_seconds_bucket/, "UNet step time");
  has(/rate\(latentfarm_agent_busy_seconds_total/, "utilization");
  has(/latentfarm_models_loaded/, "loaded models");
  has(/latentfarm_model_load_seconds_sum/, "model load time");
  has(/process_resident_memory_bytes/, "memory");
  has(/DCGM_FI_DEV_GPU_UTIL/, "GPU utilization (DCGM)");
  has(/DCGM_FI_DEV_FB_USED/, "GPU memory (DCGM)");
  const vars = byUid("latentfarm-agents").json.templating.list.map((v) => v.name);
  assert.ok(vars.includes("instance"), "an agent selector");
});

test("the tenant dashboard shows usage and rejections per tenant", () => {
  const e = exprs("latentfarm-tenants");
  assert.ok(e.some((x) => /sum by \(tenant\) \(rate\(latentfarm_tenant_images_total/.test(x)), "images per tenant");
  assert.ok(e.some((x) => /sum by \(tenant\) \(rate\(latentfarm_jobs_submitted_total/.test(x)), "jobs per tenant");
  assert.ok(e.some((x) => /sum by \(tenant, code\) \(rate\(latentfarm_submit_rejections_total/.test(x)), "rejections per tenant and code");
  assert.ok(byUid("latentfarm-tenants").json.templating.list.some((v) => v.name === "tenant"), "a tenant selector");
});

test("metric-name extraction sees through functions, matchers, grouping and durations", () => {
  assert.deepEqual(
    metricNamesIn('sum by (le, model) (rate(a_bucket{model=~"x|y", le="1"}[5m])) / on(job) group_left b offset 1h or on() vector(0)').sort(),
    ["a_bucket", "b"],
  );
  assert.deepEqual(metricNamesIn("latentfarm:job_latency_slo_errors:ratio_rate5m > (14.4 * 0.01)"), ["latentfarm:job_latency_slo_errors:ratio_rate5m"]);
  assert.ok(isDcgm("DCGM_FI_DEV_FB_USED") && !isDcgm("latentfarm_models_loaded"));
  assert.equal(substituteGrafanaVariables('rate(x{a=~"$a", b=~"${b}"}[$__rate_interval]) / $__range'), 'rate(x{a=~".*", b=~".*"}[1m]) / 1h');
});
