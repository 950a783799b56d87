import * as grpc from "@grpc/grpc-js";

/** gRPC status names, as the wire and the docs spell them. */
export type StatusName = keyof typeof grpc.status;

// Statuses a caller may retry as-is (gRPC's own guidance, infra-notes §1.7).
const RETRYABLE = new Set<grpc.status>([
  grpc.status.UNAVAILABLE,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.ABORTED,
  grpc.status.DEADLINE_EXCEEDED,
]);

/**
 * The one error type that crosses package boundaries: a gRPC status code, the request field it is
 * about (when there is one), and whether a retry can succeed.
 */
export class FarmError extends Error {
  readonly code: grpc.status;
  readonly field: string | undefined;
  readonly retryable: boolean;
  /**
   * The work was given back unfinished by a server that is shutting down (trailer x-handback), not
   * failed: the caller places it elsewhere without counting a failure against it.
   */
  readonly handBack: boolean;
  /** The message without the "field: " prefix `message` carries when there is a field. */
  readonly detail: string;

  constructor(code: grpc.status, message: string, opts: { field?: string; cause?: unknown; retryable?: boolean; handBack?: boolean } = {}) {
    super(opts.field ? `${opts.field}: ${message}` : message, { cause: opts.cause });
    this.name = "FarmError";
    this.code = code;
    this.field = opts.field;
    this.detail = message;
    this.retryable = opts.retryable ?? RETRYABLE.has(code);
    this.handBack = opts.handBack ?? false;
  }

  get codeName(): StatusName {
    return statusName(this.code);
  }

  static invalid(field: string, message: string): FarmError {
    return new FarmError(grpc.status.INVALID_ARGUMENT, message, { field });
  }

  static notFound(message: string, field?: string): FarmError {
    return new FarmError(grpc.status.NOT_FOUND, message, field === undefined ? {} : { field });
  }

  static unimplemented(field: string, message: string): FarmError {
    return new FarmError(grpc.status.UNIMPLEMENTED, message, { field });
  }

  /** Turns anything thrown into a FarmError; unknown errors become INTERNAL. */
  static from(err: unknown): FarmError {
    if (err instanceof FarmError) return err;
    if (isServiceError(err)) {
      const handBack = err.metadata?.get("x-handback")[0]?.toString() === "true";
      // The field travels in the trailers (toStatus), and already prefixes the details.
      const field = err.metadata?.get("x-field")[0]?.toString() || undefined;
      const text = err.details || err.message;
      const message = field !== undefined && text.startsWith(`${field}: `) ? text.slice(field.length + 2) : text;
      return new FarmError(err.code, message, { cause: err, handBack, ...(field !== undefined && { field }) });
    }
    if (err instanceof Error && err.name === "AbortError") {
      return new FarmError(grpc.status.CANCELLED, err.message || "cancelled", { cause: err });
    }
    const code = (err as { code?: unknown } | null)?.code;
    if (typeof code === "string" && code in grpc.status) {
      return new FarmError(grpc.status[code as StatusName], (err as Error).message, { cause: err });
    }
    return new FarmError(grpc.status.INTERNAL, err instanceof Error ? err.message : String(err), { cause: err });
  }

  /** The object grpc-js sends as a status to the peer. */
  toStatus(): Partial<grpc.StatusObject> {
    const metadata = new grpc.Metadata();
    if (this.field) metadata.set("x-field", this.field);
    metadata.set("x-retryable", String(this.retryable));
    if (this.handBack) metadata.set("x-handback", "true");
    return { code: this.code, details: this.message, metadata };
  }
}

export function statusName(code: grpc.status): StatusName {
  return (grpc.status[code] as StatusName | undefined) ?? "UNKNOWN";
}

export function isServiceError(err: unknown): err is grpc.ServiceError {
  return err instanceof Error && typeof (err as grpc.ServiceError).code === "number" && "details" in err;
}

/** An AbortError-like error for aborted slow calls. */
export function abortError(signal: AbortSignal): FarmError {
  const reason: unknown = signal.reason;
  if (reason instanceof FarmError) return reason;
  return new FarmError(grpc.status.CANCELLED, reason instanceof Error ? reason.message : "cancelled", { cause: reason });
}

/** A prompt A1111 itself would reject (it raises while parsing); field "prompt", INVALID_ARGUMENT. */
export class PromptSyntaxError extends FarmError {
  constructor(message: string) {
    super(grpc.status.INVALID_ARGUMENT, message, { field: "prompt" });
    this.name = "PromptSyntaxError";
  }
}
