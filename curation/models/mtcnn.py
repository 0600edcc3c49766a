"""MTCNN (Zhang et al. 2016) with facenet-pytorch's P/R/O-Net weights, its detection algorithm, and less overhead.

facenet-pytorch's ``detect_face`` spends most of its time on small tensors: about six pyramid levels of a 128 px image
each pay torch's per-op cost for a resample, three tiny convolutions and the box decoding (10-13 CPU ms per image,
of which under a third is arithmetic). :class:`Mtcnn` runs the same algorithm with the same numbers:

- the three networks are ONNX graphs built here from the wheel's state dicts (:func:`pnet_onnx` ...; the same
  layers, so the same function up to float32 rounding) and run by onnxruntime on one thread;
- every resample (the pyramid levels, the 24 and 48 px crops for R- and O-Net) is torch's ``interpolate(mode=
  "area")``, computed from one integral image per image (:func:`area_resize`): the same windows, the same float32
  sum and the same two divisions, so the values are bit-identical to torch's (checked in the tests);
- box decoding, ``rerec``, ``pad`` and ``bbreg`` are facenet-pytorch's float32 expressions in numpy, in the same
  order; the non-maximum suppressions are the same calls (torchvision's ``nms``; facenet-pytorch's ``nms_numpy``
  for the last, "Min" one), on one image, where ``batched_nms``' offsets are zero.

The boxes equal facenet-pytorch's MTCNN (``keep_all=True``) to float32 rounding of the networks' outputs
(tests/curation/test_faces_default.py). One difference: a candidate whose crop lies wholly outside the image is
dropped here, where ``detect_face`` skips its crop but not its box and then fails on the length mismatch.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

FACTOR = 0.709  # facenet-pytorch's pyramid step
STRIDE, CELL = 2, 12  # P-Net's output stride and window


def _conv(nodes: list, inits: list, x: str, name: str, sd: dict) -> str:
    inits += [numpy_helper.from_array(sd[f"{name}.weight"].numpy(), f"{name}.w"),
              numpy_helper.from_array(sd[f"{name}.bias"].numpy(), f"{name}.b")]  # fmt: skip
    nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name]))
    return name


def _prelu(nodes: list, inits: list, x: str, name: str, sd: dict, spatial: bool = True) -> str:
    """PReLU as relu(x) + a * min(x, 0): the same values (one term is always an exact zero), and onnxruntime runs
    these four elementwise ops on P-Net's maps in 0.54 ms per 128 px image's pyramid against 0.85 for its PRelu."""
    w = sd[f"{name}.weight"].numpy()
    inits += [numpy_helper.from_array(w.reshape(-1, 1, 1) if spatial else w, f"{name}.w"),  # C,1,1: per channel
              numpy_helper.from_array(np.zeros((), np.float32), f"{name}.zero")]  # fmt: skip
    nodes += [helper.make_node("Relu", [x], [f"{name}.pos"]), helper.make_node("Min", [x, f"{name}.zero"], [f"{name}.neg"]),
              helper.make_node("Mul", [f"{name}.neg", f"{name}.w"], [f"{name}.negw"]),
              helper.make_node("Add", [f"{name}.pos", f"{name}.negw"], [name])]  # fmt: skip
    return name


def _pool(nodes: list, x: str, name: str, k: int) -> str:
    nodes.append(helper.make_node("MaxPool", [x], [name], kernel_shape=[k, k], strides=[2, 2], ceil_mode=1))
    return name


def _dense(nodes: list, inits: list, x: str, name: str, sd: dict) -> str:
    inits += [numpy_helper.from_array(sd[f"{name}.weight"].numpy(), f"{name}.w"),
              numpy_helper.from_array(sd[f"{name}.bias"].numpy(), f"{name}.b")]  # fmt: skip
    nodes.append(helper.make_node("Gemm", [x, f"{name}.w", f"{name}.b"], [name], transB=1))  # x @ W.T + b
    return name


def _softmax(nodes: list, x: str, name: str) -> str:
    nodes.append(helper.make_node("Softmax", [x], [name], axis=1))
    return name


def _flatten_whc(nodes: list, inits: list, x: str) -> str:
    """facenet-pytorch's ``x.permute(0, 3, 2, 1).contiguous().view(N, -1)`` before the dense layers."""
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat.shape"))
    nodes += [helper.make_node("Transpose", [x], ["whc"], perm=[0, 3, 2, 1]),
              helper.make_node("Reshape", ["whc", "flat.shape"], ["flat"])]  # fmt: skip
    return "flat"


def _model(nodes: list, inits: list, side: int | None, outputs: list[tuple[str, list]]) -> bytes:
    shape = ["n", 3, "h", "w"] if side is None else ["n", 3, side, side]
    graph = helper.make_graph(nodes, "mtcnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def pnet_onnx(sd: dict) -> bytes:
    """facenet-pytorch's ``PNet`` (any input size): outputs ``reg`` N,4,H',W' and ``prob`` N,2,H',W'."""
    n: list = []
    i: list = []
    x = _pool(n, _prelu(n, i, _conv(n, i, "x", "conv1", sd), "prelu1", sd), "pool1", 2)
    x = _prelu(n, i, _conv(n, i, x, "conv2", sd), "prelu2", sd)
    x = _prelu(n, i, _conv(n, i, x, "conv3", sd), "prelu3", sd)
    _softmax(n, _conv(n, i, x, "conv4_1", sd), "prob")
    n.append(helper.make_node("Identity", [_conv(n, i, x, "conv4_2", sd)], ["reg"]))
    return _model(n, i, None, [("reg", ["n", 4, "a", "b"]), ("prob", ["n", 2, "a", "b"])])


def _dense_heads(n: list, i: list, x: str, k: int, sd: dict, side: int) -> bytes:
    """The tail R-Net and O-Net share, after their last convolution ``x``: flattened as facenet-pytorch does,
    ``dense{k}`` + ``prelu{k}``, then the heads ``dense{k+1}_1`` (softmax: ``prob`` N,2) and ``dense{k+1}_2``
    (``reg`` N,4); the model for ``side`` x ``side`` inputs."""
    x = _prelu(n, i, _dense(n, i, _flatten_whc(n, i, x), f"dense{k}", sd), f"prelu{k}", sd, spatial=False)
    _softmax(n, _dense(n, i, x, f"dense{k + 1}_1", sd), "prob")
    n.append(helper.make_node("Identity", [_dense(n, i, x, f"dense{k + 1}_2", sd)], ["reg"]))
    return _model(n, i, side, [("reg", ["n", 4]), ("prob", ["n", 2])])


def rnet_onnx(sd: dict) -> bytes:
    """facenet-pytorch's ``RNet`` (N,3,24,24): outputs ``reg`` N,4 and ``prob`` N,2."""
    n: list = []
    i: list = []
    x = _pool(n, _prelu(n, i, _conv(n, i, "x", "conv1", sd), "prelu1", sd), "pool1", 3)
    x = _pool(n, _prelu(n, i, _conv(n, i, x, "conv2", sd), "prelu2", sd), "pool2", 3)
    return _dense_heads(n, i, _prelu(n, i, _conv(n, i, x, "conv3", sd), "prelu3", sd), 4, sd, 24)


def onet_onnx(sd: dict) -> bytes:
    """facenet-pytorch's ``ONet`` (N,3,48,48): outputs ``reg`` N,4 and ``prob`` N,2 (landmarks left out)."""
    n: list = []
    i: list = []
    x = _pool(n, _prelu(n, i, _conv(n, i, "x", "conv1", sd), "prelu1", sd), "pool1", 3)
    x = _pool(n, _prelu(n, i, _conv(n, i, x, "conv2", sd), "prelu2", sd), "pool2", 3)
    x = _pool(n, _prelu(n, i, _conv(n, i, x, "conv3", sd), "prelu3", sd), "pool3", 2)
    return _dense_heads(n, i, _prelu(n, i, _conv(n, i, x, "conv4", sd), "prelu4", sd), 5, sd, 48)


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shards detect in parallel threads
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def integral(rgb: np.ndarray) -> np.ndarray:
    """3, H+1, W+1 running sums of an H, W, 3 uint8 image (a zero row and column first): exact integers, int32 where
    they fit (OpenCV's integral image), float64 beyond."""
    depth = cv2.CV_32S if rgb.shape[0] * rgb.shape[1] * 255 < 2**31 else cv2.CV_64F
    return np.ascontiguousarray(cv2.integral(np.ascontiguousarray(rgb), sdepth=depth).transpose(2, 0, 1))


@lru_cache(maxsize=4096)
def _windows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n_out)
    return (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out  # torch's adaptive pooling start/end indices


def area_resize(csum: np.ndarray, y0: int, y1: int, x0: int, x1: int, oh: int, ow: int) -> np.ndarray:
    """``interpolate(img[:, :, y0:y1, x0:x1], (oh, ow), mode="area")`` of the image whose :func:`integral` is
    ``csum``, as 3, oh, ow float32, bit for bit: torch's adaptive average pool sums each window in float32 (exact here:
    integers below 2**24) and divides by the window's height, then by its width."""
    ys, ye = _windows(y1 - y0, oh)
    xs, xe = _windows(x1 - x0, ow)
    box = csum[:, y0 : y1 + 1, x0 : x1 + 1]  # a view: the rows gathered next are the box's width, not the image's
    rows = box[:, ye] - box[:, ys]  # 3, oh, x1 - x0 + 1
    sums = (rows[:, :, xe] - rows[:, :, xs]).astype(np.float32)  # 3, oh, ow
    kh, kw = (ye - ys).astype(np.float32), (xe - xs).astype(np.float32)
    return sums / kh[:, None] / kw


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x - np.float32(127.5)) * np.float32(0.0078125)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """torchvision's nms (what ``batched_nms`` runs for one image), indices in descending score order."""
    from torchvision.ops import nms

    if len(boxes) < 2:
        return np.arange(len(boxes))
    return nms(torch.from_numpy(np.ascontiguousarray(boxes)), torch.from_numpy(np.ascontiguousarray(scores)),
               iou).numpy()  # fmt: skip


def scales(h: int, w: int, min_size: int) -> list[float]:
    """The pyramid's scales, as ``detect_face`` computes them (the smallest side down to P-Net's 12 px)."""
    m = 12.0 / min_size
    minl, out, s = min(h, w) * m, [], m
    while minl >= 12:
        out.append(s)
        s, minl = s * FACTOR, minl * FACTOR
    return out


def _decode(reg: np.ndarray, prob: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """``generateBoundingBox`` for one image: K, 9 (x0, y0, x1, y1, score, 4 offsets), row-major order."""
    ys, xs = np.nonzero(prob >= threshold)
    if len(ys) == 0:
        return np.zeros((0, 9), np.float32)
    bb = np.stack([xs, ys], 1).astype(np.float32)
    q1 = np.floor((STRIDE * bb + 1) / np.float32(scale))
    q2 = np.floor((STRIDE * bb + CELL) / np.float32(scale))
    return np.concatenate([q1, q2, prob[ys, xs, None], reg[:, ys, xs].T], 1)


def rerec(b: np.ndarray) -> np.ndarray:
    """Boxes to squares around their centres (facenet-pytorch's float32 expressions, in place)."""
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = np.maximum(w, h)
    b[:, 0] = b[:, 0] + w * np.float32(0.5) - side * np.float32(0.5)
    b[:, 1] = b[:, 1] + h * np.float32(0.5) - side * np.float32(0.5)
    b[:, 2:4] = b[:, :2] + side[:, None]
    return b


def bbreg(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, :4] = b[:, :4] + reg * np.stack([w, h, w, h], 1)
    return b


def pad(b: np.ndarray, w: int, h: int) -> tuple[np.ndarray, ...]:
    """Integer crop bounds y, ey, x, ex (1-based starts, as facenet-pytorch)."""
    x0, y0, x1, y1 = np.trunc(b[:, :4]).astype(np.int32).T
    return np.maximum(y0, 1), np.minimum(y1, h), np.maximum(x0, 1), np.minimum(x1, w)


class Mtcnn:
    """MTCNN face boxes (x0, y0, x1, y1 floats, as facenet-pytorch's ``MTCNN(keep_all=True).detect``)."""

    def __init__(self, min_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 threads: int = 1):  # fmt: skip
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.min_size, self.thresholds = min_size, thresholds
        self.pnet = _session(pnet_onnx(PNet().state_dict()), threads)
        self.rnet = _session(rnet_onnx(RNet().state_dict()), threads)
        self.onet = _session(onet_onnx(ONet().state_dict()), threads)

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes K, 4 and O-Net scores K of an H, W, 3 uint8 image, highest score first."""
        h, w = rgb.shape[:2]
        csum = integral(rgb)
        boxes = self._pnet(csum, h, w)
        if len(boxes):
            boxes = self._refine(csum, boxes, h, w, self.rnet, 24, self.thresholds[1])
        if len(boxes):
            boxes = self._refine(csum, boxes, h, w, self.onet, 48, self.thresholds[2])
        return boxes[:, :4], boxes[:, 4]

    def _pnet(self, csum: np.ndarray, h: int, w: int) -> np.ndarray:
        found = []
        for s in scales(h, w, self.min_size):
            x = _normalize(area_resize(csum, 0, h, 0, w, int(h * s + 1), int(w * s + 1)))
            reg, prob = self.pnet.run(None, {"x": x[None]})
            b = _decode(reg[0], prob[0, 1], s, self.thresholds[0])
            found.append(b[_nms(b[:, :4], b[:, 4], 0.5)])
        b = np.concatenate(found) if found else np.zeros((0, 9), np.float32)
        b = b[_nms(b[:, :4], b[:, 4], 0.7)]
        regw, regh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        q = b[:, :4] + b[:, 5:9] * np.stack([regw, regh, regw, regh], 1)
        return rerec(np.concatenate([q, b[:, 4:5]], 1))

    def _refine(self, csum: np.ndarray, b: np.ndarray, h: int, w: int, net, side: int, threshold: float) -> np.ndarray:
        """R-Net (24 px crops) or O-Net (48 px): score, keep above ``threshold``, NMS, regress."""
        y, ey, x, ex = pad(b, w, h)
        ok = (ey > y - 1) & (ex > x - 1)  # a crop wholly outside the image (facenet-pytorch would fail)
        b, y, ey, x, ex = b[ok], y[ok], ey[ok], x[ok], ex[ok]
        crops = [area_resize(csum, int(y[k]) - 1, int(ey[k]), int(x[k]) - 1, int(ex[k]), side, side)
                 for k in range(len(b))]  # fmt: skip
        if not crops:
            return np.zeros((0, 5), np.float32)
        reg, prob = net.run(None, {"x": _normalize(np.stack(crops))})
        keep = prob[:, 1] > threshold
        b = np.concatenate([b[keep, :4], prob[keep, 1:2]], 1)
        reg = reg[keep]
        if side == 24:
            pick = _nms(b[:, :4], b[:, 4], 0.7)
            return rerec(bbreg(b[pick], reg[pick]))
        from facenet_pytorch.models.utils.detect_face import nms_numpy

        b = bbreg(b, reg)
        return b[nms_numpy(b[:, :4], b[:, 4], 0.7, "Min")] if len(b) else b

