// Bundling aid for device benchmark runs only: grpc-health-check and @grpc/reflection read .proto
// files next to their modules at import time, which a single-file bundle cannot carry. The device
// scripts run pipelines, not gRPC servers, so these stand in for the two packages there.
export class HealthImplementation {
  addToServer() {}
  setStatus() {}
}
export class ReflectionService {
  addToServer() {}
}
