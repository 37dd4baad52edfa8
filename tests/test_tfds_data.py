"""MNIST / CIFAR loaders, on tensorflow-datasets' mock data.

tensorflow_datasets is imported inside the tests, after keras (conftest),
as the loaders do: importing TensorFlow first crashes the torch backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_seht.data import (
    DatasetNotFoundError,
    load_cifar,
    load_image_dataset,
    load_mnist,
)
from keras_seht.data.tfds import NORMALIZATION

# The loaders return NumPy arrays: one backend is enough (conftest).
pytestmark = pytest.mark.single_backend


def _mock(num_examples):
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples)


def test_mnist_shapes_and_normalization():
    with _mock(40):
        (x, y), (x_test, y_test) = load_mnist(test_limit=16)
        (raw, _), _ = load_mnist(normalize=False, flatten=False)
    assert x.shape == (40, 784) and x.dtype == np.float32
    assert x_test.shape == (16, 784) and y_test.shape == (16,)
    assert y.dtype == np.int64 and 0 <= y.min() and y.max() <= 9
    assert raw.shape == (40, 28, 28, 1)
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    (mean,), (std,) = NORMALIZATION["mnist"]
    np.testing.assert_allclose(x, (raw.reshape(40, -1) - mean) / std, rtol=1e-5)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar(num_classes):
    with _mock(12):
        (x, y), (x_test, _) = load_cifar(num_classes, train_limit=8)
    assert x.shape == (8, 32, 32, 3) and x_test.shape == (12, 32, 32, 3)
    assert y.max() < num_classes
    # Standardized per channel: mock pixels are uniform, so means are
    # far from 0.5 only if the constants were not applied.
    assert abs(float(x.mean())) < 1.0


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_image_dataset("mnist", data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path) in message and "'mnist'" in message
    assert "tfds.load('mnist', data_dir='DIR')" in message
    assert "--data-dir" in message


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: load_image_dataset("svhn"), "name"),
        (lambda: load_cifar(20), "num_classes"),
        (lambda: load_mnist(train_limit=0), "limit"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
