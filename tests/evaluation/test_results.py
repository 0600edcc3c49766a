"""The results table under a runs root: one part per evaluation id, so a rerun replaces its rows."""

import pandas as pd

from evaluation.features import PixelModel
from evaluation.results import TABLE_DIR, read_table
from evaluation.suite import EvalModel, evaluate
from infra.config.evaluate import ClassificationBenchmark, EvaluateConfig


def _evaluate(toy, root, run_id):
    train, test = toy
    cfg = EvaluateConfig(protocols=["knn"], knn={"ks": [1, 3]}, precision="fp32")
    bench = [ClassificationBenchmark(name="toy", train=train, test=test)]
    evaluate(bench, [EvalModel(PixelModel(8, 4), "baseline")], cfg, root / run_id / "stages" / "evaluate",
             run_id=run_id, cache_dir=root / ".cache", table_root=root)  # fmt: skip
    return pd.read_parquet(root / run_id / "stages" / "evaluate" / "results.parquet")


def test_a_rerun_evaluation_replaces_its_rows_in_the_table(toy_classification, tmp_path):
    first = _evaluate(toy_classification, tmp_path, "run-a")
    assert len(first) == 4  # top-1 / top-5 at k = 1, 3
    # Killed after the table write, before the stage manifest: the stage reruns its core with the same run id.
    again = _evaluate(toy_classification, tmp_path, "run-a")
    table = read_table(tmp_path)
    assert len(table) == 4 and set(table["evaluated_at"]) == set(again["evaluated_at"])
    pd.testing.assert_frame_equal(table, again)
    # Another evaluation adds its own rows; a part under the earlier "<id>-<UTC stamp>" naming of run-a is replaced,
    # while a run whose id merely starts with "run-a-" keeps its part.
    parts = tmp_path / TABLE_DIR
    first.to_parquet(parts / "run-a-20261122T150900123+0000.parquet")
    first.assign(run_id="run-a-b").to_parquet(parts / "run-a-b.parquet")
    _evaluate(toy_classification, tmp_path, "run-a")
    _evaluate(toy_classification, tmp_path, "run-c")
    assert sorted(p.name for p in parts.iterdir()) == ["run-a-b.parquet", "run-a.parquet", "run-c.parquet"]
    assert read_table(tmp_path).groupby("run_id").size().to_dict() == {"run-a": 4, "run-a-b": 4, "run-c": 4}
