import { status } from "@grpc/grpc-js";
import { FarmError } from "@latentfarm/shared";

/** A prompt A1111 itself would reject (it raises while parsing); field "prompt", INVALID_ARGUMENT. */
export class PromptSyntaxError extends FarmError {
  constructor(message: string) {
    super(status.INVALID_ARGUMENT, message, { field: "prompt" });
    this.name = "PromptSyntaxError";
  }
}

/** The model cannot produce what the request asks (e.g. a CLIP skip deeper than its hidden states). */
export class ConditioningPreconditionError extends FarmError {
  constructor(message: string, field?: string) {
    super(status.FAILED_PRECONDITION, message, field === undefined ? {} : { field });
    this.name = "ConditioningPreconditionError";
  }
}
