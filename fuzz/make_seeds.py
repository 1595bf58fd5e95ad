#!/usr/bin/env python3
"""Writes the small seed models of the ONNX reader fuzz target (fuzz/seeds/onnx_read/).

Each is a few hundred bytes to a few KB, so that libFuzzer mutates and runs them fast, and
together they reach every op elrt reads, in the opset-11+ (operands as inputs) and the old
(operands as attributes) forms, plus a model whose weights are external data (ext.bin, which
the fuzz target writes beside every input). Needs the onnx Python package.

    python3 fuzz/make_seeds.py
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds", "onnx_read")
rng = np.random.default_rng(0)


def w(name, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def f32(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.float32), name)


def model(name, nodes, inits, x_shape, y_shape, opset=13, x="x", y="y"):
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def bn(prefix, c, x, y):
    inits = [
        f32(prefix + ".s", rng.uniform(0.5, 1.5, c)),
        f32(prefix + ".b", rng.standard_normal(c)),
        f32(prefix + ".m", rng.standard_normal(c)),
        f32(prefix + ".v", rng.uniform(0.5, 1.5, c)),
    ]
    node = helper.make_node(
        "BatchNormalization",
        [x, prefix + ".s", prefix + ".b", prefix + ".m", prefix + ".v"],
        [y],
        epsilon=1e-5,
    )
    return node, inits


def tiny_resnet(opset=13):
    n, inits = [], [w("c1.w", 4, 3, 3, 3), w("c2.w", 4, 4, 3, 3), w("fc.w", 3, 4), f32("fc.b", [0.1, 0.2, 0.3])]
    n.append(helper.make_node("Conv", ["x", "c1.w"], ["a"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
    b, i = bn("bn1", 4, "a", "b")
    n.append(b)
    inits += i
    n.append(helper.make_node("Relu", ["b"], ["c"]))
    n.append(helper.make_node("Conv", ["c", "c2.w"], ["d"], pads=[1, 1, 1, 1], strides=[1, 1]))
    b, i = bn("bn2", 4, "d", "e")
    n.append(b)
    inits += i
    n.append(helper.make_node("Add", ["e", "c"], ["f"]))
    n.append(helper.make_node("Relu", ["f"], ["g"]))
    n.append(helper.make_node("MaxPool", ["g"], ["h"], kernel_shape=[2, 2], strides=[2, 2]))
    n.append(helper.make_node("GlobalAveragePool", ["h"], ["i"]))
    n.append(helper.make_node("Flatten", ["i"], ["j"], axis=1))
    n.append(helper.make_node("Gemm", ["j", "fc.w", "fc.b"], ["k"], transB=1))
    n.append(helper.make_node("Softmax", ["k"], ["y"], axis=1))
    return model("tiny_resnet", n, inits, ["N", 3, 8, 8], ["N", 3], opset)


def dynamic_flatten():
    """PyTorch's flatten export: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    n = [
        helper.make_node("Conv", ["x", "c.w"], ["a"], kernel_shape=[1, 1]),
        helper.make_node("HardSwish", ["a"], ["a2"]),
        helper.make_node("AveragePool", ["a2"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc.b"], ["y"]),
    ]
    inits = [w("c.w", 2, 3, 1, 1), i64("ax0", [0]), i64("minus1", [-1]), w("fc.w", 8, 5), f32("fc.b", [0] * 5)]
    return model("dynamic_flatten", n, inits, [1, 3, 8, 8], [1, 5])


def op_zoo():
    """Many of the other ops elrt reads, in their opset-13 forms."""
    n = [
        helper.make_node("Conv", ["x", "dw.w", "dw.b"], ["a"], group=4, kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["b"]),
        helper.make_node("Pad", ["b", "pads", "pv"], ["c"], mode="constant"),
        helper.make_node("Slice", ["c", "st", "en", "axs", "stp"], ["d"]),
        helper.make_node("Split", ["d", "sp"], ["e1", "e2"], axis=1),
        helper.make_node("Sigmoid", ["e1"], ["f1"]),
        helper.make_node("LeakyRelu", ["e2"], ["f2"], alpha=0.1),
        helper.make_node("Mul", ["f1", "f2"], ["g1"]),
        helper.make_node("HardSigmoid", ["f2"], ["g2"]),
        helper.make_node("Sub", ["g1", "g2"], ["g3"]),
        helper.make_node("Div", ["g3", "two"], ["g4"]),
        helper.make_node("Concat", ["g4", "g1"], ["h"], axis=1),
        helper.make_node("Dropout", ["h"], ["h2"]),
        helper.make_node("Identity", ["h2"], ["h3"]),
        helper.make_node("Transpose", ["h3"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("ReduceMean", ["t"], ["r"], axes=[2, 3], keepdims=1),
        helper.make_node("Squeeze", ["r", "sq"], ["s"]),
        helper.make_node("Gemm", ["s", "fc.w"], ["l"], alpha=1.0, beta=1.0),
        helper.make_node("LogSoftmax", ["l"], ["y"], axis=-1),
    ]
    inits = [
        w("dw.w", 4, 1, 3, 3), f32("dw.b", [0, 0, 0, 0]), f32("lo", 0.0), f32("hi", 6.0),
        i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]), f32("pv", 0.0),
        i64("st", [0, 1]), i64("en", [4, 9]), i64("axs", [1, 2]), i64("stp", [1, 1]),
        i64("sp", [2, 2]), f32("two", 2.0), i64("sq", [2, 3]), w("fc.w", 4, 3),
    ]
    return model("op_zoo", n, inits, [1, 4, 8, 8], [1, 3])


def const_ops():
    """ConstantOfShape, Range, Expand, Where, Equal, Cast, Sum: the constant-folding side."""
    n = [
        helper.make_node("ConstantOfShape", ["shp"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Range", ["r0", "r1", "r2"], ["rg"]),
        helper.make_node("Cast", ["rg"], ["rgf"], to=TensorProto.FLOAT),
        helper.make_node("Equal", ["rg", "r0"], ["eq"]),
        helper.make_node("Where", ["eq", "ones", "rgf"], ["wh"]),
        helper.make_node("Expand", ["wh", "eshape"], ["ex"]),
        helper.make_node("Conv", ["x", "c.w"], ["a"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("GlobalAveragePool", ["b"], ["c"]),
        helper.make_node("Flatten", ["c"], ["d"]),
        helper.make_node("Sum", ["d", "ex"], ["y"]),
    ]
    inits = [
        i64("shp", [4]), i64("r0", 0), i64("r1", 4), i64("r2", 1),
        i64("eshape", [1, 4]), w("c.w", 4, 2, 3, 3),
    ]
    return model("const_ops", n, inits, [1, 2, 6, 6], [1, 4])


def old_opset():
    """Opset 9: Pad, Slice, Split, Clip, Squeeze, Unsqueeze and Dropout operands as attributes."""
    n = [
        helper.make_node("Conv", ["x", "c.w"], ["a"], kernel_shape=[3, 3]),
        helper.make_node("Clip", ["a"], ["b"], min=0.0, max=6.0),
        helper.make_node("Pad", ["b"], ["c"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.5),
        helper.make_node("Slice", ["c"], ["d"], starts=[0], ends=[2], axes=[1]),
        helper.make_node("Split", ["d"], ["e1", "e2"], axis=1, split=[1, 1]),
        helper.make_node("Add", ["e1", "e2"], ["f"]),
        helper.make_node("Dropout", ["f"], ["g"], ratio=0.2),
        helper.make_node("GlobalAveragePool", ["g"], ["h"]),
        helper.make_node("Squeeze", ["h"], ["i"], axes=[2, 3]),
        helper.make_node("Unsqueeze", ["i"], ["j"], axes=[2]),
        helper.make_node("Flatten", ["j"], ["k"]),
        helper.make_node("Gemm", ["k", "fc.w"], ["y"], transB=1),
    ]
    inits = [w("c.w", 2, 1, 3, 3), w("fc.w", 3, 1)]
    return model("old_opset", n, inits, [1, 1, 6, 6], [1, 3], opset=9)


def external(m):
    """The model with every initializer of more than 4 values in ext.bin."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    blob = bytearray()
    for t in m.graph.initializer:
        if len(t.raw_data) > 16:
            data = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in [("location", "ext.bin"), ("offset", str(len(blob))), ("length", str(len(data)))]:
                e = t.external_data.add()
                e.key, e.value = k, v
            blob += data
    return m, bytes(blob)


def main():
    os.makedirs(OUT, exist_ok=True)
    models = {
        "tiny_resnet.onnx": tiny_resnet(),
        "tiny_resnet_opset18.onnx": tiny_resnet(18),
        "dynamic_flatten.onnx": dynamic_flatten(),
        "op_zoo.onnx": op_zoo(),
        "const_ops.onnx": const_ops(),
        "old_opset.onnx": old_opset(),
    }
    ext, blob = external(models["tiny_resnet.onnx"])
    models["tiny_resnet_external.onnx"] = ext
    # ext.bin is the side file the fuzz target writes beside each input (fixed content).
    with open(os.path.join(HERE, "ext.bin"), "wb") as f:
        f.write(blob)
    for name, m in models.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(m.SerializeToString())
        print(name, len(m.SerializeToString()), "bytes")


if __name__ == "__main__":
    main()
