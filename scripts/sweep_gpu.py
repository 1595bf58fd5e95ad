#!/usr/bin/env python3
"""Many short ResNet-20 / Tucker-2 trainings at once on one GPU: a PyTorch twin of
`elrt compress` used to choose which low-rank training variants are worth a 30-epoch elrt run
on the CPU (a 30-epoch elrt run takes about an hour of one core; a GPU runs a dozen at once).

    python3 scripts/sweep_gpu.py probe [--procs 1,8,16] [--steps 100] [--compile]
    python3 scripts/sweep_gpu.py sweep --data DIR [--configs FILE.json] [--epochs 30]
        [--procs 16] [--out DIR]

The recipe is elrt's (scripts/train_pytorch.py documents it line by line): SGD momentum 0.9,
Nesterov, lr 0.1 cosine per step, weight decay 5e-4 on conv and linear weights only, batch 128
with drop_last, random crop (pad 4) + flip, CIFAR mean/std normalisation, 30 epochs. The
Tucker-2 model is elrt's rewrite: every 3x3 conv with more than 3 input channels becomes
1x1 (C_in -> r_in) -> 3x3 (r_in -> r_out) -> 1x1 (r_out -> C_out), ranks per stage, BN after
the last factor, Kaiming fan-out on each factor (elrt's default --factor-init per-conv) or the
composed-variance init (--factor-init composed). DSO as src/lowrank/orth.rs:
rho / r * (||A^T A - I||^2 + ||A A^T - I||^2) on U1 [r_in, C_in] and U2 [C_out, r_out].

Variants a config can ask for (JSON keys): arch (resnet20|tucker2), ranks ([r16, r32, r64]: the
rank of a 16-, 32- or 64-channel side, so r_in follows C_in and r_out C_out as in elrt's ranks
files; 0 leaves that stage dense and is full width where a factorised conv reads it), rho,
orth_no_decay (U1/U2 out of weight decay), factor_bn (a BatchNormalization after U1 and after
the core while training; export folds each into the conv before it), init
(per-conv|composed), lr, wd, seed.

Random streams are torch's, not elrt's, and the training images are decoded from a lossless
WebP copy of the CIFAR-10 binary batches (scripts/sweep_gpu.py pack), so results agree with
elrt's only statistically; compare variants against the full-rank and baseline rows of the
same sweep. Output: one JSON line per finished run in OUT/results.jsonl, and every fifth
epoch's line of every run in OUT/epochs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

DEFAULT_CONFIGS = [
    {"name": "full_s0", "arch": "resnet20", "seed": 0},
    {"name": "full_s1", "arch": "resnet20", "seed": 1},
    {"name": "t2p5_s0", "seed": 0},
    {"name": "t2p5_s1", "seed": 1},
    {"name": "t2p5_nodecay_s0", "orth_no_decay": True, "seed": 0},
    {"name": "t2p5_nodecay_s1", "orth_no_decay": True, "seed": 1},
    {"name": "t2p5_rho3e-2_s0", "rho": 3e-2, "seed": 0},
    {"name": "t2p5_fbn_s0", "factor_bn": True, "seed": 0},
    {"name": "t2p5_fbn_s1", "factor_bn": True, "seed": 1},
    {"name": "t2p5_fbn_nodecay_s0", "factor_bn": True, "orth_no_decay": True, "seed": 0},
    {"name": "t2p5_fbn_nodecay_s1", "factor_bn": True, "orth_no_decay": True, "seed": 1},
    {"name": "t2p5_fbn_rho0_s0", "factor_bn": True, "rho": 0.0, "seed": 0},
    {"name": "t2_l1dense_16_36_s0", "ranks": [0, 16, 36], "seed": 0},
    {"name": "t2p5_composed_s0", "init": "composed", "seed": 0},
    {"name": "t2p5_rho0_s0", "rho": 0.0, "seed": 0},
    {"name": "t2r5_s0", "ranks": [8, 16, 32], "seed": 0},
]

BASE = {"arch": "tucker2", "ranks": [8, 16, 40], "rho": 1e-2, "orth_no_decay": False,
        "factor_bn": False, "init": "per-conv", "lr": 0.1, "wd": 5e-4, "seed": 0}


# ---------------------------------------------------------------------------------------------
# Data: pack (here) and unpack (there)


def pack(src: str, dst: str, names):
    """Lossless WebP mosaics (100 x 100 images of 32x32) + label files: about half the bytes of
    the binary batches, so the set fits the device tool's transfer limit in a few calls."""
    import numpy as np
    from PIL import Image

    os.makedirs(dst, exist_ok=True)
    for name in names:
        raw = np.fromfile(os.path.join(src, f"{name}.bin"), dtype=np.uint8).reshape(-1, 3073)
        imgs = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        m = imgs.reshape(100, 100, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(3200, 3200, 3)
        Image.fromarray(m).save(os.path.join(dst, f"{name}.webp"), "WEBP", lossless=True,
                                quality=100, method=6)
        raw[:, 0].tofile(os.path.join(dst, f"{name}.labels"))


def load_packed(folder: str, names):
    import numpy as np
    import torch
    from PIL import Image

    xs, ys = [], []
    for name in names:
        m = np.array(Image.open(os.path.join(folder, f"{name}.webp")).convert("RGB"))
        imgs = m.reshape(100, 32, 100, 32, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, 32, 32)
        xs.append(torch.from_numpy(np.ascontiguousarray(imgs)))
        ys.append(torch.from_numpy(
            np.fromfile(os.path.join(folder, f"{name}.labels"), dtype=np.uint8).astype(np.int64)))
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------
# Model


def build(cfg):
    import torch
    import torch.nn as nn

    torch.manual_seed(cfg["seed"])
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    # export_models imports onnx and onnxruntime at module level, unused here: stubbed for that
    # import only (torch probes for onnx later and must see the real package or none).
    from bench_train import _stub_onnx_modules

    before = set(sys.modules)
    _stub_onnx_modules()
    try:
        from export_models import ResNetCifar
    finally:
        for m in ("onnx", "onnx.numpy_helper", "onnxruntime"):
            if m not in before:
                sys.modules.pop(m, None)

    model = ResNetCifar(3)
    factors = []  # (weight, rank) under DSO
    if cfg["arch"] == "tucker2":
        # Ranks by channel width, as elrt's policies give them: r_in from C_in, r_out from C_out
        # (layer3.0.conv1, 32 -> 64, gets r_in = ranks[1], r_out = ranks[2]).
        by_width = dict(zip((16, 32, 64), cfg["ranks"]))
        for si, stage in enumerate((model.layer1, model.layer2, model.layer3)):
            if cfg["ranks"][si] == 0:
                continue
            for block in stage:
                for cname in ("conv1", "conv2"):
                    conv = getattr(block, cname)
                    ci, co = conv.in_channels, conv.out_channels
                    ri, ro = by_width[ci] or ci, by_width[co] or co
                    u1 = nn.Conv2d(ci, ri, 1, bias=False)
                    core = nn.Conv2d(ri, ro, 3, conv.stride, conv.padding, bias=False)
                    u2 = nn.Conv2d(ro, co, 1, bias=False)
                    if cfg["init"] == "composed":
                        nn.init.normal_(u1.weight, 0.0, math.sqrt(1.0 / ci))
                        nn.init.normal_(core.weight, 0.0, math.sqrt(1.0 / (ri * 9)))
                        nn.init.normal_(u2.weight, 0.0, math.sqrt(2.0 * ci / (co * ro)))
                    else:
                        for m in (u1, core, u2):
                            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    seq = [u1, core, u2]
                    if cfg["factor_bn"]:
                        seq = [u1, nn.BatchNorm2d(ri), core, nn.BatchNorm2d(ro), u2]
                    setattr(block, cname, nn.Sequential(*seq))
                    factors += [(u1.weight, ri), (u2.weight, ro)]
    return model, factors


def dso(factors, rho):
    """The DSO penalty summed over the factor matrices, one batched product per shape (the
    per-matrix loop launched ~8 kernels per matrix: most of a step's launches on a GPU)."""
    import torch

    groups = {}
    for w, r in factors:
        groups.setdefault((w.shape[0], w.shape[1], r), []).append(w)
    total = 0.0
    for (m, n, r), ws in groups.items():
        a = torch.stack([w.reshape(m, n) for w in ws])  # [G, m, n]
        ata = a.transpose(1, 2) @ a - torch.eye(n, device=a.device)
        aat = a @ a.transpose(1, 2) - torch.eye(m, device=a.device)
        total = total + (rho / r) * ((ata * ata).sum() + (aat * aat).sum())
    return total


def dso_reference(factors, rho):
    """DSO one matrix at a time, as src/lowrank/orth.rs writes it: the check for dso()."""
    import torch

    total = 0.0
    for w, r in factors:
        a = w.reshape(w.shape[0], w.shape[1])
        ata = a.t() @ a - torch.eye(a.shape[1], device=a.device)
        aat = a @ a.t() - torch.eye(a.shape[0], device=a.device)
        total = total + (rho / r) * ((ata * ata).sum() + (aat * aat).sum())
    return total


def lr_at(base, step, total):
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step / total, 1.0)))


# ---------------------------------------------------------------------------------------------
# One run


def run(cfg, data, epochs, out_dir, steps_limit=None, compile_=False):
    import torch
    import torch.nn.functional as F

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tx, ty, vx, vy = data
    tx, ty, vx, vy = tx.to(dev), ty.to(dev), vx.to(dev), vy.to(dev)
    model, factors = build(cfg)
    model = model.to(dev).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    fids = {id(w) for w, _ in factors}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.ndim >= 2 and not (cfg["orth_no_decay"] and id(p) in fids):
            decay.append(p)
        else:
            no_decay.append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg["wd"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg["lr"], momentum=0.9, nesterov=True,
                          fused=dev.type == "cuda")
    table = ((torch.arange(256, device=dev, dtype=torch.float32)[None, :] / 255.0
              - torch.tensor(CIFAR_MEAN, device=dev)[:, None])
             / torch.tensor(CIFAR_STD, device=dev)[:, None])  # [3, 256]
    ch = torch.arange(3, device=dev)[None, :, None, None]
    rho = cfg["rho"]
    if factors:  # the batched penalty against the per-matrix definition, once per run
        a, b = dso(factors, 1.0), dso_reference(factors, 1.0)
        assert torch.allclose(a, b, rtol=1e-4), f"batched DSO {float(a)} != {float(b)}"

    def loss_fn(xb, yb):
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        reg = dso(factors, rho) if rho > 0 and factors else torch.zeros((), device=dev)
        return loss, reg, logits

    step_fn = torch.compile(loss_fn) if compile_ else loss_fn
    gen = torch.Generator(device=dev).manual_seed(1000 + cfg["seed"])
    n, b = len(ty), 128
    per_epoch = n // b
    total = epochs * per_epoch
    ar = torch.arange(32, device=dev)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(3, device=dev)[None, :, None, None]
    step, t0 = 0, time.time()
    log = open(os.path.join(out_dir, "epochs.jsonl"), "a") if out_dir else None
    last = {}
    for epoch in range(epochs):
        order = torch.randperm(n, device=dev, generator=gen)
        lsum = torch.zeros((), device=dev)
        rsum = torch.zeros((), device=dev)
        for k in range(per_epoch):
            idx = order[k * b:(k + 1) * b]
            xb = F.pad(tx[idx], (4, 4, 4, 4))
            dy = torch.randint(0, 9, (b,), device=dev, generator=gen)
            dx = torch.randint(0, 9, (b,), device=dev, generator=gen)
            flip = torch.rand(b, device=dev, generator=gen) < 0.5
            rows = dy[:, None] + ar[None, :]
            cols = dx[:, None] + ar[None, :]
            cols = torch.where(flip[:, None], cols.flip(1), cols)
            xb = xb[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
            xb = table[ch, xb.long()].contiguous(memory_format=torch.channels_last)
            yb = ty[idx]
            lr = lr_at(cfg["lr"], step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, reg, _ = step_fn(xb, yb)
            opt.zero_grad(set_to_none=True)
            (loss + reg).backward()
            opt.step()
            lsum += loss.detach()
            rsum += reg.detach()
            step += 1
            if steps_limit and step >= steps_limit:
                float(loss.detach())  # waits for the device
                return {"steps": step, "s": time.time() - t0}
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            model.eval()
            c1, tl = 0, 0.0
            with torch.no_grad():
                for i in range(0, len(vy), 500):
                    lg = model(table[ch, vx[i:i + 500].long()]
                               .contiguous(memory_format=torch.channels_last))
                    tl += float(F.cross_entropy(lg, vy[i:i + 500], reduction="sum"))
                    c1 += int((lg.argmax(1) == vy[i:i + 500]).sum())
            model.train()
            last = {"epoch": epoch + 1, "train_loss": float(lsum) / per_epoch,
                    "orth": float(rsum) / per_epoch, "test_acc": c1 / len(vy),
                    "test_loss": tl / len(vy), "wall_s": time.time() - t0}
            if log:
                log.write(json.dumps({"name": cfg["name"], **last}) + "\n")
                log.flush()
    return {"name": cfg["name"], "config": cfg, "params": params, **last}


# ---------------------------------------------------------------------------------------------
# Entry points


def worker(args):
    cfg = json.loads(args.cfg)
    if args.probe_steps:
        import torch

        data = (torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8),
                torch.randint(0, 10, (50000,)),
                torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8),
                torch.randint(0, 10, (1000,)))
        if not args.compile:  # warm-up (cudnn autotuning); a compiled run is timed with its compile
            run(cfg, data, 30, None, steps_limit=20)
        r = run(cfg, data, 30, None, steps_limit=args.probe_steps, compile_=args.compile)
        print(json.dumps({"name": cfg["name"], **r}), flush=True)
        return
    tx, ty = load_packed(args.data, [f"data_batch_{i}" for i in range(1, 6)])
    vx, vy = load_packed(args.data, ["test_batch"])
    if args.images:  # smoke tests
        tx, ty, vx, vy = tx[:args.images], ty[:args.images], vx[:args.images], vy[:args.images]
    r = run(cfg, (tx, ty, vx, vy), args.epochs, args.out, compile_=args.compile)
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps(r), flush=True)


def launch(cfgs, extra, procs):
    """Runs each config in its own process, at most `procs` at a time."""
    pending = list(cfgs)
    running = []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < procs:
            c = pending.pop(0)
            running.append(subprocess.Popen(
                [sys.executable, __file__, "worker", "--cfg", json.dumps(c)] + extra,
                env={**os.environ, "OMP_NUM_THREADS": "1"}))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("--src", required=True)
    pk.add_argument("--dst", required=True)
    pk.add_argument("names", nargs="+")
    pr = sub.add_parser("probe")
    pr.add_argument("--procs", default="1,8,16")
    pr.add_argument("--steps", type=int, default=100)
    pr.add_argument("--compile", action="store_true")
    sw = sub.add_parser("sweep")
    sw.add_argument("--data", required=True)
    sw.add_argument("--configs")
    sw.add_argument("--epochs", type=int, default=30)
    sw.add_argument("--procs", type=int, default=16)
    sw.add_argument("--out", default="sweep_out")
    sw.add_argument("--compile", action="store_true")
    sw.add_argument("--images", type=int, default=0, help="use the first N images (smoke test)")
    wk = sub.add_parser("worker")
    wk.add_argument("--cfg", required=True)
    wk.add_argument("--data")
    wk.add_argument("--epochs", type=int, default=30)
    wk.add_argument("--out")
    wk.add_argument("--probe-steps", type=int, default=0)
    wk.add_argument("--images", type=int, default=0)
    wk.add_argument("--compile", action="store_true")
    a = p.parse_args()
    if a.cmd == "pack":
        pack(a.src, a.dst, a.names)
    elif a.cmd == "worker":
        worker(a)
    elif a.cmd == "probe":
        for n in [int(v) for v in a.procs.split(",")]:
            cfg = {**BASE, "name": f"probe{n}"}
            extra = ["--probe-steps", str(a.steps)] + (["--compile"] if a.compile else [])
            s = launch([cfg] * n, extra, n)
            print(json.dumps({"procs": n, "steps_each": a.steps, "wall_s": s,
                              "compile": a.compile}), flush=True)
    else:
        cfgs = json.load(open(a.configs)) if a.configs else DEFAULT_CONFIGS
        cfgs = [{**BASE, **c} for c in cfgs]
        os.makedirs(a.out, exist_ok=True)
        extra = ["--data", a.data, "--epochs", str(a.epochs), "--out", a.out,
                 "--images", str(a.images)] + \
            (["--compile"] if a.compile else [])
        s = launch(cfgs, extra, a.procs)
        print(json.dumps({"sweep_wall_s": s, "runs": len(cfgs)}), flush=True)


if __name__ == "__main__":
    main()
