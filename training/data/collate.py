"""Collate multi-crop samples and draw the iBOT masks (reference `collate_data_and_cast`).

Of the 2B global crops, int(2B * mask_probability) get a mask; the ratio range is cut into that many equal strata
(`linspace`) and the i-th masked image draws its ratio uniformly inside stratum i (budget int(N * ratio)). The
other images get empty masks and the list is shuffled. `upperbound` = sum of int(N * stratum max) bounds the masked
patch count (the reference pre-sizes buffers with it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.data.masking import MaskingGenerator


def stratified_budgets(n_images: int, n_tokens: int, ratio_min_max: tuple[float, float], probability: float,
                       rng: random.Random) -> tuple[list[int], int]:
    """Patch budgets of the masked images, in stratum order, and the upper bound of their sum."""
    n_masked = int(n_images * probability)
    bounds = np.linspace(*ratio_min_max, n_masked + 1)
    budgets = [int(n_tokens * rng.uniform(bounds[i], bounds[i + 1])) for i in range(n_masked)]
    upperbound = sum(int(n_tokens * bounds[i + 1]) for i in range(n_masked))
    return budgets, upperbound


def collate_data_and_cast(samples: Sequence[dict[str, Any]], mask_ratio_tuple: tuple[float, float],
                          mask_probability: float, n_tokens: int, mask_generator: MaskingGenerator,
                          rng: random.Random, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """samples: dicts with `global_crops` (2 x [3, H, W]) and `local_crops` (n x [3, h, w]).

    Crops are stacked crop-major ([crop0 of every image, crop1 of every image, ...]), so `chunk(2)` of the global
    batch gives the two views.
    """
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    local_crops = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples]) if n_local else None
    b = len(global_crops)
    budgets, upperbound = stratified_budgets(b, n_tokens, mask_ratio_tuple, mask_probability, rng)
    masks = [torch.from_numpy(mask_generator(k, rng)) for k in budgets]
    masks += [torch.from_numpy(mask_generator(0, rng)) for _ in range(b - len(budgets))]
    rng.shuffle(masks)
    collated_masks = torch.stack(masks).flatten(1)  # 2B, N
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    def cast(x: torch.Tensor | None) -> torch.Tensor | None:  # uint8 crops stay uint8 (batched augmentation)
        return x.to(dtype) if x is not None and x.is_floating_point() else x

    return {
        "collated_global_crops": cast(global_crops),
        "collated_local_crops": cast(local_crops),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
