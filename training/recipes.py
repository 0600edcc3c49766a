"""Named training recipes as `train:` overlays (the integrator copies them into configs/*.yaml).

`DEMO` is the CPU demo: a ViT-tiny/4 on 28 px digits (the bundled demo corpus is mostly MNIST-like digits plus a
few small photos), about 3-4 minutes on 2 cores with bf16 autocast. Checked by `python -m training.demo_check`.
"""

from __future__ import annotations

from typing import Any

DEMO: dict[str, Any] = {
    "student": {"arch": "vit_nano", "patch_size": 4, "drop_path_rate": 0.0, "layerscale": 0.1},
    "teacher": {"momentum_teacher": 0.9, "warmup_teacher_temp_epochs": 3},
    "dino": {"head_n_prototypes": 1024, "head_hidden_dim": 512, "head_bottleneck_dim": 128},
    "ibot": {"head_n_prototypes": 1024, "head_hidden_dim": 512, "head_bottleneck_dim": 128},
    "optim": {"epochs": 10, "warmup_epochs": 1, "base_lr": 4.0e-3, "freeze_last_layer_epochs": 0.5,
              "layerwise_decay": 1.0},
    "crops": {"global_crops_size": 28, "local_crops_size": 12, "local_crops_number": 4,
              "global_crops_scale": [0.5, 1.0], "local_crops_scale": [0.15, 0.5]},
    "batch_size_per_gpu": 64,
    "official_epoch_length": 15,
    "num_workers": 0,
    "accelerator": "cpu",
    "precision": "auto",
    "checkpoint_every": 100,
    "log_every": 10,
}


def overrides(recipe: dict[str, Any], prefix: str = "train") -> list[str]:
    """Flatten a recipe to dotted `key=value` overrides (for `infra.config.schema.load_config`)."""
    out = []
    for key, value in recipe.items():
        if isinstance(value, dict):
            out += overrides(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={value}")
    return out
