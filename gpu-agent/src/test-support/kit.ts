// Where this package's unit tests find the team kit's fixtures (../shared/fixtures beside the repo,
// or LATENTFARM_KIT_FIXTURES). Tests only: test files and test-support are not part of the built
// package (see tsconfig.json), and every test that needs the kit skips with kitSkip() without it.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const KIT_FIXTURES =
  process.env["LATENTFARM_KIT_FIXTURES"] ?? fileURLToPath(new URL("../../../../shared/fixtures/", import.meta.url));

/** A path inside the kit's fixtures folder. */
export const kitFixture = (...parts: string[]): string => join(KIT_FIXTURES, ...parts);

export const TINY_SD15 = kitFixture("tiny-sd15");

/** A node:test skip reason when the named fixture is missing, else false. */
export function kitSkip(...parts: string[]): string | false {
  return !existsSync(kitFixture(...parts)) && `team kit fixture ${join("../shared/fixtures", ...parts)} absent`;
}
