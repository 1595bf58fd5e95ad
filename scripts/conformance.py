#!/usr/bin/env python3
"""Conformance suite: torchvision models x ONNX export forms x elrt stages, each a tick or the
exact error.

    python3 scripts/conformance.py [--quick] [--models a,b] [--forms fixed,dynamic]
                                   [--stages inspect,train | none] [--out DIR] [--elrt PATH]
                                   [--jobs N] [--threads T] [--timeout S] [--reuse-exports]
                                   [--keep-work] [--allow-fail]

    python3 scripts/conformance.py --quick          # the CI subset, about 7 min on 2 cores
    python3 scripts/conformance.py                  # all 14 models, about 40 min

1. Exports (PyTorch, CPU, one thread). Each model is torchvision's with weights=None,
   num_classes=10 (googlenet: aux_logits=False, init_weights=True), seeded random init with
   the BatchNorm statistics randomised too (zoo_common.randomize_bn), input [1,3,64,64],
   exported in these forms:

     fixed        TorchScript exporter (dynamo=False), opset 13, eval mode, batch fixed at 1,
                  input "input", output "logits" (BN after a conv is folded into it)
     dynamic      the same with dynamic_axes {"input": {0: "batch"}, "logits": {0: "batch"}}
     train        TorchScript, opset 13, train mode, training=TrainingMode.TRAINING,
                  do_constant_folding=False: BN stays as training-form nodes, batch fixed at 1
     dynamo       PyTorch's default exporter, torch.onnx.export(model.eval(), (x,), path) and
                  nothing else: opset 20, batch 1, weights in path + ".data" (checked: the
                  external-data file is the point of this form)
     fixed_op18   as fixed, opset 18      } by default only for resnet18, mobilenet_v2 and
     dynamic_op9  as dynamic, opset 9     } shufflenet_v2_x0_5 (any model with --forms)

   Every file passes onnx.checker (full_check) and runs in onnxruntime with the same logits as
   PyTorch (atol 1e-4 x max |logit|, rtol 1e-3; batch 2 for a dynamic batch, else 1). The
   train form is compared with PyTorch in train mode, Dropout off in both, within 3x PyTorch's
   own float32-vs-float64 difference when that is larger (batch statistics over 2x2 maps at
   batch 1 amplify rounding: up to 6e-3 on regnet_x_400mf), and only for shape and finiteness
   when the graph holds random ops (EfficientNet's stochastic depth). Its trainable
   parameters, counted as elrt counts them (zoo_common.onnx_per_node_params), must equal
   PyTorch's count of what the form contains: eval forms: zoo_common.fused_param_count (every
   Conv2d -> BatchNorm2d pair folded, as the TorchScript exporter and the dynamo exporter
   both do); train: sum(p.numel()); dynamo: the fused count less the Conv/Linear biases that
   are all zero after folding, which its graph optimiser drops (classifier biases that
   torchvision initialises to zero: 10 elements on mobilenet_v2, for instance). elrt restores
   those from the exporter's module records, so its own count of a dynamo file (the inspect
   stage) is the fused count itself.

2. Stages, each an elrt command run with a timeout from inside --out (so the paths in errors
   are short); a cell is a tick or the first `error:` line
   elrt printed (else the last line of stderr, e.g. a panic), "timeout", or "skipped (export
   failed)". The cells of one model and form run in this order:

     inspect   elrt inspect FILE --json: totals.params equals the PyTorch count above (for
               dynamo: the fused count, the zero biases restored)
     train     elrt train FILE --data synthetic:32,16 --batch 8 --epochs 5 --max-steps 20
               --optimizer adamw --lr 1e-3 --schedule constant --no-augment --threads 1:
               4 steps an epoch on 32 images, so 5 epoch points; the last epoch's train loss
               (OUT.metrics.jsonl) must be finite and below the first's
     convert   elrt convert FILE --format tucker2 and --format cp (with --include-1x1 for the
               pointwise-heavy nets: mobilenets, efficientnet, mnasnet, shufflenets,
               squeezenets, regnet, densenet); each converted file passes onnx.checker, runs
               in onnxruntime at batch 1 (finite logits of shape [1, 10]) and reads back in
               elrt (elrt inspect)
     export    elrt export T -o compact.onnx --forms factorized, T being the train stage's
               output when that stage ran and wrote it, else the source file (elrt validates
               in tract itself); compact.onnx then passes onnx.checker and onnxruntime
     compress  elrt compress FILE --out DIR --epochs 1 --max-steps 10 --threads 1 (built-in
               synthetic set; --include-1x1 as for convert); its compact.onnx passes
               onnx.checker and onnxruntime

3. Output in --out (default target/conformance): exports/ (the ONNX files and one
   .export.json record each, reused with --reuse-exports), logs/MODEL_FORM/STAGE.log (command,
   exit status, stdout, stderr), work/MODEL_FORM/ (stage outputs, kept for cells with a
   failure, or all with --keep-work: a full run keeps about 10 GB), conformance.json (every
   cell: command, seconds, status, error, details) and conformance.md (the table: rows model x
   form, columns stages; then each export's ONNX op types, those outside the set elrt is
   known to read flagged). The table is printed too.

--quick is the CI subset: resnet18, mobilenet_v3_small, shufflenet_v2_x0_5 in the four main
forms. Exit status 0 when every cell (exports included) is a tick, 1 otherwise (0 with
--allow-fail), 2 on bad arguments. Needs torch, torchvision, onnxscript (the dynamo form),
onnx, onnxruntime, numpy: scripts/requirements-dev.txt; and a release build of elrt
(cargo build --release).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_common import (  # noqa: E402
    SEED,
    check_and_run,
    count_params,
    fused_param_count,
    onnx_per_node_params,
    op_histogram,
    op_types,
    randomize_bn,
    seed_everything,
    seeded_input,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "densenet121",
    "mnasnet0_5",
    "regnet_x_400mf",
    "googlenet",
    "convnext_tiny",
]
MAIN_FORMS = ["fixed", "dynamic", "train", "dynamo"]
EXTRA_FORMS = ["fixed_op18", "dynamic_op9"]
ALL_FORMS = MAIN_FORMS + EXTRA_FORMS
EXTRA_FORM_MODELS = {"resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"}
QUICK_MODELS = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"]
STAGES = ["inspect", "train", "convert", "export", "compress"]
# Nets whose weight sits in 1x1 convs: convert and compress run with --include-1x1.
POINTWISE_HEAVY = ("mobilenet", "efficientnet", "mnasnet", "shufflenet", "squeezenet", "regnet",
                   "densenet", "convnext")
INPUT_SHAPE = [1, 3, 64, 64]
NUM_CLASSES = 10
# Per-command limits in seconds (--timeout overrides them all).
TIMEOUTS = {"inspect": 120, "train": 900, "convert": 600, "export": 900, "compress": 1800}
# ONNX op types elrt is known to read; anything else in an export is flagged in the report.
KNOWN_OPS = {
    "Conv", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Gelu", "Erf", "LayerNormalization", "Add", "Sub", "Mul", "Div", "Concat",
    "Split", "MaxPool", "AveragePool",
    "GlobalAveragePool", "ReduceMean", "Flatten", "Gemm", "MatMul", "Reshape", "Transpose",
    "Slice", "Pad", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Gather", "Cast",
    "Constant",
}
RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
              "Bernoulli", "Multinomial"}
# Train stage: a small set the net can learn (memorise) in 20 steps, 5 epochs of 4 steps.
TRAIN_ARGS = ["--data", "synthetic:32,16", "--batch", "8", "--epochs", "5", "--max-steps", "20",
              "--optimizer", "adamw", "--lr", "1e-3", "--schedule", "constant", "--no-augment"]
COMPRESS_ARGS = ["--epochs", "1", "--max-steps", "10"]
ERROR_CHARS = 200

_print_lock = threading.Lock()


def log(msg: str) -> None:
    with _print_lock:
        print(msg, flush=True)


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def trim(text: str, n: int = ERROR_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def pointwise_heavy(model: str) -> bool:
    return any(model.startswith(p) for p in POINTWISE_HEAVY)


def cell_key(model: str, form: str) -> str:
    return f"{model}_{form}"


# ---------------------------------------------------------------------------------------------
# Exports (PyTorch)


class ExportFailure(Exception):
    pass


def build_model(name: str):
    import torchvision

    seed_everything(SEED)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kw)
    randomize_bn(model, SEED)
    return model.eval()


def zero_bias_elements(model) -> int:
    """Elements of Conv2d / Linear biases that are all zero once each Conv2d -> BatchNorm2d pair
    is folded: the dynamo exporter's graph optimiser drops such biases where they are an
    operand of the Conv or Gemm. A Linear applied to a rank > 2 input (ConvNeXt's per-pixel
    Linear layers) is a MatMul followed by an Add of its bias, which the exporter keeps."""
    import torch
    import torch.nn as nn
    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(model).eval())
    ranks = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: ranks.__setitem__(id(mod), inp[0].dim()))
             for m in fused.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        fused(torch.zeros(*INPUT_SHAPE))
    for h in hooks:
        h.remove()
    return sum(m.bias.numel() for m in fused.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None
               and not (isinstance(m, nn.Linear) and ranks.get(id(m), 2) > 2)
               and not bool(m.bias.detach().any()))


def torch_export(model, form: str, path: str) -> str:
    """Writes the form's file; returns what the exporter printed (for the log)."""
    import torch

    x = torch.zeros(*INPUT_SHAPE)
    captured = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(captured):
        warnings.simplefilter("always")
        if form == "dynamo":
            torch.onnx.export(model.eval(), (x,), path)
        elif form == "train":
            torch.onnx.export(model.train(), (x,), path, opset_version=13,
                              input_names=["input"], output_names=["logits"],
                              training=torch.onnx.TrainingMode.TRAINING,
                              do_constant_folding=False, dynamo=False)
        else:
            opset = {"fixed": 13, "dynamic": 13, "fixed_op18": 18, "dynamic_op9": 9}[form]
            dyn = form.startswith("dynamic")
            torch.onnx.export(
                model.eval(), (x,), path, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dyn else None)
    out = captured.getvalue()
    for w in caught:
        out += f"warning: {w.category.__name__}: {first_line(w.message)}\n"
    return out


def reference_logits(model, form: str, x: np.ndarray, double: bool = False) -> np.ndarray:
    """PyTorch's logits for what the file of this form computes (in float64 with double)."""
    import torch

    m = copy.deepcopy(model)
    xt = torch.from_numpy(x)
    if double:
        m, xt = m.double(), xt.double()
    if form == "train":
        m.train()
        for sub in m.modules():  # Dropout and stochastic depth off (they are random)
            if "dropout" in type(sub).__name__.lower() or type(sub).__name__ == "StochasticDepth":
                sub.eval()
    else:
        m.eval()
    with torch.no_grad():
        return m(xt).numpy()


def ort_train_form(path: str, x: np.ndarray):
    """onnxruntime on the train-form file with every Dropout's training_mode off (in memory
    only). Returns (logits, note); logits None when the graph holds other random ops."""
    import onnxruntime as ort

    m = onnx.load(path)
    randoms = sorted({n.op_type for n in m.graph.node if n.op_type in RANDOM_OPS})
    for n in m.graph.node:
        if n.op_type == "Dropout" and len(n.input) >= 3:
            del n.input[2]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if randoms:
        return None, f"graph holds random ops ({', '.join(randoms)}): logits not compared"
    return y, ""


def export_one(model, name: str, form: str, out_dir: str) -> dict:
    """Exports and checks one form; returns its record (status ok or error)."""
    rel = os.path.join("exports", f"{cell_key(name, form)}.onnx")
    path = os.path.join(out_dir, rel)
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
    rec = {"model": name, "form": form, "file": rel, "status": "error", "error": "",
           "notes": [], "seconds": 0.0}
    t0 = time.time()
    log_text = ""
    stage = "export"
    try:
        log_text = torch_export(copy.deepcopy(model), form, path)
        stage = "check"
        om = onnx.load(path)
        rec.update(opset=max((o.version for o in om.opset_import if o.domain in ("", "ai.onnx")),
                             default=0),
                   ops=op_types(om), op_counts=dict(op_histogram(om)),
                   unknown_ops=sorted(set(op_types(om)) - KNOWN_OPS),
                   input_shape=[d.dim_value if d.HasField("dim_value") else d.dim_param
                                for d in om.graph.input[0].type.tensor_type.shape.dim],
                   mb=round(sum(os.path.getsize(p) for p in (path, path + ".data")
                                if os.path.exists(p)) / 1e6, 2))
        try:
            from export_torchvision import notable

            rec["notable"] = notable(om)
        except Exception:  # noqa: BLE001  (a report detail only)
            pass
        if form == "dynamo" and not os.path.exists(path + ".data"):
            raise ExportFailure(f"the dynamo exporter wrote no external-data file {rel}.data")
        batch = 2 if form.startswith("dynamic") else 1
        x = seeded_input([batch] + INPUT_SHAPE[1:])
        if form == "train":
            onnx.checker.check_model(path, full_check=True)
            y, note = ort_train_form(path, x)
            if note:
                rec["notes"].append(note)
        else:
            (y,) = check_and_run(path, x)
        if y is not None:
            ref = reference_logits(model, form, x)
            if y.shape != ref.shape:
                raise ExportFailure(f"onnxruntime logits shape {list(y.shape)} != PyTorch's "
                                    f"{list(ref.shape)}")
            scale = float(np.abs(ref).max()) or 1.0
            err = float(np.abs(y - ref).max())
            atol = 1e-4 * max(1.0, scale)
            if form == "train":
                # Batch statistics at batch 1 over maps as small as 2x2 amplify rounding:
                # allow 3x PyTorch's own float32-vs-float64 difference.
                spread = float(np.abs(ref - reference_logits(model, form, x, True)).max())
                rec["pytorch_fp32_vs_fp64"] = spread
                atol = max(atol, 3 * spread)
            rec["max_abs_diff"] = err
            if not np.allclose(y, ref, atol=atol, rtol=1e-3):
                raise ExportFailure(f"onnxruntime differs from PyTorch by {err:.3g} "
                                    f"(max |logit| {scale:.3g}, atol {atol:.3g})")
        stage = "params"
        if form == "train":
            expected = count_params(model)
            how = "sum(p.numel())"
        else:
            expected = fused_param_count(model)
            how = "fused_param_count"
            if form == "dynamo":
                zb = zero_bias_elements(model)
                if zb:
                    expected -= zb
                    how += f" - {zb} all-zero bias elements"
        in_file = onnx_per_node_params(om)
        rec.update(params=expected, params_how=how)
        if form == "dynamo":
            rec["elrt_params"] = fused_param_count(model)
        if in_file != expected:
            raise ExportFailure(f"params: PyTorch {expected:,} ({how}) != the file's "
                                f"{in_file:,} (counted as elrt counts)")
        rec["status"], rec["error"] = "ok", ""
    except Exception as e:  # noqa: BLE001  (any failure is the cell's error)
        msg = first_line(str(e)) or type(e).__name__
        rec["error"] = trim(f"{'torch.onnx.export' if stage == 'export' else stage}: "
                            f"{type(e).__name__}: {msg}")
        log_text += "\n" + traceback.format_exc()
    rec["seconds"] = round(time.time() - t0, 2)
    log_dir = os.path.join(out_dir, "logs", cell_key(name, form))
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "torch_export.log"), "w") as f:
        f.write(log_text)
    with open(path[: -len(".onnx")] + ".export.json", "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def run_exports(models, forms_for, out_dir, reuse) -> dict:
    import torch

    torch.set_num_threads(1)
    os.makedirs(os.path.join(out_dir, "exports"), exist_ok=True)
    records = {}
    for name in models:
        model = None
        for form in forms_for(name):
            key = cell_key(name, form)
            rec_path = os.path.join(out_dir, "exports", key + ".export.json")
            if reuse and os.path.exists(rec_path):
                with open(rec_path) as f:
                    rec = json.load(f)
                if rec.get("status") == "ok" and os.path.exists(
                        os.path.join(out_dir, rec["file"])):
                    rec["reused"] = True
                    records[key] = rec
                    log(f"export {key}: reused")
                    continue
            if model is None:
                try:
                    model = build_model(name)
                except Exception as e:  # noqa: BLE001
                    records[key] = {"model": name, "form": form, "file": None,
                                    "status": "error", "seconds": 0.0, "notes": [],
                                    "error": trim(f"torchvision: {type(e).__name__}: "
                                                  f"{first_line(str(e))}")}
                    log(f"export {key}: {records[key]['error']}")
                    continue
            rec = export_one(model, name, form, out_dir)
            records[key] = rec
            extra = f"{rec['params']:,} params, {rec['mb']} MB" if rec.get("params") else ""
            log(f"export {key}: {'ok' if rec['status'] == 'ok' else rec['error']} "
                f"({rec['seconds']:.1f} s{', ' + extra if extra else ''})")
    return records


# ---------------------------------------------------------------------------------------------
# Stages (elrt)


def run_cmd(cmd: list, cwd: str, timeout: float, log_path: str, threads: int) -> dict:
    """Runs cmd in its own process group; on timeout the group is killed. The thread count is
    elrt's own --threads (each command runs on a pool of exactly that many)."""
    del threads
    t0 = time.time()
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "0")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True, env=env)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    except BaseException:  # Ctrl-C: do not leave the command running in its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    secs = time.time() - t0
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n# cwd {cwd}\n# exit {proc.returncode}"
                f"{' (timeout)' if timed_out else ''}, {secs:.1f} s\n"
                f"--- stdout\n{out}\n--- stderr\n{err}\n\n")
    return {"cmd": shlex.join(cmd), "rc": proc.returncode, "stdout": out, "stderr": err,
            "seconds": round(secs, 2), "timed_out": timed_out}


def elrt_error(r: dict, timeout: float) -> str | None:
    """None when the command succeeded, else the cell text: 'timeout' or the exact error."""
    if r["timed_out"]:
        return f"timeout ({timeout:.0f} s)"
    if r["rc"] == 0:
        return None
    lines = [ln.strip() for ln in r["stderr"].splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:"):
            return trim(ln)
    for ln in lines:  # a panic: its first line says where and why
        if "panicked at" in ln:
            i = lines.index(ln)
            return trim(" ".join(lines[i: i + 2]))
    return trim(lines[-1] if lines else f"exit status {r['rc']}, nothing on stderr")


def ort_check(path: str, cwd: str) -> tuple:
    """onnx.checker + onnxruntime at batch 1 (or the file's fixed batch): (error or None,
    output shape)."""
    import onnxruntime as ort

    full = os.path.join(cwd, path)
    if not os.path.exists(full):
        return f"{path} was not written", None
    try:
        onnx.checker.check_model(full, full_check=True)
    except Exception as e:  # noqa: BLE001
        return trim(f"onnx.checker: {first_line(str(e))}"), None
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(full, so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else INPUT_SHAPE[i])
                 for i, d in enumerate(inp.shape)]
        y = sess.run(None, {inp.name: seeded_input(shape)})[0]
    except Exception as e:  # noqa: BLE001
        return trim(f"onnxruntime: {first_line(str(e))}"), None
    if list(y.shape) != [shape[0], NUM_CLASSES]:
        return f"onnxruntime: logits of shape {list(y.shape)}, want {[shape[0], NUM_CLASSES]}", \
            list(y.shape)
    if not np.all(np.isfinite(y)):
        return "onnxruntime: non-finite logits", list(y.shape)
    return None, list(y.shape)


class Cell:
    """One model x form: its stages, run in order (export uses the train stage's output)."""

    def __init__(self, model, form, export_rec, args, out_dir):
        self.model, self.form, self.rec, self.args, self.out = model, form, export_rec, args, \
            out_dir
        self.key = cell_key(model, form)
        self.work = os.path.join("work", self.key)  # relative to out_dir (the cwd)
        self.logs = os.path.join(out_dir, "logs", self.key)
        self.results = {}
        self.trained = None

    def timeout(self, stage):
        return self.args.timeout or TIMEOUTS[stage]

    def cmd(self, stage, argv):
        log_path = os.path.join(self.logs, f"{stage}.log")
        return run_cmd([self.args.elrt] + argv, self.out, self.timeout(stage), log_path,
                       self.args.threads)

    def run(self, stages):
        shutil.rmtree(os.path.join(self.out, self.work), ignore_errors=True)
        os.makedirs(os.path.join(self.out, self.work), exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        for stage in stages:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.logs, f"{stage}.log"))
            t0 = time.time()
            if self.rec["status"] != "ok":
                res = {"status": "skipped", "error": "skipped (export failed)", "commands": [],
                       "details": {}}
            else:
                try:
                    res = getattr(self, "stage_" + stage)()
                except Exception as e:  # noqa: BLE001  (a bug here is shown, not hidden)
                    res = {"status": "error", "commands": [], "details": {},
                           "error": trim(f"conformance.py: {type(e).__name__}: {e}")}
                    with open(os.path.join(self.logs, f"{stage}.log"), "a") as f:
                        f.write(traceback.format_exc())
            res["seconds"] = round(time.time() - t0, 2)
            res.setdefault("error", "")
            self.results[stage] = res
            log(f"{self.key} {stage}: {'ok' if res['status'] == 'ok' else res['error']} "
                f"({res['seconds']:.1f} s)")
        if not self.args.keep_work and all(r["status"] == "ok" for r in self.results.values()):
            # A passing cell's outputs are not needed (a full run would keep about 10 GB).
            shutil.rmtree(os.path.join(self.out, self.work), ignore_errors=True)
        return self

    @staticmethod
    def result(commands, error, details, timeout=False):
        status = "ok" if error is None else ("timeout" if timeout else "error")
        return {"status": status, "error": error or "", "commands": commands,
                "details": details}

    def stage_inspect(self):
        r = self.cmd("inspect", ["inspect", self.rec["file"], "--json"])
        err, details = elrt_error(r, self.timeout("inspect")), {}
        if err is None:
            rep = json.loads(r["stdout"])
            got = rep["totals"]["params"]
            want = self.rec.get("elrt_params", self.rec["params"])
            details = {"params": got, "macs": rep["totals"].get("macs"),
                       "input_shapes": rep.get("input_shapes"),
                       "pytorch_params": want}
            if got != want:
                err = f"params {got:,} != PyTorch's {want:,}"
        return self.result([r["cmd"]], err, details, r["timed_out"])

    def stage_train(self):
        out = os.path.join(self.work, "train.onnx")
        r = self.cmd("train", ["train", self.rec["file"], *TRAIN_ARGS, "--threads",
                               str(self.args.threads), "--json", "--quiet", "-o", out])
        err, details = elrt_error(r, self.timeout("train")), {}
        if err is None:
            metrics = os.path.join(self.out, self.work, "train.metrics.jsonl")
            with contextlib.suppress(Exception):
                metrics = os.path.join(self.out, json.loads(r["stdout"])["metrics_file"])
            losses = []
            if os.path.exists(metrics):
                with open(metrics) as f:
                    losses = [json.loads(ln)["train_loss"] for ln in f if ln.strip()]
            details = {"train_loss": losses}
            if len(losses) < 2:
                err = f"{len(losses)} epoch(s) in the metrics file: no trend to judge"
            elif not all(math.isfinite(v) for v in losses):
                err = f"non-finite train loss: {losses}"
            elif not losses[-1] < losses[0]:
                err = f"train loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
            if os.path.exists(os.path.join(self.out, out)):
                self.trained = out
        return self.result([r["cmd"]], err, details, r["timed_out"])

    def stage_convert(self):
        extra = ["--include-1x1"] if pointwise_heavy(self.model) else []
        commands, errors, details, timed_out = [], [], {}, False
        for fmt in ("tucker2", "cp"):
            out = os.path.join(self.work, f"{fmt}.onnx")
            r = self.cmd("convert", ["convert", self.rec["file"], "--format", fmt, *extra,
                                     "-o", out])
            commands.append(r["cmd"])
            timed_out |= r["timed_out"]
            err = elrt_error(r, self.timeout("convert"))
            shape = None
            if err is None:
                err, shape = ort_check(out, self.out)
                summary = [ln for ln in r["stdout"].splitlines() if ln.startswith("total")]
                details[fmt] = {"summary": summary[-1] if summary else "", "ort_shape": shape}
            if err is None:  # the converted file reads back in elrt
                r2 = self.cmd("convert", ["inspect", out, "--json"])
                commands.append(r2["cmd"])
                timed_out |= r2["timed_out"]
                err = elrt_error(r2, self.timeout("convert"))
                if err is not None:
                    err = "inspect of the converted file: " + err
            else:
                details[fmt] = {"error": err}
            if err:
                errors.append((fmt, err))
        if not errors:
            return self.result(commands, None, details)
        if len(errors) == 2 and errors[0][1] == errors[1][1]:
            text = f"tucker2, cp: {errors[0][1]}"  # each error is already trimmed
        else:
            text = trim("; ".join(f"{fmt}: {e}" for fmt, e in errors), 2 * ERROR_CHARS)
        return self.result(commands, text, details, timed_out)

    def stage_export(self):
        src = self.trained if self.trained else self.rec["file"]
        out = os.path.join(self.work, "compact.onnx")
        r = self.cmd("export", ["export", src, "-o", out, "--forms", "factorized", "--quiet"])
        err = elrt_error(r, self.timeout("export"))
        details = {"source": src}
        if err is None:
            err, details["ort_shape"] = ort_check(out, self.out)
        return self.result([r["cmd"]], err, details, r["timed_out"])

    def stage_compress(self):
        run_dir = os.path.join(self.work, "compress")
        shutil.rmtree(os.path.join(self.out, run_dir), ignore_errors=True)
        extra = ["--include-1x1"] if pointwise_heavy(self.model) else []
        r = self.cmd("compress", ["compress", self.rec["file"], "--out", run_dir, *extra,
                                  *COMPRESS_ARGS, "--threads", str(self.args.threads),
                                  "--quiet"])
        err, details = elrt_error(r, self.timeout("compress")), {}
        if err is None:
            err, details["ort_shape"] = ort_check(os.path.join(run_dir, "compact.onnx"),
                                                  self.out)
            rep = os.path.join(self.out, run_dir, "report.json")
            if os.path.exists(rep):
                with open(rep) as f:
                    details["report"] = json.load(f)
        return self.result([r["cmd"]], err, details, r["timed_out"])


# ---------------------------------------------------------------------------------------------
# Report


def md_cell(status: str, error: str) -> str:
    if status == "ok":
        return "✓"
    return "`" + error.replace("`", "'").replace("|", "\\|") + "`"


def markdown(models, forms_for, stages, exports, cells, meta) -> str:
    lines = [f"# elrt conformance: {meta['elrt_version']}", "",
             f"`{meta['command']}`, {meta['created']}; exports {meta['export_seconds']:.0f} s, "
             f"stages {meta['stage_seconds']:.0f} s. ✓ or the exact error; input [1,3,64,64], "
             "10 classes, random init.", ""]
    head = ["model", "form", "params", "torch.onnx"] + stages
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for m in models:
        for form in forms_for(m):
            key = cell_key(m, form)
            rec = exports[key]
            row = [m, form, f"{rec['params']:,}" if rec.get("params") else "",
                   md_cell(rec["status"], rec["error"])]
            for s in stages:
                res = cells[key].results[s]
                row.append(md_cell(res["status"], res["error"]))
            lines.append("| " + " | ".join(row) + " |")
    n_ok = sum(1 for c in cells.values() for r in c.results.values() if r["status"] == "ok")
    n_ok += sum(1 for r in exports.values() if r["status"] == "ok")
    n_all = sum(len(c.results) for c in cells.values()) + len(exports)
    lines += ["", f"{n_ok} of {n_all} cells ok."]
    # The same error on many cells, with the cell's own paths replaced by FILE / DIR.
    distinct: dict = {}
    for m in models:
        for form in forms_for(m):
            key = cell_key(m, form)
            found = [("torch.onnx", exports[key]["status"], exports[key]["error"])]
            found += [(s, r["status"], r["error"]) for s, r in cells[key].results.items()]
            for stage, status, error in found:
                if status in ("ok", "skipped"):
                    continue
                text = error.replace(f"exports/{key}.onnx", "FILE").replace(f"work/{key}/",
                                                                              "DIR/")
                distinct.setdefault(text, []).append(f"{key} {stage}")
    if distinct:
        lines += ["", "## Distinct errors", "", "| cells | error | where |", "|---:|---|---|"]
        for text, where in sorted(distinct.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(where[:6]) + (f", ... ({len(where) - 6} more)"
                                            if len(where) > 6 else "")
            lines.append(f"| {len(where)} | {md_cell('error', text)} | {shown} |")
    lines += ["", "## ONNX op types per export", "",
              "Op types outside the set elrt is known to read are in **bold**.", "",
              "| model | form | opset | op types |", "|---|---|---|---|"]
    for m in models:
        for form in forms_for(m):
            rec = exports[cell_key(m, form)]
            if not rec.get("ops"):
                continue
            ops = ", ".join(f"**{o}**" if o not in KNOWN_OPS else o for o in rec["ops"])
            lines.append(f"| {m} | {form} | {rec.get('opset', '')} | {ops} |")
    notes = [(k, n) for k, r in exports.items() for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(f"{k}: {n}" for k, n in notes) + "."]
    return "\n".join(lines) + "\n"


def parse_list(ap, text: str, allowed: list, what: str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        ap.error(f"unknown {what} {', '.join(bad)} (known: {', '.join(allowed)})")
    return items


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Conformance suite: torchvision models x ONNX export forms x elrt stages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the docstring at the top of scripts/conformance.py for what each stage checks.")
    ap.add_argument("--out", default=os.path.join(REPO, "target", "conformance"),
                    help="output folder (default: target/conformance)")
    ap.add_argument("--models", help=f"comma-separated (default: all {len(MODELS)})")
    ap.add_argument("--forms", help="comma-separated, of " + ", ".join(ALL_FORMS) +
                    " (default: the four main forms, plus the opset 18/9 forms for "
                    + ", ".join(sorted(EXTRA_FORM_MODELS)) + ")")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated, of " + ", ".join(STAGES) +
                    " (default: all; 'none' for the exports and their checks only)")
    ap.add_argument("--quick", action="store_true",
                    help="the CI subset: " + ", ".join(QUICK_MODELS) + " in the four main forms")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in parallel (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="--threads for elrt train and compress (default 1)")
    ap.add_argument("--timeout", type=float, default=0,
                    help="limit in seconds for every elrt command (default per stage: " +
                    ", ".join(f"{k} {v}" for k, v in TIMEOUTS.items()) + ")")
    ap.add_argument("--elrt", default=os.path.join("target", "release", "elrt"),
                    help="the elrt binary (default target/release/elrt, relative to the repo)")
    ap.add_argument("--reuse-exports", action="store_true",
                    help="keep exports that passed their checks in an earlier run in --out")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep work/MODEL_FORM of cells whose stages all passed (default: only "
                    "failing cells keep their stage outputs)")
    ap.add_argument("--allow-fail", action="store_true", help="exit 0 even when cells fail")
    args = ap.parse_args()

    models = parse_list(ap, args.models, MODELS, "model") if args.models else (
        QUICK_MODELS if args.quick else MODELS)
    explicit_forms = parse_list(ap, args.forms, ALL_FORMS, "form") if args.forms else None
    stages = [] if args.stages.strip() in ("", "none") else parse_list(ap, args.stages, STAGES,
                                                                       "stage")
    stages = [s for s in STAGES if s in stages]  # pipeline order
    if args.jobs < 1 or args.threads < 1:
        ap.error("--jobs and --threads must be at least 1")

    def forms_for(model):
        if explicit_forms is not None:
            return explicit_forms
        if args.quick:
            return MAIN_FORMS
        return MAIN_FORMS + (EXTRA_FORMS if model in EXTRA_FORM_MODELS else [])

    elrt = args.elrt if os.path.isabs(args.elrt) else os.path.join(REPO, args.elrt)
    args.elrt = os.path.abspath(elrt)
    if stages and not os.access(args.elrt, os.X_OK):
        ap.error(f"no elrt binary at {args.elrt} (cargo build --release, or --elrt PATH)")
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    version = "elrt (not run)"
    if stages:
        with contextlib.suppress(Exception):
            version = subprocess.run([args.elrt, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.strip() or version
    command = "python3 scripts/conformance.py " + shlex.join(sys.argv[1:])

    t0 = time.time()
    exports = run_exports(models, forms_for, out_dir, args.reuse_exports)
    t_export = time.time() - t0

    t1 = time.time()
    cells = {}
    if stages:
        todo = [Cell(m, f, exports[cell_key(m, f)], args, out_dir)
                for m in models for f in forms_for(m)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for c in pool.map(lambda c: c.run(stages), todo):
                cells[c.key] = c
    t_stages = time.time() - t1

    meta = {"elrt": args.elrt, "elrt_version": version, "command": command,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "export_seconds": round(t_export, 1),
            "stage_seconds": round(t_stages, 1), "input_shape": INPUT_SHAPE,
            "train_args": TRAIN_ARGS, "compress_args": COMPRESS_ARGS}
    rows = []
    for m in models:
        for form in forms_for(m):
            key = cell_key(m, form)
            rec = exports[key]
            rows.append({"model": m, "form": form, "stage": "torch.onnx", "status": rec["status"],
                         "error": rec["error"], "seconds": rec["seconds"], "command": None,
                         "details": {k: v for k, v in rec.items()
                                     if k not in ("model", "form", "status", "error", "seconds")}})
            if key in cells:
                for s in stages:
                    res = cells[key].results[s]
                    rows.append({"model": m, "form": form, "stage": s, "status": res["status"],
                                 "error": res["error"], "seconds": res["seconds"],
                                 "command": "; ".join(res["commands"]) or None,
                                 "details": res["details"]})
    with open(os.path.join(out_dir, "conformance.json"), "w") as f:
        json.dump({"meta": meta, "cells": rows}, f, indent=1)
    if stages:
        md = markdown(models, forms_for, stages, exports, cells, meta)
    else:
        dummy = {}
        for m in models:
            for form in forms_for(m):
                c = Cell(m, form, exports[cell_key(m, form)], args, out_dir)
                dummy[c.key] = c
        md = markdown(models, forms_for, [], exports, dummy, meta)
    with open(os.path.join(out_dir, "conformance.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} cells ok; exports {t_export:.0f} s, stages "
          f"{t_stages:.0f} s; report in {os.path.join(out_dir, 'conformance.md')}")
    return 0 if not failed or args.allow_fail else 1


if __name__ == "__main__":
    sys.exit(main())
