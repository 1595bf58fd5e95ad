#!/usr/bin/env python3
"""Training-step speed of torchvision classifiers: elrt against PyTorch CPU, interleaved, one run.

    python3 scripts/bench_torchvision.py [--models resnet18,mobilenet_v2] [--size 64] [--batch 64]
        [--threads 1,2] [--rounds 3] [--steps 3] [--elrt target/release/elrt[,OTHER_BUILD ...]]
        [--out docs/bench/torchvision_speed.json]

Each model is torchvision's (weights=None, 10 classes), exported once with a dynamic batch
(opset 13, the conformance suite's "dynamic" form). The work timed on both sides is one
training step: forward in training mode, softmax cross-entropy, backward; a fixed random
batch, one warm-up step, then --steps timed steps.
* elrt: `elrt speed FILE --batch B --threads T --steps S --json`, one process per run, for each
  binary given to --elrt (so two builds can be compared in the same run: the ratio between them
  is what a kernel change bought).
* PyTorch: a fresh process per run with torch.set_num_threads(T), interop threads 1.
Runs are interleaved (round by round, every model and thread count, each elrt build then
PyTorch), and the median img/s of each is reported with its ratio to PyTorch. Shared machines
drift 2x from day to day; only the ratios of one run hold. The JSON has the CPU model, the
OpenBLAS kernel set elrt used and the load average.

The whole issue-15 suite (ResNet-20 and its Tucker-2 form, resnet18 full and through
`elrt convert --ranks params=0.5` at 64 and 128, these nets, peak memory, 2-thread scaling, the
goals) is scripts/bench_train.py; this script is the quick A/B tool: several elrt builds against
each other and PyTorch on torchvision nets, which is how a kernel change is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NUM_CLASSES = 10


def torch_worker(args) -> int:
    import time

    import torch
    import torch.nn.functional as F
    import torchvision

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=NUM_CLASSES)
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.arange(args.batch) % NUM_CLASSES

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = time.perf_counter() - t0
    print(json.dumps({"img_per_s": args.batch * args.steps / wall}))
    return 0


def export(name: str, size: int, path: str) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), path, opset_version=13,
                      input_names=["input"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def last_json(text: str) -> dict:
    """The JSON object a command printed (elrt pretty-prints it over several lines)."""
    i, j = text.find("{"), text.rfind("}")
    if i < 0 or j < i:
        raise ValueError(f"no JSON in output: {text[-300:]}")
    return json.loads(text[i:j + 1])


def run(cmd: list, timeout: float) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return last_json(p.stdout)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0")
    ap.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    ap.add_argument("--elrt", default=os.path.join(REPO, "target", "release", "elrt"),
                    help="comma-separated elrt binaries (default: this build)")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        args.threads = int(args.threads)
        return torch_worker(args)

    models = [m for m in args.models.split(",") if m]
    threads = [int(t) for t in args.threads.split(",")]
    builds = [b for b in args.elrt.split(",") if b]
    for b in builds:
        if not os.access(b, os.X_OK):
            raise SystemExit(f"{b}: no such elrt binary (cargo build --release first)")
    tmp = tempfile.mkdtemp(prefix="elrt-tv-bench-")
    files = {}
    for m in models:
        files[m] = os.path.join(tmp, f"{m}_{args.size}.onnx")
        print(f"export {m} at {args.size}x{args.size}", file=sys.stderr)
        export(m, args.size, files[m])

    samples: dict = {}
    blas_core = None
    for r in range(args.rounds):
        for m in models:
            for t in threads:
                for i, b in enumerate(builds):
                    d = run([b, "speed", files[m], "--batch", str(args.batch), "--threads", str(t),
                             "--steps", str(args.steps), "--json"], args.timeout)
                    blas_core = d.get("blas_core", blas_core)
                    samples.setdefault((m, t, f"elrt{i}"), []).append(d["img_per_s"])
                d = run([sys.executable, __file__, "--torch-worker", "--model", m,
                         "--threads", str(t), "--batch", str(args.batch), "--size", str(args.size),
                         "--steps", str(args.steps)], args.timeout)
                samples.setdefault((m, t, "torch"), []).append(d["img_per_s"])
                print(f"round {r + 1}/{args.rounds} {m} {t} thread(s) done", file=sys.stderr)

    rows = []
    for m in models:
        for t in threads:
            torch_ips = statistics.median(samples[(m, t, "torch")])
            row = {"model": m, "size": args.size, "batch": args.batch, "threads": t,
                   "torch_img_per_s": torch_ips, "elrt": []}
            for i, b in enumerate(builds):
                e = statistics.median(samples[(m, t, f"elrt{i}")])
                row["elrt"].append({"binary": b, "img_per_s": e, "ratio": e / torch_ips,
                                    "samples": samples[(m, t, f"elrt{i}")]})
            row["torch_samples"] = samples[(m, t, "torch")]
            rows.append(row)
    report = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "blas_core": blas_core,
        "loadavg_end": os.getloadavg(), "rounds": args.rounds, "steps": args.steps, "rows": rows,
    }
    heads = " | ".join(f"elrt{'' if len(builds) == 1 else i} img/s | ratio"
                       for i in range(len(builds)))
    print(f"\n{report['cpu']}, {report['cores']} cores, OpenBLAS {blas_core}, "
          f"median of {args.rounds} interleaved rounds\n")
    print(f"| model | size | batch | threads | PyTorch img/s | {heads} |")
    print("|---|---:|---:|---:|---:|" + "---:|---:|" * len(builds))
    for row in rows:
        cells = " | ".join(f"{e['img_per_s']:.1f} | {e['ratio']:.2f}" for e in row["elrt"])
        print(f"| {row['model']} | {row['size']} | {row['batch']} | {row['threads']} | "
              f"{row['torch_img_per_s']:.1f} | {cells} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
