"""Evaluate checkpoints on a configuration's benchmarks outside a pipeline run (``lvd evaluate``).

Any backbone side by side on the same benchmarks and protocols: this project's exports (safetensors with the
architecture in their metadata), official DINOv2 ``.pth`` state dicts (architecture inferred from the tensors) and
timm models with local weights. Results land in ``<root>/<eval_id>/`` and in the results table of ``<root>``, so
``lvd compare`` works between evaluations and pipeline runs alike.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from prefect import flow

from curation.models.dinov3 import is_dinov3
from evaluation.features import FeatureModel, PixelModel
from evaluation.suite import EvalModel, classification_benchmarks, evaluate
from flows.models import feature_model
from infra import run_lock
from infra.config import ConfigError, PipelineConfig, to_yaml
from infra.config.curation import BackboneConfig
from infra.config.evaluate import ModelEntry
from infra.stage import StageResult
from infra.storage import atomic_write_text

OFFICIAL_EVAL_SIZE = 224  # dinov2's eval transform crops 224 px; released checkpoints carry 518 px pos-embeds
RELEASED_SIZE = 518  # the released checkpoints' position-embedding grid: 37 x 37 patches of 14 px
SPEC_OPTIONS = ("kind", "arch", "image_size", "patch_size", "interpolate_offset", "interpolate_antialias")


def checkpoint_image_size(path: Path, name: str = "NAME") -> int:
    """The resolution a checkpoint records (project exports, the sidecar of a `.pth` export, a transformers folder's
    processor); a released official checkpoint (518 px grid) is evaluated at 224 px as dinov2's eval does. Anything
    else is refused rather than guessed: a plain state dict does not say at which size it was trained."""
    from training.checkpoint import read_checkpoint, recorded_image_size

    size = recorded_image_size(path)
    if size is not None:
        return size
    state = read_checkpoint(path).backbone
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)  # official layout: 1 + grid x grid
    if (released := released_eval_size(grid * patch)) is not None:
        return released
    raise ConfigError([f"--model {name}: {path} records no training resolution (a plain state dict; lvd's .pth "
                       f"exports carry it in {path.name}.json beside them). Its position embeddings hold {grid} x "
                       f"{grid} patches of {patch} px ({grid * patch} px), which need not be the size to evaluate at: "
                       f"give it, e.g. --model {name}={path},image_size={grid * patch}"], source="--model")


def released_eval_size(grid_px: int) -> int | None:
    """224 px for a checkpoint whose position embeddings cover the released 518 px grid (dinov2 evaluates those at
    224), else None."""
    return OFFICIAL_EVAL_SIZE if grid_px == RELEASED_SIZE else None


def parse_model_spec(spec: str) -> ModelEntry:
    """``NAME=PATH[,kind=vit|dinov2|dinov3|timm][,arch=A][,image_size=N][,patch_size=P][,interpolate_offset=F]
    [,interpolate_antialias=true|false]``.

    Without ``kind``: DINOv3 weights in any layout (:mod:`curation.models.dinov3`) are ``dinov3`` (224 px unless
    ``image_size`` says otherwise); else ``.safetensors`` is a project export (vit), anything else (an official
    ``.pth``, a transformers folder, a timm state dict) a DINOv2 checkpoint (dinov2).
    """
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ConfigError([f"--model {spec!r}: expected NAME=PATH[,key=value...]"], "lvd evaluate's arguments",
                          "are invalid")
    path, *options = rest.split(",")
    opts: dict[str, Any] = dict(o.split("=", 1) for o in options if "=" in o)
    unknown = set(opts) - set(SPEC_OPTIONS)
    if unknown or len(opts) != len(options):
        raise ConfigError([f"--model {spec!r}: options are {', '.join(f'{o}=' for o in SPEC_OPTIONS)} (got {options})"],
                          "lvd evaluate's arguments", "are invalid")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--model {name}: checkpoint {p} does not exist")
    kind = opts.get("kind") or ("dinov3" if is_dinov3(p) else "vit" if p.suffix == ".safetensors" else "dinov2")
    size = (int(opts["image_size"]) if "image_size" in opts else
            checkpoint_image_size(p, name) if kind in ("vit", "dinov2") else 224)  # fmt: skip
    interpolation = {k: opts[k] for k in ("interpolate_offset", "interpolate_antialias") if k in opts}
    if "interpolate_antialias" in interpolation:
        interpolation["interpolate_antialias"] = _flag(interpolation["interpolate_antialias"], spec)
    backbone = BackboneConfig(kind=kind, arch=opts.get("arch", "vit_tiny" if kind != "timm" else ""), path=p,
                              image_size=size, patch_size=int(opts.get("patch_size", 14)), **interpolation)  # fmt: skip
    return ModelEntry(name=name, backbone=backbone)


def _flag(text: str, spec: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ConfigError([f"--model {spec!r}: interpolate_antialias is true or false, not {text!r}"],
                      "lvd evaluate's arguments", "are invalid")


def build_models(entries: list[ModelEntry], random_init: bool, raw_pixels: bool, seed: int = 0) -> list[EvalModel]:
    models = [EvalModel(feature_model(e.backbone, e.name), "model", str(e.backbone.path)) for e in entries]
    first = models[0].features if models else None
    if random_init and first is not None:
        # The first model's architecture, untrained: what pretraining added.
        arch = getattr(getattr(first, "model", None), "arch_kwargs", None)
        if arch is None:
            raise ConfigError(["--random-init needs a DINOv2-architecture first model (project or official checkpoint)"],
                              "lvd evaluate's arguments", "are invalid")
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
        raise ConfigError(["data.eval_sets / evaluate.benchmarks: both empty; give an evaluation set or a benchmark"],
                          "configuration", "has nothing to evaluate on")
    models = build_models(entries, random_init, raw_pixels, cfg.run.seed)
    eval_id = eval_id or evaluation_id(cfg, models)
    out = Path(root) / eval_id
    with run_lock.writing(out, "lvd evaluate", what="evaluation", create=True):  # the same evaluation started twice: one writes
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
