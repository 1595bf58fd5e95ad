#!/usr/bin/env bash
# The main job on the embedded default. Sets up what is missing first.
# Today the pipeline's first stage is what exists: inspect the model zoo's ResNet-20 (the
# `compress` command of issue 6 replaces this once training and export land).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/elrt inspect models/resnet20.onnx "$@"
