import json
import pickle

import numpy as np
import pytest

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
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "gnd_evil.pkl").write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing builtins\.print"):
        load_revisited_gnd(tmp_path / "gnd_evil.pkl")
