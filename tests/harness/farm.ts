// Real processes for end-to-end tests: nats-server, a coordinator and agents, each its own
// process on loopback, all stopped by close().
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { RenderService, createClient, type ServiceClient } from "@latentfarm/shared";
import { startNatsServer, findNatsServer, type NatsServerHandle } from "@latentfarm/coordinator";
import {
  GraphBuilder,
  SeededRandom,
  TINY_SPECS,
  encodeSafetensors,
  ldmTensorShapes,
  randomTensor,
  saveModel,
} from "@latentfarm/gpu-agent/model-graph";

export const REPO = fileURLToPath(new URL("../../", import.meta.url));
export const KIT = join(REPO, "..", "shared");
/** The team kit's fixtures; LATENTFARM_KIT_FIXTURES points elsewhere (as for the unit tests). */
export const FIXTURES = process.env["LATENTFARM_KIT_FIXTURES"] ?? join(KIT, "fixtures");
export const TINY_SD15 = join(FIXTURES, "tiny-sd15");
const BIN = join(REPO, "bin", "latentfarm.js");

/** Why e2e tests cannot run here, or undefined when they can. */
export function farmSkipReason(): string | false {
  if (!existsSync(TINY_SD15)) return `team kit fixtures absent (${TINY_SD15})`;
  if (!findNatsServer()) return "nats-server not installed (apt-get install nats-server)";
  if (!existsSync(join(REPO, "coordinator", "dist", "cli", "main.js"))) return "project not built (run npm run build)";
  return false;
}

type RenderClient = ServiceClient<typeof RenderService extends { method: infer M } ? M : never>;

export interface ServiceProcess {
  readonly child: ChildProcess;
  readonly ready: Record<string, unknown>;
  readonly stderr: () => string;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

/** A real agent as a child process on loopback, one ONNX Runtime thread, a short drain (tests). */
export function startAgentProcess(o: {
  natsUrl: string;
  modelsDir: string;
  id: string;
  slots: number;
  heartbeatMs: number;
  extra?: string[];
}): Promise<ServiceProcess> {
  return startService([
    "agent",
    "--port",
    "0",
    "--host",
    "127.0.0.1",
    "--nats",
    o.natsUrl,
    "--models",
    o.modelsDir,
    "--id",
    o.id,
    "--threads",
    "1",
    "--slots",
    String(o.slots),
    "--heartbeat-ms",
    String(o.heartbeatMs),
    "--drain-seconds",
    "2",
    ...(o.extra ?? []),
  ]);
}

export function startService(args: string[], env: Record<string, string> = {}): Promise<ServiceProcess> {
  const child = spawn(process.execPath, [BIN, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, LATENTFARM_LOG_LEVEL: "warn", ...env },
  });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-20_000)));
  return new Promise((resolve, reject) => {
    let out = "";
    const onData = (d: Buffer): void => {
      out += d.toString();
      const line = out.split("\n").find((l) => l.includes('"ready":true'));
      if (line) {
        child.stdout!.off("data", onData);
        resolve({
          child,
          ready: JSON.parse(line) as Record<string, unknown>,
          stderr: () => err,
          kill: (signal = "SIGTERM") =>
            new Promise<void>((r) => {
              if (child.exitCode !== null || child.signalCode !== null) return r();
              child.once("exit", () => r());
              child.kill(signal);
              setTimeout(() => child.kill("SIGKILL"), 10_000).unref();
            }),
        });
      }
    };
    child.stdout!.on("data", onData);
    child.once("exit", (code) => reject(new Error(`${args[0]} exited with ${code} before ready: ${err}`)));
  });
}

export interface TestFarm {
  coordinatorAddress: string;
  coordinatorMetricsUrl: string;
  agentMetricsUrls: string[];
  agentMetricsUrl: string;
  nats: NatsServerHandle;
  coordinator: ServiceProcess;
  agents: ServiceProcess[];
  modelsDir: string;
  client: RenderClient;
  /** Runs a short job to completion. */
  runJob(params?: Record<string, unknown>): Promise<void>;
  waitForAgents(n: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * A textual-inversion embedding every test farm agent has: the tiny model's own token-embedding rows for
 * the words of TEST_EMBEDDING_WORDS, so a prompt naming it renders exactly as one with those words.
 */
export const TEST_EMBEDDING = "lf-sparkle";
export const TEST_EMBEDDING_WORDS = "red car";

/**
 * The embedding's file: safetensors with one `emb_params` tensor, written by hand (8-byte header length,
 * JSON, data), from the rows of "red" (736) and "car" (1615) in the kit checkpoint's token table.
 */
export function testEmbedding(): Buffer {
  const ckpt = readFileSync(join(FIXTURES, "tiny-sd15.safetensors"));
  const headerLength = Number(ckpt.readBigUInt64LE(0));
  const tensors = JSON.parse(ckpt.subarray(8, 8 + headerLength).toString("utf8")) as Record<string, { data_offsets: [number, number] }>;
  const [start] = tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]!.data_offsets;
  const row = (id: number) => ckpt.subarray(8 + headerLength + start + id * 32 * 4, 8 + headerLength + start + (id + 1) * 32 * 4);
  // A copy of its own: a small Buffer is a view into a shared pool.
  const data = new Float32Array(Uint8Array.from(Buffer.concat([row(736), row(1615)])).buffer);
  const header = Buffer.from(JSON.stringify({ emb_params: { dtype: "F32", shape: [2, 32], data_offsets: [0, data.byteLength] } }));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(header.length));
  return Buffer.concat([length, header, Buffer.from(data.buffer)]);
}

/**
 * A VAE file every test farm agent has in its --vae-dir: the kit checkpoint's own VAE in A1111's
 * models/VAE layout (no key prefix), its decoder's output bias raised by TEST_VAE_SHIFT, so every
 * unclipped pixel it decodes is TEST_VAE_SHIFT × 127.5 levels brighter than the checkpoint's VAE makes it.
 */
export const TEST_VAE = "lf-bright.safetensors";
export const TEST_VAE_SHIFT = 0.2;

export function testVae(): Buffer {
  const ckpt = readFileSync(join(FIXTURES, "tiny-sd15.safetensors"));
  const headerLength = Number(ckpt.readBigUInt64LE(0));
  const tensors = JSON.parse(ckpt.subarray(8, 8 + headerLength).toString("utf8")) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> = {};
  const parts: Buffer[] = [];
  let at = 0;
  for (const [key, t] of Object.entries(tensors)) {
    if (!key.startsWith("first_stage_model.")) continue;
    // A copy: the shifted tensor must not write into the checkpoint's buffer.
    const data = Buffer.from(ckpt.subarray(8 + headerLength + t.data_offsets[0], 8 + headerLength + t.data_offsets[1]));
    if (key === "first_stage_model.decoder.conv_out.bias") {
      const bias = new Float32Array(Uint8Array.from(data).buffer);
      for (let i = 0; i < bias.length; i++) bias[i]! += TEST_VAE_SHIFT;
      Buffer.from(bias.buffer).copy(data);
    }
    header[key.slice("first_stage_model.".length)] = { dtype: t.dtype, shape: t.shape, data_offsets: [at, at + data.length] };
    parts.push(data);
    at += data.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([length, json, ...parts]);
}

/** The kit's tiny-sd15.safetensors as the test farm's agents list it (sorted after the ONNX models). */
export const TEST_RENAMED_CHECKPOINT = "z-renamed";

/**
 * An SDXL-layout checkpoint (the repository's "sdxl-small" topology, random weights) with the kit
 * tokenizer's vocabulary, so the agents' one tokenizer serves it; its `.json` gives the head counts.
 */
export const TEST_SDXL_CHECKPOINT = "tiny-sdxl";
/** The same for the SDXL refiner ("sdxl-refiner-small"): OpenCLIP-G alone, an aesthetic score in its time ids. */
export const TEST_SDXL_REFINER_CHECKPOINT = "tiny-sdxl-refiner";

const checkpoints = new Map<string, { checkpoint: Buffer; hints: string }>();

/** Made once per process (16 MB of random weights), however many test farms it starts. */
export function testSdxlCheckpoint(config: "sdxl-small" | "sdxl-refiner-small" = "sdxl-small"): { checkpoint: Buffer; hints: string } {
  const made = checkpoints.get(config);
  if (made !== undefined) return made;
  const spec = TINY_SPECS[config];
  const tensors = new Map<string, { dtype: "F32"; shape: number[]; data: Float32Array }>();
  let seed = 0;
  for (const [key, shape] of ldmTensorShapes(spec, 49408)) {
    const data = key.endsWith("logit_scale") ? Float32Array.of(Math.log(100)) : randomTensor(new SeededRandom(++seed), key, shape);
    tensors.set(key, { dtype: "F32", shape, data });
  }
  const hints = { unetHeads: spec.unetHeads, ...(spec.textHeads > 0 && { textHeads: spec.textHeads }), text2Heads: spec.text2Heads };
  const checkpoint = { checkpoint: Buffer.from(encodeSafetensors(tensors)), hints: JSON.stringify(hints) };
  checkpoints.set(config, checkpoint);
  return checkpoint;
}

/** An A1111 styles.csv the test farm's coordinator reads (--styles-file). */
export const TEST_STYLES_CSV =
  "name,prompt,negative_prompt\n" + '"lf-cinematic","cinematic still of {prompt}, bokeh","cartoon"\n' + '"lf-grain","film grain",\n';

/** The upscaler model file startTestFarm gives its first agent: ×2 nearest-neighbour. */
export const TEST_UPSCALER = "2x-nearest-test";
/** A LoRA for the kit's tiny SD1.5, in the first agent's LoRA folder only. */
export const TEST_LORA = "lf-ink";

/** TEST_LORA's file: rank-2 factors on the UNet's first self-attention query and the text encoder's first layer's, with some metadata. */
export function testLora(): Uint8Array {
  const factor = (shape: number[], v: number) => ({
    dtype: "F32" as const,
    shape,
    data: Float32Array.from({ length: shape[0]! * shape[1]! }, (_, i) => v * Math.sin(i + 1)),
  });
  return encodeSafetensors(
    {
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": factor([32, 2], 0.6),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": factor([2, 32], 0.6),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": factor([32, 2], 0.4),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": factor([2, 32], 0.4),
    },
    TEST_LORA_METADATA,
  );
}

/** TEST_LORA's training metadata, as kohya's scripts write some of it (the header's __metadata__, all strings). */
export const TEST_LORA_METADATA = { ss_network_dim: "2", ss_tag_frequency: '{"ink": {"lf": 3}}', ss_resolution: "(64, 64)" };

/** A ×2 nearest-neighbour upscaler as an ONNX model: four copies of the image's channels, then DepthToSpace (DCR). */
async function writeNearest2xUpscaler(path: string): Promise<void> {
  const g = new GraphBuilder("nearest2x", 17);
  const x = g.input("input", "float32", [1, 3, "height", "width"]);
  const copies = g.op1("Concat", [x, x, x, x], { axis: 1 });
  g.output(g.op1("DepthToSpace", [copies], { blocksize: 2, mode: "DCR" }), "output", "float32", [1, 3, "height_out", "width_out"]);
  await saveModel(g.toSpec(), path);
}

export async function startTestFarm(
  opts: {
    agents?: number;
    agentTimeoutMs?: number;
    slots?: number;
    coordinatorArgs?: string[];
    /** Agent i offers only these models of the farm's (by name); default all of them. */
    agentModels?: ReadonlyArray<readonly string[]>;
  } = {},
): Promise<TestFarm> {
  const nats = await startNatsServer();
  const tmp = mkdtempSync(join(tmpdir(), "latentfarm-test-"));
  const modelsDir = join(tmp, "models");
  mkdirSync(modelsDir);
  symlinkSync(TINY_SD15, join(modelsDir, "tiny-sd15"));
  // The same weights under a second name: a checkpoint to switch to (a Hires.fix job's hires checkpoint).
  symlinkSync(TINY_SD15, join(modelsDir, "tiny-sd15-hr"));
  // The kit's checkpoint under a name of this farm's own: a pasted infotext finds it by its Model hash.
  symlinkSync(join(FIXTURES, "tiny-sd15.safetensors"), join(modelsDir, `${TEST_RENAMED_CHECKPOINT}.safetensors`));
  writeFileSync(join(modelsDir, `${TEST_RENAMED_CHECKPOINT}.json`), JSON.stringify({ unetHeads: 8, textHeads: 4 }));
  const sdxl = testSdxlCheckpoint();
  writeFileSync(join(modelsDir, `${TEST_SDXL_CHECKPOINT}.safetensors`), sdxl.checkpoint);
  writeFileSync(join(modelsDir, `${TEST_SDXL_CHECKPOINT}.json`), sdxl.hints);
  const refiner = testSdxlCheckpoint("sdxl-refiner-small");
  writeFileSync(join(modelsDir, `${TEST_SDXL_REFINER_CHECKPOINT}.safetensors`), refiner.checkpoint);
  writeFileSync(join(modelsDir, `${TEST_SDXL_REFINER_CHECKPOINT}.json`), refiner.hints);
  const embeddingsDir = join(tmp, "embeddings");
  mkdirSync(embeddingsDir);
  writeFileSync(join(embeddingsDir, `${TEST_EMBEDDING}.safetensors`), testEmbedding());
  // A file no model can use: ListEmbeddings reports it as skipped.
  writeFileSync(join(embeddingsDir, "not-an-embedding.pt"), "plain text");
  const vaeDir = join(tmp, "VAE");
  mkdirSync(vaeDir);
  writeFileSync(join(vaeDir, TEST_VAE), testVae());
  const stylesFile = join(tmp, "styles.csv");
  writeFileSync(stylesFile, TEST_STYLES_CSV);
  // An upscaler model file on the first agent only: ListUpscalers names it, and tasks that run it go there.
  const upscalersDir = join(tmp, "upscalers");
  mkdirSync(upscalersDir);
  await writeNearest2xUpscaler(join(upscalersDir, `${TEST_UPSCALER}.onnx`));
  // A LoRA folder on the first agent only: ListLoras lists the file there, and placement checks for it.
  const lorasDir = join(tmp, "loras");
  mkdirSync(lorasDir);
  writeFileSync(join(lorasDir, `${TEST_LORA}.safetensors`), testLora());
  const started: ServiceProcess[] = [];
  try {
    const coordinator = await startService([
      "coordinator",
      "--port",
      "0",
      "--host",
      "127.0.0.1",
      "--nats",
      nats.url,
      "--metrics-port",
      "0",
      "--agent-timeout-ms",
      String(opts.agentTimeoutMs ?? 3000),
      "--styles-file",
      stylesFile,
      ...(opts.coordinatorArgs ?? []),
    ]);
    started.push(coordinator);
    const agents: ServiceProcess[] = [];
    for (let i = 0; i < (opts.agents ?? 2); i++) {
      const only = opts.agentModels?.[i];
      let agentModelsDir = modelsDir;
      if (only !== undefined) {
        // A folder of its own holding the chosen models (and their .json hints) as links to the farm's.
        agentModelsDir = join(tmp, `models-${i}`);
        mkdirSync(agentModelsDir);
        for (const entry of readdirSync(modelsDir)) {
          const name = entry.replace(/\.(safetensors|json)$/, "");
          if (only.includes(name)) symlinkSync(join(modelsDir, entry), join(agentModelsDir, entry));
        }
      }
      const a = await startAgentProcess({
        natsUrl: nats.url,
        modelsDir: agentModelsDir,
        id: `agent-${i}`,
        slots: opts.slots ?? 2,
        heartbeatMs: 250,
        extra: [
          "--metrics-port",
          "0",
          "--embeddings",
          embeddingsDir,
          "--vae-dir",
          vaeDir,
          ...(i === 0 ? ["--upscalers", upscalersDir, "--loras", lorasDir] : []),
        ],
      });
      started.push(a);
      agents.push(a);
    }
    const coordinatorAddress = `127.0.0.1:${coordinator.ready["port"] as number}`;
    const client = createClient(RenderService, coordinatorAddress) as RenderClient;
    const farm: TestFarm = {
      coordinatorAddress,
      coordinatorMetricsUrl: coordinator.ready["metrics"] as string,
      agentMetricsUrls: agents.map((a) => a.ready["metrics"] as string),
      agentMetricsUrl: agents[0]?.ready["metrics"] as string,
      nats,
      coordinator,
      agents,
      modelsDir,
      client,
      waitForAgents: async (n) => {
        for (const deadline = Date.now() + 15_000; Date.now() < deadline;) {
          const { agents: seen } = await client.listAgents({});
          if (seen.length === n) return;
          await new Promise((r) => setTimeout(r, 50));
        }
        throw new Error(`coordinator did not see ${n} agents`);
      },
      runJob: async (params = {}) => {
        const { jobId } = await client.submit({
          params: {
            prompt: "a photo of a cat",
            model: "tiny-sd15",
            width: 64,
            height: 64,
            steps: 4,
            samplerName: "Euler a",
            seed: 1n,
            ...params,
          },
        });
        for await (const { event } of client.watch({ jobId })) {
          if (event?.event.case === "failed") throw new Error(`job failed: ${event.event.value.message}`);
        }
      },
      close: async () => {
        client.close();
        await Promise.all(agents.map((a) => a.kill()));
        await coordinator.kill();
        await nats.stop();
        rmSync(tmp, { recursive: true, force: true });
      },
    };
    await farm.waitForAgents(agents.length);
    return farm;
  } catch (err) {
    await Promise.all(started.map((s) => s.kill("SIGKILL")));
    await nats.stop();
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
}
