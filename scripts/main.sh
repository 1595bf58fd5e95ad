#!/usr/bin/env bash
# The main job on the embedded default, set-up included: ResNet-20 converted to Tucker-2
# (ratio 0.5), trained from random factors with double soft orthogonality on the built-in
# synthetic data for a short schedule, then evaluated. A few minutes on 2 cores.
# (Issue 6's one-command `elrt compress` will replace this sequence.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
elrt=target/release/elrt
out=runs/main
mkdir -p "$out"
$elrt inspect models/resnet20.onnx | tail -n 1
$elrt convert models/resnet20.onnx --format tucker2 --ranks ratio=0.5 -o "$out/resnet20.tucker2.onnx" | tail -n 2
$elrt train "$out/resnet20.tucker2.onnx" --data synthetic:4000,1000 --epochs 3 --batch 64 --lr 0.05 \
  --orth 0.01 --seed 0 -o "$out/resnet20.tucker2.trained.onnx" "$@"
$elrt eval "$out/resnet20.tucker2.trained.onnx" --data synthetic:4000,1000
echo "outputs in $out/: the factorized architecture, the trained model, its checkpoint and metrics"
