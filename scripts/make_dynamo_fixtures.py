#!/usr/bin/env python3
"""Writes two fixtures of what PyTorch's default (dynamo) exporter makes of small untrained
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

    python3 scripts/make_dynamo_fixtures.py [OUT_ROOT]

Needs torch and onnxscript (scripts/requirements-dev.txt). Seeded; the script prints which
initializers the first file shares and which ops the second holds.
"""

import collections
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


def export(model_class, seed, size, root, name):
    """What a user types: the default exporter at batch 1, nothing else (external data is forced
    so that the fixture has the .onnx.data file that large models get). Returns the graph."""
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    path = os.path.join(out, "model.onnx")
    torch.onnx.export(model_class().eval(), (torch.randn(1, 3, size, size),), path, dynamo=True,
                      external_data=True)
    return path, onnx.load(path, load_external_data=False).graph


def export_adaptive_pool(root):
    path, graph = export(UnevenPools, 1, 12, root, "dynamo_adaptive_pool")
    ops = sorted({n.op_type for n in graph.node})
    print(f"wrote {path}; ops: {ops}")
    if "GatherND" not in ops or "Where" not in ops:
        sys.exit("the exporter wrote no GatherND or Where: the fixture would test nothing")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
    export_adaptive_pool(root)
    path, graph = export(TinyDenseNet, 0, 16, root, "dynamo_shared_bn")
    inits = {t.name for t in graph.initializer}
    uses = collections.Counter(i for n in graph.node for i in n.input if i in inits)
    shared = sorted(k for k, c in uses.items() if c > 1)
    print(f"wrote {path}; initializers read more than once: {shared}")
    if not shared:
        sys.exit("the exporter shared no initializer: the fixture would test nothing")


if __name__ == "__main__":
    main()
