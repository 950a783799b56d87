export { Coordinator, RetryLaterError, type CoordinatorConfig } from "./coordinator.js";
export { validateJob, imageSeeds, resolveSeed, DEFAULT_LIMITS, type Limits } from "./validate.js";
export { startNatsServer, findNatsServer, freePort, type NatsServerHandle } from "./cli/nats-server.js";
export { startFarm, type Farm } from "./cli/main.js";
export { A1111Gateway, type A1111GatewayOptions } from "./a1111-api/gateway.js";
export { readApiRequest, modelFromCheckpointTitle, type ApiRequest, type Endpoint } from "./a1111-api/request.js";
export {
  DurableStore,
  DEFAULT_DURABLE_CONFIG,
  ConflictError,
  StoreConfigError,
  ensureStream,
  type DurableStoreConfig,
  type StoredJob,
} from "./durable-store.js";
export { FairQueue, DEFAULT_TENANT_POLICY, type TenantPolicy, type FairItem } from "./fair-queue.js";
export { SpeedModel, type SpeedKey, type Estimate } from "./speed-model.js";
export {
  Scheduler,
  handsOver,
  type Task,
  type Run,
  type SchedulerHooks,
  type SchedulerOptions,
  type TaskStageSpec,
  type StageRequest,
} from "./scheduler.js";
export { Job, JobStore, type JobSpec } from "./job-store.js";
export type { AgentState } from "./agent-registry.js";
export {
  HiresImage,
  DEFAULT_HIRES_TILING,
  planHires,
  checkTiling,
  equivalentModelCalls,
  parsePixelCount,
  type HiresPlan,
  type HiresTiling,
  type StageSpec,
} from "./hires-stages.js";
