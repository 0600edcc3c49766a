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


def test_mtcnn_gives_facenet_pytorchs_boxes():
    """curation.models.mtcnn runs facenet-pytorch's MTCNN algorithm with its weights on onnxruntime and numpy: the same
    boxes (to float32 rounding, < 1e-3 px) and O-Net scores as facenet-pytorch's own MTCNN, on faces, face-free
    photos and small images like bench/ingest.py's."""
    import torch
    from facenet_pytorch import MTCNN

    from curation.models.mtcnn import Mtcnn

    stock, ours = MTCNN(keep_all=True, device="cpu", min_face_size=20, thresholds=[0.6, 0.7, 0.9]), Mtcnn(20, (0.6, 0.7, 0.9))
    images = [s.image for s in labelled_set(n_faces=4, n_free=2, seed=1)]
    images += [im.resize((im.width // 2, im.height // 2), Image.BICUBIC) for im in images[:3]]  # 128 px: faces 12-64 px
    found, before = 0, torch.get_num_threads()
    torch.set_num_threads(1)  # stock on a busy machine: two OpenMP threads take 30x longer
    try:
        for img in images:
            (a, pa), (b, pb) = stock.detect(img), ours.detect(np.asarray(img))
            a, pa = (np.zeros((0, 4)), np.zeros(0)) if a is None else (a.astype(np.float32), pa.astype(np.float32))
            order_a, order_b = np.lexsort(a.T[::-1]), np.lexsort(b.T[::-1])
            assert a.shape == b.shape
            np.testing.assert_allclose(b[order_b], a[order_a], rtol=0, atol=1e-3)
            np.testing.assert_allclose(pb[order_b], pa[order_a], rtol=0, atol=1e-5)
            found += len(a)
    finally:
        torch.set_num_threads(before)
    assert found >= 5  # the comparison covered real detections


def test_mtcnn_threads_change_no_box():
    """`faces.threads` is an execution key, outside the stage's key (a resumed run may change it): the same boxes and
    scores, bit for bit, at 1 and 2 onnxruntime threads."""
    from curation.models.mtcnn import Mtcnn

    images = [np.asarray(s.image) for s in labelled_set(n_faces=4, n_free=2, seed=1)]
    one, two = Mtcnn(20, (0.6, 0.7, 0.9), threads=1), Mtcnn(20, (0.6, 0.7, 0.9), threads=2)
    found = 0
    for img in images:
        (a, pa), (b, pb) = one.detect(img), two.detect(img)
        assert np.array_equal(a, b) and np.array_equal(pa, pb)
        found += len(a)
    assert found >= 4


def test_area_resize_is_torch_area_interpolation_bit_for_bit():
    """MTCNN's resamples (pyramid levels, crops) from an integral image equal torch's interpolate(mode="area")."""
    import torch
    from torch.nn.functional import interpolate

    from curation.models.mtcnn import area_resize, integral

    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(12, 300, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if trial % 2:  # a crop to R-Net's or O-Net's input
            y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
            y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
            oh = ow = int(rng.choice([24, 48]))
        else:  # a pyramid level
            y0, x0, y1, x1, s = 0, 0, h, w, float(rng.uniform(0.05, 0.9))
            oh, ow = int(h * s + 1), int(w * s + 1)
        ref = interpolate(torch.from_numpy(img).permute(2, 0, 1)[None, :, y0:y1, x0:x1].float(), (oh, ow), mode="area")
        assert np.array_equal(area_resize(integral(img), y0, y1, x0, x1, oh, ow), ref[0].numpy())


def test_mtcnn_networks_are_facenet_pytorchs():
    """The ONNX P-, R- and O-Net built from the wheel's state dicts compute what facenet-pytorch's modules do."""
    import torch
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    from curation.models.mtcnn import _session, onet_onnx, pnet_onnx, rnet_onnx

    torch.manual_seed(0)
    for net, build, shape in ((PNet(), pnet_onnx, (2, 3, 31, 45)), (RNet(), rnet_onnx, (5, 3, 24, 24)),
                              (ONet(), onet_onnx, (5, 3, 48, 48))):  # fmt: skip
        x = torch.rand(shape) * 2 - 1
        with torch.inference_mode():
            ref = net(x)
        reg, prob = _session(build(net.state_dict()), 1).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(reg, ref[0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(prob, ref[-1].numpy(), rtol=0, atol=1e-6)
