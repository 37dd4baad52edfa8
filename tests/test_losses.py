"""`keras_seht.losses.SparseCategoricalCrossentropy`: label smoothing for
integer labels, checked against NumPy and against Keras' own losses.

Backend-agnostic: runs unchanged under KERAS_BACKEND=torch, jax and
tensorflow.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import make_data, tanh_mlp

import keras_seht
from keras_seht.losses import SparseCategoricalCrossentropy

SMOOTHING_RANGE = r"`label_smoothing` must be in the interval \[0, 1\)"


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _numpy_log_probs(y_pred: np.ndarray, from_logits: bool) -> np.ndarray:
    y_pred = np.asarray(y_pred, "float64")
    if from_logits:
        shifted = y_pred - y_pred.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    eps = keras.config.epsilon()
    probs = y_pred / y_pred.sum(axis=-1, keepdims=True)
    return np.log(np.clip(probs, eps, 1.0 - eps))


def numpy_smoothed_ce(y_true, y_pred, eps, from_logits):
    """-sum_k y~_k log p_k with y~ = (1 - eps) onehot(y) + eps / K."""
    k = y_pred.shape[-1]
    labels = np.asarray(y_true).astype("int64")
    if labels.ndim == y_pred.ndim:
        labels = labels[..., 0]
    target = (1.0 - eps) * np.eye(k)[labels] + eps / k
    return -(target * _numpy_log_probs(y_pred, from_logits)).sum(axis=-1)


def _reduce(per_example, sample_weight, reduction):
    weighted = per_example * (1.0 if sample_weight is None else sample_weight)
    if reduction is None:
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / weighted.size  # "sum_over_batch_size"


def _inputs(shape, k, from_logits, seed):
    """Labels of `shape` and logits or probabilities of shape + (k,)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=shape).astype("int32")
    logits = (3.0 * rng.normal(size=shape + (k,))).astype("float32")
    if from_logits:
        return y, logits
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return y, (probs / probs.sum(axis=-1, keepdims=True)).astype("float32")


CASES = [
    # (label shape, classes): (N,), (N, 1), sequence targets (N, T).
    ((8,), 5),
    ((8, 1), 4),
    ((3, 7), 11),
]


@pytest.mark.parametrize("from_logits", [True, False])
def test_matches_numpy(from_logits):
    for (shape, k), eps in zip(CASES, [0.1, 0.25, 0.9]):
        y, y_pred = _inputs(shape, k, from_logits, seed=k)
        pred_shape = y_pred.shape[:-1]
        weights = np.random.default_rng(1).uniform(size=pred_shape)
        expected = numpy_smoothed_ce(y, y_pred, eps, from_logits)
        for reduction in ["sum_over_batch_size", "sum", None]:
            for sample_weight in [None, weights.astype("float32")]:
                loss = SparseCategoricalCrossentropy(
                    eps, from_logits=from_logits, reduction=reduction
                )
                got = loss(y, y_pred, sample_weight=sample_weight)
                np.testing.assert_allclose(
                    keras.ops.convert_to_numpy(got),
                    _reduce(expected, sample_weight, reduction),
                    rtol=2e-5,
                    atol=1e-6,
                    err_msg=f"{shape=} {eps=} {reduction=}",
                )


def test_hand_computed_values():
    # Two classes, p = (0.8, 0.2), label 0, eps = 0.2: target (0.9, 0.1).
    loss = SparseCategoricalCrossentropy(label_smoothing=0.2)
    value = float(loss(np.array([0]), np.array([[0.8, 0.2]])))
    assert value == pytest.approx(-(0.9 * math.log(0.8) + 0.1 * math.log(0.2)))
    # Uniform predictions: log K whatever the labels and the smoothing.
    logits = np.zeros((4, 3), "float32")
    loss = SparseCategoricalCrossentropy(0.5, from_logits=True)
    value = float(loss(np.array([0, 1, 2, 0]), logits))
    assert value == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize("from_logits", [True, False])
def test_zero_smoothing_equals_keras(from_logits):
    for shape, k in CASES:
        y, y_pred = _inputs(shape, k, from_logits, seed=2 * k)
        weights = np.random.default_rng(3).uniform(size=y_pred.shape[:-1])
        for reduction in ["sum_over_batch_size", None]:
            ours = SparseCategoricalCrossentropy(
                0.0, from_logits=from_logits, reduction=reduction
            )
            theirs = keras.losses.SparseCategoricalCrossentropy(
                from_logits=from_logits, reduction=reduction
            )
            for sample_weight in [None, weights.astype("float32")]:
                np.testing.assert_allclose(
                    keras.ops.convert_to_numpy(ours(y, y_pred, sample_weight)),
                    keras.ops.convert_to_numpy(
                        theirs(y, y_pred, sample_weight)
                    ),
                    rtol=1e-6,
                )


@pytest.mark.parametrize("from_logits", [True, False])
def test_equals_categorical_crossentropy_on_one_hot(from_logits):
    y, y_pred = _inputs((3, 7), 6, from_logits, seed=5)
    ours = SparseCategoricalCrossentropy(0.15, from_logits=from_logits)
    theirs = keras.losses.CategoricalCrossentropy(
        label_smoothing=0.15, from_logits=from_logits
    )
    np.testing.assert_allclose(
        float(ours(y, y_pred)),
        float(theirs(np.eye(6, dtype="float32")[y], y_pred)),
        rtol=1e-5,
    )


def test_minimum_is_the_smoothed_target():
    # d loss / d z = softmax(z) - y~: zero exactly at softmax(z) = y~.
    eps, k = 0.3, 4
    target = (1 - eps) * np.eye(k)[[2]] + eps / k
    logits = np.log(target).astype("float32")
    loss = SparseCategoricalCrossentropy(eps, from_logits=True)
    value = float(loss(np.array([2]), logits))
    # At the optimum the loss is the entropy of y~.
    assert value == pytest.approx(-(target * np.log(target)).sum(), rel=1e-5)
    nudged = logits + np.array([[0.0, 0.0, 0.05, 0.0]], "float32")
    assert float(loss(np.array([2]), nudged)) > value


def test_keras_mask_on_predictions_leaves_out_padding():
    # A language-model head on padded token ids: Embedding(mask_zero=True)
    # masks the padding, and the loss averages over real tokens only.
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(9, 4, mask_zero=True),
            keras.layers.Dense(9),
        ]
    )
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, 9, size=(5, 6)).astype("int32")
    tokens[:, 4:] = 0
    tokens[0, 2:] = 0
    targets = rng.integers(0, 9, size=(5, 6)).astype("int32")
    logits = model(tokens)
    valid = tokens != 0
    per_token = numpy_smoothed_ce(targets, _np(logits), 0.1, True)
    loss = SparseCategoricalCrossentropy(0.1, from_logits=True)
    assert float(_np(loss(targets, logits))) == pytest.approx(
        per_token[valid].mean(), rel=1e-5
    )
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain = SparseCategoricalCrossentropy(from_logits=True)
    assert float(_np(plain(targets, logits))) == pytest.approx(
        float(_np(keras_loss(targets, logits))), rel=1e-6
    )


def test_label_smoothing_range():
    for value in [-0.1, 1.0, 1.5, math.nan, math.inf, "abc", None, True]:
        with pytest.raises(ValueError, match=SMOOTHING_RANGE):
            SparseCategoricalCrossentropy(label_smoothing=value)
    for value in [0, 0.0, 0.1, 0.999, np.float32(0.5)]:
        loss = SparseCategoricalCrossentropy(label_smoothing=value)
        assert loss.label_smoothing == pytest.approx(float(value))
    with pytest.raises(ValueError, match="`from_logits` must be a bool"):
        SparseCategoricalCrossentropy(0.1, from_logits="yes")


def test_config_round_trip():
    loss = SparseCategoricalCrossentropy(
        0.1, from_logits=True, reduction="sum", name="smooth_ce"
    )
    config = loss.get_config()
    assert config == {
        "name": "smooth_ce",
        "reduction": "sum",
        "label_smoothing": 0.1,
        "from_logits": True,
    }
    clone = SparseCategoricalCrossentropy.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == (
        "keras_seht>SparseCategoricalCrossentropy"
    )
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, SparseCategoricalCrossentropy)
    assert restored.get_config() == config
    assert keras.losses.get(serialized).get_config() == config


def test_model_save_load_round_trip(tmp_path):
    x, y = make_data(n=16)
    model = tanh_mlp()
    model.compile(
        optimizer="sgd",
        loss=keras_seht.losses.SparseCategoricalCrossentropy(0.1),
        seht=keras_seht.SEHTD(p=0.1),
    )
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")

    assert type(loaded) is type(model)
    assert loaded.seht == keras_seht.SEHTD(p=0.1)
    assert isinstance(loaded.loss, SparseCategoricalCrossentropy)
    assert loaded.loss.label_smoothing == 0.1
    assert loaded.loss.from_logits is False
    np.testing.assert_allclose(
        loaded.evaluate(x, y, verbose=0),
        model.evaluate(x, y, verbose=0),
        rtol=1e-5,
    )
