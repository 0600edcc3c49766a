"""Initialising a run from pretrained weights (highres finishing stage, continued pretraining, fine-tuned
continuations).

Accepts whatever `training.checkpoint.read_checkpoint` reads: a project bundle (`teacher_checkpoint.safetensors`:
backbone + heads), a backbone export, an official DINOv2 checkpoint (a released `.pth`, or a training run's
`teacher_checkpoint.pth` / `{"model": ...}` checkpoint with its DINO and iBOT heads, block chunks or not), a
transformers folder or a timm state dict. The backbone (and the heads when present and of matching shape) are
loaded into the student, and the teacher is reset to a copy of the student. A positional embedding of another grid
(e.g. 224 px weights for a 518 px stage) is resampled bicubically to the new grid.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from training.checkpoint import load_official_state_dict, read_checkpoint

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
    ck = read_checkpoint(path)
    state = dict(ck.backbone)
    backbone = meta.student.backbone
    grid = backbone.patch_embed.patches_resolution[0]
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid)
    load_official_state_dict(backbone, state, strict=True)
    for head, sub in ck.heads.items():
        if head not in meta.student:
            log.warning("%s in %s is not used (this run has no separate %s)", head, path, head)
            continue
        own = meta.student[head].state_dict()
        if set(sub) == set(own) and all(sub[k].shape == v.shape for k, v in own.items()):
            meta.student[head].load_state_dict(sub, strict=True)
        else:
            log.warning("%s in %s does not match the configured head; it starts from scratch", head, path)
    missing = [h for h in meta.student if h != "backbone" and h not in ck.heads]
    if missing:
        log.info("%s: no %s in %s; initialised from scratch", path.name, ", ".join(missing), path)
    (meta.ema if meta.distill else meta.teacher).load_state_dict(meta.student.state_dict(), strict=True)
    log.info("initialised student and teacher from %s (%s layout)", path, ck.layout)
