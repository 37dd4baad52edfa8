"""The scikit-learn "digits" data set: 1,797 8x8 grayscale handwritten digits.

It ships inside scikit-learn (no download), which makes it the data set of
the keras-seht demo and of tests that need real data.
"""

from __future__ import annotations

import numpy as np

Split = tuple[np.ndarray, np.ndarray]


def load_digits(
    test_fraction: float = 0.25, seed: int = 0, flatten: bool = False
) -> tuple[Split, Split]:
    """Loads scikit-learn's digits, split into train and test sets.

    The split is stratified by class and deterministic for a given `seed`.
    Pixels are rescaled from 0..16 to float32 in [0, 1].

    Args:
        test_fraction: Fraction of the 1,797 images held out for testing,
            in (0, 1).
        seed: Seed of the shuffle that assigns images to the two sets.
        flatten: Return images as vectors of 64 pixels instead of
            ``(8, 8, 1)`` arrays.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: float32 images shaped
        ``(n, 8, 8, 1)`` (or ``(n, 64)`` with `flatten`) and int64 labels
        in 0..9 shaped ``(n,)``.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: `test_fraction` is not in (0, 1).

    Example:
    >>> from keras_seht.data import load_digits
    >>> (x_train, y_train), (x_test, y_test) = load_digits()
    >>> x_train.shape, x_test.shape
    ((1347, 8, 8, 1), (450, 8, 8, 1))
    """
    test_fraction = check_fraction(test_fraction)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as error:  # pragma: no cover - depends on the env
        raise ImportError(
            "keras_seht.data.load_digits needs scikit-learn, which ships the "
            "digits data set. Install it with `pip install keras-seht[demo]` "
            "(or `pip install scikit-learn`)."
        ) from error

    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype="float32") / 16.0).reshape(-1, 8, 8, 1)
    y = np.asarray(bunch.target, dtype="int64")
    return stratified_split(x, y, test_fraction, seed, flatten)


def check_fraction(test_fraction: float) -> float:
    """`test_fraction` as a float in (0, 1), or a ValueError naming it."""
    try:
        test_fraction = float(test_fraction)
    except (TypeError, ValueError):
        test_fraction = float("nan")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            "`test_fraction` must be in (0, 1). Received: "
            f"test_fraction={test_fraction!r}"
        )
    return test_fraction


def stratified_split(
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    flatten: bool,
) -> tuple[Split, Split]:
    """A train/test split stratified by class, fixed by `seed`.

    With `flatten`, the images come back as vectors.
    """
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    if flatten:
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    return (x_train, y_train), (x_test, y_test)
