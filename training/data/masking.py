"""BEiT-style block masking (reference `dinov2/data/masking.py`), drawing from an explicit `random.Random`.

Rectangles of area uniform in [min_num_patches, remaining budget] and log-uniform aspect in
[min_aspect, 1/min_aspect] are placed at random positions; each placement makes up to 10 tries and must add at
least one new patch without exceeding the remaining budget. Blocks are placed until the budget is met or a
placement fails, so an image gets at most its budget (often a little less).
"""

from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    def __init__(self, input_size: int | tuple[int, int], max_num_patches: float | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _place_block(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= max_mask_patches:
                    mask[top:top + h, left:left + w] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        """A [H, W] bool mask with at most `num_masking_patches` patches set."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._place_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask
