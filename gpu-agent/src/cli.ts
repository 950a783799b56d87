import { parseArgs } from "node:util";
import { availableParallelism } from "node:os";
import { jsonLogger, tlsFromFlags, type LogLevel } from "@latentfarm/shared";
import { join, resolve } from "node:path";
import { Agent } from "./agent.js";
import { ClipTokenizer, describePrompt, EmbeddingDatabase, type PromptChunk } from "./conditioning/index.js";
import { readEmbeddingsFolder } from "./models/embedding-files.js";
import { makeTinyModelCli } from "./model-graph/index.js";
import type { ExecutionProvider } from "./runtime/protocol.js";

const AGENT_USAGE = `latentfarm agent --models DIR [--port N] [--host ADDR] [--nats URL] [--ep cpu|cuda|webgpu] [--device-id N]
                 [--device-name NAME]
                 [--slots N] [--threads N] [--max-loaded-models N] [--metrics-port N] [--health-port N]
                 [--advertise-address HOST:PORT] [--id ID] [--heartbeat-ms N] [--drain-seconds N] [--orphan-grace-seconds N]
                 [--tls-cert FILE --tls-key FILE --tls-ca FILE] [--cache-dir DIR] [--tokenizer DIR] [--loras DIR]
                 [--embeddings DIR] [--vae-dir DIR] [--vae-path FILE] [--upscalers DIR] [--face-models DIR]
                 [--max-input-pixels N] [--max-input-bytes N]
`;

function ep(name: string, deviceId: number): ExecutionProvider {
  if (name === "cpu") return { name: "cpu" };
  if (name === "cuda") return { name: "cuda", deviceId };
  if (name === "webgpu") return { name: "webgpu" };
  throw new Error(`--ep must be cpu, cuda or webgpu, got "${name}"`);
}

async function runAgent(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      models: { type: "string", default: process.env["LATENTFARM_MODELS"] ?? "models" },
      port: { type: "string", default: "50052" },
      host: { type: "string", default: "0.0.0.0" },
      nats: { type: "string", default: process.env["NATS_URL"] ?? "nats://127.0.0.1:4222" },
      ep: { type: "string", default: "cpu" },
      "device-id": { type: "string", default: "0" },
      // What the agent runs on, as images' provenance records it (e.g. "NVIDIA H200"); default: the CPU's model, or the provider and device index.
      "device-name": { type: "string" },
      slots: { type: "string", default: "4" },
      threads: { type: "string" },
      "max-loaded-models": { type: "string", default: "2" },
      "metrics-port": { type: "string" },
      "health-port": { type: "string" },
      "advertise-address": { type: "string" },
      id: { type: "string" },
      "heartbeat-ms": { type: "string", default: "1000" },
      "drain-seconds": { type: "string", default: "300" },
      // A task whose coordinator went away keeps running this long, for a restarted one to re-attach.
      "orphan-grace-seconds": { type: "string", default: "30" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "tls-ca": { type: "string" },
      "cache-dir": { type: "string" },
      tokenizer: { type: "string" },
      loras: { type: "string" },
      embeddings: { type: "string" },
      "vae-dir": { type: "string" },
      "vae-path": { type: "string" },
      upscalers: { type: "string" },
      "face-models": { type: "string" },
      "max-input-pixels": { type: "string" },
      "max-input-bytes": { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (v.help) {
    process.stdout.write(AGENT_USAGE);
    return 0;
  }
  const logger = jsonLogger({
    level: (process.env["LATENTFARM_LOG_LEVEL"] as LogLevel | undefined) ?? "info",
    base: { service: "gpu-agent" },
  });
  const agent = new Agent({
    listen: `${v.host}:${v.port}`,
    natsUrl: v.nats,
    modelsDir: v.models,
    ep: ep(v.ep, Number(v["device-id"])),
    slots: Number(v.slots),
    heartbeatMs: Number(v["heartbeat-ms"]),
    orphanGraceMs: Number(v["orphan-grace-seconds"]) * 1000,
    maxLoadedModels: Number(v["max-loaded-models"]),
    intraOpNumThreads: v.threads ? Number(v.threads) : Math.max(1, availableParallelism()),
    ...(v.id ? { agentId: v.id } : {}),
    ...(v["device-name"] ? { deviceName: v["device-name"] } : {}),
    ...(v["metrics-port"] !== undefined ? { metricsPort: Number(v["metrics-port"]) } : {}),
    ...(v["health-port"] !== undefined ? { healthPort: Number(v["health-port"]) } : {}),
    ...(v["advertise-address"] ? { advertiseAddress: v["advertise-address"] } : {}),
    ...(tlsFromFlags(v) ? { tls: tlsFromFlags(v)! } : {}),
    ...(v["cache-dir"] ? { cacheDir: v["cache-dir"] } : {}),
    ...(v.tokenizer ? { tokenizerDir: v.tokenizer } : {}),
    ...(v.loras ? { lorasDir: v.loras } : {}),
    ...(v.embeddings ? { embeddingsDir: v.embeddings } : {}),
    ...(v["vae-dir"] ? { vaeDir: v["vae-dir"] } : {}),
    ...(v["vae-path"] ? { vaePath: resolve(v["vae-path"]) } : {}),
    ...(v.upscalers ? { upscalersDir: v.upscalers } : {}),
    ...(v["face-models"] ? { faceModelsDir: v["face-models"] } : {}),
    ...(v["max-input-pixels"] ? { maxInputPixels: Number(v["max-input-pixels"]) } : {}),
    ...(v["max-input-bytes"] ? { maxInputBytes: Number(v["max-input-bytes"]) } : {}),
    logger,
  });
  await agent.start();
  process.stdout.write(JSON.stringify({ ready: true, id: agent.id, address: agent.address, metrics: agent.metricsUrl }) + "\n");
  const graceMs = Number(v["drain-seconds"]) * 1000;
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off("SIGTERM", stop);
      process.off("SIGINT", stop);
      void agent.drain(graceMs).then(resolve, resolve);
    };
    process.once("SIGTERM", stop);
    process.once("SIGINT", stop);
  });
  await agent.close();
  return 0;
}

const PROMPT_USAGE = `latentfarm prompt "<prompt>" [--steps N] [--json] [--tokenizer DIR | --models DIR --model NAME] [--embeddings DIR]
`;

/** A1111's token counter and prompt inspection, offline: no farm needed, only a tokenizer. */
async function prompt(argv: string[]): Promise<number> {
  const { values: v, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      steps: { type: "string", default: "20" },
      json: { type: "boolean", default: false },
      tokenizer: { type: "string" },
      models: { type: "string", default: process.env["LATENTFARM_MODELS"] ?? "models" },
      model: { type: "string" },
      embeddings: { type: "string" },
    },
  });
  if (positionals.length !== 1) {
    process.stderr.write(PROMPT_USAGE);
    return 2;
  }
  const steps = Number(v.steps);
  if (!Number.isInteger(steps) || steps < 1) {
    process.stderr.write(`--steps must be a positive integer, got "${v.steps}"\n`);
    return 2;
  }
  let dir = v.tokenizer;
  if (!dir) {
    if (!v.model) {
      process.stderr.write(`prompt needs --tokenizer DIR, or --models DIR with --model NAME\n`);
      return 2;
    }
    dir = join(v.models, v.model, "tokenizer");
  }
  const tok = await ClipTokenizer.fromDirectory(dir);
  // Counted with the folder's embeddings of every width: the counter has no model to choose by.
  const embeddings = v.embeddings ? new EmbeddingDatabase(tok, (await readEmbeddingsFolder(v.embeddings)).embeddings) : undefined;
  const d = describePrompt(tok, positionals[0]!, steps, embeddings ? { embeddings } : {});
  const fixesOf = (c: PromptChunk) =>
    (c.fixes ?? []).map((f) => ({ name: f.embedding.name, position: f.position, vectors: f.embedding.vectors }));
  const out = {
    attention: d.attention,
    schedule: d.schedule,
    chunks: d.chunks.map((c) => ({ tokens: c.tokens, multipliers: c.multipliers, embeddings: fixesOf(c) })),
    token_count: d.token_count,
  };
  if (v.json) {
    process.stdout.write(JSON.stringify(out) + "\n");
    return 0;
  }
  const w = (s: string): boolean => process.stdout.write(s + "\n");
  w(`${d.token_count}/${d.max_length} tokens`);
  w("attention:");
  for (const [text, weight] of d.attention) w(`  ${JSON.stringify(text)}  ×${weight}`);
  w("schedule:");
  for (const [step, text] of d.schedule) w(`  until step ${step}: ${JSON.stringify(text)}`);
  d.chunks.forEach((c, i) => {
    w(`chunk ${i}:`);
    w(`  tokens:      ${c.tokens.join(" ")}`);
    w(`  multipliers: ${c.multipliers.join(" ")}`);
    for (const f of fixesOf(c)) w(`  embedding:   ${f.name}, ${f.vectors} vectors from position ${f.position}`);
  });
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case "agent":
        return await runAgent(rest);
      case "prompt":
        return await prompt(rest);
      case "make-tiny-model": {
        const m = await makeTinyModelCli(rest);
        process.stdout.write(
          JSON.stringify({ checkpoint: m.checkpointPath, onnx: m.onnxDir, tokenizer: m.tokenizerDir, hints: m.hints }) + "\n",
        );
        return 0;
      }
      default:
        process.stderr.write(`unknown agent command "${cmd}"\n`);
        return 2;
    }
  } catch (err) {
    process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  }
}
