// Where this package's unit tests find the team kit's fixtures: the folder LATENTFARM_KIT_FIXTURES names.
// The test runner (scripts/run-tests.mjs, behind `npm test`) sets it to the kit beside the repository
// when it is there; this package itself knows no path outside its own tree. Tests only: test files and
// test-support are not part of the built package (see tsconfig.json), and every test that needs the kit
// skips with kitSkip() when it is not configured or lacks the fixture.
import { existsSync } from "node:fs";
import { join } from "node:path";

const configured = process.env["LATENTFARM_KIT_FIXTURES"] || undefined;

/** The kit's fixtures folder; without the kit, a path that does not exist (tests then skip). */
export const KIT_FIXTURES: string = configured ?? "/nonexistent-latentfarm-kit-fixtures";

/** A path inside the kit's fixtures folder. */
export const kitFixture = (...parts: string[]): string => join(KIT_FIXTURES, ...parts);

export const TINY_SD15 = kitFixture("tiny-sd15");

/** A node:test skip reason when the named fixture is missing, else false. */
export function kitSkip(...parts: string[]): string | false {
  if (configured === undefined)
    return "team kit not configured: set LATENTFARM_KIT_FIXTURES (npm test sets it when the kit is beside the repo)";
  return !existsSync(kitFixture(...parts)) && `team kit fixture ${join(KIT_FIXTURES, ...parts)} absent`;
}
