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
