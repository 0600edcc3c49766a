"""A deterministic, resumable stream of collated training batches.

Every batch is a pure function of (seed, step, rank): sample position p = step * global_batch + rank * B + i maps
to image `perm_e[p mod n]` of epoch e = p // n (a seeded permutation per epoch, an infinite sampler with
drop_last like the reference's SHARDED_INFINITE); the crops of position p are drawn with seed (seed, p); the masks
and the batched photometric parameters of a step with seed (seed, step, rank). With gradient accumulation
(`train.accumulate_grad_batches` = A) micro-batch j of rank r is, in all of this, rank j * W + r of a run on A * W
ranks without accumulation: the same images, crops and masks. Resuming at step s therefore reproduces the
uninterrupted run exactly, whatever the number of DataLoader workers (worker w of W produces the steps s + w,
s + w + W, ..., which the DataLoader interleaves back in order).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from training.data.augmentations import MultiCropAugmentation
from training.data.datasets import ImageSource, decode_rgb
from training.seeding import mix_seed

log = logging.getLogger(__name__)


class BatchStream(IterableDataset):
    def __init__(self, source: ImageSource, transform: MultiCropAugmentation,
                 collate: Callable[..., dict[str, Any]], batch_size: int,
                 seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1, max_bad_retries: int = 16,
                 accumulate: int = 1):
        self.source = source
        self.transform = transform
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.max_bad_retries = max_bad_retries
        self.accumulate = accumulate
        self.n_bad = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def index_at(self, position: int) -> int:
        n = len(self.source)
        epoch, offset = divmod(position, n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A3D))
            self._perm = (epoch, torch.randperm(n, generator=g))
        return int(self._perm[1][offset])

    def lane(self, micro: int = 0) -> int:
        """The rank, in a run on accumulate x world_size ranks without accumulation, whose batch is this rank's
        micro-batch ``micro`` (micro-batches outermost, then ranks)."""
        return micro * self.world_size + self.rank

    def positions(self, step: int, micro: int = 0) -> list[int]:
        start = (step * self.accumulate * self.world_size + self.lane(micro)) * self.batch_size
        return list(range(start, start + self.batch_size))

    def sample(self, position: int) -> dict[str, Any]:
        """Decode and augment the image at `position`; an undecodable image is replaced by the next position's
        (deterministically) and counted."""
        for attempt in range(self.max_bad_retries):
            index = self.index_at(position + attempt * 7919)
            image = decode_rgb(self.source.read(index), keep_grey=getattr(self.transform, "grey_path", False))
            if image is not None:
                break
            self.n_bad += 1
            log.warning("skipping undecodable image %s (%d so far in this worker)", self.source.name(index), self.n_bad)
        else:
            raise RuntimeError(f"{self.max_bad_retries} undecodable images in a row near position {position}")
        return self.transform(image, mix_seed(self.seed, position, 0xA116))

    def micro_batch(self, step: int, micro: int = 0) -> dict[str, Any]:
        positions, lane = self.positions(step, micro), self.lane(micro)
        with torch.random.fork_rng(devices=[]):  # the "pil" augmentation seeds the global RNG; keep the caller's
            samples = [self.sample(p) for p in positions]
        out = self.collate(samples, rng=random.Random(mix_seed(self.seed, step, lane, 0x3A5C)))
        out = self.transform.finish(out, torch.Generator().manual_seed(mix_seed(self.seed, step, lane, 0xC010)))
        out["positions"] = torch.tensor(positions, dtype=torch.long)
        return out

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of optimiser step ``step``; with accumulation, ``{"micro_batches": [...], "step": step}``."""
        if self.accumulate == 1:
            out = self.micro_batch(step)
        else:
            out = {"micro_batches": [self.micro_batch(step, j) for j in range(self.accumulate)]}
        out["step"] = step
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n_workers
