"""The model card (`README.md` of an export folder, the hub's format): what the model is, how to load it, the data it
was trained on (run id, corpus composition), the recipe, and the run's evaluation table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

FRONT_MATTER = """---
library_name: transformers
pipeline_tag: image-feature-extraction
tags:
- dinov2
- self-supervised
- lvd
---
"""


@dataclass
class CardInputs:
    run_id: str
    stage: str
    arch: dict[str, Any]
    usage: str  # the Python that loads the export
    recipe: dict[str, Any] = field(default_factory=dict)  # label -> value, in order
    composition: Sequence[Mapping[str, Any]] = ()  # corpus rows: dataset, images, retrieval, retrieved, final
    results: pd.DataFrame | None = None  # benchmark, protocol, model, metric, value
    evaluation_note: str | None = None  # why there is no table (not evaluated, another stage evaluated)
    notes: Sequence[str] = ()


def model_card(c: CardInputs) -> str:
    a = c.arch
    parts = [FRONT_MATTER, f"# {c.run_id}: {c.stage} ({describe(a)})\n",
             f"A DINOv2 backbone trained with lvd from a curated corpus: run `{c.run_id}`, stage `{c.stage}`.\n",
             "## Use\n", f"```python\n{c.usage}\n```\n", _io(a), *[f"> {n}\n" for n in c.notes],
             "## Data\n", _composition(c.composition), "## Recipe\n",
             _table(["", ""], [(k, _cell(v, ".3g") if isinstance(v, float) else _cell(v)) for k, v in c.recipe.items()]),
             "## Evaluation\n", _evaluation(c)]
    return "\n".join(parts)


def describe(a: Mapping[str, Any]) -> str:
    regs = a.get("num_register_tokens", 0)
    return (f"ViT {a['embed_dim']}-dim x {a['depth']} blocks x {a['num_heads']} heads, patch {a['patch_size']}, "
            f"{a['img_size']} px" + (f", {regs} registers" if regs else "")
            + (", SwiGLU" if a.get("ffn_layer", "mlp").startswith("swiglu") else ""))


def _io(a: Mapping[str, Any]) -> str:
    s, r = a["img_size"], a.get("num_register_tokens", 0)
    return (f"Input: RGB, shorter side resized to {s} px (bicubic), centre crop {s} x {s}, ImageNet mean and std "
            f"(`preprocessor_config.json`; `AutoImageProcessor.from_pretrained(folder, backend=\"pil\")` gives the "
            f"pixels lvd evaluated with). Output: `last_hidden_state[:, 0]` is the class token, "
            f"`last_hidden_state[:, {1 + r}:]` the patch tokens" + (f" (after {r} registers)" if r else "") + ". "
            f"Position embeddings: offset {a['interpolate_offset']:g}, antialias {bool(a['interpolate_antialias'])}.\n")


def _composition(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "Corpus composition: not recorded.\n"
    cols = ["dataset", "images", "retrieval", "retrieved", "final"]
    body = [[_cell(r.get(c)) for c in cols] for r in rows]
    totals = [r for r in rows if r.get("dataset") == "total"]
    total = int(totals[0]["final"]) if totals else sum(int(r.get("final") or 0) for r in rows)
    return _table(cols, body) + f"\n{total:,} images in the corpus.\n"


def _evaluation(c: CardInputs) -> str:
    if c.results is None or c.results.empty:
        return (c.evaluation_note or "Not evaluated.") + "\n"
    models = list(dict.fromkeys(c.results["model"]))
    keys = list(dict.fromkeys(zip(c.results["benchmark"], c.results["protocol"], c.results["metric"], strict=True)))
    values = {(b, p, m, model): v for b, p, m, model, v in
              c.results[["benchmark", "protocol", "metric", "model", "value"]].itertuples(index=False)}
    rows = [[*key, *(_cell(values.get((*key, m)), ".2f") for m in models)] for key in keys]  # the run's order (k10, k20..)
    return _table(["benchmark", "protocol", "metric", *models], rows)


def _cell(value: Any, fmt: str = ",.0f") -> str:
    """Numbers as numbers (a count without `.0`), a missing value as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if fmt == ",.0f" and float(value) != int(value):
        return f"{value:.3g}"
    return format(value, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
