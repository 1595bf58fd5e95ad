#!/usr/bin/env python3
"""Check that an ONNX file written by elrt is valid and computes what the original computes.

    python3 scripts/roundtrip_check.py ORIGINAL WRITTEN [--input-shape 1,3,32,32]

1. onnx.checker.check_model(WRITTEN, full_check=True) (full_check runs ONNX shape inference
   in strict mode too).
2. ORIGINAL and WRITTEN run in onnxruntime (CPU, graph optimisations off, so each graph is
   executed as written) on the same seeded random input. The data input's shape is
   --input-shape, or else the ORIGINAL file's declared shape with every symbolic or unknown
   dimension set to 1. Any further graph inputs (not initializers) get their declared shape
   with symbolic dims set to 1.
3. The two files must have the same number of outputs, and every output must have the same
   shape and dtype and match within atol 1e-5 / rtol 1e-4 (numpy.allclose).

Prints `roundtrip ok: <max abs diff>` and exits 0, or prints `roundtrip FAILED: <problem>` and
exits 1. Needs only onnx, onnxruntime and numpy (scripts/requirements-ci.txt).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

ATOL, RTOL, SEED = 1e-5, 1e-4, 0


class Failure(Exception):
    pass


def parse_shape(text: str) -> list:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 1,3,32,32")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: dims must be positive")
    return dims


def session(path: str, ort):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise Failure(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}")


def make_inputs(sess, data_shape) -> dict:
    """Seeded random inputs; the first graph input gets data_shape when it is given."""
    rng = np.random.default_rng(SEED)
    feeds = {}
    for k, inp in enumerate(sess.get_inputs()):
        if k == 0 and data_shape is not None:
            shape = list(data_shape)
        else:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        t = inp.type  # e.g. "tensor(float)"
        if t in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                     "tensor(float16)": np.float16}[t]
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif t in ("tensor(int64)", "tensor(int32)"):
            feeds[inp.name] = rng.integers(0, 2, shape).astype(
                np.int64 if t == "tensor(int64)" else np.int32)
        elif t == "tensor(bool)":
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise Failure(f"input {inp.name!r} has unsupported type {t}")
    return feeds


def run(original: str, written: str, data_shape) -> float:
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(written, full_check=True)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise Failure(f"onnx.checker rejects {written}: {msg[:2000]}")

    s_orig, s_written = session(original, ort), session(written, ort)
    in_o = [(i.name, i.type) for i in s_orig.get_inputs()]
    in_w = [(i.name, i.type) for i in s_written.get_inputs()]
    if in_o != in_w:
        raise Failure(f"graph inputs differ: original {in_o}, written {in_w}")

    feeds = make_inputs(s_orig, data_shape)
    try:
        y_o = s_orig.run(None, feeds)
    except Exception as e:
        raise Failure(f"onnxruntime fails on {original}: {str(e).strip().splitlines()[0]}")
    try:
        y_w = s_written.run(None, feeds)
    except Exception as e:
        raise Failure(f"onnxruntime fails on {written}: {str(e).strip().splitlines()[0]}")

    names_o = [o.name for o in s_orig.get_outputs()]
    names_w = [o.name for o in s_written.get_outputs()]
    if len(y_o) != len(y_w):
        raise Failure(f"{len(y_o)} outputs {names_o} in the original, {len(y_w)} {names_w} written")
    max_diff = 0.0
    for k, (a, b) in enumerate(zip(y_o, y_w)):
        if names_o[k] != names_w[k]:
            raise Failure(f"output {k} is named {names_o[k]!r} in the original, {names_w[k]!r} written")
        label = names_o[k]
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise Failure(f"output {label!r}: shape {list(a.shape)} original, {list(b.shape)} written")
        if a.dtype != b.dtype:
            raise Failure(f"output {label!r}: dtype {a.dtype} original, {b.dtype} written")
        if a.size == 0:
            continue
        if a.dtype.kind in "fc":
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                raise Failure(f"output {label!r}: NaNs in different places")
            ok = np.isfinite(a) & np.isfinite(b)
            if not np.array_equal(a[~ok], b[~ok]):
                raise Failure(f"output {label!r}: infinities differ")
            diff = float(np.abs(a[ok].astype(np.float64) - b[ok].astype(np.float64)).max(initial=0.0))
            if not np.allclose(a, b, atol=ATOL, rtol=RTOL, equal_nan=True):
                raise Failure(f"output {label!r}: max abs diff {diff:.3g} exceeds atol {ATOL} / rtol {RTOL}")
        else:
            if not np.array_equal(a, b):
                raise Failure(f"output {label!r}: values differ")
            diff = 0.0
        max_diff = max(max_diff, diff)
    return max_diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="onnx.checker on WRITTEN, then compare ORIGINAL and WRITTEN in onnxruntime.")
    ap.add_argument("original", help="the ONNX file elrt read")
    ap.add_argument("written", help="the ONNX file elrt wrote")
    ap.add_argument("--input-shape", type=parse_shape, default=None,
                    help="shape of the data input, e.g. 1,3,32,32 (default: the original's "
                         "declared shape, symbolic dims set to 1)")
    args = ap.parse_args(argv)
    try:
        diff = run(args.original, args.written, args.input_shape)
    except Failure as e:
        print(f"roundtrip FAILED: {e}")
        return 1
    except Exception as e:  # unreadable files and the like
        print(f"roundtrip FAILED: {type(e).__name__}: {' '.join(str(e).split())[:2000]}")
        return 1
    print(f"roundtrip ok: {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
