"""A user's own data for the end-to-end tests: real photographs that ship with scikit-image, scikit-learn and
matplotlib, written as a folder (the pool), a seed set and a small labelled evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Colour and grey photographs (astronaut has a face the Haar cascade finds), none of them digits.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "retina", "immunohistochemistry",
          "moon", "horse", "clock", "coins", "grass", "gravel", "brick", "cell", "colorwheel", "microaneurysms")


def photo(name: str, side: int = 160) -> Image.Image:
    import skimage.data

    if name.startswith("sample"):
        from sklearn.datasets import load_sample_images

        return _fit(Image.fromarray(load_sample_images().images[int(name[-1])]), side)
    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return _fit(Image.fromarray(arr).convert("RGB"), side)


def _fit(img: Image.Image, side: int) -> Image.Image:
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.BICUBIC)
    return img


def write_pool(folder: Path) -> list[Path]:
    """The photographs and a tile of each (the middle half): 2 x len(PHOTOS) distinct JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in PHOTOS:
        img = photo(name)
        w, h = img.size
        for suffix, im in (("", img), ("_tile", img.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)))):
            path = folder / f"{name}{suffix}.jpg"
            im.save(path, quality=90)
            out.append(path)
    return out


def write_seeds(folder: Path) -> list[Path]:
    """Curated seed images, not in the pool: the astronaut (a face) and two other photographs, mirrored."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("astronaut", "coffee", "sample0"):
        path = folder / f"seed_{name}.png"
        photo(name, 160).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)  # the face: ~32 px, found at 160
        out.append(path)
    return out


def write_eval_set(root: Path, per_class: int = 8) -> tuple[Path, Path]:
    """scikit-image's lfw_subset (faces / non-faces, 25 x 25) as train/ and test/ folders of class subfolders."""
    import skimage.data

    images = (skimage.data.lfw_subset() * 255).astype(np.uint8)  # 100 faces, then 100 non-faces
    for split, offset in (("train", 0), ("test", per_class)):
        for label, start in (("face", 0), ("nonface", 100)):
            d = root / split / label
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(images[start + offset + i]).save(d / f"{label}{offset + i:03d}.png")
    return root / "train", root / "test"
