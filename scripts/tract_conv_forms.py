#!/usr/bin/env python3
"""Can a Tucker-2 core run faster in tract if the ONNX file writes it differently?

    python3 scripts/tract_conv_forms.py [--elrt PATH] [--runs 500] [--out docs/bench/tract_conv_forms.json]

Issue 5: tract runs every 3x3 conv as (lazy) im2col + a matrix product whose rows are the
output channels, so the small cores of a Tucker-2 layer (8 to 32 channels) pay the whole im2col
packing for few output rows. This script writes one 3x3 conv (stride 1, pad 1, batch 1) in
three exactly equivalent ONNX forms and times them in tract with `elrt bench` (files
interleaved, one thread):

  a  `Conv` 3x3, as elrt exports it;
  b  the three horizontal taps stacked on the channel axis (Pad + 3 Slice + Concat), then a
     3x1 `Conv` (C_in*3 -> C_out): the kernel tract's "blocked conv" path accepts
     (kernel width 1; it is off by default on native targets: TRACT_ENABLE_BLOCKED_CONV=1 turns
     it on, and then form b ran slower still, 159 us against 42 for 8 -> 8 at 32x32);
  c  a 1x1 `Conv` to 9*C_out channels (one plain matrix product, no im2col), then the nine
     shifted output slices added (Pad + 9 Slice + 8 Add): im2col on the outputs instead of the
     inputs.

Each form is checked against form a in onnxruntime (max abs difference) before timing. Shapes:
the cores of ResNet-20 Tucker-2 at ratio 0.5 (8x8 and 16x16 channels at 32x32 and 16x16), a
merged core (8 -> 16), and a dense layer1 conv (16 -> 16).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(8, 8, 32), (8, 16, 32), (16, 16, 16), (16, 16, 32), (32, 32, 8)]


def save(path, nodes, inits, cin, cout, hw):
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def i64(*v):
    return np.array(v, np.int64)


def form_a(w, cin, cout, hw, path):
    save(path, [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], {"w": w}, cin, cout, hw)


def form_b(w, cin, cout, hw, path):
    # x padded by one column each side; tap dx is columns dx..dx+hw; stacked taps -> 3x1 conv.
    w3 = np.concatenate([w[:, :, :, dx : dx + 1] for dx in range(3)], axis=1)
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"])]
    inits = {"w3": w3, "p": i64(0, 0, 0, 1, 0, 0, 0, 1), "ax": i64(3)}
    for dx in range(3):
        inits[f"s{dx}"], inits[f"e{dx}"] = i64(dx), i64(dx + hw)
        nodes.append(helper.make_node("Slice", ["xp", f"s{dx}", f"e{dx}", "ax"], [f"x{dx}"]))
    nodes.append(helper.make_node("Concat", ["x0", "x1", "x2"], ["xc"], axis=1))
    nodes.append(helper.make_node("Conv", ["xc", "w3"], ["y"], pads=[1, 0, 1, 0]))
    save(path, nodes, inits, cin, cout, hw)


def form_c(w, cin, cout, hw, path):
    # z[(dy,dx,o)] = W[o,:,dy,dx] . x; y[o,i,j] = sum z[(dy,dx,o), i+dy-1, j+dx-1] (zero outside).
    z = w.transpose(2, 3, 0, 1).reshape(9 * cout, cin, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "z"], ["zz"]), helper.make_node("Pad", ["zz", "p"], ["zp"])]
    inits = {"z": z, "p": i64(0, 0, 1, 1, 0, 0, 1, 1), "ax": i64(1, 2, 3)}
    acc = None
    for t in range(9):
        dy, dx = divmod(t, 3)
        inits[f"s{t}"] = i64(t * cout, dy, dx)
        inits[f"e{t}"] = i64((t + 1) * cout, dy + hw, dx + hw)
        nodes.append(helper.make_node("Slice", ["zp", f"s{t}", f"e{t}", "ax"], [f"t{t}"]))
        if acc is None:
            acc = f"t{t}"
        else:
            out = "y" if t == 8 else f"a{t}"
            nodes.append(helper.make_node("Add", [acc, f"t{t}"], [out]))
            acc = out
    save(path, nodes, inits, cin, cout, hw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elrt", default=str(REPO / "target/release/elrt"))
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--out", default=str(REPO / "docs/bench/tract_conv_forms.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cin, cout, hw in SHAPES:
            w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
            files = {}
            for name, make in [("a_conv3x3", form_a), ("b_stacked_3x1", form_b), ("c_1x1_then_shifts", form_c)]:
                files[name] = Path(tmp) / f"{name}_{cin}_{cout}_{hw}.onnx"
                make(w, cin, cout, hw, files[name])
            x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
            outs = {k: ort.InferenceSession(str(f)).run(None, {"x": x})[0] for k, f in files.items()}
            diffs = {k: float(np.abs(v - outs["a_conv3x3"]).max()) for k, v in outs.items()}
            bad = {k: d for k, d in diffs.items() if d > 1e-3 * float(np.abs(outs["a_conv3x3"]).max())}
            if bad:
                sys.exit(f"forms differ from the 3x3 conv at {cin}->{cout} {hw}x{hw}: {bad}")
            cmd = [args.elrt, "bench", *map(str, files.values()), "--threads", "1", "--runs", str(args.runs), "--json"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
            bench = json.loads(r.stdout)
            macs = cout * cin * 9 * hw * hw
            for (name, f), b in zip(files.items(), bench):
                rows.append({
                    "cin": cin, "cout": cout, "hw": hw, "form": name, "p50_ms": b["p50_ms"],
                    "gmac_per_s": macs / (b["p50_ms"] * 1e-3) / 1e9, "max_abs_diff_vs_a": diffs[name],
                })
    print(f"{'cin->cout':>10} {'hw':>4}  {'form':<20} {'p50 us':>8} {'GMAC/s':>7}")
    for r in rows:
        print(f"{r['cin']:>4}->{r['cout']:<5} {r['hw']:>4}  {r['form']:<20} {r['p50_ms'] * 1e3:8.1f} {r['gmac_per_s']:7.1f}")
    Path(args.out).write_text(json.dumps({"tract": "0.23 via elrt bench, 1 thread, batch 1", "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
