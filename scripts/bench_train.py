#!/usr/bin/env python3
"""Training-speed comparison: elrt against PyTorch CPU, same machine, same work, one go.

    python3 scripts/bench_train.py [--elrt PATH] [--build] [--steps N] [--threads 1,2]
                                   [--batch 128] [--rounds 3] [--out docs/bench/train_speed.json]

What it measures (issue 3, "Speed"): training img/s of ResNet-20 (CIFAR) full rank and a
Tucker-2 version at ratio 0.5, batch 128, at each thread count, in elrt (`elrt speed`) and in
PyTorch with the same number of threads; peak memory of each; where elrt's time goes (its
per-op profile); and the rate of elrt's conv GEMMs against a measured single-thread sgemm.

Models. ResNet-20 is the definition of scripts/export_models.py (the one models/resnet20.onnx
comes from; same seed). The Tucker-2 version is written by hand here: every 3x3 conv except the
first (the one with 3 input channels) becomes

    Conv1x1(C_in -> r_in) -> Conv3x3(r_in -> r_out, same stride/padding) -> Conv1x1(r_out -> C_out)

with r_in = C_in * ratio, r_out = C_out * ratio (no biases); the 1x1 shortcut convs stay as they
are and the BatchNorm that followed the conv follows the last factor. Both are exported to ONNX
in training form as export_models.py does (TrainingMode.TRAINING, do_constant_folding=False,
opset 13, input "input" [batch,3,32,32], output "logits") into a temporary folder (--onnx-dir to
keep them), checked with onnx.checker and onnxruntime against PyTorch, and their params and MACs
counted with forward hooks (zoo_common.py's conventions).

The work timed, on both sides: one training step = forward in training mode (BN with batch
statistics), softmax cross-entropy, backward (parameter and input gradients); no optimiser update,
no data loading; a fixed random batch; one warm-up step, then --steps timed steps.

* elrt: `elrt speed FILE --batch B --threads T --steps S --json --profile`, one process per run.
  The engine sets OpenBLAS to one thread and parallelises with rayon over the batch.
* PyTorch: a fresh `python3 bench_train.py --torch-worker ...` process per run, with
  torch.set_num_threads(T), torch.set_num_interop_threads(1) (and OMP_NUM_THREADS=T,
  MKL_NUM_THREADS=T), model.train(), zero_grad(set_to_none=True) + forward + F.cross_entropy +
  backward per step. The worker imports neither onnx nor onnxruntime (stubbed out), so its peak
  RSS is torch's own.
* Peak memory: elrt's VmHWM, PyTorch's resource.getrusage(RUSAGE_SELF).ru_maxrss, both for the
  whole process (PyTorch's includes what `import torch` maps; the worker reports that part too).

elrt and PyTorch runs are interleaved (round r: every thread count and model, elrt then PyTorch on
even rounds, PyTorch then elrt on odd ones), --rounds rounds, and the median of each figure is
reported, so that slow drift of the machine hits both sides alike.

Conv GEMM rate: for full-rank ResNet-20 at 1 thread, nominal conv FLOPs per training step
6 * conv MACs * batch (forward 2*MACs; backward, input and weight gradients, about twice that)
divided by the time elrt's profile puts on Conv nodes (forward + backward, im2col and col2im
included), next to a measured single-thread sgemm rate (1024^3, float32): of the OpenBLAS the elrt
binary links (through ctypes, the library the engine calls), and of numpy's BLAS when it is
OpenBLAS. Each in a fresh process with OPENBLAS_NUM_THREADS=1.

OpenBLAS kernels: OpenBLAS picks its kernels for the CPU at load time unless OPENBLAS_CORETYPE
says otherwise (some environments pin an older kernel set, e.g. Haswell's AVX2 on an AVX-512
CPU). `--openblas-cores env,auto` runs elrt (and the sgemm reference) once per entry: `env` is
the environment as it is, `auto` removes OPENBLAS_CORETYPE, any other entry sets it (SkylakeX,
Haswell, ...). The first entry fills the main columns; the core OpenBLAS reports is recorded.

Output: a table on stdout, the top entries of elrt's profile at 1 thread, and --out (JSON) with
every figure, the raw runs, and the machine (CPU model, cores, torch and BLAS versions, load
average before and after). Needs torch, onnx, onnxruntime, numpy, and a release build of elrt
(`cargo build --release`, or --build to run it first).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

MODELS = {
    "resnet20": "ResNet-20 (CIFAR), full rank",
    "resnet20_tucker2": "ResNet-20, Tucker-2 ratio 0.5 (hand-written factorisation)",
}
TUCKER_RATIO = 0.5
NUM_CLASSES = 10
SGEMM_N = 1024


# ---------------------------------------------------------------------------------------------
# Models (shared by the parent and the PyTorch worker)


def _stub_onnx_modules() -> None:
    """Let the worker import export_models.py without loading onnx / onnxruntime (they would add
    to PyTorch's peak RSS). Any attribute of a stub is a placeholder; the worker uses none."""

    class _Placeholder:
        def __init__(self, name):
            self._name = name

        def __getattr__(self, attr):
            return _Placeholder(f"{self._name}.{attr}")

        def __call__(self, *a, **k):
            raise RuntimeError(f"{self._name} is stubbed out in the PyTorch worker")

    for name in ("onnx", "onnx.numpy_helper", "onnxruntime"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__dict__["__getattr__"] = lambda attr, _n=name: _Placeholder(f"{_n}.{attr}")
            sys.modules[name] = mod


def tucker2_factorise(model, ratio: float = TUCKER_RATIO):
    """Replace, in place, every 3x3 Conv2d with more than 3 input channels by
    1x1 (C_in->r_in) -> 3x3 (r_in->r_out, the conv's stride/padding/dilation) -> 1x1 (r_out->C_out).
    Kaiming-normal (fan_out) init for each factor, as the ResNet's own init."""
    import torch.nn as nn

    replaced = 0

    def visit(parent):
        nonlocal replaced
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3)
                    and child.in_channels != 3 and child.groups == 1):
                c_in, c_out = child.in_channels, child.out_channels
                r_in = max(1, int(round(c_in * ratio)))
                r_out = max(1, int(round(c_out * ratio)))
                seq = nn.Sequential(
                    nn.Conv2d(c_in, r_in, 1, 1, 0, bias=False),
                    nn.Conv2d(r_in, r_out, 3, child.stride, child.padding,
                              dilation=child.dilation, bias=False),
                    nn.Conv2d(r_out, c_out, 1, 1, 0, bias=child.bias is not None),
                )
                for m in seq:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                setattr(parent, name, seq)
                replaced += 1
            else:
                visit(child)

    visit(model)
    return replaced


def build_model(name: str):
    """The PyTorch model for a name of MODELS (deterministic: same seed as export_models.py)."""
    from export_models import ResNetCifar
    from zoo_common import randomize_bn, seed_everything

    seed_everything()
    model = ResNetCifar(3)
    randomize_bn(model)
    if name == "resnet20_tucker2":
        n = tucker2_factorise(model)
        assert n == 18, f"expected 18 factorised 3x3 convs in ResNet-20, got {n}"
    elif name != "resnet20":
        raise SystemExit(f"unknown model {name!r}")
    return model


def conv_macs(model, input_shape=(1, 3, 32, 32)) -> tuple[int, int]:
    """(MACs of all Conv2d layers, MACs of the convs that read the network input) at batch 1."""
    import torch
    import torch.nn as nn

    total, first = 0, 0
    handles = []

    def hook(mod, inp, out):
        nonlocal total, first
        n, c_out, h, w = out.shape
        kh, kw = mod.kernel_size
        macs = n * c_out * h * w * (mod.in_channels // mod.groups) * kh * kw
        total += macs
        if inp[0] is x:
            first += macs

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    x = torch.zeros(*input_shape)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return total, first


# ---------------------------------------------------------------------------------------------
# Workers (fresh processes)


def torch_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    _stub_onnx_modules()
    import torch.nn.functional as F

    model = build_model(args.model)
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.arange(args.batch) % NUM_CLASSES

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(max(0, args.warmup)):
        step()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    print(json.dumps({
        "model": args.model,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "steps": args.steps,
        "ms_per_step": 1e3 * wall / args.steps,
        "img_per_s": args.batch * args.steps / wall,
        "cpu_per_wall": cpu / wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_after_import_torch_mib": rss_import,
        "onnx_stubbed": "__file__" not in getattr(sys.modules.get("onnx"), "__dict__", {"__file__": 0}),
    }))
    return 0


def sgemm_worker(args) -> int:
    """Single-thread sgemm n^3 (float32): the OpenBLAS at --lib through ctypes, and numpy's."""
    import numpy as np

    n = args.n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.zeros((n, n), dtype=np.float32)
    out = {"n": n}

    def timeit(fn, reps):
        fn()
        best, times, cpus = float("inf"), [], []
        for _ in range(reps):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt)
            cpus.append((time.process_time() - c0) / dt)
            best = min(best, dt)
        med = statistics.median(times)
        return {"gflops_best": 2 * n**3 / best / 1e9, "gflops_median": 2 * n**3 / med / 1e9,
                "cpu_per_wall": statistics.median(cpus), "reps": reps}

    if args.lib:
        try:
            lib = ctypes.CDLL(args.lib)
            if hasattr(lib, "openblas_set_num_threads"):
                lib.openblas_set_num_threads(1)
            f = lib.cblas_sgemm
            f.restype = None
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                          ctypes.c_int]
            pa, pb, pc = (m.ctypes.data for m in (a, b, c))

            def run():  # CblasRowMajor = 101, CblasNoTrans = 111
                f(101, 111, 111, n, n, n, 1.0, pa, n, pb, n, 0.0, pc, n)

            r = timeit(run, args.reps)
            ref = a[:8].astype(np.float64) @ b.astype(np.float64)
            r["max_rel_err_rows0_8"] = float(np.abs(c[:8] - ref).max() / np.abs(ref).max())
            if hasattr(lib, "openblas_get_num_threads"):
                r["threads"] = lib.openblas_get_num_threads()
            r["lib"] = args.lib
            out["system_openblas"] = r
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["system_openblas"] = {"error": f"{type(e).__name__}: {e}", "lib": args.lib}

    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = str(cfg.get("name", ""))
        out["numpy_blas"] = {"name": name, "version": cfg.get("version"),
                             "config": cfg.get("openblas configuration")}
    except Exception as e:  # noqa: BLE001
        name = ""
        out["numpy_blas"] = {"error": f"cannot read numpy's BLAS config: {e}"}
    if "openblas" in name.lower():
        r = timeit(lambda: np.matmul(a, b, out=c), args.reps)
        out["numpy"] = r
    else:
        out["numpy"] = {"skipped": f"numpy's BLAS is {name or 'unknown'}, not OpenBLAS"}
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: export, run, report


def export_models(names, out_dir: str) -> dict:
    """Export each model in training form; return {name: facts}."""
    import numpy as np
    import onnx
    import torch
    from export_models import export
    from zoo_common import (check_and_run, count_macs, count_params, onnx_trainable_params,
                            op_histogram, seeded_input)

    facts = {}
    for name in names:
        model = build_model(name)
        path = os.path.join(out_dir, name + ".onnx")
        export(model, path, "training")
        params = count_params(model)
        macs = count_macs(model, [1, 3, 32, 32])
        cmacs, first = conv_macs(model)
        m = onnx.load(path)
        onnx_params = onnx_trainable_params(m)
        if onnx_params != params:
            raise SystemExit(f"{name}: PyTorch counts {params} params, the ONNX file holds "
                             f"{onnx_params} trainable elements")
        x = seeded_input([2, 3, 32, 32])
        (y,) = check_and_run(path, x)
        with torch.no_grad():
            ref = copy.deepcopy(model).train()(torch.from_numpy(x)).numpy()
        if not np.allclose(y, ref, atol=1e-4, rtol=1e-3):
            raise SystemExit(f"{name}: onnxruntime and PyTorch (train mode) differ by "
                             f"{float(np.abs(y - ref).max())}")
        hist = op_histogram(m)
        facts[name] = {
            "description": MODELS[name],
            "onnx": path,
            "params": params,
            "macs": macs,
            "conv_macs": cmacs,
            "input_conv_macs": first,
            "onnx_ops": dict(sorted(hist.items())),
            "onnx_bytes": os.path.getsize(path),
        }
    return facts


def _json_from(stdout: str):
    i = stdout.find("{")
    if i < 0:
        raise ValueError("no JSON object in the output")
    return json.JSONDecoder().raw_decode(stdout[i:])[0]


def run_cmd(cmd, env=None, timeout=None):
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout or "(no output)").strip().splitlines()[-15:]
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd)}\n    " + "\n    ".join(tail))
    try:
        rep = _json_from(p.stdout)
    except ValueError as e:
        raise RuntimeError(f"{' '.join(cmd)}: {e}; stdout: {p.stdout[-500:]!r}") from None
    rep["process_wall_s"] = wall
    rep["process_cpu_s"] = cpu
    core = next((l.split(":", 1)[1].strip() for l in (p.stderr or "").splitlines()
                 if l.startswith("Core:")), None)
    if core:
        rep["openblas_core"] = core
    return rep


def openblas_env(core: str) -> dict:
    """The environment for one `--openblas-cores` entry (OPENBLAS_VERBOSE=2 makes OpenBLAS print
    the core it chose, on stderr)."""
    env = dict(os.environ)
    if core == "auto":
        env.pop("OPENBLAS_CORETYPE", None)
    elif core != "env":
        env["OPENBLAS_CORETYPE"] = core
    env["OPENBLAS_VERBOSE"] = "2"
    return env


def run_elrt(elrt, path, batch, threads, steps, timeout, core="env"):
    rep = run_cmd([elrt, "speed", path, "--batch", str(batch), "--threads", str(threads),
                   "--steps", str(steps), "--json", "--profile"], env=openblas_env(core),
                  timeout=timeout)
    if rep.get("threads") != threads:
        rep["warning"] = f"elrt ran with {rep.get('threads')} threads, asked for {threads}"
    return rep


def run_torch(name, batch, threads, steps, warmup, timeout):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    rep = run_cmd([sys.executable, os.path.abspath(__file__), "--torch-worker", "--model", name,
                   "--batch", str(batch), "--threads", str(threads), "--steps", str(steps),
                   "--warmup", str(warmup)], env=env, timeout=timeout)
    if rep.get("threads") != threads:
        rep["warning"] = f"torch ran with {rep.get('threads')} threads, asked for {threads}"
    return rep


def measure_sgemm(blas_lib, timeout, core="env"):
    """The sgemm worker in a fresh process with every BLAS at one thread."""
    env = openblas_env(core)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--sgemm-worker", "--n", str(SGEMM_N)]
    if blas_lib:
        cmd += ["--lib", blas_lib]
    try:
        return run_cmd(cmd, env=env, timeout=timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"  ERROR sgemm: {e}", file=sys.stderr)
        return {"error": str(e)}


def median_profile(profiles):
    """Median over runs of ms/step for each (op, direction)."""
    keys = {(op, d) for p in profiles for op, d, _ in p}
    out = []
    for op, d in keys:
        vals = [next((ms for o, dd, ms in p if (o, dd) == (op, d)), 0.0) for p in profiles]
        out.append([op, d, statistics.median(vals)])
    return sorted(out, key=lambda e: -e[2])


def openblas_lib_of(binary: str):
    """Path of the BLAS library the binary loads (from ldd), or None."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "=>" in line and ("openblas" in line or "libblas" in line):
            path = line.split("=>")[1].split("(")[0].strip()
            if path and os.path.exists(path):
                return os.path.realpath(path)
    return None


def openblas_info(lib):
    info = {"lib": lib}
    if not lib:
        return info
    try:
        l = ctypes.CDLL(lib)
        for fn in ("openblas_get_config", "openblas_get_corename"):
            if hasattr(l, fn):
                f = getattr(l, fn)
                f.restype = ctypes.c_char_p
                info[fn.removeprefix("openblas_get_")] = f().decode()
    except OSError as e:
        info["error"] = str(e)
    try:
        pkg = subprocess.run(["dpkg-query", "-S", lib], capture_output=True, text=True,
                             timeout=30).stdout.split(":")[0].strip()
        if pkg:
            ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
            info["debian_package"] = f"{pkg} {ver}"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_facts(elrt, blas_lib) -> dict:
    import numpy as np
    import torch

    cpu = "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    cfg = torch.__config__.show()
    torch_blas = next((p.split("=")[1] for p in cfg.replace(",", " ").split() if p.startswith("BLAS_INFO=")), None)
    dnnl = next((l.strip(" -") for l in cfg.splitlines() if "MKL-DNN" in l or "oneDNN" in l), None)
    capability = next((l.split(":")[1].strip() for l in cfg.splitlines() if "CPU capability" in l), None)
    git = {}
    try:
        git["head"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                     text=True, timeout=30).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "src"],
                                           capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    st = os.stat(elrt)
    return {
        "cpu_model": cpu,
        "cpu_flags_avx": sorted(f for f in flags.split() if f.startswith(("avx", "fma"))),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_blas": torch_blas,
        "torch_onednn": dnnl,
        "torch_cpu_capability": capability,
        "torch_mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "numpy": np.__version__,
        "elrt_openblas": openblas_info(blas_lib),
        "elrt_binary": os.path.abspath(elrt),
        "elrt_binary_mtime": datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
        "repo_git": git,
    }


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def default_elrt() -> str:
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(target, "release", "elrt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elrt", default=None,
                    help="elrt binary (default: $CARGO_TARGET_DIR/release/elrt, else "
                         "target/release/elrt of the repository)")
    ap.add_argument("--build", action="store_true", help="run `cargo build --release` first")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="PyTorch warm-up steps (default 1, as elrt speed does)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved elrt/PyTorch rounds; medians are reported (default 3)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "bench", "train_speed.json"),
                    help="JSON report (default docs/bench/train_speed.json); '' for none")
    ap.add_argument("--onnx-dir", default=None,
                    help="keep the exported ONNX files here (default: a temporary folder)")
    ap.add_argument("--no-sgemm", action="store_true", help="skip the sgemm measurement")
    ap.add_argument("--openblas-cores", default="env",
                    help="comma-separated OpenBLAS kernel choices for elrt: env (as the "
                         "environment says), auto (OPENBLAS_CORETYPE removed), or a core name; "
                         "the first fills the main columns (default env)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    # internal: worker modes
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sgemm-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=SGEMM_N, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.torch_worker:
        args.threads = int(args.threads)
        return torch_worker(args)
    if args.sgemm_worker:
        return sgemm_worker(args)

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    cores = [c.strip() for c in args.openblas_cores.split(",") if c.strip()]
    if not cores or len(set(cores)) != len(cores):
        ap.error("--openblas-cores needs distinct, non-empty entries")
    names = [m for m in args.models.split(",") if m]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    if not threads or min(threads) < 1 or args.steps < 1 or args.batch < 1 or args.rounds < 1:
        ap.error("--threads, --steps, --batch and --rounds must be positive")

    if args.build:
        print("cargo build --release ...", flush=True)
        subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    elrt = args.elrt or default_elrt()
    if not (os.path.isfile(elrt) and os.access(elrt, os.X_OK)):
        raise SystemExit(f"no elrt binary at {elrt}: build it with `cargo build --release` "
                         f"(or pass --build, or --elrt PATH)")

    import torch

    torch.set_num_threads(max(1, min(threads)))
    load_before = loadavg()
    t_start = time.time()

    tmp = None
    onnx_dir = args.onnx_dir
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="elrt-bench-")
        onnx_dir = tmp.name
    os.makedirs(onnx_dir, exist_ok=True)
    print(f"exporting {', '.join(names)} to {onnx_dir} ...", flush=True)
    facts = export_models(names, onnx_dir)
    for n in names:
        f = facts[n]
        print(f"  {n:<18} params {f['params']:>9,}  MACs/img {f['macs']:>12,}  "
              f"conv MACs/img {f['conv_macs']:>12,}")

    blas_lib = openblas_lib_of(elrt)
    machine = machine_facts(elrt, blas_lib)
    print(f"machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs; torch "
          f"{machine['torch']} ({machine['torch_blas']}); elrt OpenBLAS "
          f"{machine['elrt_openblas'].get('config', '?')}; load {load_before}", flush=True)

    sgemm_before = None if args.no_sgemm else {c: measure_sgemm(blas_lib, args.timeout, c)
                                                for c in cores}

    # Interleaved runs; "elrt" holds the first core's runs, "elrt_cores" every core's.
    runs = {(n, t): {"elrt": [], "torch": [], "errors": [], "elrt_cores": {c: [] for c in cores}}
            for n in names for t in threads}
    for r in range(args.rounds):
        for t in threads:
            for n in names:
                elrt_sides = [f"elrt:{c}" for c in cores]
                order = elrt_sides + ["torch"] if r % 2 == 0 else ["torch"] + elrt_sides[::-1]
                for side in order:
                    try:
                        if side.startswith("elrt:"):
                            core = side.split(":", 1)[1]
                            rep = run_elrt(elrt, facts[n]["onnx"], args.batch, t, args.steps,
                                           args.timeout, core)
                            rep["openblas_cores_entry"] = core
                        else:
                            rep = run_torch(n, args.batch, t, args.steps, args.warmup,
                                            args.timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        msg = f"{side} {n} T={t} round {r + 1}: {e}"
                        print("  ERROR " + msg, file=sys.stderr, flush=True)
                        runs[(n, t)]["errors"].append(msg)
                        continue
                    if side.startswith("elrt:"):
                        runs[(n, t)]["elrt_cores"][core].append(rep)
                        if core == cores[0]:
                            runs[(n, t)]["elrt"].append(rep)
                        label = f"elrt [{rep.get('openblas_core', core)}]"
                    else:
                        runs[(n, t)][side].append(rep)
                        label = side
                    print(f"  round {r + 1}/{args.rounds} T={t} {n:<18} {label:<20} "
                          f"{rep['img_per_s']:8.1f} img/s  {rep['peak_rss_mib']:7.1f} MiB"
                          + (f"  ({rep['warning']})" if "warning" in rep else ""), flush=True)

    # Summaries.
    def med(reps, key):
        vals = [x[key] for x in reps if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    results, profiles = [], {}
    for n in names:
        for t in threads:
            e, p = runs[(n, t)]["elrt"], runs[(n, t)]["torch"]
            row = {
                "model": n, "threads": t, "batch": args.batch,
                "elrt_img_per_s": med(e, "img_per_s"), "torch_img_per_s": med(p, "img_per_s"),
                "elrt_ms_per_step": med(e, "ms_per_step"), "torch_ms_per_step": med(p, "ms_per_step"),
                "elrt_peak_rss_mib": med(e, "peak_rss_mib"), "torch_peak_rss_mib": med(p, "peak_rss_mib"),
                "torch_rss_after_import_mib": med(p, "rss_after_import_torch_mib"),
                "torch_cpu_per_wall": med(p, "cpu_per_wall"),
                "elrt_runs": [{k: v for k, v in x.items() if k != "profile"} for x in e],
                "torch_runs": p,
                "errors": runs[(n, t)]["errors"],
            }
            row["elrt_by_openblas_core"] = {}
            for c in cores:
                ec = runs[(n, t)]["elrt_cores"][c]
                img = med(ec, "img_per_s")
                row["elrt_by_openblas_core"][c] = {
                    "openblas_core": next((x["openblas_core"] for x in ec
                                           if x.get("openblas_core")), None),
                    "img_per_s": img, "ms_per_step": med(ec, "ms_per_step"),
                    "peak_rss_mib": med(ec, "peak_rss_mib"),
                    "speed_ratio": img / row["torch_img_per_s"]
                    if img and row["torch_img_per_s"] else None,
                    "runs": len(ec),
                }
            ok = row["elrt_img_per_s"] and row["torch_img_per_s"]
            row["speed_ratio"] = row["elrt_img_per_s"] / row["torch_img_per_s"] if ok else None
            okm = row["elrt_peak_rss_mib"] and row["torch_peak_rss_mib"]
            row["mem_ratio"] = row["elrt_peak_rss_mib"] / row["torch_peak_rss_mib"] if okm else None
            results.append(row)
            if e:
                mp = median_profile([x["profile"] for x in e])
                step = row["elrt_ms_per_step"]
                profiles.setdefault(n, {})[str(t)] = [
                    [op, d, round(ms, 3), round(100 * ms / step, 2)] for op, d, ms in mp]

    # sgemm and conv GEMM rate: measured before and after the training runs (the best of the
    # two is the reference, so that a busy moment does not lower it).
    ref_rate, ref_name = None, None
    if sgemm_before is not None:
        # The main entries ("before", "after", "*_gflops_best") are the first core's.
        by_core = {c: {"before": sgemm_before[c], "after": measure_sgemm(blas_lib, args.timeout, c)}
                   for c in cores}
        for c, sg in by_core.items():
            for key in ("system_openblas", "numpy"):
                best = [w[key]["gflops_best"] for w in (sg["before"], sg["after"])
                        if isinstance(w.get(key), dict) and "gflops_best" in w[key]]
                if best:
                    sg[key + "_gflops_best"] = max(best)
        sgemm = dict(by_core[cores[0]])
        for key in ("system_openblas", "numpy"):
            if ref_rate is None and key + "_gflops_best" in sgemm:
                ref_rate, ref_name = sgemm[key + "_gflops_best"], key
        if len(cores) > 1:
            sgemm["by_openblas_core"] = by_core
    else:
        sgemm = None

    conv_gemm = None
    if "resnet20" in names and "1" in profiles.get("resnet20", {}):
        prof = profiles["resnet20"]["1"]
        # `elrt speed --profile` files convs by kernel ("Conv 1x1", "Conv im2col", ...).
        conv_ms = {}
        for op, d, ms, _ in prof:
            if op == "Conv" or op.startswith("Conv "):
                conv_ms[d] = conv_ms.get(d, 0.0) + ms
        conv_s = (conv_ms.get("forward", 0.0) + conv_ms.get("backward", 0.0)) / 1e3
        f = facts["resnet20"]
        flops = 6 * f["conv_macs"] * args.batch
        flops_needed = (6 * f["conv_macs"] - 2 * f["input_conv_macs"]) * args.batch
        conv_gemm = {
            "model": "resnet20", "threads": 1, "batch": args.batch,
            "conv_macs_per_img": f["conv_macs"],
            "flops_per_step": flops,
            "flops_per_step_without_input_grad_of_first_conv": flops_needed,
            "conv_forward_ms": conv_ms.get("forward"), "conv_backward_ms": conv_ms.get("backward"),
            "conv_gflops": flops / conv_s / 1e9 if conv_s > 0 else None,
            "conv_gflops_without_input_grad_of_first_conv":
                flops_needed / conv_s / 1e9 if conv_s > 0 else None,
            "conv_forward_gflops": 2 * f["conv_macs"] * args.batch / (conv_ms["forward"] / 1e3) / 1e9
                if conv_ms.get("forward") else None,
            "conv_backward_gflops": 4 * f["conv_macs"] * args.batch / (conv_ms["backward"] / 1e3) / 1e9
                if conv_ms.get("backward") else None,
            "sgemm_reference": ref_name, "sgemm_gflops": ref_rate,
        }
        if conv_gemm["conv_gflops"] and ref_rate:
            conv_gemm["fraction_of_sgemm"] = conv_gemm["conv_gflops"] / ref_rate

    load_after = loadavg()

    # Report.
    print()
    core_name = {c: next((r["elrt_by_openblas_core"][c]["openblas_core"] for r in results
                          if r["elrt_by_openblas_core"][c]["openblas_core"]), c) for c in cores}
    extra = "".join(f" {'[' + core_name[c] + '] img/s':>22} {'ratio':>6}" for c in cores[1:])
    hdr = (f"{'model':<18} {'thr':>3} {'batch':>5} {'elrt img/s':>11} {'PyTorch img/s':>14} "
           f"{'ratio':>6} {'elrt MiB':>9} {'PyTorch MiB':>12}{extra}")
    if len(cores) > 1 or core_name[cores[0]] != cores[0]:
        print(f"elrt img/s with OpenBLAS core {core_name[cores[0]]} ({cores[0]})"
              + "".join(f"; [{core_name[c]}] = {c}" for c in cores[1:]))
    print(hdr)
    print("-" * len(hdr))

    def fmt(v, spec):
        if v is not None:
            return format(v, spec)
        width = spec.split(".")[0]
        return format("-", ">" + width) if width.isdigit() else "-"

    for row in results:
        print(f"{row['model']:<18} {row['threads']:>3} {row['batch']:>5} "
              f"{fmt(row['elrt_img_per_s'], '11.1f')} {fmt(row['torch_img_per_s'], '14.1f')} "
              f"{fmt(row['speed_ratio'], '6.2f')} {fmt(row['elrt_peak_rss_mib'], '9.0f')} "
              f"{fmt(row['torch_peak_rss_mib'], '12.0f')}"
              + "".join(f" {fmt(row['elrt_by_openblas_core'][c]['img_per_s'], '22.1f')}"
                        f" {fmt(row['elrt_by_openblas_core'][c]['speed_ratio'], '6.2f')}"
                        for c in cores[1:]))
    imp = [r["torch_rss_after_import_mib"] for r in results if r["torch_rss_after_import_mib"]]
    if imp:
        print(f"(PyTorch's peak includes about {statistics.median(imp):.0f} MiB resident after "
              f"`import torch` alone)")
    for n in names:
        prof = profiles.get(n, {}).get("1")
        if not prof:
            continue
        print(f"\nelrt profile, {n}, 1 thread, batch {args.batch} (median ms/step, % of step):")
        for op, d, ms, pct in prof[:8]:
            print(f"  {op:<20} {d:<8} {ms:9.1f} ms {pct:6.1f}%")
    if conv_gemm:
        print(f"\nconv GEMM rate (resnet20, 1 thread): 6 x {conv_gemm['conv_macs_per_img']:,} MACs "
              f"x {args.batch} = {conv_gemm['flops_per_step'] / 1e9:.2f} GFLOP/step in "
              f"{conv_gemm['conv_forward_ms']:.1f} + {conv_gemm['conv_backward_ms']:.1f} ms "
              f"(Conv fwd + bwd) = {fmt(conv_gemm['conv_gflops'], '.1f')} GFLOP/s "
              f"(fwd {fmt(conv_gemm['conv_forward_gflops'], '.1f')}, bwd "
              f"{fmt(conv_gemm['conv_backward_gflops'], '.1f')})")
    if sgemm:
        for key, label in (("system_openblas", "elrt's OpenBLAS (ctypes)"), ("numpy", "numpy")):
            ss = [sgemm[w].get(key) for w in ("before", "after")]
            ss = [x for x in ss if isinstance(x, dict)]
            if not ss:
                continue
            if all("gflops_best" in x for x in ss):
                print(f"sgemm {SGEMM_N}^3, 1 thread, {label} [{core_name[cores[0]]}]: best "
                      f"{max(x['gflops_best'] for x in ss):.1f} GFLOP/s (median before/after: "
                      + ", ".join(f"{x['gflops_median']:.1f}" for x in ss)
                      + "; cpu/wall " + ", ".join(f"{x['cpu_per_wall']:.2f}" for x in ss) + ")")
            else:
                print(f"sgemm, {label}: {ss[0].get('skipped') or ss[0].get('error')}")
    for c, sg in ((sgemm or {}).get("by_openblas_core") or {}).items():
        if c != cores[0] and sg.get("system_openblas_gflops_best"):
            print(f"sgemm {SGEMM_N}^3, 1 thread, elrt's OpenBLAS [{core_name[c]}]: best "
                  f"{sg['system_openblas_gflops_best']:.1f} GFLOP/s")
    if conv_gemm and conv_gemm.get("fraction_of_sgemm") is not None:
        print(f"conv GEMMs at {100 * conv_gemm['fraction_of_sgemm']:.0f}% of the sgemm rate "
              f"({conv_gemm['sgemm_reference']})")

    goals = {
        "speed_ratio_ge_2": {f"{r['model']}@{r['threads']}": None if r["speed_ratio"] is None
                             else r["speed_ratio"] >= 2.0 for r in results},
        "peak_mem_le_torch": {f"{r['model']}@{r['threads']}": None if r["mem_ratio"] is None
                              else r["mem_ratio"] <= 1.0 for r in results},
        "conv_gemm_ge_half_sgemm": (conv_gemm or {}).get("fraction_of_sgemm", 0) >= 0.5
        if conv_gemm and conv_gemm.get("fraction_of_sgemm") is not None else None,
    }
    print(f"\ngoals: >=2x PyTorch img/s: {goals['speed_ratio_ge_2']}; peak memory <= PyTorch: "
          f"{goals['peak_mem_le_torch']}; conv GEMM >= 50% sgemm: {goals['conv_gemm_ge_half_sgemm']}")
    print(f"load average before {load_before}, after {load_after}; {time.time() - t_start:.0f} s")
    if load_before and machine["cpus_usable"] and load_before[0] > 0.5:
        print(f"note: the machine was not idle (load {load_before[0]}); figures may be noisy")

    report = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "config": {"batch": args.batch, "steps": args.steps, "torch_warmup": args.warmup,
                   "openblas_cores": cores,
                   "openblas_core_names": core_name,
                   "elrt_warmup": 1, "threads": threads, "rounds": args.rounds,
                   "tucker2_ratio": TUCKER_RATIO, "statistic": "median over rounds"},
        "work_per_step": "forward (train mode) + softmax cross-entropy + backward; no optimiser "
                         "update, no data loading; PyTorch also zero_grad(set_to_none=True)",
        "machine": machine,
        "load_average": {"before": load_before, "after": load_after},
        "models": {n: {k: v for k, v in f.items() if k != "onnx"} for n, f in facts.items()},
        "results": results,
        "elrt_profiles_ms_per_step": profiles,
        "conv_gemm": conv_gemm,
        "sgemm": sgemm,
        "goals": goals,
        "wall_s": time.time() - t_start,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
        os.replace(tmp_out, args.out)
        print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    failed = any(r["errors"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
