#!/usr/bin/env bash
# The test command: sets up what is missing, generates the model files that are too large to
# commit (when PyTorch is installed), then runs every test (with `--features mpi` when Open MPI
# is installed, as setup.sh does: tests/mpi.rs then runs `mpirun -np 2`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if python3 -c "import torch, torchvision" 2>/dev/null; then
  [ -f models/vgg16_bn.onnx ] || python3 scripts/export_models.py --only vgg16_bn
  tv=target/torchvision-onnx
  [ -f "$tv/manifest.json" ] || python3 scripts/export_torchvision.py "$tv"
else
  echo "test: PyTorch not installed; tests on generated models (vgg16_bn, torchvision exports) will skip" >&2
  echo "      (ELRT_SETUP_TORCH=1 scripts/setup.sh installs it)" >&2
fi
# With MPI (tests/mpi.rs runs `mpirun -np 2`) when setup.sh could install Open MPI.
features=()
command -v mpicc >/dev/null && features=(--features mpi)
cargo test --release ${features[@]+"${features[@]}"} "$@"
# The engine's unit tests again with the vector instructions capped (ELRT_MAX_ISA,
# src/engine/isa.rs): on an AVX-512 machine the AVX2 builds and the SSE2 baseline then run
# through the speed rules' own choices too, each against the naive references. Whole runs only.
if [ $# -eq 0 ]; then
  for isa in avx2 sse2; do
    echo "test: engine unit tests under ELRT_MAX_ISA=$isa" >&2
    ELRT_MAX_ISA=$isa cargo test --release ${features[@]+"${features[@]}"} --lib
  done
fi
