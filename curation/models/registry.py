"""Official model files this project can use, and `lvd models fetch` (for users who are online).

URLs are the ones the upstream READMEs link (sscd-copy-detection README "Pretrained models";
dinov2 ``hub/backbones.py``). Upstream publishes no checksums. A ``sha256`` here is pinned only once it was
verified; where it is None the download is recorded as unverified in ``<dir>/checksums.json`` with the digest it
had, and later fetches of the same name must match that recorded digest (trust on first use).
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.storage import atomic_write_json, commit, temp_for

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/{name}.{fmt}.pt"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
LOCK = "checksums.json"


@dataclass(frozen=True)
class ModelFile:
    name: str  # registry key, e.g. sscd_disc_mixup.torchscript
    url: str
    kind: str  # sscd | dinov2
    fmt: str  # torchscript | torchvision | dinov2
    sha256: str | None = None  # verified digest, when one is known

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _registry() -> dict[str, ModelFile]:
    files = []
    # sscd_disc_large (ResNeXt101 32x4) ships no torchvision file upstream.
    for name in ("sscd_disc_blur", "sscd_disc_advanced", "sscd_disc_mixup", "sscd_disc_large",
                 "sscd_imagenet_blur", "sscd_imagenet_advanced", "sscd_imagenet_mixup"):  # fmt: skip
        for fmt in ("torchscript", "torchvision"):
            if not (name == "sscd_disc_large" and fmt == "torchvision"):
                files.append(ModelFile(f"{name}.{fmt}", SSCD_URL.format(name=name, fmt=fmt), "sscd", fmt))
    for arch in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"):
        for reg in ("", "_reg4"):
            files.append(ModelFile(f"{arch}{reg}", DINOV2_URL.format(arch=arch, reg=reg), "dinov2", "dinov2"))
    return {f.name: f for f in files}


REGISTRY = _registry()
# `lvd models fetch sscd_disc_mixup` means the recommended default file of that model.
ALIASES = {"sscd_disc_mixup": "sscd_disc_mixup.torchscript", "sscd": "sscd_disc_mixup.torchscript"}


class ChecksumError(RuntimeError):
    pass


class UnknownModel(KeyError):
    """A name `lvd models fetch` does not download; its message says why and what to do."""

    def __str__(self) -> str:
        return str(self.args[0])


def resolve(name: str) -> ModelFile:
    key = ALIASES.get(name, name)
    if key.startswith("dinov3"):  # Meta's hub names: dinov3_vits16, dinov3_vits16plus, dinov3_vitb16, ...
        repo = f"facebook/{key.replace('_', '-')}" + ("" if "-pretrain-" in key.replace("_", "-") else
                                                       "-pretrain-lvd1689m")  # fmt: skip
        raise UnknownModel(f"{name}: DINOv3 weights are gated by Meta's licence and lvd does not download them: accept "
                           f"the licence on https://huggingface.co/{repo}, download it once "
                           f"(`huggingface-cli download {repo}`), then give the folder: "
                           "embed.backbone={kind: dinov3, path: <the folder>, image_size: 224} (docs/models.md, "
                           "DINOv3)")  # fmt: skip
    if key not in REGISTRY:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _lock(out_dir: Path) -> dict[str, dict[str, str]]:
    path = out_dir / LOCK
    return json.loads(path.read_text()) if path.is_file() else {}


def expected_digest(entry: ModelFile, out_dir: Path) -> str | None:
    return entry.sha256 or _lock(out_dir).get(entry.name, {}).get("sha256")


def fetch(name: str, out_dir: Path, opener=urllib.request.urlopen) -> tuple[Path, str, bool]:
    """Download one registry file into ``out_dir``; returns (path, sha256, verified).

    A present file with the expected digest is not downloaded again. A digest that differs from the pinned or
    recorded one is an error and the download is discarded.
    """
    entry = resolve(name)
    out_dir = Path(out_dir)
    target = out_dir / entry.filename
    want = expected_digest(entry, out_dir)
    if target.is_file() and want is not None and sha256_file(target) == want:
        return target, want, entry.sha256 is not None
    tmp = temp_for(target)
    h = hashlib.sha256()
    try:
        with opener(entry.url) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
                h.update(block)
        digest = h.hexdigest()
        if want is not None and digest != want:
            raise ChecksumError(f"{entry.name}: sha256 {digest} does not match the expected {want}")
        commit(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    lock = _lock(out_dir)
    lock[entry.name] = {"file": entry.filename, "url": entry.url, "sha256": digest,
                        "verified": "pinned" if entry.sha256 else "first-use"}  # fmt: skip
    atomic_write_json(out_dir / LOCK, lock)
    return target, digest, entry.sha256 is not None
