"""Perplexity: exact exp(token-mean NLL), checked against NumPy."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_seht.metrics import Perplexity, perplexity_from_loss

VOCAB = 5


def log_softmax(logits):
    logits = np.asarray(logits, "float64")
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def nll(logits, y):
    """Per-token negative log-likelihoods, in float64."""
    return -np.take_along_axis(log_softmax(logits), y[..., None], -1)[..., 0]


def batches(seed=0):
    """Two batches of different sizes and ranks: 4 tokens, then 2 x 3."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4, VOCAB)).astype("float32")
    b = 2 * rng.normal(size=(2, 3, VOCAB)).astype("float32")
    ya = rng.integers(0, VOCAB, size=(4,)).astype("int32")
    yb = rng.integers(0, VOCAB, size=(2, 3)).astype("int32")
    return (ya, a), (yb, b)


def softmax(logits):
    return np.exp(log_softmax(logits)).astype("float32")


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x))


def result(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


class TestPerplexity:
    def test_logits_two_batches(self):
        (ya, a), (yb, b) = batches()
        metric = Perplexity()
        metric.update_state(ya, a)
        metric.update_state(yb, b)
        tokens = np.concatenate([nll(a, ya), nll(b, yb).ravel()])
        np.testing.assert_allclose(result(metric), np.exp(tokens.mean()), 1e-5)
        # Not the mean of the two batch perplexities.
        per_batch = np.mean(
            [np.exp(nll(a, ya).mean()), np.exp(nll(b, yb).mean())]
        )
        assert abs(result(metric) - per_batch) > 1e-2

    def test_probabilities(self):
        (ya, a), (yb, b) = batches(1)
        metric = Perplexity(from_logits=False)
        metric.update_state(ya, softmax(a))
        metric.update_state(yb[..., None], softmax(b))  # (..., 1) targets
        tokens = np.concatenate([nll(a, ya), nll(b, yb).ravel()])
        np.testing.assert_allclose(result(metric), np.exp(tokens.mean()), 1e-5)

    def test_sample_weights(self):
        (ya, a), (yb, b) = batches(2)
        wa = np.array([1.0, 0.0, 2.0, 0.5], "float32")  # one per token
        wb = np.array([3.0, 0.0], "float32")  # one per sequence
        metric = Perplexity()
        metric.update_state(ya, a, sample_weight=wa)
        metric.update_state(yb, b, sample_weight=wb)
        wb_tokens = np.repeat(wb, 3)
        total = (nll(a, ya) * wa).sum() + (nll(b, yb).ravel() * wb_tokens).sum()
        expected = np.exp(total / (wa.sum() + wb_tokens.sum()))
        np.testing.assert_allclose(result(metric), expected, rtol=1e-5)

    @pytest.mark.parametrize("mask_id", [0, -100])
    def test_mask_token_id(self, mask_id):
        (_, a), (yb, b) = batches(3)
        yb = np.where(np.arange(3) == 2, mask_id, yb).astype("int32")
        ya = np.array([1, mask_id, 2, 3], "int32")
        metric = Perplexity(mask_token_id=mask_id)
        metric.update_state(ya, a)
        metric.update_state(yb, b, sample_weight=np.array([1.0, 2.0]))
        keep_a, keep_b = ya != mask_id, yb != mask_id
        weight_b = keep_b * np.array([[1.0], [2.0]])
        total = (
            nll(a, np.where(keep_a, ya, 0))[keep_a].sum()
            + (nll(b, np.where(keep_b, yb, 0)) * weight_b).sum()
        )
        expected = np.exp(total / (keep_a.sum() + weight_b.sum()))
        np.testing.assert_allclose(result(metric), expected, rtol=1e-5)

    def test_reset(self):
        (ya, a), (yb, b) = batches(4)
        metric = Perplexity()
        assert result(metric) == 1.0  # exp(0) before any update
        metric.update_state(ya, a)
        metric.reset_state()
        assert result(metric) == 1.0
        metric.update_state(yb, b)
        np.testing.assert_allclose(
            result(metric), np.exp(nll(b, yb).mean()), rtol=1e-5
        )

    def test_serialization(self):
        metric = Perplexity(from_logits=False, mask_token_id=0, name="ppl")
        config = metric.get_config()
        assert config["from_logits"] is False and config["mask_token_id"] == 0
        assert keras.saving.get_registered_name(Perplexity) == (
            "keras_seht>Perplexity"
        )
        for clone in (
            Perplexity.from_config(config),
            keras.metrics.deserialize(keras.metrics.serialize(metric)),
        ):
            assert isinstance(clone, Perplexity)
            assert clone.name == "ppl"
            assert clone.from_logits is False and clone.mask_token_id == 0
        assert Perplexity().name == "perplexity"

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="`from_logits`"):
            Perplexity(from_logits="yes")
        with pytest.raises(ValueError, match="`mask_token_id`"):
            Perplexity(mask_token_id=1.5)


class TestInModel:
    def test_compile_and_evaluate(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(10, 3)).astype("float32")
        y = rng.integers(0, VOCAB, size=(10,)).astype("int32")
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(VOCAB)])
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[Perplexity()],
        )
        # Batches of 4, 4 and 2: exact over all 10 samples.
        logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
        expected = np.exp(nll(predict(model, x), y).mean())
        np.testing.assert_allclose(logs["perplexity"], expected, rtol=1e-5)

        model.fit(
            x, y, epochs=1, batch_size=5, verbose=0, validation_data=(x, y)
        )
        assert "val_perplexity" in model.history.history

    def test_keras_mask_is_respected(self):
        # Embedding(mask_zero=True): positions whose input is 0 do not count.
        x = np.array([[1, 2, 0], [3, 0, 0]], "int32")
        y = np.array([[1, 2, 3], [4, 1, 2]], "int32")
        model = keras.Sequential(
            [
                keras.Input((3,), dtype="int32"),
                keras.layers.Embedding(VOCAB, 4, mask_zero=True),
                keras.layers.Dense(VOCAB),
            ]
        )
        model.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[Perplexity()],
        )
        logs = model.evaluate(x, y, verbose=0, return_dict=True)
        tokens = nll(predict(model, x), y)[x != 0]
        np.testing.assert_allclose(
            logs["perplexity"], np.exp(tokens.mean()), rtol=1e-5
        )


def test_perplexity_from_loss():
    assert perplexity_from_loss(0.0) == 1.0
    assert isinstance(perplexity_from_loss(np.float32(2.0)), float)
    np.testing.assert_allclose(perplexity_from_loss(np.log(95.65)), 95.65)
    np.testing.assert_allclose(
        perplexity_from_loss(np.array([0.0, 1.0])), [1.0, np.e]
    )
    assert perplexity_from_loss(1000.0) == float("inf")
    tensor = keras.ops.convert_to_tensor(np.log(4.0))
    np.testing.assert_allclose(perplexity_from_loss(tensor), 4.0, rtol=1e-6)
