import inspect

import pytest
import yaml

from evaluation.dense import dense_linear_probe
from infra.config import ConfigError, load_config
from infra.config.evaluate import (
    ClassificationBenchmark,
    CopyDetectionBenchmark,
    RetrievalBenchmark,
    SegmentationBenchmark,
)
from infra.runs import prepare_run


def test_evaluate_defaults_are_the_reference_protocols():
    ev = load_config().evaluate
    assert (ev.knn.ks, ev.knn.temperature) == ([10, 20, 100, 200], 0.07)
    assert (ev.linear.n_last_blocks, ev.linear.avgpool, ev.linear.lr_grid) == ([1, 4], [False, True], "code")
    assert (ev.linear.iterations, ev.linear.batch_size, ev.linear.momentum, ev.linear.weight_decay) == (12_500, 128, 0.9, 0)
    assert (ev.logreg.c_min_exp, ev.logreg.c_max_exp, ev.logreg.n_c, ev.logreg.max_iter) == (-6, 5, 45, 1000)
    # dinov2 *_linear_config.py: AdamW lr 1e-3, weight decay 1e-4, batch 16, 40k iterations; the probe's defaults agree
    dense = (ev.dense.iterations, ev.dense.batch_size, ev.dense.lr, ev.dense.weight_decay)
    assert dense == (40_000, 16, 1e-3, 1e-4)
    probe = inspect.signature(dense_linear_probe).parameters
    assert tuple(probe[k].default for k in ("iterations", "batch_size", "lr", "weight_decay")) == dense
    assert ev.protocols == ["knn", "linear", "logreg"] and ev.benchmarks == []


def test_benchmarks_of_every_kind_parse_by_kind(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text(yaml.safe_dump({"evaluate": {"benchmarks": [
        {"kind": "classification", "name": "c", "train": "a", "test": "b", "protocols": ["knn"]},
        {"kind": "retrieval", "name": "roxford5k", "images": "jpg", "gnd": "gnd_roxford5k.pkl"},
        {"kind": "copy_detection", "name": "cd", "ground_truth": "gt.csv", "references": "refs"},
        {"kind": "segmentation", "name": "ade", "root": "ade"},
    ]}}))
    kinds = [type(b) for b in load_config(f).evaluate.benchmarks]
    assert kinds == [ClassificationBenchmark, RetrievalBenchmark, CopyDetectionBenchmark, SegmentationBenchmark]
    f.write_text(yaml.safe_dump({"evaluate": {"benchmarks": [{"kind": "depth", "name": "nyu"}]}}))
    with pytest.raises(ConfigError, match=r"evaluate\.benchmarks\.0"):
        load_config(f)


def test_missing_benchmark_inputs_stop_the_run_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are the command's directory's, and named in full
    urls = tmp_path / "urls.parquet"
    urls.write_bytes(b"")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"run": {"root": str(tmp_path / "runs")}, "data": {"url_list": str(urls)},
                                 "embed": {"allow_random_init": True},
                                 "evaluate": {"benchmarks": [{"kind": "segmentation", "name": "ade", "root": "nowhere"}],
                                              "models": [{"name": "official", "backbone": {"kind": "dinov2", "path": "x.pth"}}]}}))
    from flows.preflight import check_run_inputs

    with pytest.raises(ConfigError) as err:
        prepare_run(f, checks=check_run_inputs)  # as `lvd run` does
    problems = [p for p in err.value.problems if p.startswith("evaluate.")]  # (the defaults' SSCD file is not here)
    assert problems == [f"evaluate.benchmarks[ade].root: {tmp_path / 'nowhere'} does not exist",
                        f"evaluate.models[official].backbone.path: {tmp_path / 'x.pth'} does not exist"]
