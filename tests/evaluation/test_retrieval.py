import json
import pickle

import numpy as np
import pytest
from PIL import Image

from evaluation.retrieval import average_precision, load_revisited_gnd, revisited_map

# Query 0 ranks the database as [3, 0, 5, 1, 4, 2]; query 1 as [0, 1, 2, 3, 4, 5].
SIMS = np.array([[0.8, 0.5, 0.0, 0.9, 0.3, 0.6], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
GND = [{"easy": [0, 4], "hard": [1], "junk": [5]}, {"easy": [0], "hard": [], "junk": []}]


def test_average_precision_by_hand():
    # positives at ranks 1 and 2 of 2: (0 + 1/2)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/8 + 7/24 = 5/12
    assert average_precision([1, 2], 2) == pytest.approx(5 / 12, abs=1e-15)
    assert average_precision([0], 1) == 1.0
    assert average_precision([], 3) == 0.0  # no positive retrieved


def test_revisited_easy_medium_hard_by_hand():
    # Query 0. Easy: positives {0, 4}, ignored {5, 1} -> list [3, 0, 4, 2], ranks 1, 2 -> 5/12.
    #          Medium: positives {0, 4, 1}, ignored {5} -> [3, 0, 1, 4, 2], ranks 1, 2, 3
    #                  -> (0 + 1/2)/6 + (1/2 + 2/3)/6 + (2/3 + 3/4)/6 = 37/72.
    #          Hard: positives {1}, ignored {5, 0, 4} -> [3, 1, 2], rank 1 -> 1/4.
    # Query 1: easy 0 at rank 0 -> AP 1 for Easy and Medium; no hard positive, so it is left out of Hard.
    got = revisited_map(SIMS, GND)
    assert got["map_easy"] == pytest.approx((5 / 12 + 1) / 2 * 100, abs=1e-12)
    assert got["map_medium"] == pytest.approx((37 / 72 + 1) / 2 * 100, abs=1e-12)
    assert got["map_hard"] == pytest.approx(25.0, abs=1e-12)


def test_ground_truth_files_pickle_and_json(tmp_path):
    raw = {"imlist": [f"db{i}" for i in range(6)], "qimlist": ["q0", "q1"],
           "gnd": [{**g, "bbx": [1.0, 2.0, 10.0, 12.0]} for g in GND]}
    arrays = {**raw, "gnd": [{k: np.asarray(v) for k, v in g.items()} for g in raw["gnd"]]}  # revisitop stores arrays
    (tmp_path / "gnd_x.pkl").write_bytes(pickle.dumps(arrays))
    (tmp_path / "gnd_x.json").write_text(json.dumps(raw))
    for name in ("gnd_x.pkl", "gnd_x.json"):
        gt = load_revisited_gnd(tmp_path / name)
        assert gt.qimlist == ["q0", "q1"] and gt.gnd[0]["easy"] == [0, 4] and gt.gnd[1]["hard"] == []
        assert gt.gnd[0]["bbx"] == [1.0, 2.0, 10.0, 12.0]


def test_ground_truth_pickle_cannot_run_code(tmp_path):
    # Written opcode by opcode (protocol 0): {"gnd": [builtins.print("pwned")]}. Not pickle.dumps(print): pickle names
    # the object that builtins.print is in this process, and a Ray driver replaces it with Ray's own print.
    evil = b"(dp0\nVgnd\np1\n(lp2\ncbuiltins\nprint\np3\n(Vpwned\np4\ntp5\nRp6\nas."
    assert pickle.loads(evil.replace(b"cbuiltins\nprint", b"cbuiltins\nlen").replace(b"pwned", b"abc")) == {"gnd": [3]}
    (tmp_path / "gnd_evil.pkl").write_bytes(evil)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing builtins\.print"):
        load_revisited_gnd(tmp_path / "gnd_evil.pkl")


# --- run_retrieval end to end: files on disk, query boxes, gnd pkl/JSON, raw-pixel features ---------------------
# Database: solid grey images. Raw-pixel features of a solid grey g are 16 copies of u(t) = (t - mean) / std,
# t = g / 255: points on one line, whose direction turns monotonically (< 180 degrees) as t grows. So the cosine
# to a white (t = 1) query falls with decreasing grey, and to a black (t = 0) query with increasing grey.
GREYS = [255, 0, 230, 30, 200, 60, 170, 100]  # database index -> grey
RANKED = {"white": [0, 2, 4, 6, 7, 5, 3, 1], "black": [1, 3, 5, 7, 6, 4, 2, 0]}
QUERY_GND = [{"easy": [0, 6], "hard": [7], "junk": [2]}, {"easy": [1], "hard": [5, 0], "junk": [3]}]
# Query 0 (white crop). Easy: drop {2, 7} -> [0, 4, 6, 5, 3, 1], ranks 0, 2 -> 1/2 + (1/2 + 2/3)/4 = 19/24.
#   Medium: drop {2} -> [0, 4, 6, 7, 5, 3, 1], ranks 0, 2, 3 -> 1/3 + 7/36 + (2/3 + 3/4)/6 = 55/72.
#   Hard: drop {2, 0, 6} -> [4, 7, 5, 3, 1], rank 1 -> (0 + 1/2)/2 = 1/4.
# Query 1 (black crop). Easy: drop {3, 5, 0} -> [1, 7, 6, 4, 2], rank 0 -> 1.
#   Medium: drop {3} -> [1, 5, 7, 6, 4, 2, 0], ranks 0, 1, 6 -> 1/3 + 1/3 + (2/6 + 3/7)/6 = 50/63.
#   Hard: drop {3, 1} -> [5, 7, 6, 4, 2, 0], ranks 0, 5 -> 1/2 + (1/5 + 2/6)/4 = 19/30.
EXPECTED = {"map_easy": (19 / 24 + 1) / 2 * 100, "map_medium": (55 / 72 + 50 / 63) / 2 * 100,
            "map_hard": (1 / 4 + 19 / 30) / 2 * 100}  # fmt: skip


def _write_benchmark(root):
    jpg = root / "jpg"
    jpg.mkdir(parents=True)
    for i, g in enumerate(GREYS):
        Image.new("RGB", (6, 9), (g, g, g)).save(jpg / f"db_{i}.png")  # any size: a solid image stays solid
    for name, (left, right) in {"q_white": (255, 0), "q_black": (0, 255)}.items():
        img = np.zeros((12, 12, 3), np.uint8)
        img[:, :6], img[:, 6:] = left, right  # the box keeps the left half; the whole query is half black, half white
        Image.fromarray(img).save(jpg / f"{name}.png")
    raw = {"imlist": [f"db_{i}" for i in range(len(GREYS))], "qimlist": ["q_white", "q_black"],
           "gnd": [{**g, "bbx": [0.0, 0.0, 6.0, 12.0]} for g in QUERY_GND]}  # fmt: skip
    arrays = {**raw, "gnd": [{k: np.asarray(v) for k, v in g.items()} for g in raw["gnd"]]}
    (root / "gnd_toy.pkl").write_bytes(pickle.dumps(arrays))
    (root / "gnd_toy.json").write_text(json.dumps(raw))
    return jpg


def test_run_retrieval_crops_queries_and_scores_by_hand(tmp_path):
    from evaluation.features import FeatureExtractor, PixelModel
    from evaluation.suite import EvalModel, run_retrieval
    from infra.config.evaluate import EvaluateConfig, RetrievalBenchmark

    jpg = _write_benchmark(tmp_path)
    model, cfg = EvalModel(PixelModel(4, 4), "baseline"), EvaluateConfig()
    extract = FeatureExtractor(tmp_path / "cache", precision="fp32")
    # the premise of the hand count: raw-pixel cosines rank the database by grey as stated
    db = extract.extract(model.features, [Image.open(jpg / f"db_{i}.png") for i in range(len(GREYS))], False)
    for colour, grey in (("white", 255), ("black", 0)):
        q = extract.extract(model.features, [Image.new("RGB", (4, 4), (grey,) * 3)], False)
        assert np.argsort(-(q.global_ @ db.global_.T)[0], kind="stable").tolist() == RANKED[colour]
    digests = set()
    for gnd in ("gnd_toy.pkl", "gnd_toy.json"):  # revisitop's pickle of numpy arrays, and the same as JSON
        b = RetrievalBenchmark(name="toy", images=jpg, gnd=tmp_path / gnd, extension=".png")
        rows = run_retrieval(b, [model], cfg, extract)
        assert [(r["protocol"], r["model"], r["metric"]) for r in rows] == [
            ("retrieval", "raw-pixels", m) for m in ("map_easy", "map_medium", "map_hard")]
        for r in rows:
            assert r["value"] == pytest.approx(EXPECTED[r["metric"]], abs=1e-12), r["metric"]
        digests.add(rows[0]["dataset_digest"])
    assert len(digests) == 2  # the ground-truth file's bytes are part of the benchmark's digest
    # Without the boxes the queries are half black, half white: no longer the database's extremes.
    whole = run_retrieval(b.model_copy(update={"crop_queries": False}), [model], cfg, extract)
    assert [r["value"] for r in whole] != [r["value"] for r in rows]
