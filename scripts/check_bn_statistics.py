#!/usr/bin/env python3
"""Judge a trained file's batch-norm running statistics with PyTorch.

Loads the weights and running statistics of an ONNX file that `elrt train` wrote from a
torchvision architecture (initializer names are PyTorch's state_dict names) into that
torchvision model, and tests it on an image folder's test split three ways, in PyTorch:

  file stats      eval mode with the file's running statistics (what the file deploys);
  batch stats     train-mode batch norms over the whole test split (are the weights fine?);
  recalibrated    running statistics recomputed over the training split (momentum=None,
                  one pass, no augmentation), then eval mode.

Per batch norm it also prints how far the file's running variance is from the variance of
that layer's input over a training batch (median ratio per layer, worst layers first).

With --train it first trains the torchvision model itself with elrt's default recipe for
`elrt train --data folder:... --lr LR` (SGD Nesterov 0.9, cosine, wd 5e-4, batch 32, no
augmentation) and reports its own eval accuracy per epoch: PyTorch's run of the same recipe.

Used for README's `--bn-recalibrate` paragraph (torchvision efficientnet_v2_s, 64x64, the
3-class folder): `python3 scripts/check_bn_statistics.py full.onnx efficientnet_v2_s FOLDER`.
Needs torch, torchvision, onnx, pillow.
"""

import argparse
import sys

import numpy as np
import onnx
import torch
import torchvision
from onnx import numpy_helper
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def split(folder, name):
    return ImageFolder(f"{folder}/{name}", T.Compose([T.ToTensor(), T.Normalize(*IMAGENET)]))


def stack(ds):
    return torch.stack([x for x, _ in ds]), torch.tensor([y for _, y in ds])


def accuracy(model, x, y):
    with torch.no_grad():
        o = model(x)
    return (o.argmax(1) == y).float().mean().item(), torch.nn.functional.cross_entropy(o, y).item()


def train_reference(arch, classes, tr, te, epochs, lr):
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None, num_classes=classes)
    dl = torch.utils.data.DataLoader(tr, batch_size=32, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(dl))
    x, y = stack(te)
    for e in range(epochs):
        m.train()
        for xb, yb in dl:
            loss = torch.nn.functional.cross_entropy(m(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
        m.eval()
        acc, loss = accuracy(m, x, y)
        print(f"PyTorch's own run, epoch {e + 1}: test {100 * acc:.2f}% (loss {loss:.4f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("onnx")
    ap.add_argument("arch", help="torchvision model name, e.g. efficientnet_v2_s")
    ap.add_argument("folder", help="image folder with train/ and test/ class folders")
    ap.add_argument("--train", action="store_true", help="also train PyTorch's own reference")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.025)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tr, te = split(a.folder, "train"), split(a.folder, "test")
    classes = len(tr.classes)
    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(a.onnx).graph.initializer}
    model = getattr(torchvision.models, a.arch)(weights=None, num_classes=classes)
    sd = model.state_dict()
    missing = [k for k in sd if k not in init and not k.endswith("num_batches_tracked")]
    if missing:
        sys.exit(f"{a.onnx}: {len(missing)} of {a.arch}'s tensors are not in the file "
                 f"(e.g. {missing[:3]}): not a file elrt trained from this architecture")
    model.load_state_dict({k: torch.from_numpy(init[k].copy()).reshape(v.shape) if k in init
                           else v for k, v in sd.items()})
    # The file's epsilons (elrt's re-inserted BNs have ONNX's 1e-5 where torchvision may use
    # 1e-3): with PyTorch's own, small running variances made it another model.
    eps = {n.name: onnx.helper.get_attribute_value(at) for n in onnx.load(a.onnx).graph.node
           if n.op_type == "BatchNormalization" for at in n.attribute if at.name == "epsilon"}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d) and name in eps:
            mod.eps = eps[name]
    x, y = stack(te)
    model.eval()
    acc, loss = accuracy(model, x, y)
    print(f"file stats:   test {100 * acc:.2f}% (loss {loss:.4f})")
    model.train()
    for mod in model.modules():  # dropout and stochastic depth off: only the BNs in train mode
        if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.training = False
    acc, loss = accuracy(model, x, y)
    print(f"batch stats:  test {100 * acc:.2f}% (loss {loss:.4f})")
    # The file's running variance against each BN input's variance over a training batch.
    xt, _ = stack(tr)
    xt = xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:96]]
    ratios = {}

    def hook(name):
        def f(mod, inp, out):
            v = inp[0].var((0, 2, 3), unbiased=True).numpy()
            ratios[name] = init[name + ".running_var"] / np.maximum(v, 1e-12)
        return f

    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [m.register_forward_hook(hook(n)) for n, m in bns]
    with torch.no_grad():
        model(xt)
    for h in handles:
        h.remove()
    worst = sorted(ratios.items(), key=lambda kv: -abs(np.log(np.median(kv[1]))))[:6]
    print("file running var / batch var, median per layer, furthest first: "
          + ", ".join(f"{n} {np.median(r):.2f}" for n, r in worst))
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        xa, _ = stack(tr)
        for i in range(0, len(xa), 32):
            model(xa[i:i + 32])
    model.eval()
    acc, loss = accuracy(model, x, y)
    print(f"recalibrated: test {100 * acc:.2f}% (loss {loss:.4f})")
    if a.train:
        train_reference(a.arch, classes, tr, te, a.epochs, a.lr)


if __name__ == "__main__":
    main()
