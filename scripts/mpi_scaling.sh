#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same training (global batch 128, synthetic data,
# one epoch) as one process with 2 threads and as `mpirun -np 2` ranks with 1 thread each, for
# ResNet-20 and its Tucker-2 form (compress's default ranks, params=0.4), the MPI run also with
# --sync-bn. Prints img/s (from
# the metrics file: the epoch's training steps, evaluation excluded) and, for the MPI runs, the
# bytes each rank all-reduces per step, the milliseconds per step the all-reduce takes (after a
# barrier) and the share of the step it is, and the milliseconds per step spent in that barrier
# waiting for the slower rank (load imbalance; on a busy machine, other processes). docs/mpi.md has the numbers of this machine.
#
#   scripts/mpi_scaling.sh [IMAGES]      (default 3840 training images: 30 steps)
#
# Needs the binary built with --features mpi (scripts/setup.sh does) and mpirun.
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-3840}
elrt=target/release/elrt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
"$elrt" convert models/resnet20.onnx --ranks params=0.4 -o "$tmp/tucker2.onnx" >/dev/null
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); global batch 128, $images images"
printf '%-10s %-13s %8s %9s %13s %7s %13s\n' model run img/s "MB/step" "allreduce ms" "comm %" "wait ms/step"
for model in models/resnet20.onnx "$tmp/tucker2.onnx"; do
  name=$(basename "$model" .onnx)
  args=(train "$model" --data "synthetic:$images,128" --epochs 1 --batch 128 --json --quiet)
  "$elrt" "${args[@]}" --threads 2 -o "$tmp/one.onnx" >"$tmp/one.json"
  mpirun --oversubscribe --bind-to none -np 2 "$elrt" "${args[@]}" --threads 1 -o "$tmp/two.onnx" >"$tmp/two.json"
  mpirun --oversubscribe --bind-to none -np 2 "$elrt" "${args[@]}" --threads 1 --sync-bn -o "$tmp/sync.onnx" >"$tmp/sync.json"
  python3 - "$name" "$tmp/one.json" "$tmp/two.json" "$tmp/sync.json" <<'PY'
import json, sys
name = sys.argv[1]
for label, path in (("1 x 2 thr", sys.argv[2]), ("2 ranks x 1", sys.argv[3]), ("  --sync-bn", sys.argv[4])):
    r = json.load(open(path))
    last, mpi = r["last"], r.get("mpi")
    ips = last["img_per_s"]
    if mpi:
        step_s = 128 / ips
        ms = 1e3 * mpi["seconds"] / mpi["steps"]
        wait = 1e3 * mpi["wait_seconds"] / mpi["steps"]
        print(f"{name:<10} {label:<13} {ips:8.1f} {mpi['bytes_per_step']/1e6:9.3f} {ms:13.2f} {100*ms/1e3/step_s:6.1f}% {wait:13.2f}")
    else:
        print(f"{name:<10} {label:<13} {ips:8.1f} {'-':>9} {'-':>13} {'-':>7} {'-':>13}")
PY
done
