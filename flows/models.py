"""Backbones for embedding and evaluation, built from configuration (flows may import every package)."""

from __future__ import annotations

from pathlib import Path

import torch

from infra.config.curation import BackboneConfig
from infra.features import Embedder


def build_model(cfg: BackboneConfig, seed: int = 0) -> torch.nn.Module:
    """A backbone whose ``forward`` returns the (normalised) global embedding."""
    torch.manual_seed(seed)
    if cfg.kind == "timm":
        import timm

        # Any timm architecture; the weights come from a local file (no hub access), classifier head removed.
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
        if cfg.path is not None:
            # Classifier weights in the file are ignored (num_classes=0); every backbone weight must be there.
            missing, _ = model.load_state_dict(_load_state_dict(cfg.path), strict=False)
            if missing:
                raise ValueError(f"{cfg.path}: weights missing for {cfg.arch}: {missing[:5]} ...")
        return model
    from training.checkpoint import load_backbone
    from training.registry import build_backbone

    if cfg.path is not None:
        # Project exports (.safetensors with the architecture in the metadata) and official DINOv2
        # `dinov2_vit*14*_pretrain.pth` state dicts (architecture inferred from the shapes, heads from `arch`).
        return load_backbone(cfg.path, arch=cfg.arch, patch_size=cfg.patch_size)
    if cfg.kind == "dinov2":
        raise ValueError("embed.backbone.kind=dinov2 needs embed.backbone.path (an official DINOv2 checkpoint)")
    return build_backbone(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.image_size)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def embedder(cfg: BackboneConfig, name: str, batch_size: int, precision: str, seed: int = 0) -> Embedder:
    return Embedder(build_model(cfg, seed), cfg.image_size, name, batch_size=batch_size, precision=precision)
