#!/usr/bin/env python3
"""Make the PyTorch-parity fixtures for elrt's training engine (ResNet-20, one batch, one step).

    python3 scripts/make_parity_fixtures.py [--out tests/fixtures/resnet20_parity]

Writes, into --out (default: tests/fixtures/resnet20_parity/ of the repository):

  model.onnx    ResNet-20 exactly as scripts/export_models.py exports models/resnet20.onnx (same
                definition, seed and export function): opset 13, input "input" [batch,3,32,32],
                output "logits" [batch,10], training form (every BatchNormalization explicit, with
                five outputs, so it normalises with the batch statistics). Initializer names are
                PyTorch's state_dict names (conv1.weight, bn1.weight, bn1.running_mean, fc.weight,
                ...); the gradients and updated parameters below are keyed by them.
  tensors.bin   One little-endian blob: every tensor below, float32 unless noted, C order, each at
                an offset that is a multiple of 8 bytes.
  index.json    {"tensors": {key: {"shape", "offset" (bytes), "dtype" ("f32"|"i64"), "numel"}},
                 "params": [{"name", "shape", "decay"}] (trainable parameters, state_dict order),
                 "bn": [BN module names], "labels": [...], "meta": {...}}.
  README.md     What the files hold, the conventions, and how they were made.

What is computed (PyTorch, CPU, float32, 1 thread, deterministic algorithms):

  * A fixed batch: input [8,3,32,32] (seeded standard normal), labels [8] in 0..9 (seeded). The
    input is then moved by at most ~2e-3 (deterministically, see nudge_input) so that no ReLU
    input of the train-mode forward lies within 1e-3 of zero: otherwise float32 rounding decides
    on which side of ReLU's kink a few of them fall, and any two float32 engines disagree on
    upstream gradients by ~1e-2 relative.
  * The model in train mode, one forward: logits [8,10]; loss = mean over the batch of the softmax
    cross-entropy; loss_ls = the same with label_smoothing=0.1 (from the same logits).
  * One backward of the plain loss: grad/<param> for every trainable parameter, and the gradient
    w.r.t. the logits of both losses (grad_logits, grad_logits_ls; small, for debugging).
  * The BN running statistics after that forward (momentum 0.1, unbiased batch variance).
  * One optimiser step from those gradients, starting from the file's parameters:
      after_sgd/<param>           SGD lr 0.1, momentum 0.9, dampening 0, nesterov False
      after_sgd_nesterov/<param>  the same with nesterov True
      after_adamw/<param>         AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8
    with weight decay (5e-4 for SGD, 0.05 for AdamW) only on conv and linear weights (tensors of
    rank > 1), none on BN weights/biases nor on the linear bias: two torch param groups.

The same forward/backward is also run in float64 (a double copy of the same model and batch); the
meta records, per tensor, how far the float32 results are from the float64 ones, i.e. what
precision a float32 engine can be expected to reach. The script then checks, in onnxruntime, that
model.onnx gives the stored logits (max abs difference <= 1e-4), and records how onnxruntime
updates the BN running variance (biased variance, per the ONNX spec; PyTorch uses the unbiased).

Deterministic: the same torch version writes the same bytes (seeded, torch.set_num_threads(1),
torch.use_deterministic_algorithms(True), no timestamps in the files); --check-determinism runs
the whole computation twice into temporary directories and compares the bytes.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from export_models import OPSET, build, export  # noqa: E402
from zoo_common import SEED  # noqa: E402

ARCH = "resnet20"
BATCH = 8
NUM_CLASSES = 10
DATA_SEED = 20240601  # input and labels; the model itself uses export_models' SEED
LABEL_SMOOTHING = 0.1
BN_MOMENTUM = 0.1  # PyTorch convention (ONNX attribute momentum = 0.9)
BN_EPS = 1e-5
SGD = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
ORT_TOL = 1e-4
RELU_MARGIN = 1e-3  # no ReLU input of the fixture batch lies closer to 0 (see nudge_input)
MAX_NUDGE_SWEEPS = 50

DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "resnet20_parity")
COMMAND = "python3 scripts/make_parity_fixtures.py"


def setup_torch() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def make_batch():
    """input [8,3,32,32] float32 (standard normal) and labels [8] int64 in 0..9, both seeded."""
    rng = np.random.default_rng(DATA_SEED)
    x = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int64)
    return x, y


def relu_inputs(model: nn.Module, x: torch.Tensor) -> list:
    """The input of every ReLU call in a forward of `model` (train mode) on x, in call order
    (clones, differentiable w.r.t. x; the ReLUs are in-place)."""
    zs = []
    hooks = [mod.register_forward_pre_hook(lambda mod, inp: zs.append(inp[0].clone()))
             for mod in model.modules() if isinstance(mod, nn.ReLU)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return zs


def nudge_input(model: nn.Module, x0: np.ndarray, margin: float = RELU_MARGIN):
    """Move x0 a little (a few 1e-3 at most) so that no ReLU input is within `margin` of zero.

    Why: ReLU's gradient jumps at 0. Float32 puts each pre-activation off by up to ~2e-5 here
    (PyTorch float32 against float64), so with 1.5 million ReLU inputs in a batch of 8 a few lie
    closer to 0 than that. Two correct float32 engines can then take different sides of the
    kink: one element's whole gradient then goes through or not, and every gradient upstream
    moves by ~1e-2 relative (seen with the plain seeded batch: 1.6e-2 on layer2.0.bn2.bias).
    A test at 1e-4 would then fail for no fault of the engine. With a margin of 1e-3 (50 times
    the worst float32 error) every ReLU mask is the same in any reasonable float32 engine.

    How: float64, Kaczmarz-style: for each violating element i (s_i z_i < margin, s_i its sign),
    largest deficit first, add (2 margin - s_i z_i) J_i / |J_i|^2 to the input (J_i the gradient of
    s_i z_i w.r.t. the input, taking the earlier corrections of the sweep into account linearly);
    repeat sweeps on the float32-rounded input until none violates. Deterministic.
    Returns (float32 input, stats).
    """
    m = copy.deepcopy(model).double().train()
    x = torch.from_numpy(x0).double()
    first = None
    for sweep in range(MAX_NUDGE_SWEEPS):
        x = x.float().double()  # check exactly the float32 input that will be stored
        xr = x.clone().requires_grad_(True)
        flat = torch.cat([z.flatten() for z in relu_inputs(m, xr)])
        sign = torch.where(flat.detach() >= 0, 1.0, -1.0).double()
        sz = sign * flat
        szd = sz.detach()
        viol = (szd < margin).nonzero().flatten()
        if first is None:
            first = {"relu_inputs": int(flat.numel()), "within_margin_before": int(viol.numel()),
                     "min_abs_before": float(szd.min())}
        if viol.numel() == 0:
            break
        delta = torch.zeros_like(x)
        for i in viol[torch.argsort(szd[viol])][:256]:
            (g,) = torch.autograd.grad(sz[i], xr, retain_graph=True)
            cur = float(szd[i]) + float((g * delta).sum())
            if cur < 2 * margin:
                delta += (2 * margin - cur) * g / float((g * g).sum())
        x = x + delta
    else:
        raise SystemExit(f"nudge_input: ReLU inputs still within {margin} of 0 after "
                         f"{MAX_NUDGE_SWEEPS} sweeps")
    xf = x.float().numpy()
    # The float32 forward must put every ReLU input on the same side, with room to spare.
    with torch.no_grad():
        z32 = torch.cat([z.flatten() for z in
                         relu_inputs(copy.deepcopy(model).float().train(), torch.from_numpy(xf))])
        z64 = torch.cat([z.flatten() for z in relu_inputs(m, torch.from_numpy(xf).double())])
    assert bool(((z32 >= 0) == (z64 >= 0)).all()) and float(z32.abs().min()) > margin / 2
    stats = dict(first, margin=margin, sweeps=sweep,
                 min_abs_after_f64=float(z64.abs().min()),
                 min_abs_after_f32=float(z32.abs().min()),
                 max_abs_f32_vs_f64=float((z32.double() - z64).abs().max()),
                 max_abs_change_of_input=float(np.abs(xf - x0).max()))
    return xf, stats


def is_decayed(name: str, p: torch.Tensor) -> bool:
    """Weight decay on conv and linear weights only (rank > 1): not BN weights/biases, no bias."""
    return p.ndim > 1


def forward_backward(model: nn.Module, x: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> dict:
    """Train-mode forward of a copy of `model` in `dtype`, both losses, backward of the plain loss.

    Returns numpy arrays (in `dtype`): logits, loss, loss_ls, grad_logits, grad_logits_ls,
    grads {param name: grad}, running {buffer name: value after the forward}.
    """
    m = copy.deepcopy(model).to(dtype).train()
    xt = torch.from_numpy(x).to(dtype)
    yt = torch.from_numpy(y)
    m.zero_grad(set_to_none=True)
    logits = m(xt)
    loss = F.cross_entropy(logits, yt)
    loss_ls = F.cross_entropy(logits, yt, label_smoothing=LABEL_SMOOTHING)
    # d loss / d logits and d loss_ls / d logits, each on its own (autograd.grad sums otherwise)
    (g_logits,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_logits_ls,) = torch.autograd.grad(loss_ls, logits, retain_graph=True)
    loss.backward()
    out = {
        "logits": logits.detach().numpy(),
        "loss": loss.detach().numpy(),
        "loss_ls": loss_ls.detach().numpy(),
        "grad_logits": g_logits.numpy(),
        "grad_logits_ls": g_logits_ls.numpy(),
        "grads": {n: p.grad.detach().numpy().copy() for n, p in m.named_parameters()},
        "running": {n: b.detach().numpy().copy() for n, b in m.named_buffers()
                    if n.endswith(("running_mean", "running_var"))},
    }
    return out


def optimiser_step(model: nn.Module, grads: dict, kind: str) -> dict:
    """One step of `kind` (sgd, sgd_nesterov, adamw) from `grads`, on a float32 copy of `model`'s
    parameters (two param groups: decayed conv/linear weights, everything else undecayed)."""
    m = copy.deepcopy(model).float()
    named = list(m.named_parameters())
    for n, p in named:
        p.grad = torch.from_numpy(grads[n].copy())
    decay = [p for n, p in named if is_decayed(n, p)]
    no_decay = [p for n, p in named if not is_decayed(n, p)]
    if kind in ("sgd", "sgd_nesterov"):
        hp = dict(SGD)
        wd = hp.pop("weight_decay")
        opt = torch.optim.SGD([{"params": decay, "weight_decay": wd},
                               {"params": no_decay, "weight_decay": 0.0}],
                              nesterov=(kind == "sgd_nesterov"), foreach=False, **hp)
    elif kind == "adamw":
        hp = dict(ADAMW)
        wd = hp.pop("weight_decay")
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                amsgrad=False, foreach=False, fused=False, **hp)
    else:
        raise ValueError(kind)
    opt.step()
    return {n: p.detach().numpy().copy() for n, p in named}


def rel_stats(a32: np.ndarray, a64: np.ndarray) -> dict:
    """How far a float32 result is from the float64 one.

    max_abs_diff: max |a32 - a64|; max_abs_ref: max |a64|; rel_to_max = max_abs_diff / max_abs_ref
    (the tensor-wise relative error: the test `|a - ref| <= tol * max|ref|` passes for tol above
    it); rel_l2 = ||a32 - a64||_2 / ||a64||_2; max_elem_rel = max |a32 - a64| / |a64| over the
    elements with |a64| >= 1e-3 * max|a64| (elementwise relative error, tiny elements left out).
    """
    a = a32.astype(np.float64)
    d = np.abs(a - a64)
    ref = np.abs(a64)
    mx = float(ref.max()) if ref.size else 0.0
    big = ref >= 1e-3 * mx
    return {
        "max_abs_diff": float(d.max()),
        "max_abs_ref": mx,
        "rel_to_max": float(d.max() / mx) if mx > 0 else 0.0,
        "rel_l2": float(np.linalg.norm(a - a64) / np.linalg.norm(a64)) if mx > 0 else 0.0,
        "max_elem_rel": float((d[big] / ref[big]).max()) if big.any() else 0.0,
    }


class Blob:
    """Append tensors to one little-endian byte string, each at an 8-byte-aligned offset."""

    def __init__(self):
        self.parts, self.size, self.index = [], 0, {}

    def add(self, key: str, arr: np.ndarray, dtype: str = "f32") -> None:
        assert key not in self.index, key
        np_dtype = {"f32": "<f4", "i64": "<i8"}[dtype]
        a = np.array(arr, dtype=np_dtype, order="C")  # keeps 0-d (ascontiguousarray would not)
        if self.size % 8:
            pad = 8 - self.size % 8
            self.parts.append(b"\0" * pad)
            self.size += pad
        self.index[key] = {"shape": list(a.shape), "offset": self.size, "dtype": dtype,
                           "numel": int(a.size)}
        b = a.tobytes(order="C")
        self.parts.append(b)
        self.size += len(b)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def ort_check(path: str, x: np.ndarray, logits: np.ndarray, running: dict):
    """Run model.onnx in onnxruntime (training-form BN: batch statistics) on x; return the max abs
    difference from PyTorch's logits, failing above ORT_TOL, and a note on how onnxruntime
    updates the first BN's running variance (biased, as ONNX specifies) against PyTorch
    (unbiased)."""
    onnx.checker.check_model(path, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["logits"], {"input": x})
    err = float(np.abs(y - logits).max())
    if not err <= ORT_TOL:
        raise SystemExit(f"{path}: onnxruntime logits differ from PyTorch's by {err} > {ORT_TOL}")
    # Sanity: the same file with BN cut to inference form (running stats) gives different
    # logits, so the check above really exercised batch statistics.
    m = onnx.load(path)
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            del n.output[1:]
    sess2 = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y2,) = sess2.run(["logits"], {"input": x})
    if float(np.abs(y2 - logits).max()) < 1e-2:
        raise SystemExit("inference-form BN gives the train-mode logits: batch statistics unused?")
    # The running statistics onnxruntime computes for bn1 (outputs 1 and 2 of the first BN).
    m = onnx.load(path)
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    assert list(bn.input[1:]) == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]
    for o in bn.output[1:3]:
        m.graph.output.append(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))
    sess3 = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    _, rm, rv = sess3.run(None, {"input": x})
    rv0 = next(onnx.numpy_helper.to_array(t) for t in m.graph.initializer
               if t.name == "bn1.running_var").astype(np.float64)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    rv_torch = running["bn1.running_var"].astype(np.float64)
    var_unbiased = (rv_torch - (1 - BN_MOMENTUM) * rv0) / BN_MOMENTUM
    rv_biased = (1 - BN_MOMENTUM) * rv0 + BN_MOMENTUM * var_unbiased * (n - 1) / n
    note = {
        "running_mean_max_abs_diff_vs_torch": float(np.abs(rm - running["bn1.running_mean"]).max()),
        "running_var_max_abs_diff_vs_torch_unbiased": float(np.abs(rv - rv_torch).max()),
        "running_var_max_abs_diff_vs_biased_formula": float(np.abs(rv - rv_biased).max()),
        "conclusion": "onnxruntime (ONNX BN spec) updates running_var with the biased batch "
                      "variance; PyTorch, and these fixtures, with the unbiased one",
    }
    assert note["running_var_max_abs_diff_vs_biased_formula"] < 1e-5
    assert note["running_mean_max_abs_diff_vs_torch"] < 1e-5
    return err, note


def check_model_file(path: str, model: nn.Module) -> None:
    """model.onnx: opset 13, dynamic batch, five-output BNs, initializers = the state_dict."""
    m = onnx.load(path)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    inp = m.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and dims == ["batch", 3, 32, 32], (inp.name, dims)
    assert [o.name for o in m.graph.output] == ["logits"]
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert bns and all(len(n.output) == 5 for n in bns), "BN must be in training form"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    state = {k: v.numpy() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert set(inits) == set(state), sorted(set(inits) ^ set(state))
    for k, v in state.items():
        assert inits[k].shape == v.shape and np.array_equal(inits[k], v), k


def compute(out_dir: str, quiet: bool = False) -> dict:
    """Compute everything and write the fixture files into out_dir. Returns a summary."""
    setup_torch()
    os.makedirs(out_dir, exist_ok=True)
    model = build(ARCH)  # seeded; BN affine params and running stats randomised (seeded)
    model_path = os.path.join(out_dir, "model.onnx")
    export(model, model_path, "training")
    check_model_file(model_path, model)

    x_seeded, y = make_batch()
    x, nudge = nudge_input(model, x_seeded)
    r32 = forward_backward(model, x, y, torch.float32)
    r64 = forward_backward(model, x, y, torch.float64)

    params = [(n, p) for n, p in model.named_parameters()]
    bn_names = [n for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)]

    # Cross-check the running-stat update against the documented formula (float64).
    for bn in bn_names:
        mod = dict(model.named_modules())[bn]
        assert mod.momentum == BN_MOMENTUM and mod.eps == BN_EPS
    steps = {k: optimiser_step(model, r32["grads"], k) for k in ("sgd", "sgd_nesterov", "adamw")}
    check_steps(model, r32["grads"], steps)

    blob = Blob()
    blob.add("input", x)
    blob.add("labels", y, "i64")
    blob.add("logits", r32["logits"])
    blob.add("loss", r32["loss"])
    blob.add("loss_ls", r32["loss_ls"])
    blob.add("grad_logits", r32["grad_logits"])
    blob.add("grad_logits_ls", r32["grad_logits_ls"])
    for n, _ in params:
        blob.add(f"grad/{n}", r32["grads"][n])
    for bn in bn_names:
        blob.add(f"running_mean_after/{bn}.running_mean", r32["running"][f"{bn}.running_mean"])
    for bn in bn_names:
        blob.add(f"running_var_after/{bn}.running_var", r32["running"][f"{bn}.running_var"])
    for kind in ("sgd", "sgd_nesterov", "adamw"):
        for n, _ in params:
            blob.add(f"after_{kind}/{n}", steps[kind][n])

    f64 = {
        "logits": rel_stats(r32["logits"], r64["logits"]),
        "loss": rel_stats(r32["loss"], r64["loss"]),
        "loss_ls": rel_stats(r32["loss_ls"], r64["loss_ls"]),
        "grad_logits": rel_stats(r32["grad_logits"], r64["grad_logits"]),
        "grad": {n: rel_stats(r32["grads"][n], r64["grads"][n]) for n, _ in params},
        "running_after": {k: rel_stats(r32["running"][k], r64["running"][k])
                          for k in r32["running"]},
    }
    # The optimiser steps taken from the float64 gradients (rounded to float32) instead: how much
    # of the step results' error comes from float32 gradient noise. SGD is linear in g; AdamW's
    # first step is about lr * sign(g) per element, so elements with |g| near the noise jump.
    steps64 = {k: optimiser_step(model, {n: g.astype(np.float32) for n, g in r64["grads"].items()},
                                 k) for k in steps}
    f64["steps_from_f64_grads"] = {}
    for k in steps:
        st = {n: rel_stats(steps[k][n], steps64[k][n].astype(np.float64)) for n, _ in params}
        worst = max(st, key=lambda n: st[n]["rel_to_max"])
        f64["steps_from_f64_grads"][k] = {"max_rel_to_max": st[worst]["rel_to_max"],
                                          "worst_tensor": worst}
    gr = f64["grad"].values()
    f64["grad_summary"] = {
        "max_rel_to_max": max(s["rel_to_max"] for s in gr),
        "max_rel_l2": max(s["rel_l2"] for s in gr),
        "max_max_elem_rel": max(s["max_elem_rel"] for s in gr),
        "worst_tensor_rel_to_max": max(f64["grad"], key=lambda n: f64["grad"][n]["rel_to_max"]),
    }

    ort_err, ort_rv = ort_check(model_path, x, r32["logits"], r32["running"])

    meta = {
        "command": COMMAND,
        "script": "scripts/make_parity_fixtures.py",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "model": {"arch": "ResNet-20 (CIFAR, n=3, 1x1 projection shortcuts)",
                  "built_by": "scripts/export_models.py build('resnet20'), export(..., 'training')",
                  "model_seed": SEED, "opset": OPSET, "bn_form": "training (5 outputs)",
                  "num_params": int(sum(p.numel() for _, p in params))},
        "batch": {"size": BATCH, "data_seed": DATA_SEED,
                  "input": "np.random.default_rng(data_seed).standard_normal((8,3,32,32)) as f32, "
                           "then moved (nudge_input) so that every ReLU input is at least "
                           "relu_margin away from 0",
                  "labels": "rng.integers(0, 10, size=8) from the same generator, after the "
                            "input",
                  "relu_margin": nudge},
        "dtype": "float32 (PyTorch CPU, 1 thread, deterministic algorithms)",
        "mode": "train (BN normalises with batch mean and biased batch variance)",
        "bn": {"eps": BN_EPS, "momentum_pytorch": BN_MOMENTUM, "momentum_onnx_attribute": 0.9,
               "running_mean": "(1 - 0.1) * running_mean + 0.1 * batch_mean",
               "running_var": "(1 - 0.1) * running_var + 0.1 * batch_var * n / (n - 1), "
                              "n = N*H*W (unbiased)"},
        "loss": "mean over the batch of -log softmax(logits)[label]",
        "loss_ls": {"label_smoothing": LABEL_SMOOTHING,
                    "definition": "mean over the batch of sum_c q_c * -log softmax(logits)_c with "
                                  "q = (1 - 0.1) * onehot(label) + 0.1 / 10"},
        "grad": "d loss / d param (the plain loss, not loss_ls), parameters as in model.onnx",
        "weight_decay_applies_to": "conv and linear weights (rank > 1) only; not BN weight/bias, "
                                   "not fc.bias",
        "sgd": dict(SGD, nesterov=False, first_step="buf = g + wd*p; p -= lr * buf",
                    torch="torch.optim.SGD, two param groups, foreach=False"),
        "sgd_nesterov": dict(SGD, nesterov=True,
                             first_step="g' = g + wd*p; buf = g'; p -= lr * (g' + momentum*buf)"),
        "adamw": dict(ADAMW, betas=list(ADAMW["betas"]), amsgrad=False,
                      first_step="p *= 1 - lr*wd; m = (1-b1) g; v = (1-b2) g^2; "
                                 "p -= lr/(1-b1) * m / (sqrt(v)/sqrt(1-b2) + eps)",
                      torch="torch.optim.AdamW, two param groups, foreach=False, fused=False"),
        "values": {"loss": float(r32["loss"]), "loss_ls": float(r32["loss_ls"]),
                   "loss_f64": float(r64["loss"]), "loss_ls_f64": float(r64["loss_ls"])},
        "f32_vs_f64": f64,
        "onnxruntime_logits_max_abs_diff": ort_err,
        "onnxruntime_bn1_running_var": ort_rv,
    }

    tensors_bytes = blob.bytes()
    with open(os.path.join(out_dir, "tensors.bin"), "wb") as f:
        f.write(tensors_bytes)
    index = {
        "format": "tensors.bin: little-endian, C order; offset in bytes; f32 = float32, "
                  "i64 = int64",
        "tensors": blob.index,
        "params": [{"name": n, "shape": list(p.shape), "decay": is_decayed(n, p)}
                   for n, p in params],
        "bn": bn_names,
        "labels": [int(v) for v in y],
        "meta": meta,
    }
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=False)
        f.write("\n")
    write_readme(out_dir, index, len(tensors_bytes))
    return index


def check_steps(model: nn.Module, grads: dict, steps: dict) -> None:
    """The three optimiser results agree with the closed-form first step (float64, loose tol)."""
    for n, p in model.named_parameters():
        p0 = p.detach().double().numpy()
        g = grads[n].astype(np.float64)
        wd = SGD["weight_decay"] if is_decayed(n, p) else 0.0
        g1 = g + wd * p0
        exp = {"sgd": p0 - SGD["lr"] * g1,
               "sgd_nesterov": p0 - SGD["lr"] * (g1 + SGD["momentum"] * g1)}
        wd = ADAMW["weight_decay"] if is_decayed(n, p) else 0.0
        b1, b2 = ADAMW["betas"]
        mm, vv = (1 - b1) * g, (1 - b2) * g * g
        exp["adamw"] = p0 * (1 - ADAMW["lr"] * wd) - ADAMW["lr"] / (1 - b1) * mm / (
            np.sqrt(vv) / np.sqrt(1 - b2) + ADAMW["eps"])
        for k, e in exp.items():
            err = np.abs(steps[k][n].astype(np.float64) - e).max()
            if err > 1e-6 * max(1.0, np.abs(e).max()):
                raise SystemExit(f"{k} {n}: torch step differs from the formula by {err}")


def write_readme(out_dir: str, index: dict, blob_size: int) -> None:
    meta = index["meta"]
    f64 = meta["f32_vs_f64"]
    s = f64["grad_summary"]
    lines = [
        "# resnet20_parity: PyTorch reference for the training engine",
        "",
        "Generated (deterministically; do not edit) by",
        "",
        f"    {meta['command']}",
        "",
        f"with torch {meta['versions']['torch']} on the CPU (float32, 1 thread, "
        "`torch.use_deterministic_algorithms(True)`). Needs torch, onnx, onnxruntime, numpy.",
        "",
        "## Files",
        "",
        "- `model.onnx`: ResNet-20 exactly as `scripts/export_models.py` writes "
        "`models/resnet20.onnx` (same code and seed): opset 13, input `input` [batch,3,32,32], "
        "output `logits` [batch,10], training form (each BatchNormalization has five outputs and "
        "normalises with the batch statistics). Initializer names are PyTorch's state_dict "
        "names (`conv1.weight`, `bn1.weight`, `bn1.running_mean`, `layer2.0.shortcut.0.weight`, "
        "`fc.weight`, ...).",
        f"- `tensors.bin` ({blob_size:,} bytes): every tensor, little-endian, C order, at an "
        "8-byte-aligned offset; `float32` unless the index says `i64`.",
        "- `index.json`: `tensors` maps each key to `{shape, offset (bytes), dtype, numel}`; "
        "`params` lists the trainable parameters in state_dict order with their shape and "
        "whether weight decay applies; `bn` lists the BatchNorm module names; `labels` repeats "
        "the labels; `meta` records versions, hyper-parameters, formulas, the losses and the "
        "float32-vs-float64 comparison.",
        "",
        "## Keys",
        "",
        "| key | shape | what |",
        "|---|---|---|",
        "| `input` | [8,3,32,32] | the batch: seeded standard normal, nudged (see below) |",
        "| `labels` | [8] (i64) | class labels in 0..9 |",
        "| `logits` | [8,10] | train-mode forward (BN with batch statistics) |",
        "| `loss` | [] | softmax cross-entropy, mean over the batch |",
        "| `loss_ls` | [] | the same with label smoothing 0.1 |",
        "| `grad_logits`, `grad_logits_ls` | [8,10] | d loss / d logits, d loss_ls / d logits |",
        "| `grad/<param>` | param's | d loss / d param (plain loss) |",
        "| `running_mean_after/<bn>.running_mean` | [C] | BN running mean after the forward |",
        "| `running_var_after/<bn>.running_var` | [C] | BN running var after the forward |",
        "| `after_sgd/<param>` | param's | parameters after one SGD step (momentum 0.9) |",
        "| `after_sgd_nesterov/<param>` | param's | the same with Nesterov |",
        "| `after_adamw/<param>` | param's | parameters after one AdamW step |",
        "",
        "`<param>` runs over the 65 trainable parameters (conv weights, BN weight and bias, "
        "`fc.weight`, `fc.bias`); `<bn>` over the 21 BatchNorm modules (`bn1`, "
        "`layer1.0.bn1`, ..., `layer2.0.shortcut.1`, ...).",
        "",
        "## The batch",
        "",
        "`input` is `np.random.default_rng(20240601).standard_normal((8,3,32,32))` in float32, "
        "then moved by at most "
        f"{meta['batch']['relu_margin']['max_abs_change_of_input']:.1e} per element so that "
        "every ReLU input of the train-mode forward is at least "
        f"{meta['batch']['relu_margin']['margin']:g} away from 0 "
        f"(before: {meta['batch']['relu_margin']['within_margin_before']} of the "
        f"{meta['batch']['relu_margin']['relu_inputs']:,} ReLU inputs were closer, the closest "
        f"at {meta['batch']['relu_margin']['min_abs_before']:.1e}). Float32 computes these "
        "pre-activations only to about "
        f"{meta['batch']['relu_margin']['max_abs_f32_vs_f64']:.0e} (absolute, PyTorch float32 "
        "against float64); an element that close to 0 can fall on either side of ReLU's kink in "
        "two correct float32 engines, and then every gradient upstream differs by ~1e-2 "
        "relative. With the margin the ReLU masks are the same in any reasonable float32 "
        "engine, so a 1e-4 comparison is meaningful. `labels` come from the same generator "
        "after the input (`integers(0, 10, size=8)`).",
        "",
        "## Conventions the engine must follow",
        "",
        "- BatchNorm, train mode: normalise with the batch mean and the **biased** batch "
        "variance (divide by n = N*H*W), eps 1e-5. Running statistics: "
        "`running = 0.9 * running + 0.1 * batch_stat`, where the variance used for the running "
        "update is the **unbiased** one (`var_biased * n / (n - 1)`). PyTorch momentum 0.1 is the "
        "ONNX attribute `momentum=0.9` (ONNX momentum = 1 - PyTorch momentum). Note that ONNX "
        "BN-9/14 (and onnxruntime) define the running variance update with the biased variance; "
        "these fixtures follow PyTorch.",
        "- Label smoothing eps=0.1 with K=10 classes: target distribution "
        "`q = (1 - eps) * onehot(label) + eps / K`, loss = mean over the batch of "
        "`-sum_c q_c log softmax(logits)_c` (PyTorch's `cross_entropy(label_smoothing=0.1)`).",
        "- Weight decay only on conv and linear weights (rank > 1 tensors); BN weight/bias and "
        "`fc.bias` have none.",
        "- SGD (PyTorch form, dampening 0): `g' = g + wd*p`; `buf = momentum*buf + g'` (first "
        "step: `buf = g'`); plain: `p -= lr*buf`; Nesterov: `p -= lr*(g' + momentum*buf)`. "
        "lr 0.1, momentum 0.9, wd 5e-4. After one step from a zero state: plain "
        "`p - lr*g'`, Nesterov `p - lr*1.9*g'`.",
        "- AdamW (decoupled decay): `p *= 1 - lr*wd`; `m = b1*m + (1-b1)*g`; "
        "`v = b2*v + (1-b2)*g^2`; `p -= lr * (m/(1-b1^t)) / (sqrt(v)/sqrt(1-b2^t) + eps)`, "
        "lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0.05. Note eps is added after the "
        "bias-corrected sqrt(v), so on the first step each element moves by about lr (for "
        "|g| >> eps).",
        "",
        "## Precision",
        "",
        f"Losses (float32): loss = {meta['values']['loss']:.7f}, loss_ls = "
        f"{meta['values']['loss_ls']:.7f}.",
        "",
        "The same forward/backward in float64 gives, over all parameter gradients: max "
        f"tensor-wise relative error `max|g32-g64| / max|g64|` = {s['max_rel_to_max']:.2e} "
        f"(worst: `{s['worst_tensor_rel_to_max']}`), max `||g32-g64|| / ||g64||` = "
        f"{s['max_rel_l2']:.2e}, max elementwise relative error (elements with "
        f"|g64| >= 1e-3 max|g64|) = {s['max_max_elem_rel']:.2e}; logits "
        f"{f64['logits']['rel_to_max']:.2e}, loss {f64['loss']['rel_to_max']:.2e}. "
        "Per-tensor figures are in `index.json` under `meta.f32_vs_f64`. A float32 engine "
        "compared with these float32 values should use a tensor-wise relative tolerance "
        "(`|a - ref| <= tol * max|ref|`) rather than a purely elementwise one.",
        "",
        "Optimiser steps: taken from the float64 gradients instead, the results differ from the "
        "stored ones (tensor-wise relative) by "
        + ", ".join(f"{k} {v['max_rel_to_max']:.1e}"
                    for k, v in f64["steps_from_f64_grads"].items())
        + ". SGD is linear in the gradient, so an engine's own gradients give its SGD step to "
        "the same precision as the gradients. AdamW's first step moves each element by about "
        "lr * sign(g), so elements whose gradient is near float32 noise can move the other way: "
        "test AdamW by feeding the stored `grad/<param>` to the optimiser and comparing with "
        "`after_adamw`, not end to end from the engine's own gradients.",
        "",
        f"onnxruntime runs `model.onnx` on `input` to within "
        f"{meta['onnxruntime_logits_max_abs_diff']:.1e} (max abs) of `logits`. Its running "
        "variance update (ONNX BN spec) uses the biased batch variance, PyTorch's the unbiased "
        "one: for `bn1` onnxruntime differs from `running_var_after` by "
        f"{meta['onnxruntime_bn1_running_var']['running_var_max_abs_diff_vs_torch_unbiased']:.1e} "
        "and matches the biased formula to "
        f"{meta['onnxruntime_bn1_running_var']['running_var_max_abs_diff_vs_biased_formula']:.1e}.",
        "",
    ]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def digest(d: str) -> dict:
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(d))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--check-determinism", action="store_true",
                    help="compute twice into temporary directories and compare bytes first")
    args = ap.parse_args()

    if args.check_determinism:
        tmp = tempfile.mkdtemp(prefix="elrt-parity-")
        try:
            a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
            compute(a)
            compute(b)
            da, db = digest(a), digest(b)
            if da != db:
                raise SystemExit(f"not deterministic: {da} vs {db}")
            print("deterministic: two runs wrote identical bytes")
        finally:
            shutil.rmtree(tmp)

    index = compute(args.out)
    meta = index["meta"]
    s = meta["f32_vs_f64"]["grad_summary"]
    total = 0
    for f in sorted(os.listdir(args.out)):
        size = os.path.getsize(os.path.join(args.out, f))
        total += size
        print(f"{f:<12} {size:>10,} bytes")
    print(f"{'total':<12} {total:>10,} bytes; {len(index['tensors'])} tensors")
    print(f"loss {meta['values']['loss']:.7f}  loss_ls {meta['values']['loss_ls']:.7f}")
    print(f"f32 vs f64 gradients: max rel_to_max {s['max_rel_to_max']:.2e} "
          f"({s['worst_tensor_rel_to_max']}), max rel_l2 {s['max_rel_l2']:.2e}, "
          f"max elementwise rel {s['max_max_elem_rel']:.2e}")
    print(f"onnxruntime logits max abs diff {meta['onnxruntime_logits_max_abs_diff']:.2e}")
    r = meta["batch"]["relu_margin"]
    print(f"input nudge: {r['within_margin_before']} ReLU inputs within {r['margin']} of 0 "
          f"before, {r['sweeps']} sweeps, max change {r['max_abs_change_of_input']:.2e}")
    print("steps from f64 grads vs stored: " + ", ".join(
        f"{k} {v['max_rel_to_max']:.1e}"
        for k, v in meta["f32_vs_f64"]["steps_from_f64_grads"].items()))
    ref = os.path.join(os.path.dirname(HERE), "models", "resnet20.onnx")
    if os.path.exists(ref):
        same = filecmp.cmp(ref, os.path.join(args.out, "model.onnx"), shallow=False)
        print(f"model.onnx {'is byte-identical to' if same else 'DIFFERS from'} models/resnet20.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
