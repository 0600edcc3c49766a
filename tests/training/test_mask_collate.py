"""iBOT masking: stratified ratios, exact masked-image count, counts within bounds, collate outputs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from training.data import MaskingGenerator, collate_data_and_cast
from training.data.collate import stratified_budgets

GRID = 14  # 196 patches: 224 px / patch 16, or 196 px / patch 14


def _samples(b: int, n_local: int = 2) -> list[dict]:
    return [{"global_crops": [torch.full((3, 4, 4), 10.0 * i), torch.full((3, 4, 4), 10.0 * i + 1)],
             "local_crops": [torch.full((3, 2, 2), 10.0 * i + 2 + j) for j in range(n_local)]} for i in range(b)]


def test_stratified_budgets_match_naive_strata():
    n_images, n_tokens, lo, hi = 16, GRID * GRID, 0.1, 0.5
    budgets, upperbound = stratified_budgets(n_images, n_tokens, (lo, hi), 0.5, random.Random(7))
    rng = random.Random(7)
    edges = [lo + (hi - lo) * k / 8 for k in range(9)]  # int(16 * 0.5) = 8 strata
    want = [int(n_tokens * rng.uniform(edges[k], edges[k + 1])) for k in range(8)]
    assert budgets == want
    assert upperbound == sum(int(n_tokens * e) for e in edges[1:])
    for k, budget in enumerate(budgets):  # each masked image draws its ratio inside its own stratum
        assert int(n_tokens * edges[k]) <= budget <= int(n_tokens * edges[k + 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate_masks_statistics(seed):
    b, n = 8, GRID * GRID
    gen = MaskingGenerator(GRID, max_num_patches=0.5 * n)
    out = collate_data_and_cast(_samples(b), (0.1, 0.5), 0.5, n, gen, random.Random(seed))
    masks = out["collated_masks"]
    counts = masks.sum(1)
    assert masks.shape == (2 * b, n)
    assert int((counts > 0).sum()) == int(0.5 * 2 * b)  # exactly int(0.5 * 2B) masked images
    edges = np.linspace(0.1, 0.5, 9)
    uppers = [int(n * e) for e in edges[1:]]
    masked_sorted = sorted(int(c) for c in counts if c > 0)
    assert all(c <= u for c, u in zip(masked_sorted, uppers, strict=True))  # within the strata's bounds
    assert out["upperbound"] == sum(uppers) and int(counts.sum()) <= out["upperbound"]
    assert out["n_masked_patches"].tolist() == [int(counts.sum())]
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    per_image = torch.zeros(2 * b).index_add_(0, out["mask_indices_list"] // n, out["masks_weight"])
    assert_close(per_image, (counts > 0).float())  # weights 1 / count: each masked image sums to 1


def test_collate_stacks_crops_view_major():
    out = collate_data_and_cast(_samples(3), (0.1, 0.5), 0.5, 4, MaskingGenerator(2), random.Random(0))
    firsts = out["collated_global_crops"][:, 0, 0, 0].tolist()
    assert firsts == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]  # [view 1 of every image, view 2 of every image]
    assert out["collated_local_crops"][:, 0, 0, 0].tolist() == [2.0, 12.0, 22.0, 3.0, 13.0, 23.0]


def test_masking_generator_respects_budget_and_fills_it():
    gen = MaskingGenerator(GRID, max_num_patches=0.5 * GRID * GRID)
    rng = random.Random(0)
    assert gen(0, rng).sum() == 0
    fills = []
    for budget in range(10, 99, 4):
        for _ in range(10):
            m = gen(budget, rng)
            assert m.shape == (GRID, GRID) and 0 < m.sum() <= budget
            fills.append(m.sum() / budget)
    assert np.mean(fills) > 0.8  # blocks are placed until the budget is (nearly) met
