#!/bin/bash
# Bundles a device script (default tests/bench/device-run.ts) and the ORT worker into .device-carry/app,
# so the GPU machine needs only the native packages from node_modules (see scripts/device-pack.sh).
set -euo pipefail
entry=${1:-tests/bench/device-run.ts}
banner="import { createRequire } from 'module'; import { fileURLToPath as __lf_f } from 'url'; import { dirname as __lf_d } from 'path'; const require = createRequire(import.meta.url); const __filename = __lf_f(import.meta.url); const __dirname = __lf_d(__filename);"
common=(--bundle --minify --platform=node --format=esm --target=node20 --external:onnxruntime-node --external:sharp
  --alias:grpc-health-check=./scripts/device/no-grpc-services.mjs --alias:@grpc/reflection=./scripts/device/no-grpc-services.mjs "--banner:js=$banner")
npx esbuild "$entry" "${common[@]}" --outfile=.device-carry/app/device-run.mjs
npx esbuild gpu-agent/src/runtime/ort-worker.ts "${common[@]}" --outfile=.device-carry/app/ort-worker.js
