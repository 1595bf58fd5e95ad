#!/usr/bin/env python3
"""Inference latency: dense ResNet-20 against its Tucker-2 compression, tract and onnxruntime.

    python3 scripts/bench_latency.py [--elrt PATH] [--ratio 0.5] [--latency 0.6] [--batch 1]
                                     [--runs 300] [--rounds 3] [--out docs/bench/latency.json]

What it measures (issue 5, "benchmark script"): ResNet-20 from models/ full rank against the
Tucker-2 conversion at ratio 0.5 (and, with --latency F, the conversion from the tract-measured
`--ranks latency=F` policy), batch 1, one thread, in one go on this machine:

1. elrt makes the deployment files at --batch: `elrt export models/resnet20.onnx` (dense, BN
   folded) and `elrt convert --ranks ratio=R` + `elrt export` (BN folded, forms timed in tract
   at that batch). Weights
   are the files' own (random factors): latency does not depend on their values.
2. tract: `elrt bench DENSE COMPACT [...] --batch 1 --threads 1 --json --profile` (files
   interleaved inside elrt, tract single-threaded on its plan) -> p50/p90/p99 and per-node time.
3. onnxruntime: the same files, one InferenceSession each (intra_op 1, inter_op 1, sequential,
   all graph optimisations), warm-up then --runs timed runs per file, files interleaved in
   rounds of 10 runs; per-run times, percentiles.
4. Ratios: realised speedup in tract over the MAC ratio (goal >= 0.8) and the compact file in
   tract against the dense file in onnxruntime (goal: faster).

The whole sequence repeats --rounds times and medians are reported, with the load average
before and after (run it on a quiet machine).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr}")
    return r.stdout


def ort_times(files, runs, batch):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import onnxruntime as ort

    sessions = []
    for f in files:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        s = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
        sessions.append((s, {s.get_inputs()[0].name: x}))
    for s, feed in sessions:
        for _ in range(20):
            s.run(None, feed)
    times = [[] for _ in files]
    while min(len(t) for t in times) < runs:
        for k, (s, feed) in enumerate(sessions):
            for _ in range(10):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t0) * 1e3)
    out = []
    for t in times:
        t.sort()
        n = len(t)
        out.append({"p50_ms": t[n // 2], "p90_ms": t[int(0.9 * n)], "p99_ms": t[int(0.99 * n)]})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elrt", default=str(REPO / "target/release/elrt"))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--latency", type=float, default=None, help="also the latency=F rank policy")
    ap.add_argument("--batch", type=int, default=1, help="batch fixed in the exported files")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "docs/bench/latency.json"))
    a = ap.parse_args()
    elrt = a.elrt
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="elrt-latency-"))
    src = REPO / "models/resnet20.onnx"
    dense = tmp / "resnet20.dense.onnx"
    b = str(a.batch)
    run([elrt, "export", src, "-o", dense, "--batch", b, "--quiet"])
    variants = [("tucker2 ratio=%g" % a.ratio, f"ratio={a.ratio}")]
    if a.latency:
        variants.append(("tucker2 latency=%g" % a.latency, f"latency={a.latency}"))
    files = [("dense", dense)]
    for name, ranks in variants:
        conv = tmp / f"{ranks.replace('=', '_')}.factorized.onnx"
        comp = tmp / f"{ranks.replace('=', '_')}.compact.onnx"
        run([elrt, "convert", src, "--format", "tucker2", "--ranks", ranks, "-o", conv])
        exp = json.loads(run([elrt, "export", conv, "-o", comp, "--batch", b, "--json", "--quiet"]))
        files.append((name, comp, exp["export"]))
    rounds = []
    for r in range(a.rounds):
        bench = json.loads(
            run([elrt, "bench", *[f[1] for f in files], "--batch", b, "--threads", "1",
                 "--runs", str(a.runs), "--json", "--profile"])
        )
        ort = ort_times([f[1] for f in files], a.runs, a.batch)
        rounds.append({"tract": bench["rows"], "profile": bench["profile"], "ort": ort})
    med = lambda xs: statistics.median(xs)
    result = {"machine": os.uname().nodename, "load_before": load_before, "rounds": a.rounds,
              "runs": a.runs, "batch": a.batch, "threads": 1, "files": []}
    for k, f in enumerate(files):
        row = rounds[0]["tract"][k]
        entry = {
            "name": f[0],
            "params": row["params"],
            "macs": row["macs"],
            "tract_p50_ms": med([rd["tract"][k]["p50_ms"] for rd in rounds]),
            "tract_p90_ms": med([rd["tract"][k]["p90_ms"] for rd in rounds]),
            "tract_p99_ms": med([rd["tract"][k]["p99_ms"] for rd in rounds]),
            "ort_p50_ms": med([rd["ort"][k]["p50_ms"] for rd in rounds]),
            "ort_p90_ms": med([rd["ort"][k]["p90_ms"] for rd in rounds]),
        }
        if len(f) > 2:
            entry["forms"] = [(l["layer"], l["form"]) for l in f[2]["layers"]]
            entry["whole_model_p50_ms"] = f[2]["whole_model_p50_ms"]
        result["files"].append(entry)
    d = result["files"][0]
    for e in result["files"]:
        e["mac_ratio"] = d["macs"] / e["macs"]
        e["tract_speedup"] = d["tract_p50_ms"] / e["tract_p50_ms"]
        e["ort_speedup"] = d["ort_p50_ms"] / e["ort_p50_ms"]
        e["tract_speedup_over_mac_ratio"] = e["tract_speedup"] / e["mac_ratio"]
        e["tract_vs_dense_ort"] = d["ort_p50_ms"] / e["tract_p50_ms"]
    result["profile_last_round"] = rounds[-1]["profile"]
    result["load_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"batch {a.batch}, 1 thread, medians of {a.rounds} rounds x {a.runs} runs; load {load_before[0]:.2f} -> {result['load_after'][0]:.2f}")
    print(f"{'model':<24} {'params':>9} {'MACs':>11} {'MAC ratio':>9} {'tract ms':>9} {'speedup':>8} {'/MACr':>6} {'ORT ms':>8} {'ORT spd':>8} {'vs ORT dense':>12}")
    for e in result["files"]:
        print(f"{e['name']:<24} {e['params']:>9,} {e['macs']:>11,} {e['mac_ratio']:>8.2f}x {e['tract_p50_ms']:>9.3f} "
              f"{e['tract_speedup']:>7.2f}x {e['tract_speedup_over_mac_ratio']:>6.2f} {e['ort_p50_ms']:>8.3f} "
              f"{e['ort_speedup']:>7.2f}x {e['tract_vs_dense_ort']:>11.2f}x")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
