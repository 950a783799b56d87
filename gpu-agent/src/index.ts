export { Agent, type AgentConfig } from "./agent.js";
export { DEFAULT_ORPHAN_GRACE_MS, TaskRun, type RunTaskMessage, type TaskOutput, type TaskRunOptions } from "./task-run.js";
export { ModelCatalog, validateModelName, type ModelEntry } from "./models/catalog.js";
export { SdModel } from "./models/sd-model.js";
export { OrtWorker } from "./runtime/ort-runtime.js";
export type { ExecutionProvider } from "./runtime/protocol.js";
