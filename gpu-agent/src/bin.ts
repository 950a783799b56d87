#!/usr/bin/env node
// `latentfarm-agent`: the gpu-agent package's own command (agent, prompt, make-tiny-model).
import { main } from "./cli.js";

const argv = process.argv.slice(2);
process.exitCode = await main(argv[0] === "agent" || argv[0] === "prompt" || argv[0] === "make-tiny-model" ? argv : ["agent", ...argv]);
