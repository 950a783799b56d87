import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { createServer } from "node:net";

/** Finds nats-server on PATH or where Debian installs it (/usr/sbin is not on a user's PATH). */
export function findNatsServer(): string | undefined {
  const dirs = [...(process.env["PATH"] ?? "").split(delimiter), "/usr/sbin", "/usr/local/sbin"];
  for (const d of dirs) {
    const p = join(d, "nats-server");
    if (d && existsSync(p)) return p;
  }
  return undefined;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface NatsServerHandle {
  readonly url: string;
  readonly monitorUrl: string;
  readonly process: ChildProcess;
  stop(): Promise<void>;
}

/** Starts a local nats-server with JetStream in a temp store, capped so it cannot take the disk. */
export async function startNatsServer(opts: { binary?: string; port?: number; storeDir?: string } = {}): Promise<NatsServerHandle> {
  const bin = opts.binary ?? findNatsServer();
  if (!bin)
    throw new Error("nats-server not found on PATH or in /usr/sbin: install it (Debian: apt-get install nats-server) or pass --nats URL");
  const port = opts.port ?? (await freePort());
  const monitor = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "latentfarm-nats-"));
  const store = opts.storeDir ?? join(dir, "js");
  const conf = join(dir, "nats.conf");
  writeFileSync(conf, `jetstream { store_dir: "${store}", max_memory_store: 256MB, max_file_store: 1GB }\n`);
  const child = spawn(bin, ["-a", "127.0.0.1", "-p", String(port), "-m", String(monitor), "-c", conf], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const monitorUrl = `http://127.0.0.1:${monitor}`;
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`nats-server exited with ${child.exitCode}: ${stderr}`);
    try {
      const r = await fetch(`${monitorUrl}/healthz?js-enabled-only=true`);
      if (r.ok) break;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`nats-server did not become healthy: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    url: `nats://127.0.0.1:${port}`,
    monitorUrl,
    process: child,
    stop: async () => {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), 3000);
        await exited;
        clearTimeout(t);
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
