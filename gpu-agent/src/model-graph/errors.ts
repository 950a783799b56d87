import { status } from "@grpc/grpc-js";
import { FarmError } from "@latentfarm/shared";

/**
 * A model, checkpoint or LoRA file that cannot be used. It names the file so that an operator can find
 * the broken download; the job fails, the agent keeps running.
 */
export class ModelFileError extends FarmError {
  readonly file: string;

  constructor(code: status, file: string, message: string, opts: { cause?: unknown } = {}) {
    super(code, `${file}: ${message}`, opts);
    this.name = "ModelFileError";
    this.file = file;
  }

  static invalidFile(file: string, message: string, cause?: unknown): ModelFileError {
    return new ModelFileError(status.INVALID_ARGUMENT, file, message, cause === undefined ? {} : { cause });
  }

  static fileNotFound(file: string, message: string, cause?: unknown): ModelFileError {
    return new ModelFileError(status.NOT_FOUND, file, message, cause === undefined ? {} : { cause });
  }
}

/** A request (config, option, name) the model-graph code cannot honour; not tied to a file. */
export function invalidArgument(field: string, message: string): FarmError {
  return FarmError.invalid(field, message);
}
