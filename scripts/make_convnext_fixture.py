#!/usr/bin/env python3
"""Writes tests/fixtures/convnext_parity/: a small torchvision ConvNeXt as PyTorch's exporters
write it, and PyTorch's numbers for one training step on it.

    python3 scripts/make_convnext_fixture.py [OUT_DIR]

The network is torchvision.models.ConvNeXt itself (its CNBlock and LayerNorm2d), small: stages
of 16 and 32 channels, one block each, 5 classes, input [4, 3, 32, 32]. What it exercises is what
a ConvNeXt export holds and ResNets do not: LayerNormalization over the channels of a
channels-last activation (and over a [N, C, 1, 1] one in the head), Linear layers on every pixel
(MatMul of a rank-4 activation, then Add of the bias), exact GELU, the layer scale (a Mul by a
[C, 1, 1] parameter), and the dynamo exporter's `as_strided` read of the pooled features.

Files:
  model.onnx (+ model.onnx.data)  dynamo export (opset 20, Gelu), weights random (seeded) so that
                 no two parameters are equal; Linear weights on pixels stored transposed as
                 MatMul reads them, under generated names (`val_4`).
  model_ts.onnx  the same weights, TorchScript exporter, opset 17: GELU spelled Div, Erf, Add,
                 Mul, Mul.
  untrained.onnx (+ .data)  torchvision's own initialisation (layer scale 1e-6, LayerNorm ones
                 and zeros, zero biases), dynamo export: the exporter stores equal tensors once,
                 so LayerNorm scales, shifts and Linear biases share initializers.
  tensors.bin, index.json  as tests/fixtures/resnet20_parity: input, labels, logits, loss, and
                 grad/<name> for every parameter, keyed by PyTorch's state_dict name; the
                 weights of the per-pixel Linear layers (block.3, block.5) transposed, [in, out],
                 as the MatMul reads them. index.json also lists state_dict names and sizes of
                 the untrained model's parameters.

Needs torch, torchvision, onnx, onnxscript (scripts/requirements-dev.txt). Seeded.
"""

import json
import os
import sys

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt


def tiny(layer_scale):
    return ConvNeXt(
        [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
        stochastic_depth_prob=0.0,
        layer_scale=layer_scale,
        num_classes=5,
    ).eval()


def per_pixel_linear(name):
    return ".block.3.weight" in name or ".block.5.weight" in name


def export(model, x, path, dynamo):
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, external_data=True,
                          input_names=["input"], output_names=["logits"])
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])


class Blob:
    def __init__(self):
        self.data = bytearray()
        self.index = {}

    def add(self, key, arr):
        a = np.ascontiguousarray(arr, dtype=np.float32)
        self.data += b"\0" * ((-len(self.data)) % 8)
        self.index[key] = {"shape": list(a.shape), "offset": len(self.data), "dtype": "f32",
                           "numel": int(a.size)}
        self.data += a.tobytes()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "fixtures", "convnext_parity")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 3, 1, 4])

    model = tiny(0.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale") or "norm" in name or ".block.2." in name \
                    or name.endswith("features.0.1.weight") or name.endswith("bias"):
                base = 1.0 if (name.endswith("weight") or name.endswith("layer_scale")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    export(model, torch.zeros(1, 3, 32, 32), os.path.join(out, "model.onnx"), True)
    export(model, torch.zeros(1, 3, 32, 32), os.path.join(out, "model_ts.onnx"), False)
    torch.manual_seed(2)
    export(tiny(1e-6), torch.zeros(1, 3, 32, 32), os.path.join(out, "untrained.onnx"), True)

    model.train()
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    blob = Blob()
    blob.add("input", x.numpy())
    blob.add("logits", logits.detach().numpy())
    blob.add("loss", loss.detach().numpy())
    params = []
    for name, p in model.named_parameters():
        gr = p.grad.numpy()
        if per_pixel_linear(name):
            gr = gr.T
        blob.add(f"grad/{name}", gr)
        params.append(name)
    untrained = [[n, int(p.numel())] for n, p in tiny(1e-6).named_parameters()]
    index = {"tensors": blob.index, "labels": labels.tolist(), "params": params,
             "untrained_params": untrained,
             "meta": {"torch": torch.__version__, "onnx": onnx.__version__}}
    with open(os.path.join(out, "tensors.bin"), "wb") as f:
        f.write(bytes(blob.data))
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    for fname in ["model.onnx", "model_ts.onnx", "untrained.onnx"]:
        m = onnx.load(os.path.join(out, fname))
        ops = sorted({n.op_type for n in m.graph.node})
        print(fname, "opset", m.opset_import[0].version, "ops", ops,
              "initializers", len(m.graph.initializer))
    print("loss", float(loss))


if __name__ == "__main__":
    main()
