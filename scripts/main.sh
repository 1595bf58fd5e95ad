#!/usr/bin/env bash
# The main job on the embedded default, set-up included: `elrt compress` takes ResNet-20 from
# models/, rewrites it to Tucker-2, trains the factors from random init with double soft
# orthogonality on the built-in synthetic data (a short schedule), exports the compact ONNX
# file (BN folded, layer forms timed in tract), validates it in tract against the engine,
# benchmarks it against the original architecture and writes report.md. A few minutes on
# 2 cores once built. Extra arguments go to `elrt compress` (e.g. --data cifar10:PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=runs/main
if [ -f "$out/run.json" ]; then
  # A finished or stopped earlier run: start afresh (pass --resume yourself to continue one).
  case " $* " in *" --resume "*) ;; *) rm -rf "$out" ;; esac
fi
target/release/elrt compress models/resnet20.onnx --out "$out" "$@"
echo "report: $out/report.md"
