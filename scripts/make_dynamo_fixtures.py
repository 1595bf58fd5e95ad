#!/usr/bin/env python3
"""Writes four fixtures of what PyTorch's default (dynamo) exporter makes of small untrained
classifiers, weights in model.onnx.data:

tests/fixtures/dynamo_shared_bn/: a DenseNet-style net. The point is what that exporter does to
an untrained model: it stores tensors
of equal contents once, so each pre-activation BatchNorm reads its scale and its running
variance from one initializer (all ones) and its shift and running mean from another (all
zeros), and the BNs of equal width share them across layers (the 16-channel norm1 of both dense layers, the 24-channel norms of
the transition and the head). tests/user_models.rs checks that elrt unties them.

tests/fixtures/dynamo_adaptive_pool/: adaptive average pools whose output size does not divide
the input's (a 3x3 map pooled to 6x6, as AlexNet's pool on a 128x128 input, and to 5x5, with
windows of unequal size, as VGG's 7x7 pool on a 64x64 input). The exporter writes them as a
Transpose, a GatherND with constant indices, Where masks and means; tests/user_models.rs checks
that elrt trains and exports them, computing what tract computes on the file itself.

tests/fixtures/dynamo_folded_bn/: a MobileNetV3-style net initialised as torchvision
initialises its nets (zero biases). The exporter's optimiser folds each BatchNorm into its conv
and drops every bias that is all zeros: the squeeze-excitation convs', a plain conv's and the
classifier's. params.json lists PyTorch's parameters (name, size) and its BN modules;
tests/user_models.rs checks that elrt restores the biases and trains with a BN exactly where
PyTorch has one, so that its parameters are PyTorch's.

tests/fixtures/dynamo_prelu_elu/: PReLU (per channel and one shared slope), ELU (alpha 0.8)
and LeakyReLU; tests/user_models.rs checks that elrt computes what tract computes on the file
and that a short compress trains the slopes and exports PRelu and Elu.

tests/fixtures/dynamo_group_norm/: GroupNorm (two, 4 groups each) and an affine InstanceNorm2d,
with PyTorch's parameter list in params.json; tests/user_models.rs checks that elrt computes
what tract computes on the file, holds PyTorch's parameters (the instance norms that GroupNorm
exports as keep their constant ones and zeros frozen) and trains and exports them.
tests/fixtures/dynamo_group_norm_opset21/: the same net exported at opset 21, where the
exporter writes GroupNormalization; the same checks, and the compact file keeps the op.

    python3 scripts/make_dynamo_fixtures.py [OUT_ROOT] [--only NAME]

Needs torch and onnxscript (scripts/requirements-dev.txt). Seeded; the script prints which
initializers the first file shares and which ops the second holds.
"""

import collections
import json
import os
import sys

import onnx
import torch
from torch import nn


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 16, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.norm1(x)))
        y = self.conv2(torch.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return nn.functional.avg_pool2d(self.conv(torch.relu(self.norm(x))), 2)


class TinyDenseNet(nn.Module):
    """DenseNet's pattern in miniature: BNs that follow a concat or a pool, which no exporter
    folds into a conv (each norm2 follows a conv and is folded)."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = DenseLayer(16, 8)
        self.transition = Transition(24, 16)
        self.layer2 = DenseLayer(16, 8)
        self.norm5 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.layer2(self.transition(self.layer1(self.conv0(x))))
        x = torch.relu(self.norm5(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class UnevenPools(nn.Module):
    """A 3x3 feature map pooled to 6x6 and to 5x5 (torch's adaptive windows: floor(i*3/n) to
    ceil((i+1)*3/n)), both flattened into the classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * (36 + 25), classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        a = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 6), 1)
        b = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 5), 1)
        return self.fc(torch.cat([a, b], 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeezed):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, c, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class TinySeNet(nn.Module):
    """Conv-BN stems and blocks (folded by the exporter), a squeeze-excitation block and a
    plain biased conv without BN (SqueezeNet's kind), zero-initialised biases."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.se = SqueezeExcite(16, 8)
        self.block = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(24), nn.ReLU())
        self.plain = nn.Conv2d(24, 24, 1)
        self.fc = nn.Linear(24, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.block(self.se(self.stem(x)))
        x = torch.relu(self.plain(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PReluElu(nn.Module):
    """Activations with a trained slope or an exponential: PReLU per channel and shared (one
    value), ELU with a non-default alpha, LeakyReLU."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.PReLU(8, init=0.2)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act2 = nn.ELU(alpha=0.8)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.act3 = nn.PReLU(init=0.1)
        self.act4 = nn.LeakyReLU(0.05)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.act2(self.c2(self.act1(self.bn1(self.c1(x)))))
        x = self.act4(self.act3(self.c3(x)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class GroupInstance(nn.Module):
    """GroupNorm (two of 4 groups: the exporter shares their constant ones and zeros) and an
    affine InstanceNorm2d, their weights and biases drawn away from ones and zeros so that the
    affine is visible in the outputs."""

    def __init__(self, classes=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.gn2 = nn.GroupNorm(4, 16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.fc = nn.Linear(16, classes)
        for m in (self.gn1, self.gn2, self.inorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.gn1(self.c1(x)))
        x = nn.functional.silu(self.gn2(self.c2(x)))
        x = torch.relu(self.inorm(self.c3(x)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def export(model_class, seed, size, root, name, opset=None):
    """What a user types: the default exporter at batch 1, nothing else (external data is forced
    so that the fixture has the .onnx.data file that large models get; `opset` where a user asks
    for one). Returns the graph."""
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    path = os.path.join(out, "model.onnx")
    torch.onnx.export(model_class().eval(), (torch.randn(1, 3, size, size),), path, dynamo=True,
                      external_data=True, opset_version=opset)
    return path, onnx.load(path, load_external_data=False).graph


def export_adaptive_pool(root):
    path, graph = export(UnevenPools, 1, 12, root, "dynamo_adaptive_pool")
    ops = sorted({n.op_type for n in graph.node})
    print(f"wrote {path}; ops: {ops}")
    if "GatherND" not in ops or "Where" not in ops:
        sys.exit("the exporter wrote no GatherND or Where: the fixture would test nothing")


def export_folded_bn(root):
    path, graph = export(TinySeNet, 2, 16, root, "dynamo_folded_bn")
    torch.manual_seed(2)
    model = TinySeNet()
    params = [[n, p.numel()] for n, p in model.named_parameters()]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with open(os.path.join(os.path.dirname(path), "params.json"), "w") as f:
        json.dump({"params": params, "batchnorms": bns}, f)
        f.write("\n")
    biased = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    convs = sum(n.op_type == "Conv" for n in graph.node)
    print(f"wrote {path}; {convs} convs, nodes with a bias operand: {biased}")
    if biased or any(n.op_type == "BatchNormalization" for n in graph.node):
        sys.exit("the exporter kept a bias or a BN: the fixture would test nothing")


def export_prelu_elu(root):
    path, graph = export(PReluElu, 3, 12, root, "dynamo_prelu_elu")
    ops = sorted({n.op_type for n in graph.node})
    print(f"wrote {path}; ops: {ops}")
    if "PRelu" not in ops or "Elu" not in ops:
        sys.exit("the exporter wrote no PRelu or Elu: the fixture would test nothing")


def export_group_norm(root, name, opset, want):
    """`want`: (op type, count) the file must hold, or the fixture would test nothing."""
    path, graph = export(GroupInstance, 5, 12, root, name, opset)
    torch.manual_seed(5)
    model = GroupInstance()
    params = [[n, p.numel()] for n, p in model.named_parameters()]
    with open(os.path.join(os.path.dirname(path), "params.json"), "w") as f:
        json.dump({"params": params}, f)
        f.write("\n")
    ops = collections.Counter(n.op_type for n in graph.node)
    print(f"wrote {path}; ops: {dict(ops)}")
    if ops[want[0]] != want[1]:
        sys.exit(f"the exporter did not write {want[1]} {want[0]}: the fixture would test nothing")


def main():
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = args[i + 1]
        del args[i:i + 2]
    root = args[0] if args else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
    if only in (None, "dynamo_folded_bn"):
        export_folded_bn(root)
    if only in (None, "dynamo_adaptive_pool"):
        export_adaptive_pool(root)
    if only in (None, "dynamo_prelu_elu"):
        export_prelu_elu(root)
    if only in (None, "dynamo_group_norm"):
        export_group_norm(root, "dynamo_group_norm", None, ("InstanceNormalization", 3))
    if only in (None, "dynamo_group_norm_opset21"):
        export_group_norm(root, "dynamo_group_norm_opset21", 21, ("GroupNormalization", 2))
    if only not in (None, "dynamo_shared_bn"):
        return
    path, graph = export(TinyDenseNet, 0, 16, root, "dynamo_shared_bn")
    inits = {t.name for t in graph.initializer}
    uses = collections.Counter(i for n in graph.node for i in n.input if i in inits)
    shared = sorted(k for k, c in uses.items() if c > 1)
    print(f"wrote {path}; initializers read more than once: {shared}")
    if not shared:
        sys.exit("the exporter shared no initializer: the fixture would test nothing")


if __name__ == "__main__":
    main()
