from pathlib import Path

import pytest
import yaml

from infra.config import ConfigError, PipelineConfig, config_hash, load_config, to_yaml, validate

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_values():
    cfg = load_config()
    assert (cfg.dedup.k, cfg.dedup.threshold, cfg.dedup.eval_threshold) == (64, 0.6, 0.45)
    assert cfg.retrieve.n_neighbors == 4
    assert (cfg.train.optim.base_lr, cfg.train.teacher.momentum_teacher, cfg.train.dino.head_n_prototypes) == (
        4e-3,
        0.992,
        65536,
    )


def test_yaml_overlay_then_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 10\n  optim: {base_lr: 0.001}\n")
    cfg = load_config(f, ["train.max_steps=50", "data.seed_sets=[]", "ingest.allow_hosts=[127.0.0.1]"])
    assert cfg.train.max_steps == 50
    assert cfg.train.optim.base_lr == 0.001
    assert cfg.ingest.allow_hosts == ["127.0.0.1"]


def test_base_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {max_steps: 7, batch_size_per_gpu: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.max_steps, cfg.train.batch_size_per_gpu) == (9, 3)


def test_every_problem_is_reported_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: {max_stepz: 3}\ningest: {timeout: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f, ["run.stop_after=nowhere", "nonsense"])
    assert sorted(err.value.problems) == sorted(
        [
            "train.max_stepz: unknown key",
            "ingest.timeout: Input should be greater than 0 (got -1)",
            "run.stop_after: Input should be 'crawl', 'ingest', 'nsfw', 'faces', 'dedup', 'embed', 'retrieve', "
            "'rebalance', 'corpus', 'pretrain', 'pretrain_highres', 'distill' or 'evaluate' (got 'nowhere')",
            "override 'nonsense' is not of the form key.path=value",
        ]
    )


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_yaml_roundtrip_and_hash_are_stable():
    cfg = load_config(None, ["train.max_steps=5"])
    again = validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(cfg, ["run.seed"]) == config_hash(PipelineConfig(), ["run.seed"])
    assert config_hash(cfg, ["train"]) != config_hash(PipelineConfig(), ["train"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_checked_in_config_parses(path):
    load_config(path)


def test_the_demo_config_trains_with_the_demo_recipe():
    from training.recipes import DEMO, overrides

    demo = load_config(REPO / "configs" / "demo.yaml").train
    assert demo == load_config(None, overrides(DEMO)).train
