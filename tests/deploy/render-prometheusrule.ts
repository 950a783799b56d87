// Writes deploy/prometheus/prometheusrule.yaml from deploy/prometheus/rules/latentfarm.rules.yaml:
//   node --import tsx tests/deploy/render-prometheusrule.ts
// rules.test.ts fails while the two differ.
import { writeFileSync } from "node:fs";
import { stringify } from "yaml";
import { prometheusRuleFile, prometheusRuleFromRules } from "./deploy-helpers.js";

const header = [
  "# Generated from rules/latentfarm.rules.yaml by tests/deploy/render-prometheusrule.ts; edit that",
  "# file and rerun the script. prometheus-operator loads it when its labels match the Prometheus'",
  "# ruleSelector (kube-prometheus-stack: release=<its release name>).",
  "",
].join("\n");
writeFileSync(prometheusRuleFile, header + stringify(prometheusRuleFromRules(), { lineWidth: 0 }));
