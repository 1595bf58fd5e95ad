#!/usr/bin/env python3
"""Train ResNet-20 on CIFAR-10 in PyTorch with elrt's recipe: the twin of `elrt train`.

    python3 scripts/train_pytorch.py [--arch resnet20|tucker2] [--data DIR] [--epochs 30]
        [--batch 128] [--lr 0.1] [--seed 0] [--threads N] [--max-steps S] [--out FILE]

is the PyTorch side of

    elrt train models/resnet20.onnx --data cifar10:DIR --epochs E --batch 128 --lr 0.1 \\
        --schedule cosine --seed 0 [--threads N]

so that the two can be run on the same machine and compared (issue "Real learning").

The recipe, as elrt implements it (src/cli_train.rs, src/train/*.rs, src/data/*.rs), and how it
is reproduced here:

* Model: ResNet-20 exactly as scripts/export_models.py defines it (ResNetCifar(3); the committed
  models/resnet20.onnx is its export). --arch tucker2 is the hand-written Tucker-2 ratio-0.5
  factorisation of scripts/bench_train.py (every 3x3 conv with more than 3 input channels
  becomes 1x1 -> 3x3 -> 1x1 at half the width; elrt trains the ONNX export of that model).
* Init (elrt's default --init scratch, src/train/init.rs): conv weights Kaiming-normal,
  fan_out, ReLU gain (std sqrt(2 / (C_out*kh*kw))), conv biases 0; Gemm weight and bias
  uniform(+-1/sqrt(fan_in)) (PyTorch's nn.Linear default); BN weight 1, bias 0, running mean 0,
  running var 1. Here: torch.manual_seed(seed), then the constructors (ResNetCifar's own
  kaiming_normal_(mode="fan_out", nonlinearity="relu"), nn.Linear's and nn.BatchNorm2d's
  defaults) give the same distributions. export_models.py's randomize_bn is NOT applied (elrt
  re-initialises the BN tensors of the file).
* BatchNorm: momentum 0.1 (ONNX 0.9), eps 1e-5, running variance updated with the unbiased
  batch variance in both; evaluation in eval mode (running statistics).
* Loss: softmax cross-entropy, mean over the batch, --label-smoothing 0 (same formula as
  F.cross_entropy(label_smoothing=...)).
* Optimiser: SGD, momentum 0.9, Nesterov on (elrt's --no-nesterov turns it off), weight decay
  5e-4 (coupled, g += wd*w, torch.optim.SGD's rule, which elrt copies) applied only to conv and
  Gemm/MatMul weights with ndim >= 2 (src/engine/program.rs); BN scale/shift and all biases get
  none. Here: two parameter groups split by p.ndim >= 2, which is the same set for these models.
* Schedule (src/train/schedule.rs, src/train/run.rs): the learning rate is set before EVERY
  optimiser step (per step, not per epoch): lr(s) = lr * 0.5 * (1 + cos(pi * s / T)) for step
  s = 0 .. T-1, T = epochs * steps_per_epoch, min ratio 0, so the last step's lr is just above 0
  and lr(T) = 0 is never used. Warm-up default 0 epochs (--warmup W: round(W * steps_per_epoch)
  steps of linear warm-up base*(s+1)/Wsteps, the cosine then spans the remaining steps).
  --max-steps does not shorten T (the schedule is that of the full run, cut off). The lr
  reported for an epoch is the one its last step used.
* Batches: drop_last (50000 // 128 = 390 steps per epoch; elrt drops the last partial batch
  whenever the training set holds at least one batch); a fresh random permutation each epoch.
* Augmentation (src/data/augment.rs), training only: zero padding 4 (raw pixel 0, i.e. black
  before normalisation), a 32x32 crop at offsets dy, dx uniform in 0..8, then a horizontal flip
  with probability 1/2; then x/255, minus mean, divided by std per channel, with
  mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616) (CIFAR_MEAN / CIFAR_STD).
  Test images: normalisation only. Here the augmentation is vectorised per batch on uint8
  tensors (one gather), then converted to float32 and normalised.
* Evaluation after every epoch on the 10,000 test images, batch = --batch, eval mode; top-1
  and top-5 as elrt counts them (label ranked by logit, ties broken towards the lower index).
* Metrics: one JSON line per epoch with elrt's EpochMetrics fields (epoch, step, lr,
  train_loss, train_acc, test_loss, test_acc, test_top5, img_per_s, epoch_s, wall_s, orth):
  train loss/acc are means over the epoch's batches as trained (augmented, train mode);
  epoch_s is the training part of the epoch (batch building included, evaluation excluded),
  img_per_s = training images / epoch_s, wall_s = time since the start, evaluation included.
  elrt writes the same fields to <output>.metrics.jsonl.

What cannot be identical: the random streams. elrt draws the init, the epoch order and each
image's crop/flip from its own keyed generator (src/rng.rs); here torch's generators are used
(seeded from --seed), so the two runs see the same distributions but not the same numbers, and
their curves agree only statistically (compare final accuracies, ideally over several seeds).
Floating-point summation orders differ as well. Other differences in how the time is spent:
elrt builds batches on 2 extra loader threads (--workers 2) beside its --threads compute
threads; here batches are built on the training thread, between steps (about 3 ms for a
batch of 128 on one core, under 1% of a one-thread ResNet-20 step).

Output: the per-epoch lines on stderr and in --out (overwritten at the start), then a summary
JSON object on stdout (final test top-1/top-5, wall seconds, threads, torch version, config).
CPU only by default (--device cuda is allowed but is not the comparison this script is for).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
RECORD = 1 + 3 * 32 * 32
PAD = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["resnet20", "tucker2"], default="resnet20",
                   help="resnet20 (scripts/export_models.py) or tucker2 (ratio 0.5, "
                        "scripts/bench_train.py)")
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                  "cifar-10-batches-bin"),
                   help="folder with data_batch_1..5.bin and test_batch.bin")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--no-nesterov", action="store_true")
    p.add_argument("--wd", type=float, default=5e-4,
                   help="weight decay on conv and linear weights (not BN, not biases)")
    p.add_argument("--schedule", choices=["constant", "step", "cosine", "onecycle"],
                   default="cosine")
    p.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, in epochs")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: all cores this process may use)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None,
                   help="metrics JSONL (default: <arch>.pytorch.metrics.jsonl in the current "
                        "folder)")
    a = p.parse_args(argv)
    if a.threads is None:
        a.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    if a.threads < 1 or a.batch < 1 or a.epochs < 1 or not (a.lr > 0):
        p.error("--threads, --batch and --epochs must be at least 1, --lr positive")
    if a.out is None:
        a.out = f"{a.arch}.pytorch.metrics.jsonl"
    return a


# ---------------------------------------------------------------------------------------------
# Schedule: src/train/schedule.rs, line by line


def lr_at(base: float, schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate at optimiser step `step` (0-based) of `total`, with `warmup` steps of
    linear warm-up from 0 (the schedule runs over the remaining steps)."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max((step - warmup) / span, 0.0), 1.0)

    def cos(a, b, u):
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * u))

    if schedule == "constant":
        return base
    if schedule == "step":  # gamma 0.1 at 50% and 75% of the run
        return base * 0.1 ** sum(t >= m for m in (0.5, 0.75))
    if schedule == "cosine":
        return cos(base, 0.0, t)
    if schedule == "onecycle":
        pct, div, final_div = 0.3, 25.0, 1e4
        if t < pct:
            lo = base / div
            return lo + (base - lo) * t / pct
        return cos(base, base / final_div, (t - pct) / (1.0 - pct))
    raise ValueError(schedule)


# ---------------------------------------------------------------------------------------------
# Data


def read_cifar10(folder: str):
    """(train_x uint8 [50000,3,32,32], train_y int64, test_x, test_y) from the binary batches."""
    import torch

    def load(names):
        xs, ys = [], []
        for n in names:
            path = os.path.join(folder, n)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise SystemExit(f"{path}: {e.strerror}; --data must hold data_batch_1..5.bin "
                                 "and test_batch.bin (the CIFAR-10 binary version)")
            if len(raw) % RECORD:
                raise SystemExit(f"{path}: {len(raw)} bytes is not a whole number of "
                                 f"{RECORD}-byte records")
            rec = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, RECORD)
            y = rec[:, 0].long()
            if int(y.max()) >= 10:
                raise SystemExit(f"{path}: label {int(y.max())} out of range")
            xs.append(rec[:, 1:].reshape(-1, 3, 32, 32).clone())
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    tx, ty = load([f"data_batch_{i}.bin" for i in range(1, 6)])
    vx, vy = load(["test_batch.bin"])
    return tx, ty, vx, vy


class Normalizer:
    """(x/255 - mean[c]) / std[c] on a uint8 batch, through a per-channel 256-entry table as
    elrt does (src/data/augment.rs, Normalize::table), so the values are bit-identical."""

    def __init__(self, device):
        import torch

        v = torch.arange(256, dtype=torch.float32) / 255.0
        mean = torch.tensor(CIFAR_MEAN, dtype=torch.float32)[:, None]
        std = torch.tensor(CIFAR_STD, dtype=torch.float32)[:, None]
        self.table = ((v[None, :] - mean) / std).to(device)  # [3, 256]
        self.ch = torch.arange(3, device=device)[None, :, None, None]

    def __call__(self, x_u8):
        return self.table[self.ch, x_u8.long()]


def augment_batch(x_u8, gen, pad: int = PAD):
    """Random crop with zero padding `pad` and random horizontal flip of a uint8 batch
    [B,C,H,W], vectorised: the crop offsets dy, dx are uniform in 0..2*pad, the flip has
    probability 1/2 and mirrors the cropped window (elrt's augment::apply)."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x_u8.shape
    padded = F.pad(x_u8, (pad, pad, pad, pad))  # zeros = black, as in elrt and torchvision
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]  # [B, H]
    cols = dx[:, None] + torch.arange(w)[None, :]  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def topk_correct(logits, labels, k: int) -> int:
    """Images whose label ranks among the first k logits; ties go to the lower class index
    (src/engine/ops/loss.rs, topk_correct)."""
    import torch

    t = logits.gather(1, labels[:, None])
    j = torch.arange(logits.shape[1], device=logits.device)[None, :]
    ahead = (logits > t) | ((logits == t) & (j < labels[:, None]))
    return int((ahead.sum(1) < min(k, logits.shape[1])).sum())


# ---------------------------------------------------------------------------------------------
# Model


def build_model(arch: str, seed: int):
    import torch

    # export_models.py (and zoo_common.py) import onnx and onnxruntime at module level; training
    # needs neither. They are stubbed out (bench_train.py's helper) for that import only, and the
    # stubs are taken out of sys.modules again: torch itself (the optimiser pulls in
    # torch._dynamo) probes for onnx and must see the real package or none.
    from bench_train import _stub_onnx_modules

    before = set(sys.modules)
    _stub_onnx_modules()
    stubs = [m for m in ("onnx", "onnx.numpy_helper", "onnxruntime") if m not in before]
    try:
        from export_models import ResNetCifar
    finally:
        for m in stubs:
            sys.modules.pop(m, None)

    torch.manual_seed(seed)
    model = ResNetCifar(3)
    if arch == "tucker2":
        from bench_train import tucker2_factorise

        n = tucker2_factorise(model)
        assert n == 18, f"expected 18 factorised 3x3 convs in ResNet-20, got {n}"
    return model


def param_groups(model, wd: float):
    """Decay for weights with ndim >= 2 (conv, linear), none for BN parameters and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# Training


def evaluate(model, x_u8, y, batch, norm, device):
    import torch
    import torch.nn.functional as F

    model.eval()
    n, loss, c1, c5 = 0, 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            xb = norm(x_u8[i:i + batch].to(device))
            yb = y[i:i + batch].to(device)
            logits = model(xb)
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            c1 += topk_correct(logits, yb, 1)
            c5 += topk_correct(logits, yb, 5)
            n += len(yb)
    model.train()
    return {"images": n, "loss": loss / n, "top1": c1 / n, "top5": c5 / n}


def main(argv=None) -> int:
    a = parse_args(argv)
    # Before torch loads its OpenMP/MKL runtimes.
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ["MKL_NUM_THREADS"] = str(a.threads)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    device = torch.device(a.device)

    t_load = time.perf_counter()
    tx, ty, vx, vy = read_cifar10(a.data)
    load_s = time.perf_counter() - t_load
    model = build_model(a.arch, a.seed).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    groups = param_groups(model, a.wd)
    opt = torch.optim.SGD(groups, lr=a.lr, momentum=a.momentum, nesterov=not a.no_nesterov,
                          dampening=0.0)
    norm = Normalizer(device)

    n = len(ty)
    drop_last = n >= a.batch
    per_epoch = n // a.batch if drop_last else -(-n // a.batch)
    total = a.epochs * per_epoch
    warmup = int(round(a.warmup * per_epoch))
    print(f"cifar10:{a.data}: {n} train / {len(vy)} test images, 10 classes; "
          f"{torch.get_num_threads()} threads, batch {a.batch}; {a.arch}: {params} params; "
          f"{per_epoch} steps/epoch, {total} steps", file=sys.stderr, flush=True)

    if os.path.dirname(a.out):
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
    out = open(a.out, "w")
    history = []
    step = 0
    outcome = "Finished"
    start = time.perf_counter()
    for epoch in range(a.epochs):
        # Order and augmentation of epoch e depend only on (seed, e), as in elrt's loader.
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + epoch)
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        lr = a.lr
        for bi in range(per_epoch):
            idx = order[bi * a.batch:(bi + 1) * a.batch]
            xb = tx[idx]
            if not a.no_augment:
                xb = augment_batch(xb, gen)
            xb = norm(xb.to(device))
            yb = ty[idx].to(device)
            lr = lr_at(a.lr, a.schedule, step, total, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=a.label_smoothing)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SystemExit(f"the loss became {lv} at epoch {epoch + 1}, step {step}: "
                                 "training diverged (try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                correct += topk_correct(logits.detach(), yb, 1)
            seen += len(yb)
            loss_sum += lv * len(yb)
            step += 1
            if a.max_steps is not None and step >= a.max_steps:
                break
        epoch_s = time.perf_counter() - t0
        ev = evaluate(model, vx, vy, a.batch, norm, device)
        m = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": loss_sum / seen if seen else float("nan"),
            "train_acc": correct / seen if seen else float("nan"),
            "test_loss": ev["loss"],
            "test_acc": ev["top1"],
            "test_top5": ev["top5"],
            "img_per_s": seen / max(epoch_s, 1e-9),
            "epoch_s": epoch_s,
            "wall_s": time.perf_counter() - start,
            "orth": 0.0,
        }
        history.append(m)
        out.write(json.dumps(m) + "\n")
        out.flush()
        print(f"epoch {m['epoch']:>3}/{a.epochs}  lr {lr:.4f}  train loss {m['train_loss']:.4f} "
              f"acc {100 * m['train_acc']:.2f}%  test loss {m['test_loss']:.4f} "
              f"acc {100 * m['test_acc']:.2f}% top-5 {100 * m['test_top5']:.2f}%  "
              f"{m['img_per_s']:.0f} img/s  {epoch_s:.0f}s", file=sys.stderr, flush=True)
        if a.max_steps is not None and step >= a.max_steps:
            outcome = "StepLimit"
            break
    out.close()
    wall = time.perf_counter() - start
    last = history[-1]
    summary = {
        "framework": "pytorch",
        "arch": a.arch,
        "params": params,
        "data": a.data,
        "outcome": outcome,
        "metrics_file": a.out,
        "final_test_top1": last["test_acc"],
        "final_test_top5": last["test_top5"],
        "final_test_loss": last["test_loss"],
        "epochs_run": last["epoch"],
        "steps": step,
        "steps_per_epoch": per_epoch,
        "wall_s": wall,
        "data_load_s": load_s,
        "mean_train_img_per_s": sum(h["img_per_s"] for h in history) / len(history),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "config": {
            "epochs": a.epochs, "batch": a.batch, "lr": a.lr, "momentum": a.momentum,
            "nesterov": not a.no_nesterov, "weight_decay": a.wd, "schedule": a.schedule,
            "warmup_epochs": a.warmup, "label_smoothing": a.label_smoothing, "seed": a.seed,
            "max_steps": a.max_steps, "augment": not a.no_augment, "drop_last": drop_last,
        },
        "last": last,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
