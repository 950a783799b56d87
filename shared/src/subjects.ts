// NATS subjects: dot-separated, general to specific, the id last so a wildcard can select it.
export const subjects = {
  jobEvents: (jobId: string) => `lf.job.${jobId}.events`,
  /** The coordinator's JetStream event stream captures these (JobEventBatch payloads). */
  allJobEvents: "lf.job.*.events",
  taskProgress: (taskId: string) => `lf.task.${taskId}.progress`,
  allTaskProgress: "lf.task.*.progress",
  agentHeartbeat: (agentId: string) => `lf.agent.${agentId}.heartbeat`,
  allAgentHeartbeats: "lf.agent.*.heartbeat",
} as const;

/** Ids become subject tokens, so they may not contain separators or wildcards. */
export function isSubjectToken(id: string): boolean {
  return /^[A-Za-z0-9_-]{1,128}$/.test(id);
}
