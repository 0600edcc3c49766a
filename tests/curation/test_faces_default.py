"""The shipped face detector (faces.backend default: MTCNN from the facenet-pytorch wheel) on a fixed subset of
bench/faces.py's labelled set, and through the faces stage end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import skimage.data
from PIL import Image

from bench.faces import evaluate, labelled_set
from curation.faces import blur_shard, build_detector
from infra.config.ingest import FacesConfig
from infra.shards import ShardWriter, iter_tar, list_shards


def test_the_default_is_mtcnn_with_its_measured_setting():
    det = build_detector(FacesConfig())
    assert det.name == "mtcnn-facenet-pytorch:o0.9"


def test_an_image_smaller_than_the_smallest_face_has_no_face():
    """MTCNN's pyramid is empty below faces.min_size (facenet-pytorch then fails in torch.cat): no face, no error."""
    det = build_detector(FacesConfig())
    face = Image.fromarray(skimage.data.astronaut()).convert("RGB").crop((150, 20, 330, 220))
    for side in (1, 12, FacesConfig().min_size - 1):
        assert det.detect(face.resize((side, side))) == []
    m = FacesConfig().min_size
    assert isinstance(det.detect(face.resize((m, m)).convert("L")), list)  # from min_size on, the pyramid runs


def test_default_detector_on_a_fixed_subset_of_the_benchmark_set():
    """40 pasted faces and 40 face-free photographs (seed 0 of bench/faces.py); numbers measured at this commit."""
    r = evaluate(build_detector(FacesConfig()).detect, labelled_set(n_faces=40, n_free=40, seed=0))
    assert (r.faces, r.free) == (40, 40)
    assert (r.blurred, r.touched, r.extra) == (38, 0, 1)
    assert r.blurred_share >= 0.95 and r.touched_share <= 0.02


def test_faces_stage_blurs_the_astronaut_and_leaves_the_coffee(tmp_path):
    images = []
    for name in ("astronaut", "coffee"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((256, 256))
        images.append(img)
    w = ShardWriter(tmp_path / "in", "00000")
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        w.add(f"{i:064x}", buf.getvalue(), "jpg", row_id=i, url=f"http://h/{i}.jpg", source="pool",
              width=img.width, height=img.height)  # fmt: skip
    w.close()
    out = tmp_path / "run" / "stages" / "faces"
    _, counts = blur_shard(out, list_shards(tmp_path / "in")[0], frozenset(), FacesConfig())
    assert counts == {"kept": 2, "blurred": 1}
    from infra.lineage import Ledger

    ev = Ledger(tmp_path / "run").events()
    details = [json.loads(d) for d in ev.sort_values("row_id")["detail"]]
    assert details[0]["n_faces"] == 1 and details[0]["detector"] == "mtcnn-facenet-pytorch:o0.9"
    assert details[1]["n_faces"] == 0
    stored = {k: d for k, _e, d in iter_tar(out / "shards" / "00000.tar")}
    blurred = Image.open(io.BytesIO(stored[f"{0:064x}"]))
    assert build_detector(FacesConfig()).detect(blurred) == []  # the blurred face is not found again
    assert np.asarray(blurred).shape == np.asarray(images[0]).shape


def test_retinaface_anchors_and_decoding_follow_the_reference():
    """curation.models.retinaface against the reference's PriorBox loop and decode (biubug6/Pytorch_Retinaface)."""
    from itertools import product

    from curation.models.retinaface import MIN_SIZES, STEPS, anchors, decode

    h, w = 40, 72
    ref = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        for i, j in product(range(-(-h // step)), range(-(-w // step))):
            ref += [[(j + 0.5) * step / w, (i + 0.5) * step / h, s / w, s / h] for s in sizes]
    np.testing.assert_allclose(anchors(h, w), np.array(ref, np.float32), rtol=1e-6)
    prior = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    loc = np.array([[1.0, -2.0, np.log(2) / 0.2, 0.0]], np.float32)  # centre moved by 0.1 x size, width doubled
    cx, cy, bw, bh = 0.5 + 0.1 * 0.2, 0.5 - 0.2 * 0.4, 0.4, 0.4
    np.testing.assert_allclose(decode(loc, prior), [[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]], rtol=1e-5)


def test_channels_last_pools_leave_mtcnn_detections_unchanged():
    """fast_pools swaps MTCNN's max pools for channels-last ones (3-7x faster on CPU): the same boxes (to float32
    rounding, < 1e-3 px) and the same O-Net scores as facenet-pytorch's own MTCNN on faces and face-free photos."""
    import torch
    from facenet_pytorch import MTCNN

    from curation.faces import ChannelsLastMaxPool, fast_pools, torch_threads

    def make():
        return MTCNN(keep_all=True, device="cpu", min_face_size=20, thresholds=[0.6, 0.7, 0.9])

    stock, fast = make(), fast_pools(make())
    assert sum(isinstance(m, ChannelsLastMaxPool) for m in fast.modules()) == 6  # P-Net 1, R-Net 2, O-Net 3
    samples = labelled_set(n_faces=4, n_free=2, seed=1)
    found = 0
    for s in samples:
        with torch_threads(1):  # as the detector runs (two OpenMP threads on a busy machine: 24 s, not 0.8)
            (a, pa), (b, pb) = stock.detect(s.image), fast.detect(s.image)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-3 and np.array_equal(pa, pb)
            found += len(a)
    assert found >= 4  # the comparison covered real detections
    x = torch.randn(3, 28, 21, 23)
    pool = torch.nn.MaxPool2d(3, 2, ceil_mode=True)
    assert torch.equal(ChannelsLastMaxPool(pool)(x), pool(x))


def test_detection_runs_on_the_configured_threads_and_restores_them():
    import torch

    from curation.faces import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
