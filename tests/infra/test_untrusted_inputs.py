"""Untrusted inputs never execute code: pickled checkpoints, resume checkpoints and configuration files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from infra.config import ConfigError, load_config


class _Payload:
    """Unpickling this would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 8)}, "hook": _Payload(marker)}, path)
    return path


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)  # what the project never does: the control for the tests below
    assert marker.exists()


@pytest.mark.parametrize("loader", ["training.checkpoint:read_backbone_state", "flows.models:_load_state_dict",
                                    "curation.models.sscd:_read_state"])
def test_model_loaders_refuse_pickled_code(tmp_path, loader):
    import importlib

    module, name = loader.split(":")
    fn = getattr(importlib.import_module(module), name)
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        fn(path)
    assert not marker.exists()


def test_configuration_is_data_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"run:\n  seed: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        load_config(cfg)
    with pytest.raises(ConfigError):
        load_config(None, [f"run.seed=!!python/object/apply:pathlib.Path.touch [{str(marker)!r}]"])
    assert not marker.exists()
