"""Model folders as the Hugging Face hub's client caches them: a user who ran `huggingface_hub.snapshot_download(
"facebook/dinov2-small")` (or `from_pretrained` once) gives the cache folder it made,
`~/.cache/huggingface/hub/models--facebook--dinov2-small`, whose files live one level down in
`snapshots/<commit>/`; the commit `refs/main` names is the one the library itself loads. And the weights of such a
folder, or of a single file as models are published (`load_state`), read the same way by every loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"  # a hub folder's weights (transformers' and timm's)


def hub_snapshot(path: Path | str) -> Path:
    """The snapshot folder of a hub cache folder (the one `refs/main` names, else the only one); any other path as
    given."""
    path = Path(path)
    snapshots = path / "snapshots"
    if not snapshots.is_dir() or (path / "config.json").exists():
        return path
    ref = path / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return found[0] if len(found) == 1 else path


def snapshot_hint(path: Path | str) -> str:
    """Why a hub cache folder could not be resolved to one snapshot (for an error message), or ""."""
    snapshots = Path(path) / "snapshots"
    if not snapshots.is_dir():
        return ""
    names = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    return (f" (a Hugging Face cache folder with {len(names)} snapshots and no refs/main: give one of "
            f"{', '.join(str(snapshots / n) for n in names[:3])})") if names else " (a Hugging Face cache folder with no snapshot)"


def weights_path(folder: Path) -> Path:
    """The weights file of a hub-style folder (transformers' or timm's): `model.safetensors`, else
    `pytorch_model.bin`."""
    for name in (WEIGHTS, "pytorch_model.bin"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{folder} holds no {WEIGHTS} (sharded checkpoints are not read)")


def folder_weights(folder: Path) -> dict[str, Any]:
    """The tensors of a hub-style folder (tensors only are unpickled from a `.bin`)."""
    import torch
    from safetensors.torch import load_file

    path = weights_path(folder)
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                 weights_only=True)


CHECKPOINT_WRAPPERS = ("teacher", "model", "state_dict")  # training and evaluation checkpoints hold the state there


def load_state(path: Path, mmap: bool = False) -> Any:
    """A weights file's contents: a `.safetensors` file's tensors, else what `torch.load` unpickles (tensors and plain
    containers only), inside the training and evaluation checkpoint wrappers (`{"teacher": ...}`, `{"model": ...}`,
    `{"state_dict": ...}`). `mmap`: memory-mapped where torch's zip format allows it (listing a large file's keys then
    reads little of it)."""
    import torch

    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format cannot be mapped
    for key in CHECKPOINT_WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj
