"""A tiny training config shared by the system tests (ViT-pico/4 on 16 px crops, 64 prototypes)."""

from __future__ import annotations

from typing import Any

from infra.config.train import TrainConfig

TINY: dict[str, Any] = {
    "student": {"arch": "vit_pico", "patch_size": 4, "drop_path_rate": 0.2},
    "dino": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
    "ibot": {"head_n_prototypes": 48, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
    "crops": {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2},
    "optim": {"epochs": 2, "warmup_epochs": 1, "freeze_last_layer_epochs": 0.4},
    "teacher": {"warmup_teacher_temp_epochs": 1},
    "batch_size_per_gpu": 4, "official_epoch_length": 5, "num_workers": 0, "accelerator": "cpu",
    "precision": "fp32", "checkpoint_every": 4, "log_every": 2,
}


def tiny_config(**changes: Any) -> TrainConfig:
    """TINY with dotted-key changes, e.g. tiny_config(**{"ibot.separate_head": True})."""
    import copy

    tree = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.model_validate(tree)
