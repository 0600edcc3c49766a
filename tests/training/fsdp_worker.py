"""Started by torchrun from test_distributed.py: the FSDP code path (the GPU strategy) on CPU processes (gloo).

The same 3 training steps run from the same initialisation on the same per-rank batches: once with plain
modules and gradients averaged by hand (what DDP does), then with every student/teacher submodule wrapped by
`training.strategy.wrap_fsdp` (sharded parameters, per-shard EMA, sharded gradient clipping, param groups of
flattened parameters): SHARD_GRAD_OP, then HYBRID_SHARD as 1 node x 2 processes and as 2 nodes x 1. Rank 0 saves
the four final states; the test asserts the wrapped ones equal the plain one. A third run wraps with bf16 mixed
precision (the precision resolved by `training.strategy.compute_precision`) and records what FSDP does with it:
per-unit dtypes, the parameter dtype seen inside the forward, gradient dtypes and the losses of one step under bf16
autocast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_config

from training.data import build_source
from training.fsdp import clip_grad_norm, full_state_dict, wrap_fsdp
from training.meta_arch import SSLMetaArch
from training.module import STEP_SEED_SALT, DinoV2DataModule
from training.param_groups import apply_optim_schedule
from training.schedules import Schedules, derive
from training.seeding import reseed
from training.strategy import compute_precision


def run(cfg, data: Path, fsdp: bool, steps: int = 3, devices_per_node: int | None = None) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg).train()
    if fsdp:
        wrap_fsdp({"student": meta.student, "teacher": meta.teacher}, cfg, torch.device("cpu"),
                  compute_precision(cfg, "cpu"), devices_per_node)
    # SGD rather than AdamW: Adam's first steps are sign-like, so gradients that are ~0 and differ only in float
    # summation order would flip whole updates; SGD keeps the comparison well conditioned.
    opt = torch.optim.SGD(meta.param_groups(), lr=0.0)
    schedules = Schedules(cfg, derive(cfg, world))
    stream = DinoV2DataModule(build_source(data), cfg, seed=0).make_stream(0, rank, world)
    for step in range(steps):
        batch, v = stream.batch(step), schedules.at(step)
        apply_optim_schedule(opt, v.lr, v.wd, v.last_layer_lr)
        reseed(0, step, rank, STEP_SEED_SALT)
        terms, _ = meta.forward_losses(batch, v.teacher_temp)
        sum(terms.values()).backward()
        if not fsdp:
            for p in meta.student.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        for module in meta.student.values():
            clip_grad_norm(module, cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meta.update_teacher(v.momentum)
    state = {}
    for group in ("student", "teacher"):
        for name, module in getattr(meta, group).items():
            state.update({f"{group}.{name}.{k}": v for k, v in full_state_dict(module).items()})
    return state


def bf16_step(cfg, data: Path) -> dict:
    """One step with every unit wrapped in bf16 mixed precision, under bf16 autocast (as Lightning's bf16-mixed)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg).train()
    precision = compute_precision(cfg, "cpu")
    wrap_fsdp({"student": meta.student, "teacher": meta.teacher}, cfg, torch.device("cpu"), precision)
    units = {}  # "student.dino_head" -> sorted set of (param, reduce, buffer) dtypes over its FSDP units
    for group in ("student", "teacher"):
        for name, module in getattr(meta, group).items():
            units[f"{group}.{name}"] = sorted({tuple(str(d) for d in (u.mixed_precision.param_dtype,
                                                                       u.mixed_precision.reduce_dtype,
                                                                       u.mixed_precision.buffer_dtype))
                                               for u in FSDP.fsdp_modules(module)})
    seen = {}  # the dtype of each backbone's patch-embedding weight inside its forward

    def record(group: str):
        def hook(module, args) -> None:
            seen.setdefault(group, str(module.weight.dtype))
        return hook

    for group in ("student", "teacher"):
        getattr(meta, group).backbone.module.patch_embed.proj.register_forward_pre_hook(record(group))
    opt = torch.optim.SGD(meta.param_groups(), lr=0.0)
    v = Schedules(cfg, derive(cfg, world)).at(0)
    apply_optim_schedule(opt, v.lr, v.wd, v.last_layer_lr)
    batch = DinoV2DataModule(build_source(data), cfg, seed=0).make_stream(0, rank, world).batch(0)
    reseed(0, 0, rank, STEP_SEED_SALT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, _ = meta.forward_losses(batch, v.teacher_temp)
    sum(terms.values()).backward()
    grads = {name: sorted({str(p.grad.dtype) for p in module.parameters() if p.grad is not None})
             for name, module in meta.student.items()}
    opt.step()
    params = sorted({str(p.dtype) for p in meta.student.parameters()} | {str(p.dtype) for p in meta.teacher.parameters()})
    return {"precision": precision, "units": units, "forward_weight": seen, "grads": grads, "params": params,
            "losses": {k: float(t.detach()) for k, t in terms.items()}}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    # clipping active; a large lr so that the three updates are far above float noise
    cfg = tiny_config(**{"ibot.separate_head": True, "optim.clip_grad": 0.5, "optim.base_lr": 10.0})
    plain, sharded = run(cfg, data, fsdp=False), run(cfg, data, fsdp=True)
    # HYBRID_SHARD as one node of 2 processes (shard groups of 2) and as 2 nodes of 1 (nothing to shard: replicated)
    hybrid = cfg.model_copy(update={"fsdp_sharding": "HYBRID_SHARD"})
    hybrids = {f"hybrid_{n}": run(hybrid, data, fsdp=True, devices_per_node=n) for n in (2, 1)}
    bf16 = bf16_step(tiny_config(**{"ibot.separate_head": True, "precision": "bf16"}), data)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"plain": plain, "fsdp": sharded, **hybrids}, out / "states.pt")
        (out / "bf16.json").write_text(json.dumps(bf16))
    dist.barrier()
    dist.destroy_process_group()
