#!/usr/bin/env python3
"""Export the CIFAR-10 architecture zoo in models/ (random, seeded weights).

    python3 scripts/export_models.py [--out models] [--bn-form training|inference]

Writes, into --out (default: models/ next to this script's parent):

  resnet20.onnx       ResNet-20 for CIFAR (He et al. 2016, sec. 4.2): 3 stages of 16/32/64
                      channels, n=3 basic blocks per stage, 1x1 conv + BN projection shortcuts
                      where the shape changes ("option B"), global average pool, Linear 64->10.
  resnet56.onnx       The same with n=9.
  vgg16_bn.onnx       VGG-16 with BatchNorm, CIFAR variant: cfg 64,64,M,128,128,M,256x3,M,
                      512x3,M,512x3,M (3x3 convs with bias, BN, ReLU; 2x2 max pools), then
                      flatten and a single Linear 512->10 (no 4096-wide classifier, no dropout).
  mobilenetv2.onnx    MobileNetV2 (width 1.0) adapted to 32x32: the first conv has stride 1 and
                      the second bottleneck stage (t=6, c=24, n=2) stride 1 instead of 2;
                      ReLU6 (exported as Clip), last 1x1 conv to 1280, global average pool,
                      Linear 1280->10 (the dropout before the classifier is left out so that the
                      training-mode graph is deterministic).
  resnet20_eval.onnx  ResNet-20 (same definition and seed as resnet20.onnx) exported in eval mode
                      with the exporter's defaults: BN folded into conv weights and biases.
  manifest.json       [{"file", "params", "macs", "input_shape"}] for every file.
  README.md           A table of the above.

Export settings: TorchScript exporter (dynamo=False), opset 13, input "input" [batch,3,32,32]
with a symbolic batch dim "batch", output "logits" [batch,10].

The first four files are exported in TRAINING mode (training=TrainingMode.TRAINING,
do_constant_folding=False) so BatchNormalization nodes stay explicit and are not folded into the
convs. At opset 13 such a BatchNormalization (ONNX BN-9 semantics) has 5 outputs (Y, running
mean, running var, saved mean, saved var); only Y is consumed, and onnxruntime normalises with
the batch statistics, as PyTorch does in train mode. The BN affine parameters and running
statistics are randomised (seeded) so that BN handling and BN folding are visible in the numbers.
With --bn-form inference they are exported in eval mode with do_constant_folding=False instead
(the exporter folds Conv -> BN only while constant folding): BN stays explicit with one output
(inference mode, running statistics).

params: PyTorch's sum(p.numel() for p in model.parameters()) of the exported model; for the
eval export, of a copy with each BN folded into its conv (torch.fx.experimental.optimization.fuse).
The script checks that it equals the element count of the ONNX file's trainable initializers
(conv/Gemm weights and biases, BN scale and bias). MACs: an independent count with forward hooks
on Conv2d and Linear at batch 1 (see zoo_common.py).

Every file is checked with onnx.checker (full_check=True) and run in onnxruntime on a random
input of batch 2. The output is deterministic: the same torch version gives the same bytes.
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
from onnx import numpy_helper
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_common import (  # noqa: E402
    SEED,
    check_and_run,
    count_macs,
    count_params,
    file_mb,
    fused_param_count,
    onnx_trainable_params,
    op_histogram,
    randomize_bn,
    seed_everything,
    seeded_input,
    write_manifest,
)

OPSET = 13
INPUT_SHAPE = [1, 3, 32, 32]
NUM_CLASSES = 10

# ---------------------------------------------------------------------------------------------
# Architectures


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus shortcut, ReLU. Projection (1x1 conv + BN) shortcut
    where stride or width changes (option B of He et al.), identity otherwise."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv3x3(16), 3 stages of n blocks (16/32/64 channels,
    stride 1/2/2), global average pool, Linear(64, classes)."""

    def __init__(self, n: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGGCifar(nn.Module):
    """VGG with BN for 32x32 inputs: after five 2x2 pools the map is 512x1x1; a single
    Linear(512, classes) classifies (the usual CIFAR variant)."""

    def __init__(self, cfg=VGG16_CFG, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, 1, 1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Biases keep PyTorch's default (uniform) init: zero biases of equal shape would
                # be merged by an eval-mode export (it deduplicates initializers by value).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand (skipped for t=1), 3x3 depthwise, 1x1 linear project;
    residual add when stride is 1 and the width is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [ConvBNReLU6(cin, hidden, 1)]
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Cifar(nn.Module):
    # (expansion t, channels c, repeats n, stride s); torchvision's table with the second
    # stage's stride 2 -> 1 (and the stem's stride 2 -> 1 below) for 32x32 inputs.
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers, c = [ConvBNReLU6(3, 32, 3, 1)], 32
        for t, cout, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(ConvBNReLU6(c, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x):
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def build(name: str) -> nn.Module:
    """A freshly initialised model; the same name always gives the same weights."""
    seed_everything(SEED)
    model = {
        "resnet20": lambda: ResNetCifar(3),
        "resnet56": lambda: ResNetCifar(9),
        "vgg16_bn": lambda: VGGCifar(),
        "mobilenetv2": lambda: MobileNetV2Cifar(),
    }[name]()
    randomize_bn(model, SEED)
    return model


# (file, builder name, description for the README, export mode); "bn" is the --bn-form mode
ZOO = [
    ("resnet20.onnx", "resnet20", "ResNet-20 (CIFAR, n=3, 1x1 projection shortcuts)", "bn"),
    ("resnet56.onnx", "resnet56", "ResNet-56 (CIFAR, n=9, 1x1 projection shortcuts)", "bn"),
    ("vgg16_bn.onnx", "vgg16_bn", "VGG-16 with BN (CIFAR, classifier Linear 512->10)", "bn"),
    ("mobilenetv2.onnx", "mobilenetv2", "MobileNetV2 x1.0 (32x32: stem and stage-2 stride 1)", "bn"),
    ("resnet20_eval.onnx", "resnet20", "ResNet-20, same weights as resnet20.onnx", "eval"),
]

EXPORT_DESC = {
    "training": "training mode, BN explicit (TrainingMode.TRAINING, do_constant_folding=False)",
    "inference": "eval mode, BN explicit (TrainingMode.EVAL, do_constant_folding=False)",
    "eval": "eval mode, exporter defaults (BN folded into conv, do_constant_folding=True)",
}

# ---------------------------------------------------------------------------------------------
# Export


def export(model: nn.Module, path: str, mode: str) -> None:
    # Export a copy: a training-mode trace runs BN in train mode, which would update the running
    # statistics of the module it runs on.
    model = copy.deepcopy(model)
    kwargs = dict(
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    if mode == "training":
        model.train()
        kwargs.update(training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    elif mode == "inference":
        # Without constant folding the exporter skips its eval peephole, which is what folds
        # Conv -> BN: BN stays a node, in inference form (one output).
        model.eval()
        kwargs.update(do_constant_folding=False)
    else:
        model.eval()  # exporter defaults: TrainingMode.EVAL, do_constant_folding=True
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dummy = torch.zeros(*INPUT_SHAPE)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; its warnings are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), path, **kwargs)
    if mode == "training":
        # The training-mode trace ran BN in train mode once, so the exported running mean/var
        # are one momentum step away from the model's. Put the model's values back, so the file
        # holds exactly the model (and its BN folds to resnet20_eval.onnx's weights).
        m = onnx.load(path)
        for t in m.graph.initializer:
            if t.name in state and t.name.endswith(("running_mean", "running_var")):
                t.CopyFrom(numpy_helper.from_array(state[t.name].numpy(), t.name))
        onnx.save(m, path)


def bn_inference_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose BatchNormalization nodes keep only output Y: ONNX BN-9's inference mode,
    which normalises with the running mean/var initializers."""
    m = copy.deepcopy(model)
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            del n.output[1:]
    return m


def torch_forward(model: nn.Module, x: np.ndarray, train: bool) -> np.ndarray:
    """PyTorch's output on x, in train mode (BN uses batch statistics) or eval mode."""
    m = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def bn_forms(model: onnx.ModelProto) -> set:
    """Distinct (number of outputs, attributes) of the BatchNormalization nodes."""
    forms = set()
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            attrs = tuple(sorted((a.name, round(onnx.helper.get_attribute_value(a), 6))
                                 for a in n.attribute))
            forms.add((len(n.output), attrs))
    return forms


BN_TRAINING_README = [
    "- Training-mode files keep every `BatchNormalization` explicit. At opset 13 each has five",
    "  outputs (`Y`, running mean, running var, saved mean, saved var; only `Y` is used) and",
    "  attributes `epsilon=1e-5`, `momentum=0.9` (ONNX momentum = 1 - PyTorch momentum). With",
    "  five outputs ONNX BN-9 is in training mode: onnxruntime normalises with the batch",
    "  statistics (as PyTorch's train mode does), not with the running mean/var initializers.",
    "  A writer must keep the five outputs: cut to `Y` alone, the node is in inference mode.",
    "- BN affine parameters and running statistics are randomised (seeded), so folding BN into",
    "  the conv (in `resnet20_eval.onnx`) changes the weights visibly. The running mean/var",
    "  initializers hold the model's values (the training-mode trace moves them one momentum",
    "  step; the script writes the model's values back). The script checks that",
    "  `resnet20.onnx` with its BN nodes cut to the single output `Y` (inference mode) gives,",
    "  in onnxruntime, the same logits as `resnet20_eval.onnx` and as PyTorch in eval mode.",
]

BN_INFERENCE_README = [
    "- The BN-explicit files are eval-mode exports without constant folding (the exporter folds",
    "  Conv -> BN only in its constant-folding pass), so every `BatchNormalization` stays a node",
    "  with one output `Y` and attributes `epsilon=1e-5`, `momentum=0.9` (ONNX momentum =",
    "  1 - PyTorch momentum): inference mode, normalising with the running mean/var.",
    "- BN affine parameters and running statistics are randomised (seeded), so folding BN into",
    "  the conv (in `resnet20_eval.onnx`) changes the weights visibly. The script checks that",
    "  `resnet20.onnx` gives, in onnxruntime, the same logits as `resnet20_eval.onnx` and as",
    "  PyTorch in eval mode.",
]


def write_readme(out_dir: str, rows: list, bn_form: str) -> None:
    lines = [
        "# models/",
        "",
        "Architecture files for elrt's tests and examples: CIFAR-10 classifiers (input",
        "`[batch,3,32,32]` named `input`, output `[batch,10]` named `logits`, ONNX opset 13) with",
        "random, seeded float32 weights. They are generated, deterministically, by",
        "",
        "    python3 scripts/export_models.py" + ("" if bn_form == "training" else " --bn-form " + bn_form),
        "",
        "(needs torch and onnx/onnxruntime: `pip install -r scripts/requirements-dev.txt`).",
        "",
        "| file | architecture | params | MACs | size | export |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['file']}` | {r['arch']} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['mb']:.1f} MB | {EXPORT_DESC[r['mode']]} |")
    lines += [
        "",
        "`manifest.json` holds the same figures for tests. **params** is PyTorch's",
        "`sum(p.numel() for p in model.parameters())` of the exported model (BatchNorm running",
        "mean/var are buffers, not parameters); for `resnet20_eval.onnx` it is counted on a copy with",
        "every BatchNorm folded into the conv before it, as the eval export does. It equals the",
        "number of elements of the file's conv/Gemm weights and biases plus BN scales and biases.",
        "**MACs** are counted independently in PyTorch with forward hooks at batch 1: a Conv2d",
        "counts `N*C_out*H_out*W_out*(C_in/groups)*kh*kw`, a Linear `N*in*out`; BatchNorm, pooling,",
        "activations and additions count 0.",
        "",
        "Export details (TorchScript exporter, `dynamo=False`):",
        "",
    ] + (BN_TRAINING_README if bn_form == "training" else BN_INFERENCE_README) + [
        "- MobileNetV2's ReLU6 is exported as `Clip` whose min (0) and max (6) inputs come from",
        "  `Constant` nodes (no constant folding); its dropout before the classifier is omitted,",
        "  as a training-mode Dropout would make the graph non-deterministic.",
        "- VGG-16 uses the common CIFAR classifier, a single `Linear(512, 10)`; its convs keep",
        "  their biases (as in torchvision's `vgg16_bn`).",
        "",
    ]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(here), "models"),
                    help="output directory (default: models/ of the repository)")
    ap.add_argument("--bn-form", choices=("training", "inference"), default="training",
                    help="how the BN-explicit files are exported: training (default; BN with 5 "
                         "outputs, batch statistics) or inference (eval mode without constant "
                         "folding; BN with 1 output, running statistics)")
    ap.add_argument("--only", default="",
                    help="comma-separated stems to (re)export, e.g. vgg16_bn; leaves the other "
                         "files, manifest.json and README.md as they are (they are committed)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    t0 = time.time()
    manifest, rows = [], []
    for fname, arch, desc, mode in ZOO:
        if only and fname.removesuffix(".onnx") not in only:
            continue
        mode = args.bn_form if mode == "bn" else mode
        model = build(arch)
        path = os.path.join(args.out, fname)
        export(model, path, mode)

        params = fused_param_count(model) if mode == "eval" else count_params(model)
        macs = count_macs(model, INPUT_SHAPE)

        m = onnx.load(path)
        onnx_params = onnx_trainable_params(m)
        if onnx_params != params:
            raise SystemExit(f"{fname}: PyTorch counts {params} params, the ONNX file's "
                             f"trainable initializers hold {onnx_params}")
        assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
        inp = m.graph.input[0]
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert inp.name == "input" and dims == ["batch", 3, 32, 32], (inp.name, dims)
        assert [o.name for o in m.graph.output] == ["logits"]
        hist = op_histogram(m)
        if mode != "eval":
            assert hist["BatchNormalization"] > 0
        else:
            assert hist["BatchNormalization"] == 0, "eval export should fold every BN"
        x = seeded_input([2] + INPUT_SHAPE[1:])
        (y,) = check_and_run(path, x)
        ref = torch_forward(model, x, train=(mode == "training"))
        err = float(np.abs(y - ref).max())
        if not np.allclose(y, ref, atol=1e-4, rtol=1e-3):
            raise SystemExit(f"{fname}: onnxruntime and PyTorch differ by {err}")
        if mode == "eval":
            # The training-mode file read with inference-mode BN is the same network as the
            # eval export: check with onnxruntime that both give PyTorch's eval output.
            twin = os.path.join(args.out, fname.replace("_eval", ""))
            inf = bn_inference_copy(onnx.load(twin)).SerializeToString()
            sess = ort.InferenceSession(inf, providers=["CPUExecutionProvider"])
            (y2,) = sess.run(None, {"input": x})
            if not (np.allclose(y2, ref, atol=1e-4, rtol=1e-3) and np.allclose(y2, y, atol=1e-4, rtol=1e-3)):
                raise SystemExit(f"{twin} with inference-mode BN does not match {fname}")

        manifest.append({"file": fname, "params": params, "macs": macs,
                         "input_shape": INPUT_SHAPE})
        rows.append({"file": fname, "arch": desc, "params": params, "macs": macs,
                     "mb": file_mb(path), "mode": mode, "hist": hist, "bn": bn_forms(m)})

    if only:
        print(f"exported {', '.join(sorted(only))} ({time.time() - t0:.1f} s)")
        return 0
    write_manifest(os.path.join(args.out, "manifest.json"), manifest)
    write_readme(args.out, rows, args.bn_form)

    print(f"{'file':<20} {'params':>12} {'MACs':>14} {'MB':>7}  nodes  BN nodes")
    for r in rows:
        print(f"{r['file']:<20} {r['params']:>12,} {r['macs']:>14,} {r['mb']:>7.2f}  "
              f"{sum(r['hist'].values()):>5}  {r['hist']['BatchNormalization']}")
    for r in rows:
        print(f"{r['file']}: ops {dict(sorted(r['hist'].items()))}")
        for outs, attrs in sorted(r["bn"]):
            print(f"    BatchNormalization: {outs} outputs, attributes {dict(attrs)}")
    print(f"all files pass onnx.checker (full_check) and match PyTorch in onnxruntime; "
          f"{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
