"""A backend-neutral, reproducible input pipeline over NumPy arrays.

`ArrayDataset` is a `keras.utils.PyDataset`: every Keras backend consumes
it the same way, and no ``tf.data`` graph is involved. Its batches are a
pure function of ``(seed, epoch, batch index)``:

- the order of the samples in epoch ``e`` is the permutation drawn by
  ``numpy.random.default_rng([seed, e])``;
- the augmentation of batch ``i`` of epoch ``e`` draws from
  ``numpy.random.default_rng([seed, e, i])``.

So a run resumed at epoch ``e`` (``set_epoch(e)``) sees exactly the
batches an uninterrupted run sees, whatever the backend or prefetching.

The augmentations are the standard CIFAR ones: `random_crop_flip`
(random crop of a zero-padded image and a horizontal flip), `cutout`
(DeVries & Taylor 2017) and `mixup` (Zhang et al. 2018).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import keras
import numpy as np

from keras_seht._checks import check_int

#: ``augment(x_batch, y_batch, rng) -> (x_batch, y_batch)``.
Augment = Callable[
    [np.ndarray, np.ndarray, np.random.Generator],
    tuple[np.ndarray, np.ndarray],
]


class ArrayDataset(keras.utils.PyDataset):
    """Shuffled, augmented mini-batches of ``(x, y)``, reproducible by seed.

    Args:
        x: Inputs, an array whose first axis indexes samples.
        y: Targets, with as many samples as `x`.
        batch_size: Samples per batch (the last batch may be smaller,
            unless `drop_remainder`).
        shuffle: Draw a new order of the samples at every epoch.
        seed: Seed of the order and of the augmentations.
        augment: Functions ``f(x_batch, y_batch, rng) -> (x_batch,
            y_batch)`` applied in order to each batch, e.g.
            ``[random_crop_flip(4), cutout(16)]``.
        drop_remainder: Drop the last, incomplete batch.
        **kwargs: Passed to `keras.utils.PyDataset` (``workers``, ...).

    Example:
    >>> import numpy as np
    >>> from keras_seht.data.pipeline import ArrayDataset
    >>> ds = ArrayDataset(np.arange(10.0), np.arange(10), batch_size=4)
    >>> len(ds), ds[2][0].shape
    (3, (2,))
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | list[Augment] | None = None,
        drop_remainder: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        if len(self.x) != len(self.y):
            raise ValueError(
                "`x` and `y` must hold the same number of samples. "
                f"Received: {len(self.x)} and {len(self.y)}"
            )
        self.batch_size = check_int("batch_size", batch_size)
        self.shuffle = bool(shuffle)
        self.seed = check_int("seed", seed, 0)
        if augment is None:
            augment = []
        elif callable(augment):
            augment = [augment]
        self.augment = list(augment)
        self.drop_remainder = bool(drop_remainder)
        if self.drop_remainder and len(self.x) < self.batch_size:
            raise ValueError(
                f"`batch_size`={self.batch_size} exceeds the {len(self.x)} "
                "samples and `drop_remainder=True`: no batch left."
            )
        self.epoch = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.x))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.x))

    def set_epoch(self, epoch: int) -> None:
        """Selects the sample order and augmentation draws of `epoch`."""
        self.epoch = check_int("epoch", epoch, 0)
        self._order = self._permutation(self.epoch)

    def __len__(self) -> int:
        n = len(self.x) / self.batch_size
        return int(n) if self.drop_remainder else math.ceil(n)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"Batch index {index} out of range.")
        rows = self._order[
            index * self.batch_size : (index + 1) * self.batch_size
        ]
        x, y = self.x[rows], self.y[rows]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            for fn in self.augment:
                x, y = fn(x, y, rng)
        return x, y


def random_crop_flip(padding: int = 4, flip: bool = True) -> Augment:
    """Random crop of the zero-padded image and horizontal flip.

    Each image (``(n, height, width, channels)``) is padded with `padding`
    zeros on every side, cropped back to its size at a uniformly random
    offset in ``0..2*padding``, and mirrored left-right with probability
    1/2: the standard CIFAR augmentation.
    """
    padding = check_int("padding", padding, 0)

    def apply(
        x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        n: int
        n, height, width = x.shape[:3]
        padded = np.pad(
            x, ((0, 0), (padding, padding), (padding, padding), (0, 0))
        )
        dy = rng.integers(0, 2 * padding + 1, size=n)
        dx = rng.integers(0, 2 * padding + 1, size=n)
        rows = dy[:, None] + np.arange(height)[None, :]
        cols = dx[:, None] + np.arange(width)[None, :]
        if flip:
            mirror = rng.random(n) < 0.5
            cols = np.where(mirror[:, None], cols[:, ::-1], cols)
        out = padded[
            np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]
        ]
        return out, y

    return apply


def cutout(size: int) -> Augment:
    """Zeroes one ``size x size`` square per image (DeVries & Taylor, 2017).

    Rows ``cy - size//2 .. cy - size//2 + size - 1`` (columns
    likewise) with the centre ``(cy, cx)`` uniform over the image and the
    square clipped at the borders. 16 for CIFAR-10, 8 for CIFAR-100.
    Apply it after normalization, so the square is the mean image.
    """
    size = check_int("size", size)

    def apply(
        x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        n, height, width = x.shape[:3]
        cy = rng.integers(0, height, size=n)
        cx = rng.integers(0, width, size=n)
        top = (cy - size // 2)[:, None]
        left = (cx - size // 2)[:, None]
        rows = np.arange(height)[None, :]
        cols = np.arange(width)[None, :]
        inside_r = (rows >= top) & (rows < top + size)
        inside_c = (cols >= left) & (cols < left + size)
        mask = inside_r[:, :, None] & inside_c[:, None, :]
        out = np.where(mask[..., None], np.zeros((), x.dtype), x)
        return out, y

    return apply


def mixup(alpha: float, num_classes: int) -> Augment:
    r"""Mixup (Zhang et al. 2018): convex combinations of sample pairs.

    With :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` per batch and
    a random pairing :math:`\pi` of the batch, returns
    :math:`\lambda x + (1-\lambda) x_\pi` and the same mix of one-hot
    targets (float32, ``(n, num_classes)``): train with a categorical
    (not sparse) cross-entropy. Integer targets are one-hot encoded.
    """
    if isinstance(alpha, bool) or not float(alpha) > 0:
        raise ValueError(f"`alpha` must be > 0. Received: alpha={alpha!r}")
    alpha = float(alpha)
    num_classes = check_int("num_classes", num_classes)

    def apply(
        x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if y.ndim == 1:
            y = np.eye(num_classes, dtype="float32")[y]
        lam = rng.beta(alpha, alpha)
        pair = rng.permutation(len(x))
        x = (lam * x + (1.0 - lam) * x[pair]).astype(x.dtype)
        y = (lam * y + (1.0 - lam) * y[pair]).astype("float32")
        return x, y

    return apply
