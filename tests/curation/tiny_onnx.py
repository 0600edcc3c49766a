"""A hand-written ONNX protobuf encoder for tiny test models (the `onnx` package is not a dependency)."""

from __future__ import annotations

import numpy as np


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    tensor_type = _int(1, 1) + _bytes(2, shape)  # elem_type FLOAT
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _tensor(name: str, arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, np.float32)
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, 1) + _bytes(8, name) + _bytes(9, arr.tobytes())


def mean_pool_linear(weight: np.ndarray, size: int) -> bytes:
    """x (N, 3, size, size) -> emb (N, D) = mean over pixels per channel @ weight (3, D)."""
    reduce = (_bytes(1, "x") + _bytes(2, "pooled") + _bytes(3, "pool") + _bytes(4, "ReduceMean")
              + _bytes(5, _bytes(1, "axes") + _int(8, 2) + _int(8, 3) + _int(20, 7))
              + _bytes(5, _bytes(1, "keepdims") + _int(3, 0) + _int(20, 2)))  # fmt: skip
    matmul = _bytes(1, "pooled") + _bytes(1, "w") + _bytes(2, "emb") + _bytes(3, "proj") + _bytes(4, "MatMul")
    graph = (_bytes(1, reduce) + _bytes(1, matmul) + _bytes(2, "tiny") + _bytes(5, _tensor("w", weight))
             + _bytes(11, _value_info("x", ["n", 3, size, size])) + _bytes(12, _value_info("emb", ["n", weight.shape[1]])))  # fmt: skip
    opset = _bytes(1, "") + _int(2, 13)
    return _int(1, 8) + _bytes(8, opset) + _bytes(7, graph)


def _tensor_of(name: str, arr: np.ndarray) -> bytes:
    """A float32 or int64 initializer (TensorProto data_type 1 or 7)."""
    arr = np.ascontiguousarray(arr)
    dtype = {np.dtype(np.float32): 1, np.dtype(np.int64): 7}[arr.dtype]
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, dtype) + _bytes(8, name) + _bytes(9, arr.tobytes())


def _ints_attr(name: str, values: list[int]) -> bytes:
    return _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7)  # AttributeProto INTS


def _node(op: str, inputs: list[str], output: str, *attrs: bytes) -> bytes:
    body = b"".join(_bytes(1, i) for i in inputs) + _bytes(2, output) + _bytes(3, output) + _bytes(4, op)
    return _bytes(1, body + b"".join(_bytes(5, a) for a in attrs))


YUNET_STRIDES = (8, 16, 32)


def tiny_yunet() -> bytes:
    """A stand-in for OpenCV's YuNet with the outputs ``cv2.FaceDetectorYN`` reads, and a rule it can be checked by.

    Input (1, 3, H, W) BGR 0-255 (H, W padded to multiples of 32 by OpenCV). For every stride s the outputs are
    ``cls_s``, ``obj_s`` (1, H*W/s^2, 1), ``bbox_s`` (1, H*W/s^2, 4) and ``kps_s`` (1, H*W/s^2, 10), cells in
    row-major order, as in the 2023mar model. Strides 8 and 16 never fire (scores 0). At stride 32, a cell's class
    and objectness scores are both its mean brightness / 255, so OpenCV's score sqrt(cls * obj) is that mean, and
    its box offsets are (0.5, 0.5, log 1, log 1): the box is the 32x32 cell itself. A white 32-aligned square on
    black is detected exactly as its own box; a cell less than ``score_threshold`` bright is not.
    """
    keepdims = _bytes(1, "keepdims") + _int(3, 1) + _int(20, 2)  # AttributeProto INT
    nodes = [
        _node("ReduceMean", ["input"], "grey", _ints_attr("axes", [1]), keepdims),  # 1, 1, H, W
        _node("Mul", ["grey", "inv255"], "bright"),  # in [0, 1]
    ]
    outputs = []
    for s in YUNET_STRIDES:
        pool = (_ints_attr("kernel_shape", [s, s]), _ints_attr("strides", [s, s]))
        nodes.append(_node("AveragePool", ["bright"], f"pool_{s}", *pool))  # 1, 1, H/s, W/s
        nodes.append(_node("Mul", [f"pool_{s}", "one" if s == 32 else "zero"], f"score_{s}"))
        nodes.append(_node("Reshape", [f"score_{s}", "cells"], f"cls_{s}"))  # 1, N, 1
        nodes.append(_node("Identity", [f"cls_{s}"], f"obj_{s}"))
        nodes.append(_node("Mul", [f"cls_{s}", "zero"], f"flat_{s}"))
        nodes.append(_node("Add", [f"flat_{s}", "box_offsets"], f"bbox_{s}"))  # 1, N, 4 (broadcast)
        nodes.append(_node("Add", [f"flat_{s}", "landmarks"], f"kps_{s}"))  # 1, N, 10
        outputs += [(f"{k}_{s}", f"n{s}", d) for k, d in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10))]
    inits = {
        "inv255": np.array(1 / 255, np.float32), "one": np.array(1.0, np.float32), "zero": np.array(0.0, np.float32),
        "cells": np.array([1, -1, 1], np.int64), "box_offsets": np.array([0.5, 0.5, 0.0, 0.0], np.float32),
        "landmarks": np.zeros(10, np.float32),
    }  # fmt: skip
    graph = (b"".join(nodes) + _bytes(2, "tiny_yunet")
             + b"".join(_bytes(5, _tensor_of(k, v)) for k, v in inits.items())
             + _bytes(11, _value_info("input", [1, 3, "h", "w"]))
             + b"".join(_bytes(12, _value_info(name, [1, n, d])) for name, n, d in outputs))  # fmt: skip
    opset = _bytes(1, "") + _int(2, 13)
    return _int(1, 8) + _bytes(8, opset) + _bytes(7, graph)
