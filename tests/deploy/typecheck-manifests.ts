// Type-checks rendered manifests against kubernetes-models' TypeScript interfaces. The JSON-schema
// validators accept unknown fields (a typo such as `grpcc:` passes them); TypeScript's excess
// property check on object literals does not, so each object becomes a typed literal in a virtual
// source file compiled in memory.
import { join } from "node:path";
import ts from "typescript";
import { repoRoot, type K8sObject } from "./deploy-helpers.js";

export interface TypedKind {
  /** Interface name exported by `module`. */
  type: string;
  module: string;
}

export const TYPED_KINDS: Record<string, TypedKind> = {
  "v1/Namespace": { type: "INamespace", module: "kubernetes-models/v1/Namespace" },
  "v1/ServiceAccount": { type: "IServiceAccount", module: "kubernetes-models/v1/ServiceAccount" },
  "v1/Service": { type: "IService", module: "kubernetes-models/v1/Service" },
  "v1/ConfigMap": { type: "IConfigMap", module: "kubernetes-models/v1/ConfigMap" },
  "v1/Secret": { type: "ISecret", module: "kubernetes-models/v1/Secret" },
  "v1/PersistentVolumeClaim": { type: "IPersistentVolumeClaim", module: "kubernetes-models/v1/PersistentVolumeClaim" },
  "apps/v1/Deployment": { type: "IDeployment", module: "kubernetes-models/apps/v1/Deployment" },
  "apps/v1/StatefulSet": { type: "IStatefulSet", module: "kubernetes-models/apps/v1/StatefulSet" },
  "policy/v1/PodDisruptionBudget": { type: "IPodDisruptionBudget", module: "kubernetes-models/policy/v1/PodDisruptionBudget" },
  "networking.k8s.io/v1/NetworkPolicy": { type: "INetworkPolicy", module: "kubernetes-models/networking.k8s.io/v1/NetworkPolicy" },
  "keda.sh/v1alpha1/ScaledObject": { type: "IScaledObject", module: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject" },
  "monitoring.coreos.com/v1/ServiceMonitor": {
    type: "IServiceMonitor",
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  },
  "monitoring.coreos.com/v1/PrometheusRule": {
    type: "IPrometheusRule",
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
  },
};

export const kindKey = (o: Pick<K8sObject, "apiVersion" | "kind">): string => `${o.apiVersion}/${o.kind}`;

/**
 * Compiles `const x: IKind = <object>` for every object; returns one message per TypeScript error,
 * prefixed with the object's label. Objects of kinds missing from TYPED_KINDS are reported too.
 */
export function typeCheckManifests(objects: { label: string; object: K8sObject }[]): string[] {
  const problems: string[] = [];
  const imports = new Map<string, string>();
  const decls: string[] = [];
  const lineLabels: { line: number; label: string }[] = [];
  let line = 0;
  objects.forEach(({ label, object }, i) => {
    const typed = TYPED_KINDS[kindKey(object)];
    if (!typed) {
      problems.push(`${label}: no TypeScript type for ${kindKey(object)}`);
      return;
    }
    imports.set(typed.type, typed.module);
    const text = `export const object${i}: ${typed.type} = ${JSON.stringify(object, null, 1)};\n`;
    lineLabels.push({ line, label });
    decls.push(text);
    line += text.split("\n").length - 1;
  });
  const head = [...imports].map(([type, module]) => `import type { ${type} } from "${module}";\n`).join("");
  const headLines = imports.size;
  const source = head + decls.join("");

  // The virtual file sits next to this one, so the validators resolve from the repo's node_modules.
  const fileName = join(repoRoot, "tests", "deploy", "__rendered_manifests__.ts");
  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    types: [],
  };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (name, languageVersion, onError, shouldCreate) =>
    name === fileName
      ? ts.createSourceFile(name, source, languageVersion, true)
      : getSourceFile.call(host, name, languageVersion, onError, shouldCreate);
  host.fileExists = (name) => name === fileName || fileExists.call(host, name);
  host.readFile = (name) => (name === fileName ? source : readFile.call(host, name));
  const program = ts.createProgram([fileName], options, host);
  for (const d of ts.getPreEmitDiagnostics(program)) {
    if (d.file && d.file.fileName !== fileName) continue;
    const message = ts.flattenDiagnosticMessageText(d.messageText, "\n");
    if (!d.file || d.start === undefined) {
      problems.push(message);
      continue;
    }
    const { line: l } = d.file.getLineAndCharacterOfPosition(d.start);
    const bodyLine = l - headLines;
    const owner = [...lineLabels].reverse().find((x) => x.line <= bodyLine);
    const snippet = source.split("\n")[l]?.trim() ?? "";
    problems.push(`${owner?.label ?? "imports"}: ${message} (at: ${snippet})`);
  }
  return problems;
}
