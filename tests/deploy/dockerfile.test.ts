// CI has no container engine, so the images cannot be built there. Instead this parses the
// Dockerfiles and checks what a build would not catch until production: the base images, a
// non-root numeric user matching the pods' runAsUser, the entrypoint the manifests' args expect,
// the ports the manifests use, and the onnxruntime-node CUDA download for the agent only.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { parse as parseYaml } from "yaml";
import { deployDir, kustomizeDir, repoRoot } from "./deploy-helpers.js";

interface Instruction {
  keyword: string;
  args: string;
  line: number;
}
interface Stage {
  image: string;
  name?: string;
  instructions: Instruction[];
}

const KEYWORDS = new Set([
  "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG",
  "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
]);

/** Splits a Dockerfile into stages of instructions: comments dropped, continuation lines joined. */
function parseDockerfile(text: string): Stage[] {
  const stages: Stage[] = [];
  let pending = "";
  let startLine = 0;
  const lines = text.split("\n");
  lines.forEach((raw, i) => {
    const line = raw.trimEnd();
    if (!pending && (line.trim() === "" || line.trimStart().startsWith("#"))) return;
    // Docker skips comments and blank lines inside a continuation.
    if (pending && (line.trim() === "" || line.trimStart().startsWith("#"))) return;
    if (!pending) startLine = i + 1;
    if (line.endsWith("\\")) {
      pending += `${line.slice(0, -1)} `;
      return;
    }
    const full = (pending + line).trim();
    pending = "";
    const m = /^(\S+)\s*(.*)$/s.exec(full);
    if (!m) return;
    const keyword = (m[1] as string).toUpperCase();
    if (!KEYWORDS.has(keyword)) throw new Error(`line ${startLine}: unknown instruction ${m[1]}`);
    const ins = { keyword, args: (m[2] as string).trim(), line: startLine };
    if (keyword === "FROM") {
      const words = ins.args.split(/\s+/).filter((w) => !w.startsWith("--"));
      const asAt = words.findIndex((w) => w.toUpperCase() === "AS");
      stages.push({ image: words[0] as string, name: asAt > 0 ? words[asAt + 1] : undefined, instructions: [] });
    } else {
      const stage = stages.at(-1);
      if (!stage && keyword !== "ARG") throw new Error(`line ${startLine}: ${keyword} before FROM`);
      stage?.instructions.push(ins);
    }
  });
  if (pending) throw new Error("the file ends inside a continuation line");
  return stages;
}

const all = (s: Stage, keyword: string): Instruction[] => s.instructions.filter((i) => i.keyword === keyword);
const last = (s: Stage, keyword: string): Instruction | undefined => all(s, keyword).at(-1);

function execForm(ins: Instruction | undefined): string[] | undefined {
  if (!ins) return undefined;
  try {
    const v: unknown = JSON.parse(ins.args);
    return Array.isArray(v) && v.every((x) => typeof x === "string") ? (v as string[]) : undefined;
  } catch {
    return undefined;
  }
}

/** ENV in both its forms: `ENV A=1 B=2` and `ENV A 1`. */
function envOf(stage: Stage): Record<string, string> {
  const env: Record<string, string> = {};
  for (const ins of all(stage, "ENV")) {
    if (/^[\w.]+=/.test(ins.args)) {
      for (const m of ins.args.matchAll(/([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)/g)) env[m[1] as string] = (m[2] as string).replace(/^"|"$/g, "");
    } else {
      const [k, ...v] = ins.args.split(/\s+/);
      env[k as string] = v.join(" ");
    }
  }
  return env;
}

interface Case {
  file: string;
  /** First argument the Kubernetes manifests pass: the latentfarm subcommand. */
  subcommand: "coordinator" | "agent";
  baseImage: RegExp;
  onnxruntimeInstall: string;
  manifest: string;
  container: string;
}

const cases: Case[] = [
  {
    file: "coordinator.Dockerfile",
    subcommand: "coordinator",
    baseImage: /^node:20\.\d+(\.\d+)?-bookworm-slim$/,
    onnxruntimeInstall: "skip",
    manifest: "base/coordinator/deployment.yaml",
    container: "coordinator",
  },
  {
    file: "agent.Dockerfile",
    subcommand: "agent",
    // onnxruntime-node's CUDA EP is built for CUDA 12 with cuDNN 9.
    baseImage: /^nvidia\/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$/,
    onnxruntimeInstall: "cuda12",
    manifest: "base/agent/statefulset.yaml",
    container: "agent",
  },
];

interface PodTemplate {
  spec: {
    template: {
      spec: {
        securityContext?: { runAsUser?: number; runAsGroup?: number };
        containers: { name: string; args?: string[]; ports?: { containerPort: number }[] }[];
      };
    };
  };
}

for (const c of cases) {
  const path = join(deployDir, "docker", c.file);

  test(`${c.file}: parses into a build stage and a runtime stage on pinned images`, () => {
    const stages = parseDockerfile(readFileSync(path, "utf8"));
    assert.ok(stages.length >= 2, "multi-stage: build tools stay out of the runtime image");
    const names = new Set(stages.map((s) => s.name).filter(Boolean));
    for (const s of stages) {
      if (names.has(s.image)) continue;
      assert.match(s.image, /^[\w./-]+(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$/, `${s.image} carries a tag or digest`);
      assert.doesNotMatch(s.image, /:latest$/, `${s.image} is not :latest`);
    }
    const runtime = stages.at(-1) as Stage;
    assert.match(runtime.image, c.baseImage, "runtime base image");
    for (const s of stages) {
      for (const add of all(s, "ADD")) assert.doesNotMatch(add.args, /https?:\/\//, `line ${add.line}: ADD of a URL`);
    }
  });

  test(`${c.file}: runs as the non-root user the pods expect, with the latentfarm entrypoint`, () => {
    const stages = parseDockerfile(readFileSync(path, "utf8"));
    const runtime = stages.at(-1) as Stage;
    const user = last(runtime, "USER");
    assert.ok(user, "the runtime stage sets USER");
    const m = /^(\d+)(?::(\d+))?$/.exec(user.args);
    assert.ok(m, `USER ${user.args} is numeric, so kubelet can verify runAsNonRoot`);
    assert.notEqual(Number(m[1]), 0, "USER is not root");
    const afterUser = runtime.instructions.slice(runtime.instructions.indexOf(user) + 1);
    assert.deepEqual(afterUser.filter((i) => i.keyword === "RUN" || i.keyword === "USER").map((i) => i.keyword), [], "nothing runs after USER switches");

    assert.deepEqual(execForm(last(runtime, "ENTRYPOINT")), ["node", "/app/bin/latentfarm.js"], "exec-form ENTRYPOINT (signals reach node)");
    assert.deepEqual(execForm(last(runtime, "CMD")), [c.subcommand], "default subcommand");

    const pod = parseYaml(readFileSync(join(kustomizeDir, c.manifest), "utf8")) as PodTemplate;
    const spec = pod.spec.template.spec;
    assert.equal(spec.securityContext?.runAsUser, Number(m[1]), "pod runAsUser equals the image's USER");
    if (m[2]) assert.equal(spec.securityContext?.runAsGroup, Number(m[2]), "pod runAsGroup equals the image's group");
    const container = spec.containers.find((x) => x.name === c.container);
    assert.equal(container?.args?.[0], c.subcommand, "the manifest passes the subcommand as the first arg");
    const exposed = all(runtime, "EXPOSE").flatMap((i) => i.args.split(/\s+/)).map((p) => Number(p.split("/")[0]));
    for (const p of container?.ports ?? []) assert.ok(exposed.includes(p.containerPort), `EXPOSE ${p.containerPort}`);
  });

  test(`${c.file}: installs production dependencies with the right onnxruntime-node binaries`, () => {
    const stages = parseDockerfile(readFileSync(path, "utf8"));
    const build = stages.find((s) => all(s, "RUN").some((r) => /\bnpm ci\b/.test(r.args)));
    assert.ok(build, "a stage runs npm ci against the lockfile");
    // onnxruntime-node's install script reads this; it overrides the repo's .npmrc skip.
    assert.equal(envOf(build).ONNXRUNTIME_NODE_INSTALL, c.onnxruntimeInstall, "ONNXRUNTIME_NODE_INSTALL in the npm ci stage");
    assert.ok(all(build, "RUN").some((r) => /npm prune --omit=dev/.test(r.args)), "dev dependencies are pruned");
    const runtime = stages.at(-1) as Stage;
    assert.ok(all(runtime, "COPY").some((i) => i.args.startsWith(`--from=${build.name}`)), "the runtime copies the built app");
    assert.equal(all(runtime, "RUN").filter((r) => /\bnpm\b/.test(r.args)).length, 0, "no npm in the runtime stage");
  });

  test(`${c.file}: copies only paths that exist in the build context (the repository root)`, () => {
    const stages = parseDockerfile(readFileSync(path, "utf8"));
    for (const s of stages) {
      for (const copy of all(s, "COPY")) {
        const words = copy.args.split(/\s+/);
        if (words.some((w) => w.startsWith("--from="))) continue;
        const sources = words.filter((w) => !w.startsWith("--")).slice(0, -1);
        for (const src of sources) assert.ok(existsSync(join(repoRoot, src)), `line ${copy.line}: COPY ${src} (missing from ${repoRoot})`);
      }
    }
    const ignore = `${path}.dockerignore`;
    assert.ok(existsSync(ignore), `${c.file}.dockerignore keeps node_modules out of the context`);
    assert.match(readFileSync(ignore, "utf8"), /^\*\*\/node_modules$/m);
  });
}

test("the Dockerfile parser rejects what docker would reject", () => {
  assert.throws(() => parseDockerfile("RUN true\n"), /before FROM/);
  assert.throws(() => parseDockerfile("FROM x:1\nRUNN true\n"), /unknown instruction/);
  assert.throws(() => parseDockerfile("FROM x:1\nRUN a \\\n"), /continuation/);
  const [s] = parseDockerfile("FROM x:1 AS b\nRUN a \\\n  # note\n  && b\nENV A=1 B=\"two words\"\n");
  assert.equal(s?.name, "b");
  assert.equal(s?.instructions[0]?.args, "a    && b");
  assert.deepEqual(envOf(s as Stage), { A: "1", B: "two words" });
});
