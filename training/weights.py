"""Initialising a run from pretrained weights (highres finishing stage, fine-tuned continuations).

Accepts a project bundle (`teacher_checkpoint.safetensors`: backbone + heads), a backbone export, or an official
DINOv2 `.pth`. The backbone (and heads when present and of matching shape) are loaded into the student, and the
teacher is reset to a copy of the student. A positional embedding of another grid (e.g. 224 px weights for a
518 px stage) is resampled bicubically to the new grid.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from training.checkpoint import load_official_state_dict, read_backbone_state, read_safetensors

log = logging.getLogger(__name__)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + M*M, D] -> [1, 1 + grid*grid, D] (bicubic, fp32, cls position kept)."""
    m = round(math.sqrt(pos_embed.shape[1] - 1))
    if m == grid:
        return pos_embed
    d = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=grid < m)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


def init_from_pretrained(meta, path: Path) -> None:  # meta: SSLMetaArch (import cycle otherwise)
    path = Path(path)
    state, _ = read_backbone_state(path)
    backbone = meta.student.backbone
    grid = backbone.patch_embed.patches_resolution[0]
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid)
    load_official_state_dict(backbone, state, strict=True)
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path)
        for head in ("dino_head", "ibot_head"):
            sub = {k[len(head) + 1:]: v for k, v in tensors.items() if k.startswith(head + ".")}
            if sub and head in meta.student:
                own = meta.student[head].state_dict()
                if all(k in sub and sub[k].shape == v.shape for k, v in own.items()):
                    meta.student[head].load_state_dict(sub, strict=True)
                else:
                    log.warning("%s in %s does not match the configured head; it starts from scratch", head, path)
    (meta.ema if meta.distill else meta.teacher).load_state_dict(meta.student.state_dict(), strict=True)
    log.info("initialised student and teacher from %s", path)
