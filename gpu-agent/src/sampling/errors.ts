import * as grpc from "@grpc/grpc-js";
import { FarmError } from "@latentfarm/shared";

/**
 * A sampling parameter the caller supplied is unusable. `field` names the request field (A1111 name);
 * as a FarmError it maps to gRPC INVALID_ARGUMENT.
 */
export class InvalidSamplingParameter extends FarmError {
  declare readonly field: string;

  constructor(field: string, message: string) {
    super(grpc.status.INVALID_ARGUMENT, message, { field });
    this.name = "InvalidSamplingParameter";
  }
}
