"""keras_seht.data.pipeline: reproducible batches and the augmentations."""

from __future__ import annotations

import numpy as np
import pytest

from keras_seht.data.pipeline import (
    ArrayDataset,
    cutout,
    mixup,
    random_crop_flip,
)

# NumPy only: one backend is enough (conftest).
pytestmark = pytest.mark.single_backend


def _images(n=6, size=5, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, channels)).astype("float32") + 10.0
    return x, np.arange(n)


def _batches(ds):
    return [ds[i] for i in range(len(ds))]


def test_every_sample_once_per_epoch_and_reproducible():
    x, y = np.arange(10.0), np.arange(10)
    ds = ArrayDataset(x, y, batch_size=4, seed=3)
    assert len(ds) == 3
    seen = np.concatenate([b[1] for b in _batches(ds)])
    assert sorted(seen) == list(range(10))
    again = ArrayDataset(x, y, batch_size=4, seed=3)
    for a, b in zip(_batches(ds), _batches(again)):
        np.testing.assert_array_equal(a[0], b[0])
    ds.set_epoch(1)
    other = np.concatenate([b[1] for b in _batches(ds)])
    assert sorted(other) == list(range(10))
    assert not np.array_equal(seen, other)
    ds.set_epoch(0)
    np.testing.assert_array_equal(
        np.concatenate([b[1] for b in _batches(ds)]), seen
    )


def test_no_shuffle_and_drop_remainder():
    x, y = np.arange(10.0), np.arange(10)
    ds = ArrayDataset(x, y, batch_size=4, shuffle=False, drop_remainder=True)
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[1][1], [4, 5, 6, 7])
    with pytest.raises(IndexError):
        ds[2]


def test_augmentation_draws_depend_on_seed_epoch_and_batch():
    x, y = _images(n=8)
    ds = ArrayDataset(x, y, 4, shuffle=False, augment=random_crop_flip(2))
    first = ds[0][0]
    np.testing.assert_array_equal(first, ds[0][0])
    ds.set_epoch(1)
    assert not np.array_equal(first, ds[0][0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "seed": -1}, "seed"),
        ({"batch_size": 20, "drop_remainder": True}, "drop_remainder"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArrayDataset(np.zeros(10), np.zeros(10), **kwargs)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="same number"):
        ArrayDataset(np.zeros(10), np.zeros(9), 2)


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    x, y = _images(n=20)
    pad = 2
    out, y_out = random_crop_flip(pad)(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(y_out, y)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    flips = offsets = 0
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if np.array_equal(
                out[i],
                (lambda c: c[:, ::-1] if flip else c)(
                    padded[i, dy : dy + 5, dx : dx + 5]
                ),
            )
        ]
        assert len(matches) == 1, i
        flips += matches[0][2]
        offsets += (matches[0][0], matches[0][1]) != (pad, pad)
    assert 0 < flips < len(x) and offsets > 0


def test_cutout_zeroes_one_clipped_square():
    x, y = _images(n=50, size=8, channels=1)
    out, _ = cutout(4)(x, y, np.random.default_rng(1))
    for i in range(len(x)):
        zero = out[i, :, :, 0] == 0
        rows, cols = np.nonzero(zero)
        assert zero.sum() > 0
        # A rectangle: its bounding box is full.
        assert zero[
            rows.min() : rows.max() + 1, cols.min() : cols.max() + 1
        ].all()
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
        np.testing.assert_array_equal(out[i][~zero], x[i][~zero])
    sizes = [(out[i] == 0).sum() for i in range(len(x))]
    assert max(sizes) == 16 and min(sizes) < 16  # clipped at the borders


def test_mixup_mixes_inputs_and_one_hot_targets_alike():
    x, y = _images(n=6)
    out, target = mixup(1.0, num_classes=6)(x, y, np.random.default_rng(2))
    assert target.shape == (6, 6) and target.dtype == np.float32
    np.testing.assert_allclose(target.sum(axis=1), 1.0, rtol=1e-6)
    for i in range(6):
        (partners,) = np.nonzero(target[i])
        if len(partners) == 1:  # paired with itself
            np.testing.assert_allclose(out[i], x[i], rtol=1e-6)
            continue
        lam = target[i, i]
        j = [p for p in partners if p != i][0]
        np.testing.assert_allclose(
            out[i], lam * x[i] + (1 - lam) * x[j], rtol=1e-5
        )
    with pytest.raises(ValueError, match="alpha"):
        mixup(0.0, 10)
