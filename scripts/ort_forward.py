#!/usr/bin/env python3
"""Run an ONNX model in onnxruntime on a raw float32 input; write the first output raw.

    python3 scripts/ort_forward.py [--check] MODEL INPUT.bin N,C,H,W OUTPUT.bin

The engine's tests use it as the outside judge of a forward pass: the input and output are
little-endian float32 arrays in C order. Graph optimisations are off so that onnxruntime
computes the graph as written. `--check` runs onnx.checker (full_check) on the file first.
"""
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "--check":
        import onnx

        onnx.checker.check_model(onnx.load(args[1]), full_check=True)
        args = args[1:]
    model, inp, shape, out = args[:4]
    dims = [int(d) for d in shape.split(",")]
    x = np.fromfile(inp, dtype="<f4").reshape(dims)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.ascontiguousarray(y, dtype="<f4").tofile(out)
    print(",".join(str(d) for d in y.shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
