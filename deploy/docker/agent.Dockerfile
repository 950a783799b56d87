# syntax=docker/dockerfile:1.7
# The GPU agent image: Node 20 on NVIDIA's CUDA 12 runtime with cuDNN 9, which onnxruntime-node's
# CUDA execution provider needs. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t <registry>/latentfarm/gpu-agent:<version> .

FROM node:20.19-bookworm-slim AS build
WORKDIR /app
# onnxruntime-node ships CPU binaries only; its install script fetches the CUDA 12 execution
# provider (libonnxruntime_providers_cuda.so) from NuGet when asked to. This overrides .npmrc's skip.
ENV ONNXRUNTIME_NODE_INSTALL=cuda12
COPY package.json package-lock.json .npmrc ./
COPY shared/package.json shared/
COPY gpu-agent/package.json gpu-agent/
COPY coordinator/package.json coordinator/
COPY tests/package.json tests/
RUN npm ci --no-audit --no-fund \
 && test -f node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime_providers_cuda.so
COPY tsconfig.base.json tsconfig.json ./
COPY bin bin
COPY proto proto
COPY shared shared
COPY gpu-agent gpu-agent
COPY coordinator coordinator
RUN npx tsc -b shared gpu-agent coordinator \
 && npm prune --omit=dev --no-audit --no-fund

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# The same Node build as the build stage, so native addons match the runtime exactly.
COPY --from=build /usr/local/bin/node /usr/local/bin/node
RUN groupadd --system --gid 10001 latentfarm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin latentfarm
WORKDIR /app
COPY --from=build /app /app
ENV NODE_ENV=production \
    HOME=/tmp \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# gRPC API, plaintext health, /metrics
EXPOSE 50052 50053 9465
USER 10001:10001
ENTRYPOINT ["node", "/app/bin/latentfarm.js"]
CMD ["agent"]
