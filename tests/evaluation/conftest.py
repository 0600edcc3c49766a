from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_class_folders(root: Path, n_per_class: int, seed: int, size: int = 16) -> Path:
    """Three classes of small RGB images: noise around a class colour."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for c, colour in enumerate(colours):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.clip(colour + rng.normal(scale=40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / str(c) / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def toy_classification(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toy")
    return write_class_folders(root / "train", 8, 0), write_class_folders(root / "test", 4, 1)
