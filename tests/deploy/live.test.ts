// Checks the deploy files against running services: a coordinator and agents from the test-farm
// harness (tests/harness/farm.ts), scraped by a real Prometheus (Debian's package) that loads the
// shipped alert rules.
// - `promtool check metrics` passes on both /metrics;
// - the metric names documented in deploy/README.md equal the names the services expose;
// - after one job, every dashboard panel without a DCGM metric returns data, the rules evaluate,
//   and neither LatentfarmDown nor LatentfarmNoAgents is pending.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import {
  catalog,
  dashboards,
  documentedMetrics,
  isDcgm,
  lintExposition,
  metricNamesIn,
  needs,
  panelTargets,
  prometheus,
  promtool,
  readmeFile,
  rulesFile,
  substituteGrafanaVariables,
} from "./deploy-helpers.js";
import { farmSkipReason, startService, startTestFarm, type ServiceProcess } from "../harness/farm.js";

const skip = needs({ promtool, prometheus }, "CI: apt-get install prometheus") || farmSkipReason();

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      lastError = err;
    }
    await sleep(250);
  }
  throw new Error(`timed out waiting for ${what}${lastError ? `: ${String(lastError)}` : ""}`);
}

/** Metric family names and types from a text exposition's # TYPE lines. */
function exposedFamilies(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) out.set(m[1] as string, m[2] as string);
  return out;
}

interface PromResponse<T> {
  status: string;
  error?: string;
  data: T;
}
interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

class Prometheus {
  private constructor(
    private readonly proc: ChildProcess,
    private readonly dir: string,
    readonly url: string,
    private readonly log: string[],
  ) {}

  static async start(targets: { job: string; urls: string[] }[]): Promise<Prometheus> {
    const dir = mkdtempSync(join(tmpdir(), "latentfarm-prometheus-"));
    const config = {
      global: { scrape_interval: "1s", evaluation_interval: "1s" },
      rule_files: [rulesFile],
      scrape_configs: targets.map((t) => ({
        job_name: t.job,
        metrics_path: new URL(t.urls[0] as string).pathname,
        static_configs: [{ targets: t.urls.map((u) => new URL(u).host) }],
      })),
    };
    writeFileSync(join(dir, "prometheus.yml"), stringify(config));
    const port = await freePort();
    const log: string[] = [];
    const proc = spawn(
      prometheus as string,
      [
        `--config.file=${join(dir, "prometheus.yml")}`,
        `--storage.tsdb.path=${join(dir, "data")}`,
        `--web.listen-address=127.0.0.1:${port}`,
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    const keep = (b: Buffer): void => {
      log.push(b.toString());
      if (log.length > 50) log.shift();
    };
    proc.stdout?.on("data", keep);
    proc.stderr?.on("data", keep);
    const p = new Prometheus(proc, dir, `http://127.0.0.1:${port}`, log);
    try {
      await until("Prometheus to be ready", 15_000, async () => ((await fetch(`${p.url}/-/ready`)).ok ? true : undefined));
    } catch (err) {
      await p.stop();
      throw new Error(`${String(err)}\n${log.join("")}`, { cause: err });
    }
    return p;
  }

  async api<T>(path: string): Promise<PromResponse<T>> {
    const res = await fetch(`${this.url}/api/v1/${path}`);
    return (await res.json()) as PromResponse<T>;
  }

  async query(expr: string): Promise<PromResponse<{ resultType: string; result: Sample[] }>> {
    return this.api(`query?query=${encodeURIComponent(expr)}`);
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise<void>((r) => this.proc.once("exit", () => r()));
      this.proc.kill("SIGTERM");
      const timer = setTimeout(() => this.proc.kill("SIGKILL"), 5_000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  recentLog(): string {
    return this.log.join("");
  }
}

test("live: the deploy files hold against a running coordinator and agent", { skip, timeout: 180_000 }, async (t) => {
  const farm = await startTestFarm();
  const agentUrls = farm.agentMetricsUrls;
  let prom: Prometheus | undefined;
  let gateway: ServiceProcess | undefined;
  try {
    // The A1111 API gateway in front of it, with one call made, so its labelled series exist.
    gateway = await startService(["a1111-api", "--coordinator", farm.coordinatorAddress, "--port", "0", "--metrics-port", "0"]);
    const gatewayMetricsUrl = String(gateway.ready["metrics"]);
    assert.equal((await fetch(`${String(gateway.ready["url"])}/sdapi/v1/progress`)).status, 200);
    const scrape = async (url: string): Promise<string> => {
      const res = await fetch(url);
      assert.equal(res.status, 200, `GET ${url}`);
      return res.text();
    };

    await t.test("promtool check metrics passes on the live /metrics of both services", async () => {
      for (const url of [farm.coordinatorMetricsUrl, ...agentUrls, gatewayMetricsUrl]) {
        const { status, problems } = lintExposition(await scrape(url));
        assert.deepEqual(problems, [], `promtool check metrics ${url}`);
        assert.notEqual(status, 1, `${url} parses`);
      }
    });

    await t.test("the README's metric names equal the names the services expose", async () => {
      const coordinator = exposedFamilies(await scrape(farm.coordinatorMetricsUrl));
      const agent = exposedFamilies(await scrape(agentUrls[0] as string));
      const a1111Api = exposedFamilies(await scrape(gatewayMetricsUrl));
      const exposed = new Map([...coordinator, ...agent, ...a1111Api].filter(([n]) => n.startsWith("latentfarm_")));
      const documented = documentedMetrics(readFileSync(readmeFile, "utf8"));
      assert.deepEqual([...exposed.keys()].sort(), documented.map((d) => d.name).sort());
      for (const d of documented) assert.equal(exposed.get(d.name), d.type, `${d.name} type`);
      for (const m of catalog()) {
        const by = { coordinator, agent, "a1111-api": a1111Api }[m.service];
        assert.ok(by.has(m.name), `${m.name} is served by the ${m.service}`);
      }
    });

    prom = await Prometheus.start([
      { job: "latentfarm-coordinator", urls: [farm.coordinatorMetricsUrl] },
      { job: "latentfarm-agent", urls: agentUrls },
      { job: "latentfarm-a1111-api", urls: [gatewayMetricsUrl] },
    ]);
    const p = prom;
    await until("every target to be up", 20_000, async () => {
      const r = await p.api<{ activeTargets: { health: string }[] }>("targets");
      const targets = r.data.activeTargets;
      return targets.length === 2 + agentUrls.length && targets.every((x) => x.health === "up") ? true : undefined;
    });

    await farm.runJob();
    // rate() needs two samples of a series that the job created; at 1 s scrapes, wait for three.
    for (const metric of ["latentfarm_jobs_finished_total", "latentfarm_agent_tasks_total", "latentfarm_unet_steps_total"]) {
      await until(`three scrapes of ${metric} after the job`, 30_000, async () => {
        const r = await p.query(`min(count_over_time(${metric}[1m])) >= 3`);
        return r.data.result.length > 0 ? true : undefined;
      });
    }

    await t.test("every dashboard panel without a DCGM metric returns data", async () => {
      const failures: string[] = [];
      let checked = 0;
      for (const board of dashboards()) {
        for (const target of panelTargets(board)) {
          if (metricNamesIn(target.expr).some(isDcgm)) continue;
          checked++;
          const expr = substituteGrafanaVariables(target.expr);
          const r = await p.query(expr);
          if (r.status !== "success") failures.push(`${board.file} panel ${target.panelId} "${target.panelTitle}" ${target.refId}: ${r.error}`);
          else if (r.data.result.length === 0) failures.push(`${board.file} panel ${target.panelId} "${target.panelTitle}" ${target.refId}: no data for ${expr}`);
        }
      }
      assert.ok(checked > 30, `checked ${checked} panel queries`);
      assert.deepEqual(failures, []);
    });

    await t.test("the shipped rules evaluate, and a healthy farm raises no down/no-agent alert", async () => {
      const r = await p.api<{ groups: { name: string; rules: { name: string; health: string; lastError?: string }[] }[] }>("rules");
      const rules = r.data.groups.flatMap((g) => g.rules);
      assert.ok(rules.length > 0, "rules loaded");
      assert.deepEqual(rules.filter((x) => x.health !== "ok").map((x) => `${x.name}: ${x.health} ${x.lastError ?? ""}`), []);
      const alerts = await p.query('ALERTS{alertname=~"LatentfarmDown|LatentfarmNoAgents"}');
      assert.deepEqual(alerts.data.result.map((s) => s.metric), []);
    });
  } catch (err) {
    if (prom) throw new Error(`${String(err)}\n--- prometheus log ---\n${prom.recentLog()}`, { cause: err });
    throw err;
  } finally {
    await prom?.stop();
    await gateway?.kill();
    await farm.close();
  }
});
