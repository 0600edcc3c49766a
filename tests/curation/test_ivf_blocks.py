"""ivf_blocks: bf16 scans equal fp32 scans, kNN search against brute force, balanced cells, and the configured dedup
index's recall on a planted pool at two sizes."""

from __future__ import annotations

import numpy as np
import pytest

from curation.graph import QueryViews, edge_recall, exact_edges, knn_edges
from curation.index import build_index, exact_search
from curation.ivf_blocks import BF16_MARGIN, RESIDENT_LISTS, balance
from curation.vectors import RowView, VectorStore
from infra.config.curation import DedupConfig, IndexConfig


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_pool(n: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The bench's pool in small (bench/curate_scale.py): n/50 concepts of power-law sizes (pairwise cosine 0.15-0.4
    inside one), 2% of the pool planted as copies (1-7 per original, cosine 0.8-0.95 to it). (vectors as stored
    (fp16 -> fp32), planted group per vector or -1)."""
    rng = np.random.default_rng(seed)
    k = max(n // 50, 10)
    centres = _unit(rng.standard_normal((k, dim)))
    w = 1.0 / np.arange(1, k + 1) ** 1.1
    n_dup = n // 50
    cluster = rng.choice(k, n - n_dup, p=w / w.sum())
    a = rng.uniform(np.sqrt(0.15), np.sqrt(0.4), k)[cluster][:, None]
    base = _unit(centres[cluster] * a + _unit(rng.standard_normal((n - n_dup, dim))) * np.sqrt(1 - a * a))
    sizes = rng.integers(1, 8, n_dup)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_dup) + 1]
    sizes[-1] -= sizes.sum() - n_dup
    originals = rng.choice(n - n_dup, len(sizes), replace=False)
    copy_of = np.repeat(originals, sizes)
    b = rng.uniform(0.8, 0.95, (n_dup, 1))
    copies = _unit(base[copy_of] * b + _unit(rng.standard_normal((n_dup, dim))) * np.sqrt(1 - b * b))
    group = np.full(n, -1)
    group[originals] = np.arange(len(sizes))
    group[n - n_dup :] = group[copy_of]
    return np.concatenate([base, copies]).astype(np.float16).astype(np.float32), group


def test_configured_dedup_index_recall_holds_at_two_pool_sizes(tmp_path) -> None:
    """The dedup stage's index (as configured, ivf_blocks forced below flat_max) against brute force on the nodes of
    80 planted groups and 200 random nodes: edge recall >= 0.95 at 20k and at 80k vectors (4x), same settings."""
    cfg = DedupConfig().index.model_copy(update={"kind": "ivf_blocks"})
    got = {}
    for n in (20_000, 80_000):
        x, group = planted_pool(n)
        store = RowView(VectorStore.from_array(x, tmp_path / f"x{n}.npy"))
        index = build_index(store, cfg, seed=0, work_dir=tmp_path / f"w{n}", self_graph=True)
        edges = knn_edges(index, QueryViews(x), k=64, threshold=0.6, view0_is_base=True, chunk=8192)
        rng = np.random.default_rng(1)
        in_groups = np.flatnonzero(np.isin(group, rng.choice(group.max() + 1, 80, replace=False)))
        nodes = np.union1d(in_groups, rng.choice(n, 200, replace=False))
        exact = exact_edges(store, nodes, x[nodes][:, None, :], 64, 0.6)
        got[n] = (index.params["nlist"], edge_recall(edges, exact, nodes))
        index.close()
        assert not list((tmp_path / f"w{n}").iterdir())  # the list and probe files are removed
    assert {n: (nlist, r["exact_edges"], r["found"], r["recall"]) for n, (nlist, r) in got.items()} == {
        20_000: (42, 2178, 2178, 1.0), 80_000: (165, 2448, 2447, 0.9996)}
    assert min(r["recall"] for _, r in got.values()) >= 0.95


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scan_finds_exactly_the_pairs_above_the_threshold(tmp_path, precision) -> None:
    """Pairs placed within 1e-4 of the threshold on both sides (well inside bf16's rounding): with every list probed,
    a bf16 scan reports exactly the fp32 (and brute-force) pairs, with exact cosines."""
    rng = np.random.default_rng(3)
    x = _unit(rng.standard_normal((600, 32)))
    near = _unit(rng.standard_normal((300, 32)))
    for i, t in enumerate(np.linspace(0.6 - 1e-4, 0.6 + 1e-4, 300)):  # near[i] . x[i] = t exactly (up to fp32)
        v = near[i] - (near[i] @ x[i]) * x[i]
        near[i] = t * x[i] + np.sqrt(1 - t * t) * v / np.linalg.norm(v)
    base = np.concatenate([x, near]).astype(np.float16).astype(np.float64)  # as stored (fp16 shards)
    s = base[:600] @ base.T
    base = base[np.r_[np.arange(600), 600 + np.flatnonzero(np.abs(s[np.arange(300), 600 + np.arange(300)] - 0.6) > 1e-6)]]
    s = base[:600] @ base.T  # exact; pairs within 1e-6 of the threshold (fp32 summation order) were dropped above
    cfg = IndexConfig(kind="ivf_blocks", nlist=8, nprobe=8, scan_precision=precision, balance=False)
    index = build_index(RowView(base.astype(np.float32)), cfg, seed=0, work_dir=tmp_path)
    rows, dst, sim = index.range_pairs(base[:600].astype(np.float32), 0.6)
    r_ref, d_ref = np.nonzero(s > 0.6)
    assert sorted(zip(rows.tolist(), dst.tolist(), strict=True)) == sorted(zip(r_ref.tolist(), d_ref.tolist(), strict=True))
    np.testing.assert_allclose(sim, s[rows, dst], atol=1e-6)
    near_pairs = np.abs(s[:, 600:] - 0.6) < BF16_MARGIN
    # 600 self pairs and 201 others above 0.6; 5 planted vectors dropped; 301 pairs closer to 0.6 than bf16's bound
    assert (len(r_ref), len(base), int(near_pairs.sum())) == (801, 895, 301)
    assert index.params["scan_precision"] == precision and BF16_MARGIN == 2.0**-7


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_knn_search_with_every_list_probed_is_exact(tmp_path, rng, precision) -> None:
    x, _group = planted_pool(3000, dim=32)
    q = _unit(x[rng.choice(3000, 200)] + 0.3 * _unit(rng.standard_normal((200, 32))))
    cfg = IndexConfig(kind="ivf_blocks", nlist=16, nprobe=16, scan_precision=precision)
    index = build_index(RowView(x), cfg, seed=0, work_dir=tmp_path)
    sims, ids = index.search(q, 5)
    ref_s, ref_i = exact_search(RowView(x), q, 5)
    assert ids.tolist() == ref_i.tolist()
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    few = build_index(RowView(x), cfg.model_copy(update={"nprobe": 2}), seed=0, work_dir=tmp_path / "few")
    _s, few_ids = few.search(q, 5)
    assert round(float(np.mean([len(set(a) & set(b)) for a, b in zip(few_ids, ref_i, strict=True)])) / 5, 4) == 0.725


def test_knn_search_over_more_lists_than_stay_resident_is_exact(tmp_path, rng) -> None:
    """Past RESIDENT_LISTS lists the search drops the list file's pages between lists; results stay exact."""
    x, _group = planted_pool(4000, dim=32)
    q = _unit(x[rng.choice(4000, 100)] + 0.3 * _unit(rng.standard_normal((100, 32))))
    cfg = IndexConfig(kind="ivf_blocks", nlist=2 * RESIDENT_LISTS + 5, probe_share=1.0)
    index = build_index(RowView(x), cfg, seed=0, work_dir=tmp_path)
    assert index.params["nprobe"] > RESIDENT_LISTS
    _s, ids = index.search(q, 5)
    assert ids.tolist() == exact_search(RowView(x), q, 5)[1].tolist()


def test_balance_splits_oversized_cells(rng) -> None:
    """Cells holding more than twice the mean share are split into cells of about the mean share; empty ones go."""
    x = np.concatenate([_unit(rng.standard_normal((900, 8)) * 0.05 + np.eye(8)[0]),  # one dense blob
                        _unit(rng.standard_normal((100, 8)))])  # fmt: skip
    centroids = _unit(np.stack([np.eye(8)[0], np.eye(8)[1], -np.eye(8)[0], np.eye(8)[2] * -1]))
    before = np.bincount((x @ centroids.T).argmax(1), minlength=4)
    after = balance(x, centroids, seed=0)
    sizes = np.bincount((x @ after.T).argmax(1), minlength=len(after))
    assert before.tolist() == [928, 19, 33, 20]  # mean share 250: the first cell is split into ceil(928 / 250)
    assert len(after) == 4 + 3 and sizes.max() <= 2 * len(x) / len(centroids) and sizes.min() > 0
