export { Agent, type AgentConfig } from "./agent.js";
export { ModelCatalog, validateModelName, type ModelEntry } from "./models/catalog.js";
export { SdModel } from "./models/sd-model.js";
export { OrtWorker } from "./runtime/ort-runtime.js";
export type { ExecutionProvider } from "./runtime/protocol.js";
