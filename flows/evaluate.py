"""Evaluate checkpoints on a configuration's benchmarks outside a pipeline run (``lvd evaluate``).

Any backbone side by side on the same benchmarks and protocols: this project's exports (safetensors with the
architecture in their metadata), official DINOv2 ``.pth`` state dicts (architecture inferred from the tensors) and
timm models with local weights. Results land in ``<root>/<eval_id>/`` and in the results table of ``<root>``, so
``lvd compare`` works between evaluations and pipeline runs alike.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow

from evaluation.features import FeatureModel, PixelModel
from evaluation.suite import EvalModel, classification_benchmarks, evaluate
from flows.models import feature_model
from infra.config import PipelineConfig, to_yaml
from infra.config.curation import BackboneConfig
from infra.config.evaluate import ModelEntry
from infra.stage import StageResult
from infra.storage import atomic_write_text

OFFICIAL_EVAL_SIZE = 224  # dinov2's eval transform crops 224 px; released checkpoints carry 518 px pos-embeds


def checkpoint_image_size(path: Path) -> int:
    """A project export's training size (from its metadata); official checkpoints are evaluated at 224 px."""
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        arch = json.loads(meta.get("lvd_backbone", "{}"))
        if "img_size" in arch:
            return int(arch["img_size"])
    return OFFICIAL_EVAL_SIZE


def parse_model_spec(spec: str) -> ModelEntry:
    """``NAME=PATH[,kind=vit|dinov2|timm][,arch=A][,image_size=N][,patch_size=P]``.

    Without ``kind``: ``.safetensors`` is a project export (vit), ``.pth`` an official DINOv2 state dict (dinov2).
    """
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--model {spec!r}: expected NAME=PATH[,key=value...]")
    path, *options = rest.split(",")
    opts: dict[str, Any] = dict(o.split("=", 1) for o in options if "=" in o)
    unknown = set(opts) - {"kind", "arch", "image_size", "patch_size"}
    if unknown or len(opts) != len(options):
        raise ValueError(f"--model {spec!r}: options are kind=, arch=, image_size=, patch_size= (got {options})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--model {name}: checkpoint {p} does not exist")
    kind = opts.get("kind") or ("vit" if p.suffix == ".safetensors" else "dinov2")
    size = int(opts["image_size"]) if "image_size" in opts else checkpoint_image_size(p) if kind != "timm" else 224
    backbone = BackboneConfig(kind=kind, arch=opts.get("arch", "vit_tiny" if kind != "timm" else ""), path=p,
                              image_size=size, patch_size=int(opts.get("patch_size", 14)))  # fmt: skip
    return ModelEntry(name=name, backbone=backbone)


def build_models(entries: list[ModelEntry], random_init: bool, raw_pixels: bool, seed: int = 0) -> list[EvalModel]:
    models = [EvalModel(feature_model(e.backbone, e.name), "model", str(e.backbone.path)) for e in entries]
    first = models[0].features if models else None
    if random_init and first is not None:
        # The first model's architecture, untrained: what pretraining added.
        arch = getattr(getattr(first, "model", None), "arch_kwargs", None)
        if arch is None:
            raise ValueError("--random-init needs a DINOv2-architecture first model (project or official checkpoint)")
        models.append(EvalModel(_random_like(arch, first.image_size, seed), "baseline"))
    if raw_pixels and first is not None:
        models.append(EvalModel(PixelModel(first.image_size, 14 if first.image_size % 14 == 0 else 4), "baseline"))
    return models


def _random_like(arch: dict[str, Any], image_size: int, seed: int) -> FeatureModel:
    import torch

    from evaluation.features import wrap
    from training.vision_transformer import DinoVisionTransformer

    # LayerScale off (1.0), as the flow's baseline (flows.models.random_init_model): at a checkpoint's 1e-5 every
    # image's class token would be the same to float precision. The position embeddings take the default init (an
    # export records the architecture, not how training initialised it).
    arch = {**arch, "init_values": None}
    torch.manual_seed(seed)
    spec = json.dumps(arch, sort_keys=True)
    return wrap(DinoVisionTransformer(**arch), "random-init", f"dinov2-arch:{spec}:random:seed={seed}", image_size)


def evaluation_id(cfg: PipelineConfig, models: list[EvalModel]) -> str:
    blob = json.dumps({"evaluate": cfg.evaluate.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                       "models": [m.features.fingerprint for m in models]}, sort_keys=True)  # fmt: skip
    return "eval-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def evaluate_checkpoints(cfg: PipelineConfig, entries: list[ModelEntry], root: Path, eval_id: str | None = None,
                         random_init: bool = False, raw_pixels: bool = False) -> tuple[Path, StageResult]:  # fmt: skip
    benchmarks = classification_benchmarks(cfg.data.eval_sets) + list(cfg.evaluate.benchmarks)
    if not benchmarks:
        raise ValueError("the configuration declares no benchmark (data.eval_sets or evaluate.benchmarks)")
    models = build_models(entries, random_init, raw_pixels, cfg.run.seed)
    eval_id = eval_id or evaluation_id(cfg, models)
    out = Path(root) / eval_id
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    cache = cfg.evaluate.cache_dir or Path(root) / ".cache" / "features"
    result = evaluate(benchmarks, models, cfg.evaluate, out, run_id=eval_id, cache_dir=cache, table_root=Path(root))
    return out, result


@flow(name="lvd-evaluate")
def evaluate_flow(config_yaml: str, model_specs: list[str], root: str, eval_id: str | None = None,
                  random_init: bool = False, raw_pixels: bool = False) -> str:  # fmt: skip
    """The same as ``lvd evaluate``, as a Prefect flow (for deployments)."""
    from infra.config import load_config

    cfg = load_config(Path(config_yaml), [])
    out, _ = evaluate_checkpoints(cfg, [parse_model_spec(s) for s in model_specs], Path(root), eval_id, random_init,
                                  raw_pixels)  # fmt: skip
    return str(out)


__all__ = ["evaluate_checkpoints", "evaluate_flow", "parse_model_spec"]
