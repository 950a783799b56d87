export { Coordinator, type CoordinatorConfig } from "./coordinator.js";
export { validateJob, imageSeeds, resolveSeed, DEFAULT_LIMITS, type Limits } from "./validate.js";
export { startNatsServer, findNatsServer, freePort, type NatsServerHandle } from "./cli/nats-server.js";
export { startFarm, type Farm } from "./cli/main.js";
