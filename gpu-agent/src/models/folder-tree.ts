// Walking the agent's folders (embeddings, VAEs) as A1111's os.walk/glob do: links followed, every file.

import { readdir, realpath, stat } from "node:fs/promises";
import { join } from "node:path";

export interface TreeFile {
  readonly path: string;
  readonly size: number;
  readonly mtimeMs: number;
}

/**
 * Regular files under `dir` whose name `keep` accepts. Links are followed, each real folder once, so a
 * link loop ends. With `skipHidden`, entries named ".…" are left out. An unreadable folder is an error.
 */
export async function filesUnder(
  dir: string,
  keep: (name: string) => boolean,
  opts: { skipHidden?: boolean } = {},
  seen = new Set<string>(),
): Promise<TreeFile[]> {
  const real = await realpath(dir);
  if (seen.has(real)) return [];
  seen.add(real);
  const out: TreeFile[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (opts.skipHidden && entry.name.startsWith(".")) continue;
    const path = join(dir, entry.name);
    const s = entry.isSymbolicLink() ? await stat(path).catch(() => undefined) : entry;
    if (s?.isDirectory()) out.push(...(await filesUnder(path, keep, opts, seen)));
    else if (s?.isFile() && keep(entry.name)) {
      const { size, mtimeMs } = await stat(path);
      out.push({ path, size, mtimeMs });
    }
  }
  return out;
}

/** The latest mtime of a folder tree's directories: a file added, removed or renamed anywhere changes it. */
export async function treeMtime(dir: string): Promise<number> {
  let latest = (await stat(dir)).mtimeMs;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) latest = Math.max(latest, await treeMtime(join(dir, entry.name)));
  }
  return latest;
}
