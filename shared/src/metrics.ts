import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

// Every metric the farm exports, in one table: the services create theirs from it, and the docs
// test compares the README against what a live /metrics actually serves. Labels are bounded sets
// (outcomes, model names, tenants); job ids, prompts and seeds never become labels.

type Kind = "counter" | "gauge" | "histogram";
interface MetricDef {
  readonly name: string;
  readonly kind: Kind;
  readonly help: string;
  readonly labels: readonly string[];
  readonly buckets?: readonly number[];
}

// Job latency spans seconds to minutes on real GPUs; step times span milliseconds to seconds.
const JOB_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300];
const STEP_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5];
const LOAD_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120];
// Submit is a validation plus one or two JetStream round trips; placement passes take microseconds to milliseconds.
const SUBMIT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];
const PLACEMENT_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1];

export const COORDINATOR_METRICS = {
  jobsSubmitted: { name: "latentfarm_jobs_submitted_total", kind: "counter", help: "Jobs accepted by Submit.", labels: ["tenant"] },
  jobsFinished: {
    name: "latentfarm_jobs_finished_total",
    kind: "counter",
    help: "Jobs that reached a final state, by outcome (succeeded, failed, cancelled) and failure reason (a gRPC status name, or none).",
    labels: ["outcome", "reason"],
  },
  imagesFinished: {
    name: "latentfarm_images_finished_total",
    kind: "counter",
    help: "Images that reached a final state, by outcome.",
    labels: ["outcome"],
  },
  jobDuration: {
    name: "latentfarm_job_duration_seconds",
    kind: "histogram",
    help: "Time from Submit to the job's final state.",
    labels: ["outcome"],
    buckets: JOB_BUCKETS,
  },
  queueDepth: { name: "latentfarm_queue_depth", kind: "gauge", help: "Image tasks waiting for an agent.", labels: [] },
  tasksRunning: { name: "latentfarm_tasks_running", kind: "gauge", help: "Image tasks running on agents.", labels: [] },
  agents: {
    name: "latentfarm_agents",
    kind: "gauge",
    help: "Agents known from heartbeats, by state (ready, draining).",
    labels: ["state"],
  },
  agentsLost: {
    name: "latentfarm_agents_lost_total",
    kind: "counter",
    help: "Agents dropped because their heartbeats stopped.",
    labels: [],
  },
  tasksDispatched: { name: "latentfarm_tasks_dispatched_total", kind: "counter", help: "Task attempts sent to agents.", labels: [] },
  refinerHandbacks: {
    name: "latentfarm_refiner_handbacks_total",
    kind: "counter",
    help: "Tasks whose pass reached its refiner switch on an agent without the refiner, placed again where the refiner is.",
    labels: [],
  },
  checkpointResumes: {
    name: "latentfarm_checkpoint_resumes_total",
    kind: "counter",
    help: "Task attempts that resumed from an earlier attempt's checkpoint instead of sampling from the start.",
    labels: [],
  },
  checkpointBytes: {
    name: "latentfarm_checkpoint_bytes",
    kind: "gauge",
    help: "Bytes of sampling-pass checkpoints the coordinator holds for running tasks (capped by --checkpoint-max-bytes).",
    labels: [],
  },
  taskRetries: {
    name: "latentfarm_task_retries_total",
    kind: "counter",
    help: "Task attempts that failed retryably and were placed again, by reason (a gRPC status name).",
    labels: ["reason"],
  },
  submitRejections: {
    name: "latentfarm_submit_rejections_total",
    kind: "counter",
    help: "Submit calls refused, by tenant and gRPC status name.",
    labels: ["tenant", "code"],
  },
  tenantImages: {
    name: "latentfarm_tenant_images_total",
    kind: "counter",
    help: "Images requested by accepted jobs, by tenant.",
    labels: ["tenant"],
  },
  tenantDeviceSeconds: {
    name: "latentfarm_tenant_device_seconds_total",
    kind: "counter",
    help: "Agent time spent on a tenant's tasks, by tenant and outcome: used (the attempt's work reached an image) or wasted (failed, lost, superseded by another attempt, cancelled).",
    labels: ["tenant", "outcome"],
  },
  tenantQueuedImages: {
    name: "latentfarm_tenant_queued_images",
    kind: "gauge",
    help: "Images of a tenant's jobs not finished yet (queued or running), by tenant; the queued-images limit applies to it.",
    labels: ["tenant"],
  },
  tenantRunningImages: {
    name: "latentfarm_tenant_running_images",
    kind: "gauge",
    help: "Images of a tenant running on agents now, by tenant.",
    labels: ["tenant"],
  },
  submitDuration: {
    name: "latentfarm_submit_duration_seconds",
    kind: "histogram",
    help: "Time to accept a job (validation, admission and the durable write).",
    labels: [],
    buckets: SUBMIT_BUCKETS,
  },
  placementPass: {
    name: "latentfarm_placement_pass_seconds",
    kind: "histogram",
    help: "Wall time of one placement pass over the queue.",
    labels: [],
    buckets: PLACEMENT_BUCKETS,
  },
  taskBackups: {
    name: "latentfarm_task_backups_total",
    kind: "counter",
    help: "Backup copies of running tasks started on idle agents, by reason (slow: a faster agent would finish first; stalled: no progress).",
    labels: ["reason"],
  },
  resultsDiscarded: {
    name: "latentfarm_results_discarded_total",
    kind: "counter",
    help: "Task results ignored because the task had already finished elsewhere (duplicate) or was cancelled or given up on (late).",
    labels: ["reason"],
  },
  jobsResumed: {
    name: "latentfarm_jobs_resumed_total",
    kind: "counter",
    help: "Unfinished jobs read back from JetStream and resumed after a coordinator start.",
    labels: [],
  },
  jobsInMemory: {
    name: "latentfarm_jobs_in_memory",
    kind: "gauge",
    help: "Jobs held in coordinator memory (unfinished ones plus a bounded set of recently finished ones).",
    labels: [],
  },
  storeRetries: {
    name: "latentfarm_store_retries_total",
    kind: "counter",
    help: "JetStream writes that failed and were retried, by reason (state, events or image).",
    labels: ["reason"],
  },
} as const satisfies Record<string, MetricDef>;

export const AGENT_METRICS = {
  tasks: {
    name: "latentfarm_agent_tasks_total",
    kind: "counter",
    help: "Tasks this agent finished, by outcome (succeeded, failed, cancelled).",
    labels: ["outcome"],
  },
  refinerSwitches: {
    name: "latentfarm_agent_refiner_switches_total",
    kind: "counter",
    help: "Passes that reached their refiner switch here, by outcome: local (the refiner ran here) or handed_back (to the coordinator).",
    labels: ["outcome"],
  },
  tasksAttached: {
    name: "latentfarm_agent_task_reattaches_total",
    kind: "counter",
    help: "RunTask calls that attached to a task already running or just finished here (a restarted coordinator re-adopting it).",
    labels: [],
  },
  taskDuration: {
    name: "latentfarm_task_duration_seconds",
    kind: "histogram",
    help: "Time an agent spent on one image task, model load included.",
    labels: ["outcome"],
    buckets: JOB_BUCKETS,
  },
  unetSteps: { name: "latentfarm_unet_steps_total", kind: "counter", help: "UNet evaluations (model calls), by model.", labels: ["model"] },
  unetStepDuration: {
    name: "latentfarm_unet_step_duration_seconds",
    kind: "histogram",
    help: "Wall time of one UNet evaluation (cond and uncond together), by model.",
    labels: ["model"],
    buckets: STEP_BUCKETS,
  },
  modelLoad: {
    name: "latentfarm_model_load_seconds",
    kind: "histogram",
    help: "Time to load a model's ONNX sessions, by model.",
    labels: ["model"],
    buckets: LOAD_BUCKETS,
  },
  modelLoadFailures: {
    name: "latentfarm_model_load_failures_total",
    kind: "counter",
    help: "Model loads that failed, by model.",
    labels: ["model"],
  },
  modelsLoaded: { name: "latentfarm_models_loaded", kind: "gauge", help: "Models held in memory.", labels: [] },
  slots: { name: "latentfarm_agent_slots", kind: "gauge", help: "Tasks this agent runs at once.", labels: [] },
  busySlots: { name: "latentfarm_agent_busy_slots", kind: "gauge", help: "Slots running a task now.", labels: [] },
  busySeconds: {
    name: "latentfarm_agent_busy_seconds_total",
    kind: "counter",
    help: "Seconds the agent spent with at least one task running; rate() of it is utilization.",
    labels: [],
  },
} as const satisfies Record<string, MetricDef>;

/** The A1111 API gateway (`latentfarm a1111-api`): its HTTP calls; what they render shows in the coordinator's. */
export const A1111_API_METRICS = {
  apiRequests: {
    name: "latentfarm_a1111_api_requests_total",
    kind: "counter",
    help: "HTTP calls to the A1111 API gateway, by route (txt2img, progress, …; other for unknown paths) and HTTP status.",
    labels: ["route", "status"],
  },
  apiRequestDuration: {
    name: "latentfarm_a1111_api_request_duration_seconds",
    kind: "histogram",
    help: "Time from an A1111 API call's arrival to its answer, by route: a txt2img call lasts as long as its job.",
    labels: ["route"],
    buckets: [0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300],
  },
  apiCallsInFlight: {
    name: "latentfarm_a1111_api_calls_in_flight",
    kind: "gauge",
    help: "A1111 API calls being answered now (generation calls wait for their jobs).",
    labels: [],
  },
} as const satisfies Record<string, MetricDef>;

type Metric<D extends MetricDef> = D["kind"] extends "counter"
  ? Counter<D["labels"][number]>
  : D["kind"] extends "gauge"
    ? Gauge<D["labels"][number]>
    : Histogram<D["labels"][number]>;

export type MetricSet<T extends Record<string, MetricDef>> = { readonly [K in keyof T]: Metric<T[K]> };

/** Creates the metrics of one catalog in its own Registry (never the global one), plus process metrics. */
export function createMetrics<T extends Record<string, MetricDef>>(
  catalog: T,
  opts: { defaultMetrics?: boolean } = {},
): { registry: Registry; metrics: MetricSet<T> } {
  const registry = new Registry();
  const out: Record<string, unknown> = {};
  for (const [key, d] of Object.entries(catalog)) {
    const common = { name: d.name, help: d.help, labelNames: [...d.labels], registers: [registry] };
    out[key] =
      d.kind === "counter"
        ? new Counter(common)
        : d.kind === "gauge"
          ? new Gauge(common)
          : new Histogram({ ...common, buckets: [...(d.buckets ?? [])] });
  }
  if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  return { registry, metrics: out as MetricSet<T> };
}

export function metricNames(catalog: Record<string, MetricDef>): string[] {
  return Object.values(catalog).map((d) => d.name);
}
