import { status } from "@grpc/grpc-js";
import { FarmError, PromptSyntaxError } from "@latentfarm/shared";

export { PromptSyntaxError };

/** The model cannot produce what the request asks (e.g. a CLIP skip deeper than its hidden states). */
export class ConditioningPreconditionError extends FarmError {
  constructor(message: string, field?: string) {
    super(status.FAILED_PRECONDITION, message, field === undefined ? {} : { field });
    this.name = "ConditioningPreconditionError";
  }
}
