export { Agent, DEFAULT_ORPHAN_GRACE_MS, type AgentConfig } from "./agent.js";
export { TaskRun, type RunTaskMessage, type TaskOutput, type TaskRunOptions } from "./task-run.js";
export { ModelCatalog, validateModelName, type ModelEntry } from "./models/catalog.js";
export { SdModel } from "./models/sd-model.js";
export { OrtWorker } from "./runtime/ort-runtime.js";
export type { ExecutionProvider } from "./runtime/protocol.js";
