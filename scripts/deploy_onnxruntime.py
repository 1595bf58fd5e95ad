#!/usr/bin/env python3
"""Classify one image with an elrt compact.onnx in onnxruntime, preprocessing it as training did.

    python3 scripts/deploy_onnxruntime.py compact.onnx image.png

Prints the top-5 classes, one per line: probability (softmax of the logits), then name.
Everything the preprocessing needs is read from the file's metadata_props, so this works for
any file `elrt export` wrote. Needs onnxruntime, numpy and Pillow
(pip install -r scripts/requirements-ci.txt); the Rust twin is examples/deploy_tract.rs.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: deploy_onnxruntime.py MODEL.onnx IMAGE")
    model_path, image_path = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])

    # What the file says about its input (see the README, "Use the compact file").
    meta = session.get_modelmeta().custom_metadata_map

    def need(key: str) -> str:
        if key not in meta:
            sys.exit(f"{model_path}: no metadata {key} (not written by elrt export?)")
        return meta[key]

    # elrt.export.input_shape is "1,C,H,W" or "N,C,H,W" (elrt.input.layout: NCHW); run batch 1.
    c, h, w = (int(d) for d in need("elrt.export.input_shape").split(",")[1:])
    mean = np.array(need("elrt.normalize.mean").split(","), dtype=np.float32)
    std = np.array(need("elrt.normalize.std").split(","), dtype=np.float32)
    classes = json.loads(meta.get("elrt.classes", "[]"))  # absent: print indices
    input_name = meta.get("elrt.input.name", session.get_inputs()[0].name)

    # elrt.input.resize: decode as RGB, bilinear resize to H x W (aspect ratio not kept).
    # PIL's BILINEAR widens its filter when shrinking, as elrt's does; its rounding can differ
    # from elrt's by one pixel level, so an image already at H x W is fed exactly as trained.
    if "elrt.input.resize" in meta:
        print(f"input: {meta['elrt.input.resize']}", file=sys.stderr)
    img = Image.open(image_path).convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.uint32)  # H, W, 3
    if c == 1:  # luma of the resized RGB image (BT.601 weights, rounded, as elrt does)
        rgb = (rgb @ np.array([299, 587, 114], dtype=np.uint32) + 500) // 1000
        rgb = rgb[:, :, None]
    # NCHW, pixels x / 255 normalised per channel: (x / 255 - mean[c]) / std[c], in float32.
    x = (rgb.astype(np.float32) / np.float32(255) - mean) / std
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    out = session.run(None, {input_name: x})[0][0].reshape(-1).astype(np.float64)
    # Probabilities: the softmax of the logits. elrt.output says what the file outputs: logits,
    # or, where the source model ended in a Softmax / LogSoftmax, probabilities / log-probabilities.
    # The softmax of log-probabilities gives the probabilities back, so only the former need
    # their logarithm first.
    if meta.get("elrt.output") == "probabilities":
        with np.errstate(divide="ignore"):
            out = np.log(out)
    p = np.exp(out - out.max())
    p /= p.sum()
    # The five most likely classes.
    for k in np.argsort(-p, kind="stable")[:5]:
        name = classes[k] if k < len(classes) else f"class {k}"
        print(f"{p[k]:.6f}  {name}")


if __name__ == "__main__":
    main()
