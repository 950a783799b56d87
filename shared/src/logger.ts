/** The injected logger every library class takes. Structured: a message and flat fields. */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

export type LogLevel = "debug" | "info" | "warn" | "error" | "silent";
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 };

/** JSON lines to a writable stream (stderr by default), so logs stay apart from a CLI's stdout. */
export function jsonLogger(opts: { level?: LogLevel; stream?: NodeJS.WritableStream; base?: Record<string, unknown> } = {}): Logger {
  const level = ORDER[opts.level ?? "info"];
  const stream = opts.stream ?? process.stderr;
  const base = opts.base ?? {};
  const write = (lvl: LogLevel, msg: string, fields?: Record<string, unknown>): void => {
    if (ORDER[lvl] < level) return;
    const rec = { time: new Date().toISOString(), level: lvl, msg, ...base, ...fields };
    stream.write(JSON.stringify(rec, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v)) + "\n");
  };
  return {
    debug: (m, f) => write("debug", m, f),
    info: (m, f) => write("info", m, f),
    warn: (m, f) => write("warn", m, f),
    error: (m, f) => write("error", m, f),
    child: (fields) => jsonLogger({ ...opts, base: { ...base, ...fields } }),
  };
}

export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
  child: () => silentLogger,
};
