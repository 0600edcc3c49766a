"""Thin Lightning wiring around the framework-free `SSLMetaArch`: schedules, the optimiser step, EMA, logging.

Manual optimisation: per step, set lr / wd from the schedules, compute the loss terms, fail fast on a non-finite
term, apply the collapse guard (`train.collapse_guard`), backward (for each of `train.accumulate_grad_batches`
micro-batches, the loss divided by their number), clip each student submodule, AdamW step, then the EMA teacher
update *after* the step. Each step reseeds the model's RNG from (seed, step, rank) and checks that the
batch belongs to this step, which together with the deterministic data stream makes a resumed run continue exactly
like an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

from infra.config.train import TrainConfig
from training.data import BatchStream, ImageSource, MaskingGenerator, MultiCropAugmentation, collate_data_and_cast
from training.distributed import all_reduce_mean
from training.fsdp import clip_grad_norm, wrap_fsdp
from training.meta_arch import SSLMetaArch, check_collapse, check_finite
from training.param_groups import apply_optim_schedule
from training.schedules import Derived, Schedules, derive
from training.seeding import reseed
from training.strategy import PRECISION, compute_precision

log = logging.getLogger(__name__)
STEP_SEED_SALT = 0x57E9  # model randomness of step s on rank r: reseed(seed, s, r, STEP_SEED_SALT)


class DinoV2Module(L.LightningModule):
    def __init__(self, cfg: TrainConfig, seed: int = 0, teacher: nn.ModuleDict | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.seed = seed
        torch.manual_seed(seed)  # identical initialisation on every rank
        self.meta = SSLMetaArch(cfg, teacher)
        self.derived: Derived | None = None
        self.schedules: Schedules | None = None
        self.last_record: dict[str, float] = {}
        self.collapsed = False  # below the collapse guard's threshold at the last step

    def setup(self, stage: str) -> None:
        self.derived = derive(self.cfg, self.trainer.world_size)
        self.schedules = Schedules(self.cfg, self.derived)

    def configure_model(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            groups = {"student": self.meta.student, "teacher": self.meta.teacher}
            if self.meta.distill:
                groups["ema"] = self.meta.ema
            device = self.trainer.strategy.root_device
            precision = compute_precision(self.cfg, device.type)  # resolved as for the trainer's flag
            assert PRECISION[precision] == self.trainer.precision, (precision, self.trainer.precision)
            wrap_fsdp(groups, self.cfg, device, precision, devices_per_node=self.trainer.num_devices)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        fused = all(p.device.type in ("cpu", "cuda") for p in self.meta.student.parameters())
        return torch.optim.AdamW(self.meta.param_groups(), lr=0.0, betas=(o.adamw_beta1, o.adamw_beta2),
                                 fused=fused or None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        step = self.global_step
        if int(batch["step"]) != step:
            raise RuntimeError(f"data stream out of step: batch for step {batch['step']} at step {step}")
        t0 = time.perf_counter()
        reseed(self.seed, step, self.global_rank, STEP_SEED_SALT)
        v = self.schedules.at(step)
        opt = self.optimizers()
        apply_optim_schedule(opt.optimizer, v.lr, v.wd, v.last_layer_lr)
        micro = batch.get("micro_batches") or [batch]
        reduced_sum, stats_sum = None, {}
        for j, mb in enumerate(micro):
            terms, stats = self.meta.forward_losses(mb, v.teacher_temp)
            names = list(terms)
            reduced = all_reduce_mean(torch.stack([terms[k].detach().float() for k in names]))
            check_finite(dict(zip(names, reduced, strict=True)), step)  # same verdict on every rank
            self._guard_collapse(stats, step)
            with self._sync_gradients(j == len(micro) - 1):  # DDP all-reduces once, in the step's last backward
                self.manual_backward(sum(terms.values()) / len(micro))
            reduced_sum = reduced if reduced_sum is None else reduced_sum + reduced
            stats_sum = {k: t.detach().float() + stats_sum.get(k, 0.0) for k, t in stats.items()}
        reduced = reduced_sum / len(micro)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16: clip unscaled gradients
            scaler.unscale_(opt.optimizer)
        norms = {f"grad_norm_{k}": clip_grad_norm(m, self.cfg.optim.clip_grad) for k, m in self.meta.student.items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.meta.update_teacher(v.momentum)
        values = dict(zip(names, reduced.tolist(), strict=True))
        self.last_record = {
            "step": step, "total_loss": sum(values.values()), **values,
            "lr": v.lr, "last_layer_lr": v.last_layer_lr, "wd": v.wd, "momentum": v.momentum,
            "teacher_temp": v.teacher_temp, **{k: float(t) / len(micro) for k, t in stats_sum.items()},
            **{k: float(t) for k, t in norms.items()},
            "step_time_s": time.perf_counter() - t0,
        }

    def _sync_gradients(self, sync: bool) -> AbstractContextManager[None]:
        """Lightning's block of DDP's gradient all-reduce for the backward of a micro-batch that is not a step's last
        (FSDP and a single process: nothing to block)."""
        strategy = None if sync else self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def _guard_collapse(self, stats: dict[str, torch.Tensor], step: int) -> None:
        """Warn (rank 0) when the teacher falls below the collapse threshold, and again whenever it falls back
        after recovering; "stop" raises before this step's update."""
        message = check_collapse(stats, step, self.cfg.collapse_guard, self.cfg.dino.head_n_prototypes)
        if message is not None and not self.collapsed and self.global_rank == 0:
            log.warning(message)
        self.collapsed = message is not None


def _set_worker_threads(_: int) -> None:
    torch.set_num_threads(1)  # augmentation workers must not compete with the training threads


class DinoV2DataModule(L.LightningDataModule):
    """Builds the deterministic batch stream, starting at the trainer's (restored) global step."""

    def __init__(self, source: ImageSource, cfg: TrainConfig, seed: int = 0):
        super().__init__()
        self.source, self.cfg, self.seed = source, cfg, seed

    def make_stream(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> BatchStream:
        c, patch = self.cfg.crops, self.cfg.student.patch_size
        grid = c.global_crops_size // patch
        augment = MultiCropAugmentation(c.global_crops_scale, c.local_crops_scale, c.local_crops_number,
                                        c.global_crops_size, c.local_crops_size, c.blur_mode, c.augment_impl,
                                        c.solarize_p, c.hflip_p)
        masking = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)
        probability = 0.0 if self.cfg.mode == "distill" else self.cfg.ibot.mask_sample_probability
        collate = partial(collate_data_and_cast, mask_ratio_tuple=tuple(self.cfg.ibot.mask_ratio_min_max),
                          mask_probability=probability, n_tokens=grid * grid, mask_generator=masking)
        return BatchStream(self.source, augment, collate, self.cfg.batch_size_per_gpu, self.seed, start_step, rank,
                           world_size, accumulate=self.cfg.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        stream = self.make_stream(t.global_step, t.global_rank, t.world_size)
        workers = self.cfg.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_set_worker_threads,
                          prefetch_factor=2 if workers else None, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)
