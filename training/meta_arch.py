"""The DINOv2 self-supervised meta-architecture, framework-free (reference `SSLMetaArch`).

Per step: `teacher_targets` (teacher backbone on the 2B global crops; cls targets swapped between the two views;
patch targets at the student's masked positions; softmax centering or Sinkhorn-Knopp), `student_outputs` (global
and local crops through the student backbone in one packed forward, heads on cls tokens and masked patch tokens),
`loss_terms` (DINO local/global averaged over the 2 + 2 x n_local (teacher, student) pairs of different views,
KoLeo on the pre-head global cls tokens of each view, iBOT on masked patches), then, after the optimiser step,
`update_teacher` (EMA of backbone and heads). Modes (`train.mode`): "pretrain"/"highres" use the EMA teacher;
"distill" uses a frozen teacher loaded from a checkpoint and keeps an EMA of the student (`ema`) for export.

Deviation: masked patch tokens are gathered to exactly n_masked rows instead of the reference's zero-padded
`upperbound` buffer (same values; the padding only served static shapes for xFormers).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from infra.config.train import CollapseGuardConfig, StudentConfig, TrainConfig
from training.distributed import all_reduce_mean
from training.fsdp import ema_tensors
from training.layers import DINOHead
from training.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from training.param_groups import fuse_param_groups, param_group_entries
from training.registry import ARCH_OPTIONS, ARCHS, build_backbone


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Fail fast, naming every loss term that is NaN or infinite."""
    values = torch.stack([v.detach().float() for v in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = {k: float(v) for k, v in zip(terms, values.tolist(), strict=True) if not math.isfinite(v)}
    raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())} "
                             f"(all terms: {dict(zip(terms, values.tolist(), strict=True))}). Lower optim.base_lr, "
                             "check the data, or resume from the last checkpoint.")


class TeacherCollapseError(RuntimeError):
    pass


def check_collapse(stats: dict[str, torch.Tensor], step: int, guard: CollapseGuardConfig,
                   n_prototypes: int) -> str | None:
    """The collapse guard (`train.collapse_guard`): a message naming the value when the teacher's prototype usage
    entropy is below `min_proto_entropy` (from `start_step` on), else None; raises TeacherCollapseError instead when
    the action is "stop". `proto_entropy` is reduced over ranks, so every rank reaches the same verdict."""
    if guard.min_proto_entropy is None or step < guard.start_step:
        return None
    value = float(stats["proto_entropy"]) + 0.0  # + 0.0: one prototype gives -0.0, shown as 0.0000
    if value >= guard.min_proto_entropy:
        return None
    message = (f"teacher collapse at step {step}: prototype usage entropy proto_entropy={value:.4f} nats is below "
               f"train.collapse_guard.min_proto_entropy={guard.min_proto_entropy:g} (about {math.exp(value):.1f} of "
               f"the {n_prototypes} prototypes in use; uniform usage is log K = {math.log(n_prototypes):.3f}). "
               "Check the centering, the teacher temperature and momentum, and the learning rate.")
    if guard.action == "stop":
        raise TeacherCollapseError(message)
    return message


@dataclass
class TeacherOutput:
    dino_probs: torch.Tensor  # 2, B, K: targets for student view order (crop 1, crop 2), i.e. swapped teacher views
    ibot_probs: torch.Tensor | None  # M, K at the selected patches
    stats: dict[str, torch.Tensor]


def backbone_options(s: StudentConfig) -> dict[str, Any]:
    """The backbone's architectural options and initialisation as the student sets them (LayerScale, drop path and
    block chunks aside). A registry entry that fixes an option (e.g. registers, SwiGLU) keeps it unless the config
    sets that option explicitly; options the entry leaves open take the config's value (its default included)."""
    options = {k: getattr(s, k) for k in ARCH_OPTIONS if k in s.model_fields_set or k not in ARCHS.get(s.arch, {})}
    return {**options, "pos_embed_init_std": s.pos_embed_init_std}


def random_init_backbone(cfg: TrainConfig) -> nn.Module:
    """The student's backbone as training builds it (architecture and initialisation, position embeddings included)
    with LayerScale off (1.0): the random-init baseline. At the reference's 1e-5 every image's class token is the
    same to float precision and kNN sits at chance, which would flatter pretraining."""
    s = cfg.student
    return build_backbone(s.arch, s.patch_size, cfg.crops.global_crops_size, **backbone_options(s))


def build_student(cfg: TrainConfig) -> nn.ModuleDict:
    s = cfg.student
    distill = cfg.mode == "distill"
    backbone = build_backbone(
        s.arch, s.patch_size, cfg.crops.global_crops_size, drop_path_rate=0.0 if distill else s.drop_path_rate,
        drop_path_uniform=s.drop_path_uniform, init_values=s.layerscale, block_chunks=s.block_chunks,
        **backbone_options(s))
    backbone.activation_checkpointing = cfg.activation_checkpointing
    d, i = cfg.dino, cfg.ibot
    modules: dict[str, nn.Module] = {"backbone": backbone, "dino_head": DINOHead(
        backbone.embed_dim, d.head_n_prototypes, d.head_nlayers, d.head_hidden_dim, d.head_bottleneck_dim)}
    if i.loss_weight > 0 and i.separate_head:
        modules["ibot_head"] = DINOHead(backbone.embed_dim, i.head_n_prototypes, i.head_nlayers, i.head_hidden_dim,
                                        i.head_bottleneck_dim)
    return nn.ModuleDict(modules)


def frozen_copy(modules: nn.ModuleDict) -> nn.ModuleDict:
    out = copy.deepcopy(modules)
    for p in out.parameters():
        p.requires_grad = False
    for m in out.modules():  # a teacher never drops paths
        if hasattr(m, "sample_drop_ratio"):
            m.sample_drop_ratio = 0.0
    return out


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: TrainConfig, teacher: nn.ModuleDict | None = None):
        super().__init__()
        self.cfg = cfg
        self.distill = cfg.mode == "distill"
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.student = build_student(cfg)
        if self.distill:
            if teacher is None:
                raise ValueError("distill mode needs the frozen teacher modules")
            self.teacher = frozen_copy(teacher)
            self.ema = frozen_copy(self.student)
            self.student.backbone.mask_token.requires_grad = False  # no masking: unused
        else:
            self.teacher = frozen_copy(self.student)
        k_patch = self.student["ibot_head" if "ibot_head" in self.student else "dino_head"].last_layer.weight_g.shape[0]
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = IBOTPatchLoss(k_patch)
        self.koleo_loss = KoLeoLoss()
        # The backbones' last block computes only the rows the losses read (class tokens, iBOT's patches): the same
        # values for less work. False: every token through every block, as the reference (benchmarks count that).
        self.last_block_rows = True

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()
        if self.distill:
            self.ema.eval()
        return self

    # --- targets --------------------------------------------------------------------------------------------
    def patch_selection(self, batch: dict[str, Any], n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the patches that carry an iBOT loss and their weights (1 / patches of the image)."""
        if not self.distill:
            return batch["mask_indices_list"], batch["masks_weight"]
        n = batch["collated_global_crops"].shape[0] * n_patches  # distillation: every patch of both views
        device = batch["collated_global_crops"].device
        return torch.arange(n, device=device), torch.full((n,), 1.0 / n_patches, device=device)

    def _rows(self, sel: torch.Tensor) -> torch.Tensor | None:
        return sel if self.last_block_rows else None

    def read_patches(self, batch: dict[str, Any]) -> torch.Tensor:
        """Flat indices (into 2B x N patches of the global crops) of the patch tokens the losses read: iBOT's
        selection, or none. The backbones compute their last block only for these and the class tokens."""
        g = batch["collated_global_crops"]
        if not self.do_ibot:
            return torch.zeros(0, dtype=torch.long, device=g.device)
        p = self.cfg.student.patch_size
        return self.patch_selection(batch, (g.shape[-2] // p) * (g.shape[-1] // p))[0]

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], teacher_temp: float) -> TeacherOutput:
        sel = self.read_patches(batch)
        out = self.teacher.backbone(batch["collated_global_crops"], is_training=True, patch_rows=self._rows(sel))
        c1, c2 = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat((c2, c1))  # 2B, D: view-2 targets supervise the student's view 1 and vice versa
        patch_logits = None
        if self.do_ibot:
            masked = selected_patches(out, sel)  # M, D
            if "ibot_head" in self.teacher:
                cls_logits, patch_logits = self.teacher.dino_head(cls), self.teacher.ibot_head(masked)
            else:
                logits = self.teacher.dino_head(torch.cat((cls, masked)))
                cls_logits, patch_logits = logits[:len(cls)], logits[len(cls):]
        else:
            cls_logits = self.teacher.dino_head(cls)
        dino_probs, ibot_probs = self._normalise(cls_logits, patch_logits, teacher_temp)
        stats = _usage_stats(dino_probs)
        stats["n_masked_patches"] = torch.tensor(0 if patch_logits is None else patch_logits.shape[0])
        return TeacherOutput(dino_probs.view(2, -1, dino_probs.shape[-1]), ibot_probs, stats)

    def _normalise(self, cls_logits: torch.Tensor, patch_logits: torch.Tensor | None,
                   temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cfg.centering == "sinkhorn_knopp":
            dino = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, temp)
            ibot = None if patch_logits is None else self.ibot_patch_loss.sinkhorn_knopp_teacher(
                patch_logits, temp, n_masked_patches=patch_logits.shape[0])
            return dino, ibot
        dino = self.dino_loss.softmax_center_teacher(cls_logits, temp)
        self.dino_loss.update_center(cls_logits)
        ibot = None
        if patch_logits is not None:
            ibot = self.ibot_patch_loss.softmax_center_teacher(patch_logits, temp)
            self.ibot_patch_loss.update_center(patch_logits)
        return dino, ibot

    # --- student --------------------------------------------------------------------------------------------
    def student_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        g, loc = batch["collated_global_crops"], batch["collated_local_crops"]
        masks = None if self.distill else batch["collated_masks"]
        backbone, sel = self.student.backbone, self.read_patches(batch)
        keep, none = self._rows(sel), self._rows(sel[:0])
        if loc is not None and self.cfg.sequence_packing:
            gout, lout = backbone([g, loc], masks=[masks, None], patch_rows=None if keep is None else [keep, none],
                                  is_training=True)
        else:
            gout = backbone(g, masks=masks, patch_rows=keep, is_training=True)
            lout = backbone(loc, patch_rows=none, is_training=True) if loc is not None else None
        g_cls = gout["x_norm_clstoken"]  # 2B, D
        l_cls = lout["x_norm_clstoken"] if lout is not None else g_cls[:0]  # n_local * B, D
        rows = [l_cls, g_cls]
        masked = None
        if self.do_ibot:
            masked = selected_patches(gout, sel)  # M, D
            if "ibot_head" not in self.student:
                rows.append(masked)
        logits = self.student.dino_head(torch.cat(rows))  # one head call for all rows (reference: packed too)
        # split, not slices: the backward of a slice fills a zero tensor of the whole [rows, K] logits per slice
        parts = logits.split([len(r) for r in rows])
        out = {"local_logits": parts[0], "global_logits": parts[1], "global_cls": g_cls}
        if masked is not None:
            out["patch_logits"] = self.student.ibot_head(masked) if "ibot_head" in self.student else parts[2]
        return out

    # --- losses ---------------------------------------------------------------------------------------------
    def loss_terms(self, student: dict[str, torch.Tensor], teacher: TeacherOutput,
                   batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weighted terms whose sum is the training loss."""
        n_local = self.cfg.crops.local_crops_number if batch["collated_local_crops"] is not None else 0
        n_pairs = 2 + 2 * n_local  # (teacher, student) pairs of different views
        terms: dict[str, torch.Tensor] = {}
        w = self.cfg.dino.loss_weight
        if self.do_dino and n_local > 0:
            local = self.dino_loss(student["local_logits"].chunk(n_local), list(teacher.dino_probs.unbind(0)))
            terms["dino_local_crops_loss"] = w * local / n_pairs
        if self.do_dino:
            glob = self.dino_loss([student["global_logits"]], [teacher.dino_probs.flatten(0, 1)])
            terms["dino_global_crops_loss"] = w * glob * 2 / n_pairs
        if self.do_koleo:  # per view, per rank, on pre-head cls tokens (the paper says first view; code: both)
            terms["koleo_loss"] = self.cfg.dino.koleo_loss_weight * sum(
                self.koleo_loss(v) for v in student["global_cls"].chunk(2))
        if self.do_ibot:
            n_patches = batch["collated_masks"].shape[1]
            _, weights = self.patch_selection(batch, n_patches)
            terms["ibot_loss"] = self.cfg.ibot.loss_weight * self.ibot_patch_loss.forward_masked(
                student["patch_logits"], teacher.ibot_probs, weights, n_images=batch["collated_global_crops"].shape[0])
        return terms

    def forward_losses(self, batch: dict[str, Any], teacher_temp: float) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, torch.Tensor]]:
        teacher = self.teacher_targets(batch, teacher_temp)
        terms = self.loss_terms(self.student_outputs(batch), teacher, batch)
        return terms, teacher.stats

    # --- optimisation helpers -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        o = self.cfg.optim
        entries = []
        for name, module in self.student.items():
            entries += param_group_entries(module, o.layerwise_decay, o.patch_embed_lr_mult,
                                           is_backbone=name == "backbone")
        return fuse_param_groups(entries)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """target <- m * target + (1 - m) * student over backbone and heads; call after the optimiser step."""
        target = self.ema if self.distill else self.teacher
        for name, module in self.student.items():
            s, t = ema_tensors(module), ema_tensors(target[name])
            assert [x.shape for x in s] == [x.shape for x in t], f"student and teacher {name} differ"
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1 - momentum)

    def export_modules(self) -> nn.ModuleDict:
        """What a run releases: the EMA teacher (pretrain) or the EMA of the student (distill)."""
        return self.ema if self.distill else self.teacher


def selected_patches(out: dict[str, Any], sel: torch.Tensor) -> torch.Tensor:
    """[M, D]: the normalised patch tokens at the flat indices `sel` of a backbone's training output, computed
    selectively (`patch_rows`) or read from the full outputs."""
    if "x_norm_patchtokens_selected" in out:
        return out["x_norm_patchtokens_selected"]
    return out["x_norm_patchtokens"].flatten(0, 1).index_select(0, sel)


@torch.no_grad()
def _usage_stats(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse monitor: entropy (nats) of the mean teacher target over the global batch (prototype usage; 0
    under collapse to one prototype, log K when usage is uniform) and the mean per-sample target entropy."""
    p = probs.float()
    mean = all_reduce_mean(p.mean(dim=0))
    usage = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    per_sample = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()
    return {"proto_entropy": usage, "target_entropy": all_reduce_mean(per_sample)}
