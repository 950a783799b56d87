// Shared by the deploy tests: where the deploy files are, the external tools they need, and small
// parsers for what those files contain (rendered manifests, dashboards, PromQL, the README table).
import { execFileSync, spawnSync } from "node:child_process";
import { accessSync, constants, existsSync, readFileSync, readdirSync, statSync } from "node:fs";
import { delimiter, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments, parse as parseYaml } from "yaml";
import { A1111_API_METRICS, AGENT_METRICS, COORDINATOR_METRICS, createMetrics } from "@latentfarm/shared";

export const repoRoot = resolve(fileURLToPath(new URL(".", import.meta.url)), "../..");
export const deployDir = join(repoRoot, "deploy");
export const kustomizeDir = join(deployDir, "kustomize");
export const dashboardsDir = join(deployDir, "grafana", "dashboards");
export const rulesFile = join(deployDir, "prometheus", "rules", "latentfarm.rules.yaml");
export const ruleTestsDir = join(deployDir, "prometheus", "tests");
export const prometheusRuleFile = join(deployDir, "prometheus", "prometheusrule.yaml");
export const readmeFile = join(deployDir, "README.md");

/** Finds an executable on PATH, or in the sbin directories Debian puts servers in. */
export function findTool(name: string): string | undefined {
  const dirs = [...(process.env["PATH"] ?? "").split(delimiter), "/usr/local/sbin", "/usr/sbin", "/sbin"];
  for (const dir of dirs) {
    if (!dir) continue;
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      if (statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

export const kubectl = findTool("kubectl");
export const promtool = findTool("promtool");
export const prometheus = findTool("prometheus");

/** A skip reason for node:test when a tool is missing, or false when it is there. */
export function needs(tools: Record<string, string | undefined>, hint: string): string | false {
  const missing = Object.entries(tools)
    .filter(([, p]) => p === undefined)
    .map(([n]) => n);
  return missing.length ? `${missing.join(", ")} not installed (${hint})` : false;
}

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [field: string]: unknown;
}

/**
 * The kustomizations an operator renders: base, every overlay and every agent pool. (base's
 * subdirectories are parts of it, and components cannot render alone.)
 */
export function kustomizations(): string[] {
  const entries = [join(kustomizeDir, "base")];
  for (const group of ["overlays", "pools"]) {
    const dir = join(kustomizeDir, group);
    if (!existsSync(dir)) continue;
    for (const name of readdirSync(dir).sort()) {
      if (existsSync(join(dir, name, "kustomization.yaml"))) entries.push(join(dir, name));
    }
  }
  return entries;
}

export function render(dir: string): K8sObject[] {
  if (!kubectl) throw new Error("kubectl not installed");
  const text = execFileSync(kubectl, ["kustomize", dir], { encoding: "utf8", maxBuffer: 64 << 20 });
  return parseAllDocuments(text)
    .map((d) => {
      if (d.errors.length) throw new Error(`${dir}: ${d.errors.map((e) => e.message).join("; ")}`);
      return d.toJS() as K8sObject | null;
    })
    .filter((o): o is K8sObject => o !== null);
}

/** Object at a path of keys, or undefined; for reading manifests without a cast at every step. */
export function at(obj: unknown, ...path: (string | number)[]): unknown {
  let cur = obj;
  for (const key of path) {
    if (cur === null || typeof cur !== "object") return undefined;
    cur = (cur as Record<string | number, unknown>)[key];
  }
  return cur;
}

// ---- metric names

export type MetricKind = "counter" | "gauge" | "histogram";
export interface CatalogEntry {
  name: string;
  kind: MetricKind;
  labels: readonly string[];
  help: string;
  service: "coordinator" | "agent" | "a1111-api";
}

export function catalog(): CatalogEntry[] {
  return [
    ...Object.values(COORDINATOR_METRICS).map((d) => ({ ...d, service: "coordinator" as const })),
    ...Object.values(AGENT_METRICS).map((d) => ({ ...d, service: "agent" as const })),
    ...Object.values(A1111_API_METRICS).map((d) => ({ ...d, service: "a1111-api" as const })),
  ];
}

/** Names of prom-client's default process and Node.js metrics, as the services register them. */
export async function defaultMetricNames(): Promise<string[]> {
  const { registry } = createMetrics({});
  return (await registry.getMetricsAsJSON()).map((m) => m.name);
}

/** Series names a metric family exposes (histograms add _bucket, _sum and _count). */
export function seriesNames(name: string, kind: string): string[] {
  return kind === "histogram" ? [`${name}_bucket`, `${name}_sum`, `${name}_count`] : [name];
}

const DCGM_NAME = /^DCGM_FI_[A-Z0-9_]+$/;
export const isDcgm = (name: string): boolean => DCGM_NAME.test(name);

const PROMQL_WORDS = new Set([
  "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
  "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan",
]);

/**
 * Metric names a PromQL expression selects. Strips strings and label matchers first, then keeps
 * identifiers that are neither function calls, keywords, nor grouping labels.
 */
export function metricNamesIn(expr: string): string[] {
  const noStrings = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/'(?:[^'\\]|\\.)*'/g, "''");
  const noMatchers = noStrings.replace(/\{[^}]*\}/g, "{}");
  const noGrouping = noMatchers.replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ");
  const noRanges = noGrouping
    .replace(/\[[^\]]*\]/g, "[]")
    .replace(/\b\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|s|m|h|d|w|y)?\b/gi, "0");
  const names = new Set<string>();
  for (const m of noRanges.matchAll(/[A-Za-z_:][A-Za-z0-9_:]*/g)) {
    const word = m[0];
    const after = noRanges.slice((m.index ?? 0) + word.length).trimStart();
    if (after.startsWith("(")) continue; // a function or an aggregation
    if (PROMQL_WORDS.has(word.toLowerCase())) continue;
    names.add(word);
  }
  return [...names];
}

// ---- dashboards

export interface PanelTarget {
  dashboard: string;
  panelId: number;
  panelTitle: string;
  panelType: string;
  refId: string;
  expr: string;
}

export interface Dashboard {
  file: string;
  json: Record<string, unknown> & { uid: string; title: string; panels: Panel[]; templating: { list: Variable[] } };
}
export interface Panel {
  id: number;
  type: string;
  title: string;
  datasource?: { type?: string; uid?: string };
  gridPos?: { h: number; w: number; x: number; y: number };
  targets?: { refId: string; expr?: string; datasource?: { type?: string; uid?: string } }[];
  panels?: Panel[];
}
export interface Variable {
  name: string;
  type: string;
  query?: unknown;
  datasource?: { type?: string; uid?: string };
}

export function dashboards(): Dashboard[] {
  return readdirSync(dashboardsDir)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => ({ file: f, json: JSON.parse(readFileSync(join(dashboardsDir, f), "utf8")) as Dashboard["json"] }));
}

export function allPanels(d: Dashboard): Panel[] {
  return d.json.panels.flatMap((p) => [p, ...(p.panels ?? [])]);
}

export function panelTargets(d: Dashboard): PanelTarget[] {
  return allPanels(d).flatMap((p) =>
    (p.targets ?? [])
      .filter((t) => typeof t.expr === "string")
      .map((t) => ({ dashboard: d.json.uid, panelId: p.id, panelTitle: p.title, panelType: p.type, refId: t.refId, expr: t.expr as string })),
  );
}

/**
 * Replaces Grafana's variables by what they become for an "All" selection, so that Prometheus
 * can parse and run the expression: intervals become fixed durations, template variables ".*".
 */
export function substituteGrafanaVariables(expr: string): string {
  return expr
    .replace(/\$__rate_interval|\$\{__rate_interval\}/g, "1m")
    .replace(/\$__interval|\$\{__interval\}/g, "1m")
    .replace(/\$__range|\$\{__range\}/g, "1h")
    .replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)/g, ".*");
}

// ---- README metrics table

export interface DocumentedMetric {
  name: string;
  type: string;
  labels: string[];
  meaning: string;
}

/** Rows of the table under "## Metrics reference" whose first cell is a `backticked` name. */
export function documentedMetrics(markdown: string): DocumentedMetric[] {
  const start = markdown.search(/^## Metrics reference\b/m);
  if (start < 0) return [];
  const rest = markdown.slice(start);
  const next = rest.slice(1).search(/^## /m);
  const section = next < 0 ? rest : rest.slice(0, next + 1);
  const rows: DocumentedMetric[] = [];
  for (const line of section.split("\n")) {
    const cells = line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
    const name = /^`([A-Za-z_:][A-Za-z0-9_:]*)`$/.exec(cells[0] ?? "")?.[1];
    if (!name) continue;
    const labels = [...(cells[2] ?? "").matchAll(/`([A-Za-z_][A-Za-z0-9_]*)`/g)].map((m) => m[1] as string);
    rows.push({ name, type: cells[1] ?? "", labels, meaning: cells[3] ?? "" });
  }
  return rows;
}

// ---- promtool

export interface ToolRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function runTool(tool: string, args: string[], input?: string): ToolRun {
  const r = spawnSync(tool, args, { encoding: "utf8", input, maxBuffer: 64 << 20, timeout: 60_000 });
  return { status: r.status, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
}

/**
 * prom-client names three default gauges with a _total suffix, which `promtool check metrics`
 * reports; they are not ours to rename.
 */
export const PROM_CLIENT_LINT_EXCEPTIONS = new Set([
  "nodejs_active_handles_total",
  "nodejs_active_requests_total",
  "nodejs_active_resources_total",
]);

/** Runs `promtool check metrics` on an exposition; returns the problems not excepted above. */
export function lintExposition(text: string): { status: number | null; problems: string[] } {
  if (!promtool) throw new Error("promtool not installed");
  const r = runTool(promtool, ["check", "metrics"], text);
  const problems = `${r.stdout}\n${r.stderr}`
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !PROM_CLIENT_LINT_EXCEPTIONS.has(l.split(/\s+/)[0] ?? ""));
  return { status: r.status, problems };
}

/** The rule groups of the plain rule file, wrapped as a prometheus-operator PrometheusRule. */
export function prometheusRuleFromRules(): K8sObject {
  const rules = parseYaml(readFileSync(rulesFile, "utf8")) as { groups: unknown[] };
  return {
    apiVersion: "monitoring.coreos.com/v1",
    kind: "PrometheusRule",
    metadata: {
      name: "latentfarm",
      labels: { release: "kube-prometheus-stack", "app.kubernetes.io/name": "latentfarm", "app.kubernetes.io/component": "alerting" },
    },
    spec: { groups: rules.groups },
  };
}
