#!/usr/bin/env python3
"""Export third-party-style ONNX files for elrt's reader tests (not committed: they are large).

    python3 scripts/export_torchvision.py OUTDIR

Writes into OUTDIR (created if missing):

  <name>_op13.onnx, <name>_op18.onnx
      torchvision's resnet18, mobilenet_v2, mobilenet_v3_small, squeezenet1_1,
      shufflenet_v2_x0_5, efficientnet_b0 and densenet121 with random init (weights=None, fixed
      seed; BN statistics randomised too), exported in eval mode with the exporter's defaults
      (TorchScript exporter, dynamo=False, do_constant_folding=True: BN that follows a conv is
      folded into it), input "input" [batch,3,224,224] with a symbolic batch dim, output "logits".
  dynflatten_op9.onnx
      A small CNN (conv-BN-ReLU-maxpool, conv-ReLU-maxpool, BN, then x.view(x.size(0), -1) and a
      Linear) exported at opset 9 with a dynamic batch, so that the flatten is the old
      Shape -> Gather -> Unsqueeze -> Concat -> Reshape pattern (checked). Its first BN is
      folded into the conv; the second follows a max pool and stays a BatchNormalization node.
  identity_weights.onnx
      A small CNN in which some layers hold equal values without being tied (two convs with
      equal weights, two Linears with equal weights, zero biases). The exporter deduplicates
      equal-valued initializers and reaches the duplicates through Identity nodes, which is how
      real exports come to read weights through Identity (checked: the file has them).
  manifest.json
      [{"file", "params", "macs", "input_shape"[, "note"]}] for every file.

params: PyTorch's sum(p.numel() for p in model.parameters()) counted on a copy with every
Conv2d -> BatchNorm2d pair folded (torch.fx.experimental.optimization.fuse), which is what the
eval export contains. The script checks it against the ONNX file counted as elrt counts it: each
node's trainable initializers (conv/Gemm weights and biases, BN scale and bias; not BN mean/var,
not shape constants), an initializer reached through an Identity node being a copy, i.e. a
parameter of its own (the exporter merges equal-valued, untied tensors that way), and one used
directly by several nodes counting once. MACs: forward hooks on Conv2d and Linear at batch 1
(see zoo_common.py).

Every file passes onnx.checker (full_check=True) and runs in onnxruntime at batch 2 with the
same logits as PyTorch. A summary table and each file's op types are printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_common import (  # noqa: E402
    SEED,
    check_and_run,
    count_macs,
    count_params,
    file_mb,
    fused_param_count,
    identity_nodes_on_initializers,
    onnx_per_node_params,
    onnx_trainable_params,
    op_types,
    randomize_bn,
    seed_everything,
    seeded_input,
    write_manifest,
)

TORCHVISION_MODELS = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "efficientnet_b0",
    "densenet121",
]
OPSETS = (13, 18)
IMAGENET_SHAPE = [1, 3, 224, 224]
SMALL_SHAPE = [1, 3, 32, 32]


def export(model: nn.Module, path: str, shape, opset: int) -> None:
    """Eval-mode export with the TorchScript exporter's defaults and a symbolic batch dim."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation warnings of the TorchScript exporter
        torch.onnx.export(
            model.eval(),
            (torch.zeros(*shape),),
            path,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )


# ---------------------------------------------------------------------------------------------
# Small hand-made files


class DynFlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(32)  # after a pool: not foldable, stays explicit
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.bn2(self.pool2(self.relu2(self.conv2(x))))
        x = x.view(x.size(0), -1)  # opset 9: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
        return self.fc(x)


class DedupNet(nn.Module):
    """Untied layers with equal values, which the exporter deduplicates through Identity."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc_out = nn.Linear(16, 10)
        with torch.no_grad():
            self.conv2.weight.copy_(self.conv1.weight)  # equal values, separate parameters
            self.fc2.weight.copy_(self.fc1.weight)
            for m in (self.conv1, self.conv2, self.fc1, self.fc2):
                m.bias.zero_()

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc_out(x)


def dynflatten_chain(model: onnx.ModelProto) -> list:
    """The op types that compute the shape input of the (first) Reshape, in graph order."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    reshape = next(n for n in g.node if n.op_type == "Reshape")
    seen, stack = set(), [reshape.input[1]]
    while stack:
        v = stack.pop()
        n = prod.get(v)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type != "Shape":  # a Shape's input is the data path, not the shape's
            stack.extend(n.input)
    return [n.op_type for n in g.node if n.name in seen] + ["Reshape"]


# ---------------------------------------------------------------------------------------------
# Reporting


def notable(model: onnx.ModelProto) -> list:
    """Features of a file worth knowing for a reader (attribute forms, ops that are rare)."""
    out = []
    g = model.graph
    inits = {t.name for t in g.initializer}
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        t = n.op_type
        if t in ("MaxPool", "AveragePool") and attrs.get("ceil_mode", 0):
            out.append(f"{t} ceil_mode=1")
        if t == "AveragePool" and attrs.get("count_include_pad", 0):
            out.append("AveragePool count_include_pad=1")
        if t == "Split":
            form = "split attr" if "split" in attrs else (
                "split input" if len(n.input) > 1 and n.input[1] else (
                    f"num_outputs={attrs['num_outputs']}" if "num_outputs" in attrs else
                    "equal split"))
            out.append(f"Split({form}, {len(n.output)} outputs)")
        if t in ("ReduceMean",):
            form = "axes attr" if "axes" in attrs else "axes input"
            out.append(f"ReduceMean({form}, keepdims={attrs.get('keepdims', 1)})")
        if t in ("Squeeze", "Unsqueeze"):
            out.append(f"{t}(axes {'attr' if 'axes' in attrs else 'input'})")
        if t == "Clip":
            srcs = ["init" if i in inits else ("" if not i else "node") for i in n.input[1:]]
            out.append(f"Clip(min/max {'attrs' if 'min' in attrs or 'max' in attrs else srcs})")
        if t in ("Pad", "Resize", "Softmax", "HardSwish", "HardSigmoid", "Dropout",
                 "Shape", "Gather", "Constant", "Identity", "Transpose", "Reshape"):
            out.append(t)
        if t == "Conv" and attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            out.append(f"Conv auto_pad={attrs['auto_pad']}")
        if t == "Conv" and attrs.get("group", 1) > 1:
            out.append("Conv group>1")
        if t == "Concat" and len(n.input) == 1:
            out.append("Concat with 1 input")
        if t == "BatchNormalization":
            out.append(f"BatchNormalization({len(n.output)} output{'s' if len(n.output) > 1 else ''}"
                       + (f", training_mode={attrs['training_mode']}" if "training_mode" in attrs else "")
                       + ")")
        if t == "Gemm" and not attrs.get("transB", 0):
            out.append("Gemm transB=0")
    counts: dict = {}
    for s in out:
        counts[s] = counts.get(s, 0) + 1
    return [f"{k} x{v}" if v > 1 else k for k, v in counts.items()]


# ---------------------------------------------------------------------------------------------


def verify(path: str, model: nn.Module, shape) -> float:
    """checker + onnxruntime at batch 2 (exercises the symbolic batch), compared with PyTorch."""
    x = seeded_input([2] + list(shape[1:]))
    (y,) = check_and_run(path, x)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(torch.from_numpy(x)).numpy()
    err = float(np.abs(y - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    if not np.allclose(y, ref, atol=1e-4 * max(1.0, scale), rtol=1e-3):
        raise SystemExit(f"{path}: onnxruntime differs from PyTorch by {err} (max |y| {scale})")
    return err


def entry(fname, model, shape, path, notes=()):
    """Manifest entry. params: the fx-fused PyTorch count, checked against the file counted as
    elrt counts it (per node, an Identity of an initializer being a copy)."""
    notes = list(notes)
    pt = fused_param_count(model)
    m = onnx.load(path)
    distinct, per_node = onnx_trainable_params(m), onnx_per_node_params(m)
    n_id = identity_nodes_on_initializers(m)
    if pt != per_node:
        raise SystemExit(f"{fname}: fused PyTorch count {pt} != the file's per-node count {per_node}")
    e = {"file": fname, "params": pt, "macs": count_macs(model, shape), "input_shape": list(shape)}
    if distinct != pt:
        notes.append(
            f"the exporter merged equal-valued initializers and reaches the duplicates through "
            f"{n_id} Identity nodes: the file stores {distinct} distinct trainable elements")
    if notes:
        e["note"] = "; ".join(notes)
    return e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", help="directory for the .onnx files and manifest.json")
    ap.add_argument("--models", default=",".join(TORCHVISION_MODELS),
                    help="comma-separated subset of the torchvision models (default: all)")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    t_start = time.time()
    manifest, report = [], []

    def record(fname, model, shape, notes=(), extra=None):
        path = os.path.join(args.outdir, fname)
        t = time.time()
        err = verify(path, model, shape)
        e = entry(fname, model, shape, path, notes)
        manifest.append(e)
        m = onnx.load(path)
        report.append({**e, "mb": file_mb(path), "err": err, "ops": op_types(m),
                       "notable": notable(m), "extra": extra, "t": time.time() - t})

    for name in [s for s in args.models.split(",") if s]:
        seed_everything(SEED)
        model = torchvision.models.get_model(name, weights=None).eval()
        randomize_bn(model, SEED)
        for opset in OPSETS:
            fname = f"{name}_op{opset}.onnx"
            t = time.time()
            export(model, os.path.join(args.outdir, fname), IMAGENET_SHAPE, opset)
            t_export = time.time() - t
            record(fname, model, IMAGENET_SHAPE, extra=f"export {t_export:.1f}s")

    # dynflatten_op9.onnx
    seed_everything(SEED)
    model = DynFlattenNet().eval()
    randomize_bn(model, SEED)
    path = os.path.join(args.outdir, "dynflatten_op9.onnx")
    export(model, path, SMALL_SHAPE, 9)
    chain = dynflatten_chain(onnx.load(path))
    want = ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]
    if [t for t in chain if t != "Constant"] != want:
        raise SystemExit(f"dynflatten_op9.onnx: the Reshape's shape comes from {chain}, not {want}")
    record("dynflatten_op9.onnx", model, SMALL_SHAPE, extra="reshape shape from " + " -> ".join(chain))

    # identity_weights.onnx
    seed_everything(SEED)
    model = DedupNet().eval()
    path = os.path.join(args.outdir, "identity_weights.onnx")
    export(model, path, SMALL_SHAPE, 13)
    n_id = identity_nodes_on_initializers(onnx.load(path))
    if n_id == 0:
        raise SystemExit("identity_weights.onnx: the exporter wrote no Identity node on a weight")
    record("identity_weights.onnx", model, SMALL_SHAPE, extra=f"{n_id} Identity nodes on weights")

    write_manifest(os.path.join(args.outdir, "manifest.json"), manifest)

    print()
    print(f"{'file':<30} {'params':>11} {'MACs':>15} {'MB':>7} {'max|ort-pt|':>11} {'s':>5}")
    for r in report:
        print(f"{r['file']:<30} {r['params']:>11,} {r['macs']:>15,} {r['mb']:>7.2f} "
              f"{r['err']:>11.2e} {r['t']:>5.1f}")
    print()
    for r in report:
        print(f"{r['file']}: {{{', '.join(r['ops'])}}}")
        if r["notable"]:
            print(f"    notable: {', '.join(r['notable'])}")
        if r["extra"]:
            print(f"    {r['extra']}")
        if r.get("note"):
            print(f"    note: {r['note']}")
    print(f"\n{len(report)} files in {args.outdir}: onnx.checker (full_check) ok, onnxruntime "
          f"matches PyTorch; total {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
