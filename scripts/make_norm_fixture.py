#!/usr/bin/env python3
"""A pretrained-style CIFAR-size classifier that expects ImageNet normalisation, its images in
an image-folder layout, and onnxruntime's results on them (the fixture of tests/normalize.rs).

    python3 scripts/make_norm_fixture.py OUTDIR

Needs numpy, onnx and onnxruntime only (no PyTorch), so it runs wherever the interop tests do.
Writes into OUTDIR (created if missing):

  images/train/c0..c9/NNNNN.png, images/test/c0..c9/NNNNN.png
      32x32 RGB PNGs (lossless, so what elrt decodes is exactly the array below; already the
      model's input size, so the folder loader resizes nothing). Ten classes told apart by
      colour and a faint stripe pattern; classes lie close together in colour, so a model fitted
      to one normalisation misreads images normalised another way. 3 training images per class
      (the folder loader wants both splits; eval reads only test) and 30 test images per class.
  model.onnx
      Conv 3x3 (3->16) -> Relu -> Conv 3x3 stride 2 (16->32) -> Relu -> GlobalAveragePool ->
      Flatten -> Gemm (32->10), opset 13, input "input" [N,3,32,32], output "logits"; no BN, so
      nothing re-centres the inputs and the logits depend on the normalisation directly. The
      convs are random (fixed seed); the Gemm is fitted by ridge regression to 2,000 further
      images (not written) normalised with the ImageNet mean/std: random features + a fitted
      head, i.e. a trained model whose expected preprocessing is ImageNet's.
  expected.json
      onnxruntime on the test images, in the folder loader's order (classes, then file names,
      sorted), with x / 255 and the ImageNet mean/std: "labels", "pred" (top-1 class per
      image), "top1", "top5", "loss" (mean cross-entropy), "images"; and the same with the CIFAR
      mean/std (elrt's default) as "cifar_pred", "cifar_top1", "cifar_loss", to show that the
      normalisation changes the answer.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))
CIFAR = (np.array([0.4914, 0.4822, 0.4465], np.float32), np.array([0.2470, 0.2435, 0.2616], np.float32))
CLASSES, SIZE = 10, 32
TRAIN_PER_CLASS, TEST_PER_CLASS, FIT_IMAGES = 3, 30, 2000


def write_png(path: str, img: np.ndarray) -> None:
    """img: HxWx3 uint8. A plain 8-bit RGB PNG, no filtering."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def make_images(rng: np.random.Generator, labels: np.ndarray, colours: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """N x 3 x 32 x 32 uint8: the class colour, a faint stripe pattern of the class's frequency,
    per-image brightness jitter and pixel noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i, k in enumerate(labels):
        stripes = 0.04 * np.sin(2 * np.pi * freqs[k] * (xx + yy) / SIZE + rng.uniform(0, 2 * np.pi))
        base = colours[k] + rng.normal(0, 0.03, 3)
        out[i] = base[:, None, None] + stripes[None] + rng.normal(0, 0.05, (3, SIZE, SIZE))
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def normalise(x: np.ndarray, ms) -> np.ndarray:
    m, s = ms
    return ((x.astype(np.float32) / np.float32(255) - m[None, :, None, None]) / s[None, :, None, None]).astype(np.float32)


def build(w1, b1, w2, b2, wf=None, bf=None) -> onnx.ModelProto:
    """The network; without the Gemm weights it ends at the pooled features."""
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "conv1.weight"), (b1, "conv1.bias"), (w2, "conv2.weight"), (b2, "conv2.bias")]]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="pool"),
        helper.make_node("Flatten", ["gap"], ["feat"], name="flatten", axis=1),
    ]
    out_name, out_dim = "feat", w2.shape[0]
    if wf is not None:
        inits += [numpy_helper.from_array(wf, "fc.weight"), numpy_helper.from_array(bf, "fc.bias")]
        nodes.append(helper.make_node("Gemm", ["feat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
        out_name, out_dim = "logits", wf.shape[0]
    graph = helper.make_graph(
        nodes,
        "norm_fixture",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="make_norm_fixture.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def scores(logits: np.ndarray, labels: np.ndarray) -> dict:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pred = logits.argmax(axis=1)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    return {
        "pred": pred.tolist(),
        "top1": float((pred == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(axis=1).mean()),
        "loss": float(-logp[np.arange(len(labels)), labels].mean()),
    }


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    out = sys.argv[1]
    rng = np.random.default_rng(20261214)
    # Class colours close together around mid-grey, so that a shift of the normalisation
    # moves images across class boundaries.
    colours = 0.5 + rng.uniform(-0.12, 0.12, (CLASSES, 3))
    freqs = rng.integers(1, 5, CLASSES)
    w1 = (rng.normal(0, 1, (16, 3, 3, 3)) * np.sqrt(2 / 27)).astype(np.float32)
    b1 = rng.normal(0, 0.3, 16).astype(np.float32)
    w2 = (rng.normal(0, 1, (32, 16, 3, 3)) * np.sqrt(2 / 144)).astype(np.float32)
    b2 = rng.normal(0, 0.3, 32).astype(np.float32)

    # Fit the head on ImageNet-normalised features of images not written anywhere.
    fit_labels = np.arange(FIT_IMAGES) % CLASSES
    fit_x = normalise(make_images(rng, fit_labels, colours, freqs), IMAGENET)
    feats = run(build(w1, b1, w2, b2), fit_x).astype(np.float64)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    f = np.hstack([(feats - mu) / sd, np.ones((FIT_IMAGES, 1))])
    y = np.eye(CLASSES)[fit_labels] * 2 - 1
    coef = np.linalg.solve(f.T @ f + 1e-2 * np.eye(f.shape[1]), f.T @ y)
    # Fold the feature standardisation into the Gemm, and sharpen the logits.
    scale = 8.0
    wf = (scale * (coef[:-1] / sd[:, None]).T).astype(np.float32)
    bf = (scale * (coef[-1] - (mu / sd) @ coef[:-1])).astype(np.float32)
    model = build(w1, b1, w2, b2, wf, bf)

    os.makedirs(out, exist_ok=True)
    onnx.save(model, os.path.join(out, "model.onnx"))
    names = [f"c{k}" for k in range(CLASSES)]
    test_images, test_labels = [], []
    for split, per in [("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)]:
        for k, name in enumerate(names):
            d = os.path.join(out, "images", split, name)
            os.makedirs(d, exist_ok=True)
            imgs = make_images(rng, np.full(per, k), colours, freqs)
            for i, img in enumerate(imgs):
                write_png(os.path.join(d, f"{i:05d}.png"), img.transpose(1, 2, 0))
                if split == "test":
                    test_images.append(img)
                    test_labels.append(k)
    # Folder-loader order: sorted class names (c0 < c1 < ... < c9), sorted file names.
    x = np.stack(test_images)
    labels = np.array(test_labels)
    ref = scores(run(model, normalise(x, IMAGENET)), labels)
    cif = scores(run(model, normalise(x, CIFAR)), labels)
    expected = {"images": len(labels), "labels": labels.tolist(), **ref}
    expected.update({"cifar_pred": cif["pred"], "cifar_top1": cif["top1"], "cifar_loss": cif["loss"]})
    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump(expected, fh)
    changed = sum(a != b for a, b in zip(ref["pred"], cif["pred"]))
    print(
        f"{out}: {len(labels)} test images; onnxruntime top-1 {100 * ref['top1']:.2f}% (ImageNet mean/std), "
        f"{100 * cif['top1']:.2f}% (CIFAR mean/std); {changed} predictions change"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
