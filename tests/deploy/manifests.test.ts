// Renders every kustomization under deploy/kustomize with `kubectl kustomize`, validates each object
// against the Kubernetes (and KEDA, prometheus-operator) JSON schemas, type-checks it against the
// TypeScript interfaces (which catch unknown fields), and checks what the schemas cannot know: that
// agents get a GPU, probe the plaintext health port, outlive their drain, advertise a resolvable
// name, scale on the right JetStream consumer, and that the NetworkPolicies isolate what they claim.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { spawnSync } from "node:child_process";
import { parse as parseYaml } from "yaml";
import { Namespace } from "kubernetes-models/v1/Namespace";
import { ServiceAccount } from "kubernetes-models/v1/ServiceAccount";
import { Service } from "kubernetes-models/v1/Service";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { Secret } from "kubernetes-models/v1/Secret";
import { PersistentVolumeClaim } from "kubernetes-models/v1/PersistentVolumeClaim";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { StatefulSet } from "kubernetes-models/apps/v1/StatefulSet";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1/PodDisruptionBudget";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1/NetworkPolicy";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import {
  at,
  dashboardsDir,
  findTool,
  kubectl,
  kustomizations,
  kustomizeDir,
  needs,
  readmeFile,
  render,
  type K8sObject,
} from "./deploy-helpers.js";
import { kindKey, typeCheckManifests, TYPED_KINDS } from "./typecheck-manifests.js";
import { ingressAllowed, type NamespaceRef, type PodRef } from "./network-policy.js";

const skip = needs({ kubectl }, "CI installs it; see deploy/README.md");

type Validating = new (data: never) => { validate(): void };
const MODELS: Record<string, Validating> = {
  "v1/Namespace": Namespace,
  "v1/ServiceAccount": ServiceAccount,
  "v1/Service": Service,
  "v1/ConfigMap": ConfigMap,
  "v1/Secret": Secret,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim,
  "apps/v1/Deployment": Deployment,
  "apps/v1/StatefulSet": StatefulSet,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
  "networking.k8s.io/v1/NetworkPolicy": NetworkPolicy,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

/** Secrets the TLS component mounts; operators create them (deploy/README.md, "Secrets"). */
const OUT_OF_BAND_SECRETS = ["latentfarm-tls", "latentfarm-api-tokens"];

/** The production overlay with the example agent pool added, as an operator would compose them. */
function renderProdWithPool(): K8sObject[] {
  const dir = mkdtempSync(join(tmpdir(), "latentfarm-kustomize-"));
  try {
    const rel = (p: string): string => relative(dir, join(kustomizeDir, p));
    writeFileSync(
      join(dir, "kustomization.yaml"),
      [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "namespace: latentfarm",
        "resources:",
        `  - ${rel("overlays/prod")}`,
        `  - ${rel("pools/xl")}`,
        "",
      ].join("\n"),
    );
    return render(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const renderings: Map<string, K8sObject[]> = new Map();
if (!skip) {
  for (const dir of kustomizations()) renderings.set(relative(kustomizeDir, dir), render(dir));
  renderings.set("overlays/prod + pools/xl", renderProdWithPool());
}
const overlays = [...renderings.keys()].filter((k) => k.startsWith("overlays/"));
/** Renderings of a whole farm, as opposed to an agent pool on its own. */
const isFarm = (name: string): boolean => name === "base" || name.startsWith("overlays/");

// ---- small readers over rendered objects

interface Container {
  name: string;
  image?: string;
  args?: string[];
  env?: { name: string; value?: string; valueFrom?: unknown }[];
  ports?: { name?: string; containerPort: number }[];
  resources?: { requests?: Record<string, string | number>; limits?: Record<string, string | number> };
  securityContext?: Record<string, unknown>;
  readinessProbe?: Record<string, unknown>;
  livenessProbe?: Record<string, unknown>;
  startupProbe?: Record<string, unknown>;
  volumeMounts?: { name: string; mountPath: string; readOnly?: boolean }[];
}
const isWorkload = (o: K8sObject): boolean => ["Deployment", "StatefulSet", "DaemonSet"].includes(o.kind);
const podSpec = (o: K8sObject): Record<string, unknown> => at(o, "spec", "template", "spec") as Record<string, unknown>;
const podLabels = (o: K8sObject): Record<string, string> => (at(o, "spec", "template", "metadata", "labels") as Record<string, string>) ?? {};
const containers = (o: K8sObject): Container[] => (podSpec(o)["containers"] as Container[]) ?? [];
const selects = (selector: Record<string, string> | undefined, labels: Record<string, string>): boolean =>
  selector !== undefined && Object.entries(selector).every(([k, v]) => labels[k] === v);
const find = (objs: K8sObject[], kind: string, name: string): K8sObject | undefined =>
  objs.find((o) => o.kind === kind && o.metadata.name === name);

/** Value following `--flag` (or in `--flag=value`) in an argument list. */
function flag(args: string[], name: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    if (a === name) return args[i + 1];
    if (a.startsWith(`${name}=`)) return a.slice(name.length + 1);
  }
  return undefined;
}
const isAgent = (o: K8sObject): boolean => o.kind === "StatefulSet" && o.metadata.labels?.["app.kubernetes.io/component"] === "gpu-agent";
const isCoordinator = (o: K8sObject): boolean =>
  o.kind === "Deployment" && o.metadata.labels?.["app.kubernetes.io/component"] === "coordinator";
const quantity = (v: string | number | undefined): number | undefined => (v === undefined ? undefined : Number(v));

function forEachRendering(fn: (name: string, objs: K8sObject[]) => void): void {
  assert.ok(renderings.size >= 4, `expected base, two overlays and a pool, rendered ${[...renderings.keys()].join(", ")}`);
  for (const [name, objs] of renderings) fn(name, objs);
}

// ---- tests

test("every kustomization renders, and the dev and prod overlays exist", { skip }, () => {
  assert.deepEqual(overlays.filter((o) => !o.includes("+")).sort(), ["overlays/dev", "overlays/prod"]);
  forEachRendering((name, objs) => {
    assert.ok(objs.length > 0, `${name} rendered nothing`);
    const keys = objs.map((o) => `${o.kind}/${o.metadata.namespace ?? ""}/${o.metadata.name}`);
    assert.deepEqual(keys.filter((k, i) => keys.indexOf(k) !== i), [], `${name}: duplicate objects`);
  });
});

test("every rendered object validates against its JSON schema", { skip }, () => {
  const problems: string[] = [];
  forEachRendering((name, objs) => {
    for (const o of objs) {
      const Model = MODELS[kindKey(o)];
      if (!Model) {
        problems.push(`${name} ${o.kind}/${o.metadata.name}: no validator for ${kindKey(o)}`);
        continue;
      }
      try {
        new Model(o as never).validate();
      } catch (err) {
        problems.push(`${name} ${o.kind}/${o.metadata.name}: ${(err as Error).message}`);
      }
    }
  });
  assert.deepEqual(problems, []);
});

test("every rendered object type-checks, so no field is unknown", { skip }, () => {
  assert.deepEqual(Object.keys(MODELS).sort(), Object.keys(TYPED_KINDS).sort(), "validators and types cover the same kinds");
  const objects: { label: string; object: K8sObject }[] = [];
  forEachRendering((name, objs) => {
    for (const o of objs) objects.push({ label: `${name} ${o.kind}/${o.metadata.name}`, object: o });
  });
  // A typo the JSON schema accepts must fail here, or this check proves nothing (compiled together
  // with the rest, because each TypeScript program costs seconds).
  const mutated = structuredClone((renderings.get("base") ?? []).find(isAgent));
  assert.ok(mutated, "base renders an agent StatefulSet");
  (containers(mutated)[0] as Container & Record<string, unknown>)["readinessProbe"] = { grpcc: { port: 50053 } };
  new StatefulSet(mutated as never).validate();
  objects.push({ label: "mutation", object: mutated });

  const problems = typeCheckManifests(objects);
  const [caught, ...others] = problems.filter((p) => p.startsWith("mutation: "));
  assert.match(caught ?? "", /'"grpcc"' does not exist/, "the type check catches an unknown field");
  assert.deepEqual(others, []);
  assert.deepEqual(problems.filter((p) => !p.startsWith("mutation: ")), []);
});

test("overlays put every object in one namespace and pin every image", { skip }, () => {
  for (const name of overlays) {
    const objs = renderings.get(name) ?? [];
    const namespaces = objs.filter((o) => o.kind === "Namespace").map((o) => o.metadata.name);
    assert.equal(namespaces.length, 1, `${name} creates its namespace`);
    for (const o of objs) {
      if (o.kind === "Namespace") continue;
      assert.equal(o.metadata.namespace, namespaces[0], `${name} ${o.kind}/${o.metadata.name} namespace`);
    }
  }
  forEachRendering((name, objs) => {
    for (const w of objs.filter(isWorkload)) {
      for (const c of containers(w)) {
        assert.ok(c.image, `${name} ${w.metadata.name}/${c.name} has an image`);
        assert.match(c.image, /(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$/, `${name} ${w.metadata.name}/${c.name} image has a tag`);
        assert.doesNotMatch(c.image, /:latest$/, `${name} ${w.metadata.name}/${c.name} image is not :latest`);
      }
    }
  });
});

test("every pod runs non-root, read-only, without privileges, within resource limits", { skip }, () => {
  forEachRendering((name, objs) => {
    for (const w of objs.filter(isWorkload)) {
      const where = `${name} ${w.kind}/${w.metadata.name}`;
      const psc = podSpec(w)["securityContext"] as Record<string, unknown> | undefined;
      assert.equal(psc?.["runAsNonRoot"], true, `${where}: runAsNonRoot`);
      assert.ok(Number(psc?.["runAsUser"]) > 0, `${where}: numeric non-root runAsUser`);
      assert.equal(at(psc, "seccompProfile", "type"), "RuntimeDefault", `${where}: seccomp`);
      assert.equal(podSpec(w)["automountServiceAccountToken"], false, `${where}: no API token`);
      for (const c of containers(w)) {
        const sc = c.securityContext ?? {};
        assert.equal(sc["allowPrivilegeEscalation"], false, `${where}/${c.name}: allowPrivilegeEscalation`);
        assert.equal(sc["readOnlyRootFilesystem"], true, `${where}/${c.name}: readOnlyRootFilesystem`);
        assert.deepEqual(at(sc, "capabilities", "drop"), ["ALL"], `${where}/${c.name}: capabilities`);
        for (const r of ["cpu", "memory"]) {
          assert.ok(c.resources?.requests?.[r] !== undefined, `${where}/${c.name}: requests.${r}`);
          assert.ok(c.resources?.limits?.[r] !== undefined, `${where}/${c.name}: limits.${r}`);
        }
      }
    }
  });
});

test("selectors, Services, named ports and PodDisruptionBudgets line up with the pods", { skip }, () => {
  forEachRendering((name, objs) => {
    const workloads = objs.filter(isWorkload);
    for (const w of workloads) {
      const sel = at(w, "spec", "selector", "matchLabels") as Record<string, string>;
      assert.ok(selects(sel, podLabels(w)), `${name} ${w.metadata.name}: selector matches its template`);
      for (const other of workloads) {
        if (other !== w) assert.ok(!selects(sel, podLabels(other)), `${name} ${w.metadata.name} also selects ${other.metadata.name}'s pods`);
      }
    }
    for (const svc of objs.filter((o) => o.kind === "Service")) {
      const sel = at(svc, "spec", "selector") as Record<string, string>;
      const backends = workloads.filter((w) => selects(sel, podLabels(w)));
      assert.ok(backends.length > 0, `${name} Service ${svc.metadata.name} selects no pods`);
      for (const port of (at(svc, "spec", "ports") as { name: string; targetPort?: string | number }[]) ?? []) {
        if (typeof port.targetPort !== "string") continue;
        for (const b of backends) {
          const named = containers(b).flatMap((c) => c.ports ?? []).map((p) => p.name);
          assert.ok(named.includes(port.targetPort), `${name} Service ${svc.metadata.name} port ${port.targetPort} not on ${b.metadata.name}`);
        }
      }
    }
    for (const pdb of objs.filter((o) => o.kind === "PodDisruptionBudget")) {
      const sel = at(pdb, "spec", "selector", "matchLabels") as Record<string, string>;
      assert.equal(workloads.filter((w) => selects(sel, podLabels(w))).length, 1, `${name} PDB ${pdb.metadata.name} covers one workload`);
    }
    for (const w of workloads) {
      assert.ok(
        objs.some((p) => p.kind === "PodDisruptionBudget" && selects(at(p, "spec", "selector", "matchLabels") as Record<string, string>, podLabels(w))),
        `${name} ${w.metadata.name} has a PodDisruptionBudget`,
      );
    }
  });
});

test("agents: one GPU each, on GPU nodes, probed on the plaintext health port", { skip }, () => {
  forEachRendering((name, objs) => {
    const agents = objs.filter(isAgent);
    assert.ok(agents.length > 0, `${name} renders an agent StatefulSet`);
    for (const a of agents) {
      const where = `${name} ${a.metadata.name}`;
      const c = containers(a).find((x) => x.name === "agent");
      assert.ok(c, `${where}: container "agent"`);
      const args = c.args ?? [];
      assert.equal(args[0], "agent", `${where}: runs \`latentfarm agent\``);
      for (const f of ["--port", "--nats", "--models", "--ep", "--device-id", "--metrics-port", "--health-port", "--advertise-address"]) {
        assert.ok(flag(args, f) !== undefined, `${where}: ${f}`);
      }
      assert.equal(flag(args, "--ep"), "cuda", `${where}: CUDA execution provider`);
      // LoRAs, embeddings and VAE files come from the models volume the agent mounts.
      for (const f of ["--loras", "--embeddings", "--vae-dir"]) assert.ok(flag(args, f)?.startsWith(`${flag(args, "--models")}/`), `${where}: ${f} on the models volume`);
      assert.equal(quantity(c.resources?.limits?.["nvidia.com/gpu"]), 1, `${where}: limits nvidia.com/gpu 1`);
      const gpuRequest = c.resources?.requests?.["nvidia.com/gpu"];
      if (gpuRequest !== undefined) assert.equal(quantity(gpuRequest), 1, `${where}: GPU request equals the limit`);
      const tolerations = (podSpec(a)["tolerations"] as { key?: string; operator?: string }[]) ?? [];
      assert.ok(tolerations.some((t) => t.key === "nvidia.com/gpu" && t.operator === "Exists"), `${where}: tolerates GPU taints`);
      const terms = at(podSpec(a), "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms");
      assert.ok(Array.isArray(terms) && terms.length > 0, `${where}: required node affinity for GPU nodes`);

      const mainPort = Number(flag(args, "--port"));
      const healthPort = Number(flag(args, "--health-port"));
      assert.notEqual(healthPort, mainPort, `${where}: the health port is separate from the (possibly mTLS) main port`);
      assert.deepEqual(at(c.readinessProbe, "grpc"), { port: healthPort, service: "" }, `${where}: readiness probe`);
      assert.deepEqual(at(c.livenessProbe, "grpc"), { port: healthPort, service: "liveness" }, `${where}: liveness probe`);
      if (c.startupProbe) assert.equal(at(c.startupProbe, "grpc", "port"), healthPort, `${where}: startup probe`);
      const ports = Object.fromEntries((c.ports ?? []).map((p) => [p.name, p.containerPort]));
      assert.equal(ports["grpc"], mainPort, `${where}: grpc containerPort`);
      assert.equal(ports["health"], healthPort, `${where}: health containerPort`);
      assert.equal(ports["metrics"], Number(flag(args, "--metrics-port")), `${where}: metrics containerPort`);

      const drain = Number(flag(args, "--drain-seconds") ?? 300);
      const grace = Number(podSpec(a)["terminationGracePeriodSeconds"]);
      assert.ok(grace >= drain + 15, `${where}: terminationGracePeriodSeconds ${grace} must exceed --drain-seconds ${drain} with a margin`);

      const models = flag(args, "--models");
      const mount = c.volumeMounts?.find((m) => m.mountPath === models);
      assert.ok(mount, `${where}: a volume is mounted at --models ${models}`);
      const volume = (podSpec(a)["volumes"] as { name: string; persistentVolumeClaim?: { claimName: string } }[]).find((v) => v.name === mount.name);
      const claim = volume?.persistentVolumeClaim?.claimName;
      assert.ok(claim && find(objs, "PersistentVolumeClaim", claim), `${where}: the model cache is a rendered PVC (${claim})`);
    }
  });
});

test("agents advertise their stable per-pod DNS name under a headless Service", { skip }, () => {
  forEachRendering((name, objs) => {
    for (const a of objs.filter(isAgent)) {
      const where = `${name} ${a.metadata.name}`;
      const svcName = at(a, "spec", "serviceName") as string;
      const svc = find(objs, "Service", svcName);
      assert.ok(svc, `${where}: serviceName ${svcName} is rendered`);
      assert.equal(at(svc, "spec", "clusterIP"), "None", `${where}: ${svcName} is headless`);
      assert.ok(selects(at(svc, "spec", "selector") as Record<string, string>, podLabels(a)), `${where}: ${svcName} selects the agents`);
      const c = containers(a)[0] as Container;
      const env = Object.fromEntries((c.env ?? []).map((e) => [e.name, e]));
      assert.deepEqual(at(env["POD_NAME"], "valueFrom", "fieldRef", "fieldPath"), "metadata.name");
      assert.deepEqual(at(env["POD_NAMESPACE"], "valueFrom", "fieldRef", "fieldPath"), "metadata.namespace");
      const advertised = flag(c.args ?? [], "--advertise-address") ?? "";
      // Kubernetes expands $(VAR) in args from the container's env.
      const expanded = advertised.replace(/\$\((\w+)\)/g, (_, v: string) => env[v]?.value ?? `<${v}>`);
      assert.equal(expanded, `<POD_NAME>.${svcName}.<POD_NAMESPACE>.svc:${flag(c.args ?? [], "--port")}`, `${where}: advertised address`);
    }
  });
});

test("each agent pool scales with KEDA on its JetStream consumer of LF_TASKS", { skip }, () => {
  forEachRendering((name, objs) => {
    for (const a of objs.filter(isAgent)) {
      const where = `${name} ${a.metadata.name}`;
      const scalers = objs.filter(
        (o) => o.kind === "ScaledObject" && at(o, "spec", "scaleTargetRef", "kind") === "StatefulSet" && at(o, "spec", "scaleTargetRef", "name") === a.metadata.name,
      );
      assert.equal(scalers.length, 1, `${where}: one ScaledObject targets it`);
      const so = scalers[0] as K8sObject;
      assert.ok(Number(at(so, "spec", "minReplicaCount")) >= 1, `${where}: keeps one warm agent`);
      assert.ok(Number(at(so, "spec", "maxReplicaCount")) >= Number(at(so, "spec", "minReplicaCount")), `${where}: max >= min`);
      const triggers = at(so, "spec", "triggers") as { type: string; metadata: Record<string, string> }[];
      assert.equal(triggers.length, 1);
      const t = triggers[0] as { type: string; metadata: Record<string, string> };
      assert.equal(t.type, "nats-jetstream");
      assert.equal(t.metadata["stream"], "LF_TASKS");
      const pool = podLabels(a)["latentfarm.dev/pool"];
      assert.equal(t.metadata["consumer"], pool === "default" ? "agents" : `agents-${pool}`, `${where}: consumer of pool ${pool}`);
      const consumerFlag = flag(containers(a)[0]?.args ?? [], "--consumer");
      if (pool !== "default") assert.equal(consumerFlag, t.metadata["consumer"], `${where}: the agents pull from the consumer KEDA watches`);
      assert.ok(Number(t.metadata["lagThreshold"]) > 0, `${where}: lagThreshold`);

      // host.namespace.svc.cluster.local:8222 must name a rendered headless NATS Service with that port.
      const m = /^([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)$/.exec(t.metadata["natsServerMonitoringEndpoint"] ?? "");
      assert.ok(m, `${where}: natsServerMonitoringEndpoint ${t.metadata["natsServerMonitoringEndpoint"]}`);
      if (!isFarm(name)) continue;
      const nats = find(objs, "Service", m[1] as string);
      assert.ok(nats, `${where}: ${m[1]} is rendered`);
      assert.equal(at(nats, "spec", "clusterIP"), "None", `${where}: KEDA reaches each consumer leader by name through a headless Service`);
      assert.ok((at(nats, "spec", "ports") as { port: number }[]).some((p) => p.port === Number(m[3])), `${where}: port ${m[3]}`);
      if (so.metadata.namespace) assert.equal(m[2], so.metadata.namespace, `${where}: endpoint namespace`);
    }
  });
});

test("the coordinator runs `latentfarm coordinator` against the rendered NATS Service", { skip }, () => {
  forEachRendering((name, objs) => {
    const coordinators = objs.filter(isCoordinator);
    if (isFarm(name)) assert.equal(coordinators.length, 1, `${name}: one coordinator`);
    for (const d of coordinators) {
      const c = containers(d)[0] as Container;
      const args = c.args ?? [];
      assert.equal(args[0], "coordinator");
      for (const f of ["--port", "--nats", "--metrics-port"]) assert.ok(flag(args, f), `${name}: coordinator ${f}`);
      const ports = Object.fromEntries((c.ports ?? []).map((p) => [p.name, p.containerPort]));
      assert.equal(ports["grpc"], Number(flag(args, "--port")));
      assert.equal(ports["metrics"], Number(flag(args, "--metrics-port")));
      const healthPort = Number(flag(args, "--health-port") ?? flag(args, "--port"));
      assert.equal(at(c.readinessProbe, "grpc", "port"), healthPort, `${name}: coordinator readiness on its plaintext gRPC port`);
      assert.equal(at(c.livenessProbe, "grpc", "port"), healthPort, `${name}: coordinator liveness on its plaintext gRPC port`);
      if (flag(args, "--tls-cert")) assert.ok(flag(args, "--health-port"), `${name}: with TLS, probes need a plaintext --health-port`);
      // Its styles file is a ConfigMap key, mounted as a folder (a subPath mount would never see an edit).
      const styles = flag(args, "--styles-file");
      if (styles !== undefined && isFarm(name)) {
        const mount = c.volumeMounts?.find((m) => styles.startsWith(`${m.mountPath}/`));
        assert.ok(mount && !("subPath" in mount), `${name}: --styles-file ${styles} is in a folder mount`);
        const volume = (podSpec(d)["volumes"] as { name: string; configMap?: { name: string } }[]).find((v) => v.name === mount.name);
        const cm = find(objs, "ConfigMap", volume?.configMap?.name ?? "");
        const key = styles.slice(mount.mountPath.length + 1);
        assert.ok(cm && typeof at(cm, "data", key) === "string", `${name}: the styles ConfigMap has ${key}`);
        assert.match(at(cm, "data", key) as string, /^name,prompt,negative_prompt\n/, `${name}: an A1111 styles.csv header`);
      }
    }
    for (const w of objs.filter((o) => isCoordinator(o) || isAgent(o))) {
      const url = flag(containers(w)[0]?.args ?? [], "--nats") ?? "";
      const m = /^nats:\/\/([a-z0-9-]+):(\d+)$/.exec(url);
      assert.ok(m, `${name} ${w.metadata.name}: --nats ${url}`);
      if (isFarm(name)) {
        const svc = find(objs, "Service", m[1] as string);
        assert.ok(svc, `${name}: NATS Service ${m[1]} is rendered`);
        assert.ok((at(svc, "spec", "ports") as { port: number }[]).some((p) => p.port === Number(m[2])));
      }
    }
  });
});

test("NATS runs JetStream on file storage, fsyncs every write, and prod is a three-server cluster", { skip }, () => {
  for (const name of ["base", ...overlays]) {
    const objs = renderings.get(name) ?? [];
    const sts = find(objs, "StatefulSet", "latentfarm-nats");
    assert.ok(sts, `${name}: NATS StatefulSet`);
    const claims = (at(sts, "spec", "volumeClaimTemplates") as { metadata: { name: string } }[]) ?? [];
    const c = containers(sts)[0] as Container;
    const configVolume = (podSpec(sts)["volumes"] as { name: string; configMap?: { name: string } }[]).find((v) => v.configMap);
    const cm = find(objs, "ConfigMap", configVolume?.configMap?.name ?? "");
    assert.ok(cm, `${name}: the NATS config ConfigMap is rendered`);
    const conf = (at(cm, "data", "nats.conf") as string) ?? "";
    assert.match(conf, /sync_interval:\s*always/, `${name}: sync_interval always`);
    const storeDir = /store_dir:\s*(\S+)/.exec(conf)?.[1] ?? "";
    const dataMount = c.volumeMounts?.find((m) => storeDir.startsWith(m.mountPath));
    assert.ok(dataMount && claims.some((cl) => cl.metadata.name === dataMount.name), `${name}: store_dir ${storeDir} is on a PersistentVolumeClaim`);
    const replicas = Number(at(sts, "spec", "replicas") ?? 1);
    const routes = [...conf.matchAll(/nats:\/\/([a-z0-9-]+)-(\d+)\.([a-z0-9-]+):6222/g)];
    if (name.includes("prod")) {
      assert.equal(replicas, 3, `${name}: three NATS servers`);
      assert.deepEqual(routes.map((r) => Number(r[2])).sort(), [0, 1, 2], `${name}: one route per server`);
      for (const r of routes) {
        assert.equal(r[1], sts.metadata.name, `${name}: route host is a pod of the StatefulSet`);
        assert.equal(r[3], at(sts, "spec", "serviceName"), `${name}: route goes through the headless Service`);
      }
    } else {
      assert.equal(routes.length, 0, `${name}: a single server has no routes`);
    }
  }
});

const natsServer = findTool("nats-server");
test("the rendered NATS configs parse (nats-server -t)", { skip: skip || needs({ "nats-server": natsServer }, "CI: apt-get install nats-server") }, () => {
  const dir = mkdtempSync(join(tmpdir(), "latentfarm-nats-"));
  try {
    for (const name of ["base", ...overlays]) {
      const cm = (renderings.get(name) ?? []).find((o) => o.kind === "ConfigMap" && at(o, "data", "nats.conf") !== undefined);
      assert.ok(cm, `${name}: NATS ConfigMap`);
      // Debian's 2.9 server predates sync_interval (2.10) and rejects it; the images run 2.12.
      const conf = (at(cm, "data", "nats.conf") as string).replace(/^\s*sync_interval:.*$/m, "");
      const file = join(dir, "nats.conf");
      writeFileSync(file, conf);
      const r = spawnSync(natsServer as string, ["-c", file, "-t"], { encoding: "utf8", env: { ...process.env, POD_NAME: "latentfarm-nats-0" } });
      assert.equal(r.status, 0, `${name}: ${r.stdout}${r.stderr}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("NetworkPolicies: only the coordinator reaches agents, only farm pods reach NATS", { skip }, () => {
  for (const name of overlays) {
    const objs = renderings.get(name) ?? [];
    const policies = objs.filter((o) => o.kind === "NetworkPolicy");
    const ns = objs.find((o) => o.kind === "Namespace")?.metadata.name ?? "latentfarm";
    const namespaces: NamespaceRef[] = [
      { name: ns, labels: { "kubernetes.io/metadata.name": ns } },
      { name: "monitoring", labels: { "kubernetes.io/metadata.name": "monitoring" } },
      { name: "keda", labels: { "kubernetes.io/metadata.name": "keda" } },
      { name: "elsewhere", labels: { "kubernetes.io/metadata.name": "elsewhere" } },
    ];
    const pod = (w: K8sObject): PodRef => ({
      namespace: ns,
      labels: podLabels(w),
      namedPorts: Object.fromEntries(containers(w).flatMap((c) => c.ports ?? []).map((p) => [p.name ?? "", p.containerPort])),
    });
    const coordinator = objs.find(isCoordinator);
    const agents = objs.filter(isAgent);
    const nats = find(objs, "StatefulSet", "latentfarm-nats");
    assert.ok(coordinator && agents.length && nats, `${name}: coordinator, agents and NATS rendered`);
    const stranger: PodRef = { namespace: ns, labels: { app: "debug-shell" } };
    const otherNs: PodRef = { namespace: "elsewhere", labels: podLabels(coordinator) };
    const prometheusPod: PodRef = { namespace: "monitoring", labels: { "app.kubernetes.io/name": "prometheus" } };
    const kedaPod: PodRef = { namespace: "keda", labels: { app: "keda-operator" } };
    const allow = (target: K8sObject, port: number, source: PodRef): boolean => ingressAllowed(policies, pod(target), port, source, namespaces);

    for (const a of agents) {
      const args = containers(a)[0]?.args ?? [];
      const grpcPort = Number(flag(args, "--port"));
      const metricsPort = Number(flag(args, "--metrics-port"));
      assert.ok(allow(a, grpcPort, pod(coordinator)), `${name}: coordinator -> agent`);
      assert.ok(!allow(a, grpcPort, stranger), `${name}: other pod -> agent is denied`);
      assert.ok(!allow(a, grpcPort, pod(nats)), `${name}: NATS -> agent is denied`);
      assert.ok(!allow(a, grpcPort, otherNs), `${name}: a coordinator-lookalike in another namespace is denied`);
      for (const other of agents) assert.ok(!allow(a, grpcPort, pod(other)), `${name}: agent -> agent is denied`);
      assert.ok(allow(a, metricsPort, prometheusPod), `${name}: Prometheus scrapes agents`);
      assert.ok(!allow(a, metricsPort, stranger), `${name}: others cannot read agent metrics`);
    }
    for (const client of [coordinator, ...agents]) assert.ok(allow(nats, 4222, pod(client)), `${name}: ${client.metadata.name} -> NATS`);
    assert.ok(!allow(nats, 4222, stranger), `${name}: other pod -> NATS is denied`);
    assert.ok(!allow(nats, 4222, { ...otherNs, labels: podLabels(agents[0] as K8sObject) }), `${name}: other namespace -> NATS is denied`);
    assert.ok(!allow(nats, 4222, kedaPod), `${name}: KEDA gets no client access`);
    assert.ok(allow(nats, 8222, kedaPod), `${name}: KEDA reads JetStream lag`);
    assert.ok(allow(nats, 6222, pod(nats)), `${name}: NATS servers route to each other`);
    assert.ok(!allow(nats, 6222, pod(coordinator)), `${name}: clients cannot join the cluster port`);
    const coordinatorArgs = containers(coordinator)[0]?.args ?? [];
    assert.ok(allow(coordinator, Number(flag(coordinatorArgs, "--port")), { namespace: "elsewhere", labels: {} }), `${name}: clients reach the API`);
    assert.ok(!allow(coordinator, Number(flag(coordinatorArgs, "--metrics-port")), stranger), `${name}: others cannot read coordinator metrics`);
    const gateway = find(objs, "Deployment", "latentfarm-a1111-api");
    assert.ok(gateway, `${name}: the A1111 API gateway is rendered`);
    const gatewayPort = Number(flag(containers(gateway)[0]?.args ?? [], "--port"));
    assert.ok(allow(gateway, gatewayPort, { namespace: "elsewhere", labels: {} }), `${name}: A1111 API clients reach the gateway`);
    assert.ok(!allow(gateway, gatewayPort + 1, stranger), `${name}: nothing else on the gateway is open`);
    const gatewayMetrics = Number(flag(containers(gateway)[0]?.args ?? [], "--metrics-port"));
    assert.ok(allow(gateway, gatewayMetrics, prometheusPod), `${name}: Prometheus scrapes the gateway`);
    assert.ok(!allow(gateway, gatewayMetrics, stranger), `${name}: others cannot read the gateway's metrics`);
    assert.ok(allow(coordinator, Number(flag(coordinatorArgs, "--port")), pod(gateway)), `${name}: gateway -> coordinator`);
  }
});

test("the A1111 API gateway runs `latentfarm a1111-api` against the coordinator Service, checking its certificate under TLS", { skip }, () => {
  forEachRendering((name, objs) => {
    const gateway = find(objs, "Deployment", "latentfarm-a1111-api");
    if (!isFarm(name) && !gateway) return;
    assert.ok(gateway, `${name}: the gateway is rendered`);
    const c = containers(gateway)[0] as Container;
    const args = c.args ?? [];
    assert.equal(args[0], "a1111-api");
    assert.equal(flag(args, "--host"), "0.0.0.0", `${name}: the gateway listens beyond loopback`);
    const port = Number(flag(args, "--port"));
    const http = (c.ports ?? []).find((p) => p.name === "http");
    assert.equal(http?.containerPort, port, `${name}: its named port is --port`);
    for (const probe of [c.readinessProbe, c.livenessProbe]) {
      assert.equal(at(probe, "httpGet", "path"), "/sdapi/v1/progress", `${name}: probed on a route that needs no coordinator call`);
      assert.equal(at(probe, "httpGet", "port"), "http");
    }
    const [host, coordinatorPort] = (flag(args, "--coordinator") ?? "").split(":");
    const coordinator = objs.find(isCoordinator);
    assert.ok(coordinator, `${name}: a coordinator`);
    assert.equal(Number(coordinatorPort), Number(flag(containers(coordinator)[0]?.args ?? [], "--port")), `${name}: the coordinator's port`);
    if (isFarm(name)) {
      const svc = find(objs, "Service", host ?? "");
      assert.ok(svc && selects(at(svc, "spec", "selector") as Record<string, string>, podLabels(coordinator)), `${name}: ${host} is the coordinator's Service`);
      // A caller's progress and options live on one replica: with several, its calls must stay there.
      const own = objs.find((o) => o.kind === "Service" && selects(at(o, "spec", "selector") as Record<string, string>, podLabels(gateway)));
      assert.ok(own, `${name}: the gateway has a Service`);
      if (Number(at(gateway, "spec", "replicas") ?? 1) > 1) assert.equal(at(own, "spec", "sessionAffinity"), "ClientIP", `${name}: ClientIP affinity`);
    }
    // Where the coordinator serves TLS, the gateway has the CA to check it by, from the mounted Secret.
    if (flag(containers(coordinator)[0]?.args ?? [], "--tls-cert")) {
      const ca = flag(args, "--tls-ca");
      assert.ok(ca, `${name}: the gateway has --tls-ca`);
      const mount = c.volumeMounts?.find((m) => ca.startsWith(`${m.mountPath}/`));
      const volume = (podSpec(gateway)["volumes"] as { name: string; secret?: { secretName: string } }[]).find((v) => v.name === mount?.name);
      assert.equal(volume?.secret?.secretName, "latentfarm-tls", `${name}: --tls-ca ${ca} is in the TLS Secret`);
    }
  });
});

test("ServiceMonitors select the farm's metrics Services and set stable job names", { skip }, () => {
  forEachRendering((name, objs) => {
    if (!isFarm(name)) return;
    const services = objs.filter((o) => o.kind === "Service");
    const monitors = objs.filter((o) => o.kind === "ServiceMonitor");
    const jobs = new Set<string>();
    for (const sm of monitors) {
      const sel = at(sm, "spec", "selector", "matchLabels") as Record<string, string>;
      const picked = services.filter((s) => selects(sel, s.metadata.labels ?? {}));
      assert.ok(picked.length > 0, `${name} ServiceMonitor ${sm.metadata.name} selects no Service`);
      const jobLabel = at(sm, "spec", "jobLabel") as string;
      for (const s of picked) {
        const portNames = (at(s, "spec", "ports") as { name: string }[]).map((p) => p.name);
        for (const ep of at(sm, "spec", "endpoints") as { port: string }[]) assert.ok(portNames.includes(ep.port), `${name}: ${s.metadata.name} has port ${ep.port}`);
        jobs.add(s.metadata.labels?.[jobLabel] ?? "");
      }
      const metricsPort = (s: K8sObject): boolean => (at(s, "spec", "ports") as { name: string }[]).some((p) => p.name === "metrics");
      for (const s of services.filter(metricsPort)) {
        const n = monitors.filter((m) => selects(at(m, "spec", "selector", "matchLabels") as Record<string, string>, s.metadata.labels ?? {})).length;
        assert.equal(n, 1, `${name}: Service ${s.metadata.name} is scraped exactly once`);
      }
    }
    // The alert rules name the coordinator's and agents' jobs.
    assert.deepEqual([...jobs].sort(), ["latentfarm-a1111-api", "latentfarm-agent", "latentfarm-coordinator"], `${name}: job names`);
  });
});

test("dashboards ship as sidecar ConfigMaps equal to deploy/grafana/dashboards", { skip }, () => {
  forEachRendering((name, objs) => {
    if (!isFarm(name)) return;
    const cms = objs.filter((o) => o.kind === "ConfigMap" && o.metadata.labels?.["grafana_dashboard"] === "1");
    const shipped = new Map<string, string>();
    for (const cm of cms) for (const [file, text] of Object.entries(at(cm, "data") as Record<string, string>)) shipped.set(file, text);
    assert.deepEqual([...shipped.keys()].sort(), ["latentfarm-agents.json", "latentfarm-overview.json", "latentfarm-tenants.json"]);
    for (const [file, text] of shipped) assert.equal(text, readFileSync(join(dashboardsDir, file), "utf8"), `${name}: ${file}`);
  });
});

test("Secrets that pods mount are rendered, or documented for operators to create", { skip }, () => {
  const readme = readFileSync(readmeFile, "utf8");
  for (const s of OUT_OF_BAND_SECRETS) assert.match(readme, new RegExp(`kubectl[^\\n]*create secret[^\\n]*\\b${s}\\b`), `README shows how to create ${s}`);
  forEachRendering((name, objs) => {
    for (const w of objs.filter(isWorkload)) {
      for (const v of (podSpec(w)["volumes"] as { secret?: { secretName: string } }[]) ?? []) {
        const s = v.secret?.secretName;
        if (!s) continue;
        assert.ok(find(objs, "Secret", s) || OUT_OF_BAND_SECRETS.includes(s), `${name} ${w.metadata.name}: Secret ${s}`);
      }
    }
  });
  const prod = renderings.get("overlays/prod") ?? [];
  const mounted = prod.filter(isWorkload).flatMap((w) => ((podSpec(w)["volumes"] as { secret?: { secretName: string } }[]) ?? []).map((v) => v.secret?.secretName));
  for (const s of OUT_OF_BAND_SECRETS) assert.ok(mounted.includes(s), `prod mounts ${s}`);
});

test("the agent's mTLS flags, when present, point at the mounted TLS Secret", { skip }, () => {
  forEachRendering((name, objs) => {
    for (const w of objs.filter((o) => isAgent(o) || isCoordinator(o))) {
      const c = containers(w)[0] as Container;
      const files = ["--tls-cert", "--tls-key", "--tls-ca", "--api-tokens-file"].map((f) => flag(c.args ?? [], f)).filter((f): f is string => !!f);
      for (const file of files) {
        const mount = c.volumeMounts?.find((m) => file.startsWith(`${m.mountPath}/`));
        assert.ok(mount, `${name} ${w.metadata.name}: ${file} is on a mounted volume`);
        const vol = (podSpec(w)["volumes"] as { name: string; secret?: { secretName: string } }[]).find((v) => v.name === mount.name);
        assert.ok(vol?.secret, `${name} ${w.metadata.name}: ${file} comes from a Secret`);
      }
    }
  });
});

test("the dev overlay fits one node: one NATS server, a ReadWriteOnce model volume", { skip }, () => {
  const dev = renderings.get("overlays/dev") ?? [];
  assert.equal(Number(at(find(dev, "StatefulSet", "latentfarm-nats"), "spec", "replicas") ?? 1), 1);
  assert.deepEqual(at(find(dev, "PersistentVolumeClaim", "latentfarm-models"), "spec", "accessModes"), ["ReadWriteOnce"]);
  const prod = renderings.get("overlays/prod") ?? [];
  assert.deepEqual(at(find(prod, "PersistentVolumeClaim", "latentfarm-models"), "spec", "accessModes"), ["ReadWriteMany"]);
  const k = parseYaml(readFileSync(join(kustomizeDir, "overlays", "prod", "kustomization.yaml"), "utf8")) as { components?: string[] };
  assert.ok(k.components?.includes("../../components/tls"), "prod uses mTLS");
});
