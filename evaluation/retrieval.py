"""Instance retrieval mAP in the revisited Oxford/Paris protocol (Radenović et al., CVPR 2018).

Every database image is ranked by cosine similarity to each query. Per query the ground truth lists ``easy``,
``hard`` and ``junk`` database indices; the three setups differ in what counts as positive and what is ignored:

- Easy: positives = easy; ignored = junk + hard;
- Medium: positives = easy + hard; ignored = junk;
- Hard: positives = hard; ignored = junk + easy.

Ignored images are removed from the ranking; queries without positives are skipped. AP is the revisitop one: the
precision-recall curve integrated with the trapezoidal rule, with precision 1 before the first retrieved image.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

SETUPS = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)), "hard": (("hard",), ("junk", "easy"))}


def average_precision(ranks: Sequence[int], n_positives: int) -> float:
    """AP from the 0-based ranks (after removing ignored images) of the retrieved positives, in increasing order."""
    ap, step = 0.0, 1.0 / n_positives
    for j, rank in enumerate(ranks):
        precision_before = 1.0 if rank == 0 else j / rank  # precision just before this positive
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) * step / 2
    return ap


def positive_ranks(order: np.ndarray, positives: set[int], ignored: set[int]) -> list[int]:
    """Ranks of the positives in ``order`` (database indices, best first) once ignored images are dropped."""
    ranks, r = [], 0
    for idx in order.tolist():
        if idx in ignored:
            continue
        if idx in positives:
            ranks.append(r)
        r += 1
    return ranks


def revisited_map(similarity: np.ndarray, gnd: Sequence[dict[str, Any]]) -> dict[str, float]:
    """mAP (%) for Easy / Medium / Hard from a (n_queries, n_database) similarity matrix and per-query lists."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    out = {}
    for setup, (pos_keys, ign_keys) in SETUPS.items():
        aps = []
        for q, g in enumerate(gnd):
            positives = {int(i) for k in pos_keys for i in g.get(k, [])}
            if not positives:
                continue
            ignored = {int(i) for k in ign_keys for i in g.get(k, [])} - positives
            aps.append(average_precision(positive_ranks(order[q], positives, ignored), len(positives)))
        out[f"map_{setup}"] = float(np.mean(aps) * 100) if aps else float("nan")
    return out


@dataclass
class RevisitedGroundTruth:
    imlist: list[str]  # database image names (no extension)
    qimlist: list[str]  # query image names
    gnd: list[dict[str, Any]]  # per query: bbx (x1, y1, x2, y2), easy, hard, junk (database indices)


class _NumpyOnly(pickle.Unpickler):
    """revisitop's gnd_*.pkl holds lists, dicts and numpy arrays: refuse every other global (no code runs)."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a ground-truth file")
        return super().find_class(module, name)


def load_revisited_gnd(path: Path) -> RevisitedGroundTruth:
    """``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (revisitop), or a JSON file with the same keys."""
    path = Path(path)
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        with open(path, "rb") as f:
            raw = _NumpyOnly(f).load()
    missing = {"imlist", "qimlist", "gnd"} - set(raw)
    if missing:
        raise ValueError(f"{path}: not a revisited ground-truth file (missing {sorted(missing)})")
    gnd = [{k: np.asarray(v).tolist() for k, v in g.items()} for g in raw["gnd"]]
    if len(gnd) != len(raw["qimlist"]):
        raise ValueError(f"{path}: {len(gnd)} ground-truth entries for {len(raw['qimlist'])} queries")
    return RevisitedGroundTruth(list(raw["imlist"]), list(raw["qimlist"]), gnd)
