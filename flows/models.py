"""Backbones for embedding and evaluation, built from configuration (flows may import every package)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from infra.config import PipelineConfig
from infra.config.curation import BackboneConfig
from infra.config.train import TrainConfig
from infra.features import Embedder

if TYPE_CHECKING:
    from evaluation.features import FeatureModel
    from evaluation.suite import EvalModel


def build_model(cfg: BackboneConfig, seed: int = 0) -> torch.nn.Module:
    """A backbone whose ``forward`` returns the (normalised) global embedding."""
    torch.manual_seed(seed)
    if cfg.kind == "dinov3" or (cfg.kind == "timm" and "dinov3" in cfg.arch and cfg.path is not None):
        from curation.models.dinov3 import load_dinov3  # (timm's DINOv3 models: the class token, as released)

        return load_dinov3(cfg.path)
    if cfg.kind == "timm":
        return _timm_model(cfg)
    from training.checkpoint import load_backbone
    from training.registry import build_backbone

    interpolation = {k: v for k in ("interpolate_offset", "interpolate_antialias") if (v := getattr(cfg, k)) is not None}
    if cfg.path is not None:
        # The file knows its architecture: project exports record it, official `.pth` state dicts are inferred
        # from tensor shapes (config defaults such as patch_size must not override a checkpoint's own).
        pin = cfg.arch if cfg.kind == "vit" and Path(cfg.path).suffix == ".pth" else None
        return load_backbone(cfg.path, arch=pin, **interpolation)
    if cfg.kind == "dinov2":
        raise ValueError("backbone.kind=dinov2 needs backbone.path (an official DINOv2 checkpoint)")
    return build_backbone(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.image_size, **interpolation)


def _timm_model(cfg: BackboneConfig) -> torch.nn.Module:
    """A timm model with local weights (no hub access); ViTs accept any input size (pos-embed interpolated)."""
    import timm

    try:
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # not a ViT: no dynamic_img_size argument
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    if cfg.path is not None:
        state = _load_state_dict(cfg.path)
        head = model.pretrained_cfg.get("classifier")
        heads = head if isinstance(head, list | tuple) else [head] if head else []
        state = {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}  # num_classes=0
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{cfg.path}: weights missing for {cfg.arch}: {missing[:5]}; unexpected: {unexpected[:5]}")
    return model


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from infra.hub import folder_weights, load_state

    # a hub folder as timm publishes models (config.json + model.safetensors), or a weights file
    return folder_weights(Path(path)) if Path(path).is_dir() else load_state(Path(path))


def embedder(cfg: BackboneConfig, name: str, batch_size: int, precision: str, seed: int = 0) -> Embedder:
    return Embedder(build_model(cfg, seed), cfg.image_size, name, batch_size=batch_size, precision=precision)


def feature_model(cfg: BackboneConfig, name: str, seed: int = 0) -> FeatureModel:
    """A backbone wrapped for evaluation, with the fingerprint its cached features are keyed on (and the results
    record): the checkpoint's bytes (a transformers folder's weights and config) and the position-embedding resizing
    a DINOv2 backbone uses."""
    from evaluation.features import file_sha256, fingerprint, wrap
    from infra.hub import weights_path

    model = build_model(cfg, seed)
    folder = cfg.path is not None and Path(cfg.path).is_dir()
    path = weights_path(Path(cfg.path)) if folder else cfg.path
    fp = fingerprint(cfg.kind, cfg.arch, path, seed, patch_size=cfg.patch_size, image_size=cfg.image_size)
    if folder:
        fp += f":config={file_sha256(Path(cfg.path).resolve() / 'config.json')}"
    if hasattr(model, "interpolate_offset"):
        fp += f":interpolate_offset={model.interpolate_offset:g}:interpolate_antialias={model.interpolate_antialias}"
    return wrap(model, name, fp, cfg.image_size)


def random_init_model(train: TrainConfig, seed: int = 0) -> FeatureModel:
    """The random-init baseline (`training.meta_arch.random_init_backbone`) wrapped for evaluation."""
    from evaluation.features import fingerprint, wrap
    from training.meta_arch import backbone_options, random_init_backbone

    s, size = train.student, train.crops.global_crops_size
    torch.manual_seed(seed)
    return wrap(random_init_backbone(train), "random-init", fingerprint(
        "vit", s.arch, None, seed, patch_size=s.patch_size, image_size=size, **backbone_options(s)), size)


def evaluation_models(cfg: PipelineConfig, teacher: Path, train: TrainConfig | None = None) -> list[EvalModel]:
    """The run's pretrained teacher, its baselines (same architecture at random init, raw pixels) and the
    configured reference checkpoints, in the order the report shows them. `train`: the configuration of the training
    stage that exported `teacher` (default `cfg.train`; a distilled student or a high-resolution stage differ)."""
    from evaluation.features import PixelModel
    from evaluation.suite import EvalModel

    train = train or cfg.train
    student = train.student
    arch = BackboneConfig(kind="vit", arch=student.arch, patch_size=student.patch_size,
                          image_size=train.crops.global_crops_size)  # fmt: skip
    models = [EvalModel(feature_model(arch.model_copy(update={"path": teacher}), "pretrained"), "pretrained", str(teacher))]
    if cfg.evaluate.random_init_baseline:
        models.append(EvalModel(random_init_model(train, cfg.run.seed), "baseline"))
    if cfg.evaluate.raw_pixel_baseline:
        # At most ~32 px: raw pixels of a 224 px image would make 150k-dim linear probes (x 13 lrs x classes).
        p = student.patch_size
        models.append(EvalModel(PixelModel(min(arch.image_size, max(p, 32 // p * p)), p), "baseline"))
    for ref in cfg.evaluate.models:
        models.append(EvalModel(feature_model(ref.backbone, ref.name), "reference", str(ref.backbone.path or "")))
    return models
