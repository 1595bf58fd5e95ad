#!/usr/bin/env bash
# Installs what elrt needs and is missing, then builds it. Safe to run again: each step is
# skipped when already done. Used by scripts/main.sh, scripts/test.sh and .ci/run.
#
#   scripts/setup.sh            system packages + Python interop packages + release build
#   ELRT_SETUP_TORCH=1 ...      also PyTorch (only for regenerating fixtures and model files)
#
# Open MPI (libopenmpi-dev, openmpi-bin) and libclang-dev (for the MPI bindings' bindgen) are
# installed too, and the binary is built with `--features mpi` when mpicc is there, so that
# `mpirun -np N target/release/elrt train ...` trains data-parallel (docs/mpi.md).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
pkg-config --exists openblas 2>/dev/null || [ -e /usr/lib/x86_64-linux-gnu/libopenblas.so ] || need_apt+=(libopenblas-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# A C compiler: the linker Rust calls, and mimalloc (the binary's allocator) is C built by cc.
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v mpicc >/dev/null || need_apt+=(libopenmpi-dev openmpi-bin)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! python3 -c "import onnx, onnxruntime, numpy, PIL" 2>/dev/null; then
  echo "setup: pip install -r scripts/requirements-ci.txt" >&2
  python3 -m pip install -q -r scripts/requirements-ci.txt
fi
if [ "${ELRT_SETUP_TORCH:-0}" = 1 ] && ! python3 -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: pip install -r scripts/requirements-dev.txt (PyTorch)" >&2
  python3 -m pip install -q -r scripts/requirements-dev.txt
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust from rustup first" >&2
  exit 1
fi
# The build scripts/test.sh tests and scripts/main.sh runs: with MPI when Open MPI is there.
features=()
command -v mpicc >/dev/null && features=(--features mpi)
cargo build --release --quiet ${features[@]+"${features[@]}"}
