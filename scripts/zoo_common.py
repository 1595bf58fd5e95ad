"""Shared helpers for the model-zoo scripts (export_models.py, export_torchvision.py).

Everything here counts in PyTorch or reads ONNX files with the `onnx` package; none of it
depends on elrt, so the figures are an independent reference for `elrt inspect`.

Conventions (the same as elrt's, see issue "Foundation"):

* params: elements of trainable tensors, i.e. PyTorch's
  `sum(p.numel() for p in model.parameters())` (shared parameters counted once; BatchNorm
  running mean/var are buffers, not parameters).
* MACs: multiply-accumulates of Conv2d and Linear layers only, measured with forward hooks at
  batch 1: Conv2d = N * C_out * H_out * W_out * (C_in / groups) * kh * kw,
  Linear = N * in_features * out_features (N = every leading dimension of the output).
  BatchNorm, pooling, activations, additions count 0.
"""

from __future__ import annotations

import copy
import random
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

SEED = 0


def seed_everything(seed: int = SEED) -> None:
    """Seed every RNG a model constructor could use."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(model: nn.Module) -> int:
    """PyTorch's parameter count (parameters() yields a shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape) -> int:
    """MACs of Conv2d and Linear layers, measured with forward hooks on one forward pass."""
    total = 0

    def conv_hook(mod: nn.Conv2d, inp, out):
        nonlocal total
        n, c_out, h, w = out.shape
        kh, kw = mod.kernel_size
        total += n * c_out * h * w * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inp, out):
        nonlocal total
        n = out.numel() // mod.out_features
        total += n * mod.in_features * mod.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def fused_param_count(model: nn.Module) -> int:
    """Parameter count after folding each BatchNorm into the conv before it.

    This is what an eval-mode export with the exporter's defaults contains: the ONNX exporter's
    eval peephole folds Conv -> BatchNormalization pairs into the conv's weight and bias (a conv
    without bias gains one). Uses torch.fx.experimental.optimization.fuse, which folds exactly the
    Conv2d -> BatchNorm2d pairs where the conv output feeds only that BatchNorm.
    """
    from torch.fx.experimental.optimization import fuse

    m = copy.deepcopy(model).eval()
    return count_params(fuse(m))


def randomize_bn(model: nn.Module, seed: int = SEED) -> None:
    """Give every BatchNorm non-trivial affine params and running statistics (seeded).

    With PyTorch's default init (weight 1, bias 0, mean 0, var 1) a BN is almost an identity,
    which would hide mistakes in BN handling or folding; random values make them visible.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


# ---------------------------------------------------------------------------------------------
# ONNX-side checks


def _producers(graph: onnx.GraphProto) -> dict:
    return {o: n for n in graph.node for o in n.output}


def onnx_param_uses(model: onnx.ModelProto) -> list:
    """(node name, initializer name) for every trainable-parameter input of every node.

    Trainable inputs: Conv/ConvTranspose weight and bias, Gemm B and C, MatMul constant
    operands, BatchNormalization scale and bias; followed back through Identity nodes to the
    initializer. Not counted: BN running mean/var, shape constants, other int64 tensors.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    prod = _producers(g)

    def resolve(name: str):
        for _ in range(100):
            if name in inits:
                return name
            if name in prod and prod[name].op_type == "Identity":
                name = prod[name].input[0]
            else:
                return None
        return None

    uses = []
    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            idx = range(1, len(n.input))
        elif n.op_type == "MatMul":
            idx = range(0, len(n.input))
        elif n.op_type == "BatchNormalization":
            idx = (1, 2)
        else:
            continue
        for i in idx:
            if i < len(n.input) and n.input[i]:
                r = resolve(n.input[i])
                if r is not None:
                    uses.append((n.name, r))
    return uses


def onnx_trainable_params(model: onnx.ModelProto) -> int:
    """Elements of the distinct initializers that are trainable parameters (each counted once,
    however many nodes use it, directly or through Identity nodes)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes[r] for r in {r for _, r in onnx_param_uses(model)})


def onnx_per_node_params(model: onnx.ModelProto) -> int:
    """Trainable elements counted as elrt counts them: an initializer reached through an
    Identity node is a copy (a parameter of its own, as the exporter writes merged, untied
    duplicates); one used by several nodes counts once per module that uses it (the module
    path the dynamo exporter records in `pkg.torch.onnx.name_scopes`, else the node: elrt
    unties the rest, src/onnx/untie.rs). Parameters
    are the weights and biases of Conv, Gemm and MatMul, the scales and shifts of
    BatchNormalization and LayerNormalization, and a multi-element float tensor that an Add,
    Sub or Mul applies to an activation other than the graph's input (src/ir/params.rs: a
    Linear's bias after a MatMul, ConvNeXt's layer scale). A Transpose of an initializer is
    followed to it (a training-mode export transposes Linear weights at run time)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    floats = {t.name for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = n.attribute[0].t
            sizes[n.output[0]] = int(np.prod(t.dims))
            if t.data_type in (1, 10, 11, 16):
                floats.add(n.output[0])
    inits = set(sizes)
    graph_inputs = {i.name for i in model.graph.input} - inits
    seen = set()
    total = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            idx = range(1, len(n.input))
        elif n.op_type == "MatMul":
            idx = range(len(n.input))
        elif n.op_type in ("BatchNormalization", "LayerNormalization"):
            idx = (1, 2)
        elif n.op_type in ("Add", "Sub", "Mul") and len(n.input) == 2:
            konst = [_resolved_size(model, i, sizes, inits) is not None for i in n.input]
            idx = ()
            for k in (0, 1):
                other = n.input[1 - k]
                name = n.input[k]
                if (konst[k] and not konst[1 - k] and other not in graph_inputs
                        and not name.endswith(".const")
                        and (_resolved_size(model, name, sizes, inits) or 0) > 1
                        and _resolved_name(model, name, inits) in floats):
                    idx = (k,)
        else:
            continue
        scopes = next((p.value for p in n.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), None)
        module = _module_path(scopes) or n.name
        for i in idx:
            name = n.input[i] if i < len(n.input) else ""
            if not name or (name, module) in seen:
                continue
            size = _resolved_size(model, name, sizes, inits)
            if size is not None:
                seen.add((name, module))
                total += size
    return total


def _module_path(name_scopes):
    """The module of a node from `pkg.torch.onnx.name_scopes` (a Python list of strings): its
    next-to-last entry, as src/onnx/untie.rs reads it."""
    if not name_scopes:
        return None
    entries = name_scopes.split("'")[1::2]
    return entries[-2] if len(entries) >= 2 and entries[-2] else None


def _resolved_name(model, name, inits):
    prod = _producers(model.graph)
    for _ in range(100):
        if name in inits:
            return name
        if name in prod and prod[name].op_type in ("Identity", "Transpose"):
            name = prod[name].input[0]
        else:
            return None
    return None


def _resolved_size(model, name, sizes, inits):
    resolved = _resolved_name(model, name, inits)
    return None if resolved is None else sizes[resolved]


def identity_nodes_on_initializers(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits)


def op_types(model: onnx.ModelProto) -> list:
    return sorted({n.op_type for n in model.graph.node})


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def seeded_input(shape, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(list(shape)).astype(np.float32)


def check_and_run(path: str, x: np.ndarray) -> list:
    """onnx.checker (full_check) and one onnxruntime run on input x; outputs must be finite."""
    onnx.checker.check_model(path, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    for o in outs:
        if not np.all(np.isfinite(o)):
            raise RuntimeError(f"{path}: onnxruntime output has non-finite values")
    return outs


def file_mb(path: str) -> float:
    import os

    return os.path.getsize(path) / 1e6


def write_manifest(path: str, entries: list) -> None:
    """A JSON list, one object per line (stable order, easy to diff)."""
    import json

    with open(path, "w") as f:
        f.write("[\n" + ",\n".join("  " + json.dumps(e) for e in entries) + "\n]\n")
