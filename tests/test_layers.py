"""`keras_seht.layers`: Cutout and DropBlock2D, checked against their
papers' definitions (geometry, drop rate, rescaling) and inside `fit`.

Backend-agnostic: runs unchanged under KERAS_BACKEND=torch, jax and
tensorflow.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import keras_seht
from keras_seht.layers import Cutout, DropBlock2D


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _extent(flags: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the True entries of a 1D array, checking contiguity."""
    (index,) = np.nonzero(flags)
    assert index.size and (np.diff(index) == 1).all(), flags
    return int(index[0]), int(index[-1]) + 1


# --------------------------------------------------------------------------
# Cutout
# --------------------------------------------------------------------------


def _check_cutout_geometry(out: np.ndarray, size: int) -> list[tuple]:
    """Checks each image's zeros form one (clipped) size x size square.

    Returns the (top, bottom, left, right) of every square.
    """
    _, height, width, _ = out.shape
    boxes = []
    for image in out == 0:
        # The same square in every channel.
        assert (image == image[..., :1]).all()
        zeros = image[..., 0]
        top, bottom = _extent(zeros.any(axis=1))
        left, right = _extent(zeros.any(axis=0))
        # A full rectangle: every pixel of the bounding box is zero.
        assert zeros[top:bottom, left:right].all()
        assert zeros.sum() == (bottom - top) * (right - left)
        for start, stop, length in [
            (top, bottom, height),
            (left, right, width),
        ]:
            if 0 < start and stop < length:
                assert stop - start == size  # fully inside on this axis
            else:
                assert 1 <= stop - start <= size  # clipped at the border
        boxes.append((top, bottom, left, right))
    return boxes


@pytest.mark.parametrize("size", [4, 3])
def test_cutout_squares(size):
    x = np.ones((256, 12, 10, 2), "float32")
    out = _np(Cutout(size, seed=3)(x, training=True))
    boxes = _check_cutout_geometry(out, size)
    # Every image is cut, with exactly size**2 zeros when fully inside.
    inside = [
        b for b in boxes if b[0] > 0 and b[1] < 12 and b[2] > 0 and b[3] < 10
    ]
    assert len(inside) > 50
    for top, bottom, left, right in inside:
        assert (bottom - top) * (right - left) == size**2
    # Centres range over the whole image: squares clipped at each border.
    tops, bottoms, lefts, rights = np.array(boxes).T
    assert tops.min() == 0 and bottoms.max() == 12
    assert lefts.min() == 0 and rights.max() == 10
    # Clipped squares can be smaller than size // 2 + 1 only if the centre
    # were outside the image: never.
    assert ((bottoms - tops) >= size - size // 2).all()
    # Different squares for different images.
    assert len(set(boxes)) > 20
    # Pixels outside the square are untouched.
    np.testing.assert_array_equal(out[out != 0], 1.0)


def test_cutout_identity_at_inference_and_channels_first():
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype("float32")
    layer = Cutout(3, seed=0)
    for training in [False, None]:
        np.testing.assert_array_equal(_np(layer(x, training=training)), x)
    np.testing.assert_array_equal(_np(layer(x)), x)
    # channels_first: the same square in every channel, on axes 2 and 3.
    first = Cutout(3, data_format="channels_first", seed=0)
    out = _np(first(np.ones((16, 2, 6, 5), "float32"), training=True))
    _check_cutout_geometry(out.transpose(0, 2, 3, 1), 3)


def test_cutout_arguments():
    for size in [0, -1, 2.5, True, "3", None]:
        with pytest.raises(ValueError, match=r"`size` must be an integer >= 1"):
            Cutout(size)
    with pytest.raises(ValueError, match="`size` must be at most"):
        Cutout(9)(np.ones((1, 8, 10, 1), "float32"))
    with pytest.raises(ValueError, match="`size` must be at most"):
        Cutout(5, data_format="channels_first")(np.ones((1, 3, 8, 4)))
    with pytest.raises(ValueError, match="`data_format`"):
        Cutout(2, data_format="NHWC")
    with pytest.raises(ValueError, match="4D"):
        Cutout(2)(np.ones((2, 8, 8), "float32"))
    Cutout(8)(np.ones((1, 8, 8, 1), "float32"), training=True)


def test_cutout_inside_compiled_fit():
    # Input ones, a fixed all-ones kernel and y = 0: the per-step MSE is
    # (64 - #zeroed)**2, so it shows the square drawn in each step.
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            Cutout(4, seed=1),
            keras.layers.Flatten(),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    running = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: running.append(logs["loss"])
    )
    x, y = np.ones((16, 8, 8, 1), "float32"), np.zeros((16, 1), "float32")
    model.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[record])
    # Per-step losses from the running means Keras logs.
    steps = np.arange(1, len(running) + 1)
    per_step = steps * np.array(running) - (steps - 1) * np.r_[0, running[:-1]]
    zeroed = 64 - np.sqrt(np.maximum(per_step, 0))
    assert (np.round(zeroed) >= 1).all() and (np.round(zeroed) <= 16).all()
    assert len(set(np.round(zeroed).tolist())) > 1  # the seed advances
    # Inference: identity.
    assert float(model.evaluate(x, y, verbose=0)) == pytest.approx(64.0**2)


# --------------------------------------------------------------------------
# DropBlock2D
# --------------------------------------------------------------------------


def expected_drop_fraction(height, width, block_size, keep_prob):
    """E[fraction dropped] of one map: pixel (i, j) is kept iff none of the
    n_i * n_j seeds whose block covers it fires, each w.p. gamma."""
    b = block_size
    valid_h, valid_w = height - b + 1, width - b + 1
    gamma = (1 - keep_prob) / b**2 * height * width / (valid_h * valid_w)

    def covering(length, valid):
        i = np.arange(length)
        return np.minimum(i, valid - 1) - np.maximum(i - b + 1, 0) + 1

    n = np.outer(covering(height, valid_h), covering(width, valid_w))
    return 1.0 - np.mean((1.0 - gamma) ** n)


def _dropped(layer, x):
    return _np(layer(x, training=True)) == 0


@pytest.mark.parametrize(
    "block_size, keep_prob, shape",
    [(3, 0.9, (16, 16)), (7, 0.9, (14, 12)), (1, 0.8, (6, 6))],
)
def test_dropblock_drop_rate(block_size, keep_prob, shape):
    # 2048 independent maps (example x channel); per-map drop fractions are
    # i.i.d., so their mean is within 4 standard errors of the expectation.
    x = np.ones((512,) + shape + (4,), "float32")
    dropped = _dropped(DropBlock2D(block_size, keep_prob, seed=7), x)
    per_map = dropped.mean(axis=(1, 2)).ravel()
    expected = expected_drop_fraction(*shape, block_size, keep_prob)
    standard_error = per_map.std(ddof=1) / math.sqrt(per_map.size)
    assert abs(per_map.mean() - expected) < 4 * standard_error
    # Ghiasi et al.'s gamma targets 1 - keep_prob; overlaps and borders
    # make it approximate.
    assert abs(expected - (1 - keep_prob)) < 0.03
    if block_size == 1:
        assert expected == pytest.approx(1 - keep_prob)


def test_dropblock_blocks_are_squares():
    b, height, width = 3, 12, 11
    x = np.ones((64, height, width, 2), "float32")
    dropped = _dropped(DropBlock2D(b, keep_prob=0.9, seed=1), x)
    assert dropped.any()
    for image in dropped.transpose(0, 3, 1, 2).reshape(-1, height, width):
        # The dropped set is a union of whole b x b squares inside the map:
        # the union of all b x b squares it contains is itself.
        union = np.zeros_like(image)
        for i in range(height - b + 1):
            for j in range(width - b + 1):
                if image[i : i + b, j : j + b].all():
                    union[i : i + b, j : j + b] = True
        np.testing.assert_array_equal(union, image)


def test_dropblock_rescaling_and_inference():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(64, 10, 10, 8)).astype("float32")
    layer = DropBlock2D(3, keep_prob=0.7, seed=2)
    for training in [False, None]:
        np.testing.assert_array_equal(_np(layer(x, training=training)), x)
    np.testing.assert_array_equal(_np(layer(x)), x)
    out = _np(layer(x, training=True))
    kept = out != 0
    assert 0.5 < kept.mean() < 0.9
    # Kept units are scaled by count(M) / sum(M) = 1 / (fraction kept).
    np.testing.assert_allclose(out[kept], x[kept] / kept.mean(), rtol=1e-5)
    # Constant input: the mean is kept exactly; random input: closely.
    ones = _np(layer(np.ones_like(x), training=True))
    assert ones.mean() == pytest.approx(1.0, rel=1e-5)
    assert out.mean() == pytest.approx(x.mean(), rel=0.02)
    # keep_prob=1 is the identity in training too.
    np.testing.assert_array_equal(
        _np(DropBlock2D(3, keep_prob=1.0)(x, training=True)), x
    )


def test_dropblock_channels_first_matches_channels_last():
    x = np.random.default_rng(1).normal(size=(4, 9, 9, 3)).astype("float32")
    last = _np(DropBlock2D(3, 0.8, seed=5)(x, training=True))
    first = DropBlock2D(3, 0.8, data_format="channels_first", seed=5)
    out = _np(first(x.transpose(0, 3, 1, 2), training=True))
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), last, rtol=1e-6)


def test_dropblock_warmup():
    x = np.ones((256, 8, 8, 4), "float32")
    layer = DropBlock2D(2, keep_prob=0.6, warmup_steps=4, seed=0)
    rates, errors = [], []
    for _ in range(7):
        per_map = _dropped(layer, x).mean(axis=(1, 2)).ravel()
        rates.append(per_map.mean())
        errors.append(per_map.std(ddof=1) / math.sqrt(per_map.size))
    assert int(_np(layer.step)) == 4  # stops counting at warmup_steps
    layer(x, training=False)
    assert int(_np(layer.step)) == 4  # inference does not count
    # Call t uses keep_prob 1 - 0.4 * min(t / 4, 1).
    assert rates[0] == 0.0
    for t, (rate, error) in enumerate(zip(rates, errors)):
        keep = 1 - 0.4 * min(t / 4, 1)
        expected = expected_drop_fraction(8, 8, 2, keep)
        assert abs(rate - expected) <= 4 * error, (t, rate, expected)
    assert rates[1] < rates[2] < rates[3] < min(rates[4:])


def test_dropblock_arguments():
    for block_size in [0, -3, 2.0, True, "7", None]:
        with pytest.raises(ValueError, match="`block_size` must be an integ"):
            DropBlock2D(block_size=block_size)
    for keep_prob in [0, 0.0, -0.1, 1.01, math.nan, "x", None, True]:
        with pytest.raises(ValueError, match=r"`keep_prob` must be in the "):
            DropBlock2D(keep_prob=keep_prob)
    for warmup_steps in [-1, 1.5, "2"]:
        with pytest.raises(ValueError, match="`warmup_steps` must be an int"):
            DropBlock2D(warmup_steps=warmup_steps)
    with pytest.raises(ValueError, match="`data_format`"):
        DropBlock2D(data_format="NCHW")
    with pytest.raises(ValueError, match="`block_size` must be at most"):
        DropBlock2D(block_size=7)(np.ones((1, 6, 8, 2), "float32"))
    with pytest.raises(ValueError, match="`block_size` must be at most"):
        keras.Sequential([keras.Input((8, 5, 3)), DropBlock2D(7)])
    with pytest.raises(ValueError, match="4D"):
        DropBlock2D(3)(np.ones((2, 8, 8), "float32"))
    # A block as large as the map is allowed: one seed position.
    layer = DropBlock2D(4, keep_prob=0.5, seed=0)
    out = _np(layer(np.ones((64, 4, 4, 1), "float32"), training=True))
    all_dropped = (out == 0).all(axis=(1, 2, 3))
    assert (all_dropped | (out != 0).all(axis=(1, 2, 3))).all()
    assert 0 < all_dropped.sum() < 64


# --------------------------------------------------------------------------
# Both: training with SEHT, serialization
# --------------------------------------------------------------------------


def _image_model():
    return keras_seht.Sequential(
        [
            keras.Input((8, 8, 1)),
            Cutout(3, seed=0),
            keras.layers.Conv2D(2, 3, padding="same", activation="tanh"),
            DropBlock2D(3, keep_prob=0.8, warmup_steps=10, seed=1),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_layers_in_seht_model_fit_and_save(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(12,)).astype("int32")
    model = _image_model()
    model.compile(
        optimizer="sgd",
        loss=keras_seht.losses.SparseCategoricalCrossentropy(0.1),
        seht=keras_seht.SEHTD(p=0.1),
    )
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    dropblock = model.layers[2]
    assert int(_np(dropblock.step)) == 3  # one count per training step
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[0], Cutout)
    assert loaded.layers[2].get_config() == dropblock.get_config()
    assert int(_np(loaded.layers[2].step)) == 3
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )


def test_layer_config_round_trip():
    for layer in [
        Cutout(5, data_format="channels_first", seed=3, name="cut"),
        DropBlock2D(5, 0.85, warmup_steps=100, seed=4, name="db"),
    ]:
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        restored = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(restored) is type(layer)
        assert restored.get_config() == config
