"""The official dinov2 training step, assembled from the official modules of a local checkout (never vendored).

The official `SSLMetaArch` cannot be built without xFormers and CUDA (it imports xFormers at module level and moves
every batch with `.cuda()`), so this module rebuilds its `forward_backward` from the checkout's own pieces: the
backbones (`dinov2.models.vision_transformer.DinoVisionTransformer` with its `NestedTensorBlock` and
`MemEffAttention`), `dinov2.layers.DINOHead` (with `torch.nn.utils.weight_norm`), `dinov2.loss` (DINO, iBOT, KoLeo),
`dinov2.utils.param_groups` and AdamW as `dinov2/train/train.py` builds it (foreach, not fused). The order of
operations follows `SSLMetaArch.forward_backward` line by line; the only departures are the ones xFormers forces:
without it the student runs its global and local crops as two forwards (with it, one packed forward, as the
official code), and the head's inputs are concatenated with `torch.cat` (what `fmha.BlockDiagonalMask
.from_tensor_list` does to them). In a single process without a process group, the one unguarded all-reduce of the
official iBOT Sinkhorn-Knopp (its sample count) is the identity it would be in a group of one. The official gradient
clipping is FSDP's `clip_grad_norm_` per student module; outside FSDP that is `torch.nn.utils.clip_grad_norm_` per
module, and the teacher EMA is the official `_foreach_mul_` / `_foreach_add_` over the parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def _world_of_one() -> Iterator[None]:
    """The official iBOT Sinkhorn-Knopp all-reduces its sample count without checking for a process group (its other
    all-reduces check); in a single process an all-reduce is the identity, so it is one for the call."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    saved = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dist.all_reduce = saved


def import_official(root: Path) -> dict[str, Any]:
    """The official modules from the checkout at `root` (the folder holding the `dinov2` package)."""
    if not (root / "dinov2" / "models" / "vision_transformer.py").is_file():
        raise SystemExit(f"--official {root}: not a dinov2 checkout (no dinov2/models/vision_transformer.py there); "
                         "clone https://github.com/facebookresearch/dinov2 and pass its folder")
    sys.path.insert(0, str(root.resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "xFormers is not available": expected on a CPU host
        names = ("dinov2.models.vision_transformer", "dinov2.layers", "dinov2.layers.block", "dinov2.loss",
                 "dinov2.utils.param_groups")
        mods = {n: importlib.import_module(n) for n in names}
    loaded = Path(mods["dinov2.layers"].__file__).resolve()
    if root.resolve() not in loaded.parents:
        raise SystemExit(f"--official {root}: python imported dinov2 from {loaded} instead (an installed copy?)")
    return mods


class OfficialStep(nn.Module):
    """Student and teacher of `cfg` (a `TrainConfig`) built by the official code; `step(batch)` is one training
    iteration of `dinov2/train/train.py` (forward_backward, clipping, AdamW, EMA) with fixed schedule values."""

    def __init__(self, mods: dict[str, Any], cfg: Any, embed: dict[str, Any], lr: float = 1e-4, wd: float = 0.04):
        super().__init__()
        vits, layers, loss = mods["dinov2.models.vision_transformer"], mods["dinov2.layers"], mods["dinov2.loss"]
        self.cfg, self.xformers = cfg, mods["dinov2.layers.block"].XFORMERS_AVAILABLE
        s, c = cfg.student, cfg.crops
        kwargs = {"img_size": c.global_crops_size, "patch_size": s.patch_size, "init_values": s.layerscale,
                  "ffn_layer": s.ffn_layer, "block_chunks": s.block_chunks, "qkv_bias": s.qkv_bias,
                  "proj_bias": s.proj_bias, "ffn_bias": s.ffn_bias, "num_register_tokens": s.num_register_tokens,
                  "interpolate_offset": s.interpolate_offset, "interpolate_antialias": s.interpolate_antialias,
                  "block_fn": partial(vits.Block, attn_class=layers.MemEffAttention),
                  **{k: embed[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")}}
        d = cfg.dino
        head = partial(layers.DINOHead, in_dim=embed["embed_dim"], out_dim=d.head_n_prototypes,
                       hidden_dim=d.head_hidden_dim, bottleneck_dim=d.head_bottleneck_dim, nlayers=d.head_nlayers)
        self.student = nn.ModuleDict({"backbone": vits.DinoVisionTransformer(
            **kwargs, drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform), "dino_head": head()})
        self.teacher = nn.ModuleDict({"backbone": vits.DinoVisionTransformer(**kwargs), "dino_head": head()})
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss, self.ibot_patch_loss = loss.DINOLoss(d.head_n_prototypes), loss.iBOTPatchLoss(d.head_n_prototypes)
        self.koleo_loss = loss.KoLeoLoss()
        self.param_groups_module = mods["dinov2.utils.param_groups"]
        self.lr, self.wd = lr, wd
        self.optimizer: torch.optim.Optimizer | None = None

    def load_student(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Student and teacher from another implementation's student (the released key names are shared)."""
        for k, sd in state.items():
            self.student[k].load_state_dict(sd)
            self.teacher[k].load_state_dict(sd)

    def build_optimizer(self) -> None:
        """`SSLMetaArch.get_params_groups` + `train.build_optimizer` + `apply_optim_scheduler` at (lr, wd)."""
        pg, o = self.param_groups_module, self.cfg.optim
        groups = []
        for m in self.student.values():
            fused = pg.fuse_params_groups(pg.get_params_groups_with_decay(m, o.layerwise_decay, o.patch_embed_lr_mult))
            for g in fused:
                g["foreach"] = True
            groups += fused
        self.optimizer = torch.optim.AdamW(groups, betas=(o.adamw_beta1, o.adamw_beta2))
        for g in self.optimizer.param_groups:
            g["weight_decay"] = self.wd * g["wd_multiplier"]
            g["lr"] = self.lr * g["lr_multiplier"]  # last layer at the same lr (past the freeze)

    def train(self, mode: bool = True) -> OfficialStep:
        super().train(mode)
        self.teacher.eval()
        return self

    def step(self, batch: dict[str, Any], teacher_temp: float, momentum: float) -> dict[str, torch.Tensor]:
        """One iteration of the official training loop; returns the loss terms as they enter the loss sum."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.forward_losses(batch, teacher_temp)
        sum(terms.values()).backward()
        if self.cfg.optim.clip_grad:
            for v in self.student.values():
                nn.utils.clip_grad_norm_(v.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.update_teacher(momentum)
        return terms

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        s = [p for k in self.student for p in self.student[k].parameters()]
        t = [p for k in self.student for p in self.teacher[k].parameters()]
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1 - m)

    @torch.no_grad()
    def _teacher(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`get_teacher_output` for a shared DINO / iBOT head."""
        global_crops, mask_indices_list = batch["collated_global_crops"], batch["mask_indices_list"]
        n_masked_patches, upperbound = mask_indices_list.shape[0], batch["upperbound"]
        out = self.teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat((cls[1], cls[0]))
        patch = out["x_norm_patchtokens"]
        n_cls = cls.shape[0]
        buffer = patch.new_zeros(upperbound + n_cls, patch.shape[-1])
        buffer[:n_cls].copy_(cls)
        torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list,
                           out=buffer[n_cls:n_cls + n_masked_patches])
        tokens = self.teacher.dino_head(buffer)
        cls_after, patch_after = tokens[:n_cls], tokens[n_cls:n_cls + n_masked_patches]
        if self.cfg.centering == "centering":
            dino = self.dino_loss.softmax_center_teacher(cls_after, teacher_temp=teacher_temp).view(
                2, -1, *cls_after.shape[1:])
            self.dino_loss.update_center(cls_after)
            patch_after = patch_after.unsqueeze(0)
            ibot = self.ibot_patch_loss.softmax_center_teacher(patch_after[:, :n_masked_patches],
                                                               teacher_temp=teacher_temp).squeeze(0)
            self.ibot_patch_loss.update_center(patch_after[:n_masked_patches])
        else:
            dino = self.dino_loss.sinkhorn_knopp_teacher(cls_after, teacher_temp=teacher_temp).view(
                2, -1, *cls_after.shape[1:])
            ibot = self._ibot_sinkhorn(patch_after, teacher_temp, batch["n_masked_patches"])
        return dino, ibot

    def _ibot_sinkhorn(self, logits: torch.Tensor, temp: float, n_masked: torch.Tensor) -> torch.Tensor:
        with _world_of_one():
            return self.ibot_patch_loss.sinkhorn_knopp_teacher(logits, teacher_temp=temp,
                                                               n_masked_patches_tensor=n_masked.clone())

    def forward_losses(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """`SSLMetaArch.forward_backward` up to the backward (shared head, two global crops, local crops)."""
        global_crops, local_crops, masks = (batch[k] for k in ("collated_global_crops", "collated_local_crops",
                                                               "collated_masks"))
        mask_indices_list, masks_weight = batch["mask_indices_list"], batch["masks_weight"]
        n_masked_patches, upperbound = mask_indices_list.shape[0], batch["upperbound"]
        n_local = self.cfg.crops.local_crops_number
        n_terms = max(n_local * 2, 1) + 2
        dino_targets, ibot_targets = self._teacher(batch, teacher_temp)
        if self.xformers:
            g_out, l_out = self.student.backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
        else:
            g_out = self.student.backbone(global_crops, masks=masks, is_training=True)
            l_out = self.student.backbone(local_crops, is_training=True)
        g_cls = g_out["x_norm_clstoken"]
        patch = g_out["x_norm_patchtokens"]
        buffer = patch.new_zeros(upperbound, patch.shape[-1])
        buffer[:n_masked_patches].copy_(torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list))
        inputs = [l_out["x_norm_clstoken"], g_cls, buffer]
        outputs = self.student.dino_head(torch.cat(inputs)).split([len(x) for x in inputs])
        local_after, global_after, patch_after = outputs[0], outputs[1], outputs[2][:n_masked_patches]
        w = self.cfg.dino.loss_weight
        terms = {"dino_local_crops_loss": w * self.dino_loss(local_after.chunk(n_local), dino_targets) / n_terms,
                 "dino_global_crops_loss": w * self.dino_loss([global_after], [dino_targets.flatten(0, 1)]) * 2
                 / n_terms,
                 "koleo_loss": self.cfg.dino.koleo_loss_weight * sum(self.koleo_loss(p) for p in g_cls.chunk(2))}
        ibot = self.ibot_patch_loss.forward_masked(patch_after, ibot_targets, student_masks_flat=masks,
                                                   n_masked_patches=n_masked_patches, masks_weight=masks_weight)
        terms["ibot_loss"] = self.cfg.ibot.loss_weight * ibot * 2 * 0.5
        return terms
