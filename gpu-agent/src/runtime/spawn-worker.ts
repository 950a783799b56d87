import { Worker, type WorkerOptions } from "node:worker_threads";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

/**
 * Starts a worker thread on a module next to the caller: `name`.js in the built package, else `name`.ts.
 * Under tsx (tests, benchmarks) only the .ts source exists and a worker does not inherit the parent's
 * loader hooks, so the worker registers tsx itself before importing the module.
 */
export function spawnModuleWorker(base: string | URL, name: string, options: WorkerOptions): Worker {
  const js = new URL(`./${name}.js`, base);
  if (existsSync(fileURLToPath(js))) return new Worker(js, options);
  const ts = new URL(`./${name}.ts`, base).href;
  const boot = `import("tsx/esm/api").then((m) => { m.register(); return import(${JSON.stringify(ts)}); });`;
  return new Worker(boot, { ...options, eval: true });
}
