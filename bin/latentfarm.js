#!/usr/bin/env node
// The `latentfarm` command. Agent-side commands live in the gpu-agent package, the rest in the
// coordinator package; this file only routes, so neither package imports the other.
const [command] = process.argv.slice(2);
const agentCommands = new Set(["agent", "prompt", "make-tiny-model"]);
const mod = agentCommands.has(command ?? "") ? await import("@latentfarm/gpu-agent/cli") : await import("@latentfarm/coordinator/cli");
process.exitCode = await mod.main(process.argv.slice(2));
