"""Tiny SSCD-like ONNX graphs in the two published layouts, built with ``onnx.helper`` (nothing downloaded).

Both compute the same function of an image: conv 3 -> 8 (4x4, stride 4), ReLU, global average pool, a projection
8 -> ``dims`` and L2 normalisation. ``float_nchw`` takes ImageNet-normalised (B, 3, H, W) float32 like this project's
``export_onnx``; ``uint8_nhwc`` takes RGB 0-255 (B, H, W, 3) uint8 and normalises inside the graph (Cast, Sub mean x
255, Div std x 255, Transpose), as the int8 ``sscd_disc_mixup`` export on PyPI does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infra.features import IMAGENET_MEAN, IMAGENET_STD


def weights(dims: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv_w": rng.normal(0, 0.3, (8, 3, 4, 4)).astype(np.float32),
            "conv_b": rng.normal(0, 0.1, 8).astype(np.float32),
            "proj": rng.normal(0, 1.0, (8, dims)).astype(np.float32)}  # fmt: skip


def _trunk(x: str, w: dict[str, np.ndarray]) -> tuple[list, list]:
    nodes = [
        helper.make_node("Conv", [x, "conv_w", "conv_b"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "proj"], ["z"]),
        helper.make_node("LpNormalization", ["z"], ["descriptors"], axis=1, p=2),
    ]
    return nodes, [numpy_helper.from_array(v, k) for k, v in w.items()]


def save(path: Path, layout: str, dims: int = 16, hw: tuple[int | str, int | str] = ("height", "width"),
         seed: int = 0, input_shape: list | None = None) -> Path:  # fmt: skip
    """Write a tiny model in ``layout`` (float_nchw | uint8_nhwc); ``input_shape`` overrides the declared shape."""
    w = weights(dims, seed)
    if layout == "float_nchw":
        shape = input_shape or ["batch", 3, *hw]
        inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)
        nodes, inits = _trunk("images", w)
    elif layout == "uint8_nhwc":
        shape = input_shape or ["batch", *hw, 3]
        inp = helper.make_tensor_value_info("images", TensorProto.UINT8, shape)
        mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 1, 1, 3) * 255
        std = np.array(IMAGENET_STD, np.float32).reshape(1, 1, 1, 3) * 255
        pre = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
               helper.make_node("Sub", ["x", "mean"], ["xc"]),
               helper.make_node("Div", ["xc", "std"], ["xn"]),
               helper.make_node("Transpose", ["xn"], ["nchw"], perm=[0, 3, 1, 2])]  # fmt: skip
        nodes, inits = _trunk("nchw", w)
        nodes = pre + nodes
        inits += [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std, "std")]
    else:
        raise ValueError(layout)
    out = helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["batch", dims])
    graph = helper.make_graph(nodes, "tiny_sscd", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference(x: np.ndarray, dims: int = 16, seed: int = 0) -> np.ndarray:
    """The same function in numpy on a normalised (B, 3, H, W) batch: (B, dims) L2-normalised."""
    w = weights(dims, seed)
    b, _, h, wd = x.shape
    patches = x[:, :, : h // 4 * 4, : wd // 4 * 4].reshape(b, 3, h // 4, 4, wd // 4, 4)
    conv = np.einsum("bcyixj,ocij->boyx", patches, w["conv_w"]) + w["conv_b"][None, :, None, None]
    z = np.maximum(conv, 0).mean((2, 3)) @ w["proj"]
    return z / np.linalg.norm(z, axis=1, keepdims=True)
