"""Where an unfinished stage will continue, read from its files alone, for `lvd status`.

Light on purpose: `lvd status` imports this and not :mod:`flows.stages` (which imports every stage's core, torch
included: ~2 s and ~700 MB before anything is printed). A training checkpoint's step is read from the pickled
structure inside the torch zip archive without torch (:func:`checkpoint_step`); what that cannot read falls back to
torch. The names below mirror those of the modules that write the files (tests/flows/test_resume_points.py checks).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

from infra.plan import TRAINING as TRAINING_STAGES  # training stages in order, each with its `train.<section>`
from infra.run import RunDir
from infra.storage import Markers, read_json

KMEANS_STEPS = "kmeans_steps"  # curation.rebalance.CHECKPOINTS: rebalancing's saved k-means steps
PROGRESS = "progress.json"  # training.callbacks.PROGRESS: the training progress written with every metrics flush
LAST = "last.ckpt"  # training.callbacks.AtomicCheckpoint's resume checkpoint


class _Stub:
    """Stands in for every class a checkpoint's pickle names: built, filled and ignored; no code of the checkpoint
    runs (tensors' storages are never read: persistent ids load as None)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


_SAFE = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
         ("builtins", "complex"), ("builtins", "bytearray"), ("_codecs", "encode")}  # fmt: skip


class _StructureUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(module, name) if (module, name) in _SAFE else _Stub

    def persistent_load(self, pid: Any) -> None:
        return None


def _pickled_state(archive: IO[bytes]) -> dict:
    with zipfile.ZipFile(archive) as z:
        name = next(n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
        with z.open(name) as f:
            return _StructureUnpickler(f).load()


def checkpoint_step(path: Path) -> int:
    """The optimiser step a resume checkpoint (a Lightning `.ckpt` file, or a sharded directory's `meta.pt`)
    continues from: `training.callbacks.checkpoint_step`, without importing torch where the archive can be read."""
    path = Path(path)
    try:
        with open(path / "meta.pt" if path.is_dir() else path, "rb") as f:
            return int(_pickled_state(f)["global_step"])
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, StopIteration, KeyError, TypeError, ValueError,
            EOFError, AttributeError):  # fmt: skip
        from training.callbacks import checkpoint_step as torch_checkpoint_step

        return torch_checkpoint_step(path)


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """`training.callbacks.find_resume_checkpoint`: a whole `last.ckpt` is returned here; anything else (the `.old`
    copy of an interrupted swap, an incomplete checkpoint) is left to it."""
    last = Path(ckpt_dir) / LAST
    if last.is_file() and zipfile.is_zipfile(last):
        return last
    if last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file():
        return last
    if not any(p.exists() for p in (last, last.with_name(LAST + ".old"))):
        return None
    from training.callbacks import find_resume_checkpoint

    return find_resume_checkpoint(ckpt_dir)


def resume_step(stage_dir: Path) -> int | None:
    """The step a training stage in `stage_dir` continues from: its resume checkpoint's (None: it starts at 0)."""
    ckpt_dir = Path(stage_dir) / "checkpoints"
    ckpt = resume_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    return None if ckpt is None else checkpoint_step(ckpt)


def _read_progress(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / PROGRESS
    try:
        return read_json(path) if path.is_file() else {}
    except ValueError:  # replaced atomically, but a reader may meet a file from an older, interrupted writer
        return {}


def stage_progress(run: RunDir, stage: str) -> str | None:
    """Where an unfinished stage will continue (`lvd status`): a training stage's checkpoint step, rebalancing's saved
    k-means steps, or the shards marked done; None when nothing is kept."""
    stage_dir = run.stage_dir(stage)
    if stage in TRAINING_STAGES:
        step = resume_step(stage_dir)
        if step is None:
            return None
        derived = read_json(stage_dir / "derived.json") if (stage_dir / "derived.json").is_file() else {}
        total = f" of {derived['run_iters']}" if "run_iters" in derived else ""
        logged = _read_progress(stage_dir)
        if logged.get("step", 0) > step:  # running, or stopped after its last checkpoint
            return f"at step {logged['step']}{total}, resumes at step {step} (its checkpoint)"
        return f"resumes at step {step}{total} (its checkpoint)"
    if stage == "rebalance" and (stage_dir / KMEANS_STEPS).is_dir():
        saved = len(list((stage_dir / KMEANS_STEPS).glob("*.npz")))
        return f"{saved} k-means steps saved" if saved else None
    done = len(Markers(stage_dir).done())
    return f"{done} shard{'s' if done != 1 else ''} done" if done else None
