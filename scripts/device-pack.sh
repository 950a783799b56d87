#!/bin/bash
# Packs what a GPU device run needs (see ../shared/device/README.md): the team kit's pack.sh, then
# node_modules again without dev-only tools (buf's binary, TypeScript, linters, manifest
# validators) to stay under the 64 MiB carry limit, and the tiny fixture model.
set -euo pipefail
bash ../shared/device/pack.sh >/dev/null
tar cJf .device-carry/nm.tar.xz \
  --exclude='node_modules/onnxruntime-node/bin/napi-v6/darwin' --exclude='node_modules/onnxruntime-node/bin/napi-v6/win32' \
  --exclude='node_modules/onnxruntime-node/bin/napi-v6/linux/arm64' --exclude='node_modules/@img/sharp-darwin*' \
  --exclude='node_modules/@img/sharp-win32*' --exclude='node_modules/@img/sharp-linux-arm*' --exclude='node_modules/@img/sharp-libvips-darwin*' \
  --exclude='node_modules/@img/sharp-libvips-linux-arm*' --exclude='node_modules/.cache' \
  --exclude='node_modules/@bufbuild/buf*' --exclude='node_modules/typescript' --exclude='node_modules/kubernetes-models' \
  --exclude='node_modules/@kubernetes-models' --exclude='node_modules/prettier' --exclude='node_modules/eslint' \
  --exclude='node_modules/@typescript-eslint' --exclude='node_modules/@eslint*' --exclude='node_modules/@huggingface' \
  node_modules
mkdir -p .device-carry/tiny-sd15
for p in model_index.json tiny_config.json scheduler tokenizer text_encoder unet vae_decoder; do cp -r ../shared/fixtures/tiny-sd15/$p .device-carry/tiny-sd15/; done
du -sh .device-carry .device-carry/*
