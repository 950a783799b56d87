export { Coordinator, type CoordinatorConfig } from "./coordinator.js";
export { validateJob, imageSeeds, resolveSeed, DEFAULT_LIMITS, type Limits } from "./validate.js";
