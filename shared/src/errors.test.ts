import { test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { FarmError } from "./errors.js";

/** A status as a grpc-js client sees it after a server threw `err` (FarmError.toStatus). */
function received(err: FarmError): grpc.ServiceError {
  const s = err.toStatus();
  return Object.assign(new Error(`${s.code} ${grpc.status[s.code!]}: ${s.details}`), {
    code: s.code!,
    details: s.details!,
    metadata: s.metadata!,
  });
}

test("a FarmError keeps its field across gRPC: the field from the trailers, the detail without its prefix", () => {
  const sent = FarmError.invalid("steps", "must be a positive integer, got 0");
  assert.equal(sent.message, "steps: must be a positive integer, got 0");
  assert.equal(sent.detail, "must be a positive integer, got 0");
  const got = FarmError.from(received(sent));
  assert.deepEqual([got.code, got.field, got.detail, got.message], [grpc.status.INVALID_ARGUMENT, "steps", sent.detail, sent.message]);
  const plain = FarmError.from(received(new FarmError(grpc.status.UNAVAILABLE, "no agents")));
  assert.deepEqual([plain.field, plain.detail, plain.message], [undefined, "no agents", "no agents"]);
});
