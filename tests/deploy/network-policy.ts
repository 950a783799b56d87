// A small evaluator of Kubernetes NetworkPolicy ingress semantics, enough to ask "may this pod reach
// that port?" of rendered manifests. It refuses selectors it does not model (matchExpressions,
// ipBlock) instead of guessing.
import { at, type K8sObject } from "./deploy-helpers.js";

export interface PodRef {
  namespace: string;
  labels: Record<string, string>;
  /** Container ports by name, to resolve named ports in policies. */
  namedPorts?: Record<string, number>;
}
export interface NamespaceRef {
  name: string;
  labels: Record<string, string>;
}

type Selector = { matchLabels?: Record<string, string>; matchExpressions?: unknown[] } | undefined;

function matches(selector: Selector, labels: Record<string, string>): boolean {
  if (selector === undefined) return false;
  if (selector.matchExpressions?.length) throw new Error("matchExpressions are not modelled");
  return Object.entries(selector.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
}

interface Peer {
  podSelector?: Selector;
  namespaceSelector?: Selector;
  ipBlock?: unknown;
}
interface PortRule {
  port?: number | string;
  protocol?: string;
}
interface IngressRule {
  from?: Peer[];
  ports?: PortRule[];
}

function peerMatches(peer: Peer, policyNamespace: string, source: PodRef, namespaces: NamespaceRef[]): boolean {
  if (peer.ipBlock) throw new Error("ipBlock peers are not modelled");
  const sourceNs = namespaces.find((n) => n.name === source.namespace) ?? { name: source.namespace, labels: {} };
  const nsOk =
    peer.namespaceSelector === undefined ? source.namespace === policyNamespace : matches(peer.namespaceSelector, sourceNs.labels);
  const podOk = peer.podSelector === undefined ? true : matches(peer.podSelector, source.labels);
  return nsOk && podOk;
}

function portMatches(rule: PortRule, port: number, target: PodRef): boolean {
  if ((rule.protocol ?? "TCP") !== "TCP") return false;
  if (rule.port === undefined) return true;
  if (typeof rule.port === "number") return rule.port === port;
  return target.namedPorts?.[rule.port] === port;
}

/** Whether `source` may open a TCP connection to `port` of `target` under these policies. */
export function ingressAllowed(
  policies: K8sObject[],
  target: PodRef,
  port: number,
  source: PodRef,
  namespaces: NamespaceRef[],
): boolean {
  const selecting = policies.filter((p) => {
    const ns = p.metadata.namespace ?? target.namespace;
    const types = (at(p, "spec", "policyTypes") as string[] | undefined) ?? ["Ingress"];
    return ns === target.namespace && types.includes("Ingress") && matches(at(p, "spec", "podSelector") as Selector, target.labels);
  });
  if (selecting.length === 0) return true; // not isolated
  return selecting.some((p) => {
    const policyNs = p.metadata.namespace ?? target.namespace;
    const rules = (at(p, "spec", "ingress") as IngressRule[] | undefined) ?? [];
    return rules.some(
      (r) =>
        (r.from === undefined || r.from.length === 0 || r.from.some((peer) => peerMatches(peer, policyNs, source, namespaces))) &&
        (r.ports === undefined || r.ports.length === 0 || r.ports.some((pr) => portMatches(pr, port, target))),
    );
  });
}
