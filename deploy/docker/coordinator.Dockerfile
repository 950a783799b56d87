# syntax=docker/dockerfile:1.7
# The coordinator image. Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t <registry>/latentfarm/coordinator:<version> .

FROM node:20.19-bookworm-slim AS build
WORKDIR /app
# The coordinator never runs a model: skip onnxruntime-node's CUDA download.
ENV ONNXRUNTIME_NODE_INSTALL=skip
# Manifests first, so the dependency layer is reused until the lockfile changes.
COPY package.json package-lock.json .npmrc ./
COPY shared/package.json shared/
COPY gpu-agent/package.json gpu-agent/
COPY coordinator/package.json coordinator/
COPY tests/package.json tests/
RUN npm ci --no-audit --no-fund
COPY tsconfig.base.json tsconfig.json ./
COPY bin bin
COPY proto proto
COPY shared shared
COPY gpu-agent gpu-agent
COPY coordinator coordinator
RUN npx tsc -b shared gpu-agent coordinator \
 && npm prune --omit=dev --no-audit --no-fund

FROM node:20.19-bookworm-slim
RUN groupadd --system --gid 10001 latentfarm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin latentfarm
WORKDIR /app
# Root owns the code, so the service cannot rewrite it; it only writes to /tmp (an emptyDir in
# Kubernetes, where the root filesystem is read-only).
COPY --from=build /app /app
ENV NODE_ENV=production \
    HOME=/tmp
# gRPC API, /metrics
EXPOSE 50051 9464
USER 10001:10001
ENTRYPOINT ["node", "/app/bin/latentfarm.js"]
CMD ["coordinator"]
