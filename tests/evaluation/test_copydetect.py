import numpy as np
import pandas as pd
import pytest

from evaluation.copydetect import evaluate_copies, micro_ap, read_ground_truth


def test_micro_ap_by_hand():
    # sorted predictions: hit, miss, hit, miss; 3 ground-truth pairs (one never predicted):
    # precision at the hits 1/1 and 2/3 -> (1 + 2/3) / 3 = 5/9
    assert micro_ap(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool), 3) == pytest.approx(5 / 9, abs=1e-15)
    # order of the input does not matter; a tie puts the miss first
    assert micro_ap(np.array([0.7, 0.9]), np.array([1, 0], bool), 1) == 0.5
    assert micro_ap(np.array([0.9, 0.9]), np.array([1, 0], bool), 1) == 0.5


def test_copy_detection_on_known_vectors():
    refs = np.eye(3, dtype=np.float32)
    # query 0 is a copy of ref 0 (sim 0.9), query 1 of ref 2 but closer to ref 1 (0.8 vs 0.6), query 2 a distractor
    q = np.array([[0.9, 0.436, 0.0], [0.0, 0.8, 0.6], [0.0, 0.0, 0.95]], np.float32)
    res = evaluate_copies(q, refs, [(0, 0), (1, 2)], k=1)
    # top-1 predictions by score: q2->r2 0.95 (miss), q0->r0 0.9 (hit), q1->r1 0.8 (miss): AP = (1/2) / 2
    assert res.micro_ap == pytest.approx(25.0, abs=1e-6)
    assert res.recall_at_1 == 50.0
    res2 = evaluate_copies(q, refs, [(0, 0), (1, 2)], k=2)
    # adds q0->r1 0.436 (miss) and q1->r2 0.6 (hit): order 0.95 m, 0.9 h, 0.8 m, 0.6 h, 0.436 m -> (1/2 + 2/4) / 2
    assert res2.micro_ap == pytest.approx(50.0, abs=1e-6)


def test_ground_truth_tables(tmp_path):
    pd.DataFrame({"query": ["q/a.png", "q/b.png"], "reference": ["r/a.png", None]}).to_csv(tmp_path / "gt.csv", index=False)
    gt = read_ground_truth(tmp_path / "gt.csv")
    assert list(gt["query"]) == [str(tmp_path / "q/a.png"), str(tmp_path / "q/b.png")]
    assert gt["reference"].iloc[0] == str(tmp_path / "r/a.png") and gt["reference"].iloc[1] is None
    truth = pd.DataFrame({"kind": ["eval_copy", "mnist", "photo", "digits"], "name": ["c.png", "m.png", "p.jpg", "d.png"],
                          "of": ["eval/mnist/test/3/x.png", "", "", ""]})
    truth.to_parquet(tmp_path / "truth.parquet")
    demo = read_ground_truth(tmp_path / "truth.parquet", max_distractors=10)
    assert list(demo["query"]) == [str(tmp_path / "images" / n) for n in ("c.png", "m.png", "d.png")]
    assert list(demo["reference"]) == [str(tmp_path / "eval/mnist/test/3/x.png"), None, None]
