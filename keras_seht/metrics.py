r"""Perplexity: the language-modeling metric of SEHT's WikiText-2 results.

For tokens :math:`t = 1..N` with targets :math:`y_t`, predicted
distributions :math:`p_t` and weights :math:`w_t` (1 by default),

.. math::

    \mathrm{PPL} = \exp\Big(\frac{\sum_t w_t\,(-\log p_t(y_t))}
                                 {\sum_t w_t}\Big),

the exponential of the token-mean negative log-likelihood (NLL, the sparse
categorical cross-entropy in nats). The classic PyTorch
``word_language_model`` recipe reports exactly this: ``exp`` of the
token-weighted mean loss over a whole split.

Example:
>>> import keras_seht
>>> ppl = keras_seht.metrics.Perplexity(from_logits=True)
>>> ppl.update_state([0, 1], [[0.0, 0.0], [0.0, 0.0]])  # uniform over 2
>>> round(float(ppl.result()), 4)
2.0
>>> round(keras_seht.metrics.perplexity_from_loss(0.0), 4)  # certain
1.0
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_seht import _keras_compat as compat


def perplexity_from_loss(mean_nll: Any) -> Any:
    r"""Perplexity from a mean negative log-likelihood: :math:`\exp(L)`.

    Use it on a token-mean cross-entropy in nats, e.g. the ``loss`` that
    `model.evaluate` returns for a sparse categorical cross-entropy over
    equal-sized batches. (Averaging per-batch perplexities instead would
    overestimate it: :math:`\exp` is convex.)

    Args:
        mean_nll: A number, array or tensor of mean NLLs.

    Returns:
        A float for a scalar input (``inf`` on overflow), else a NumPy array.

    Example:
    >>> round(perplexity_from_loss(4.5), 2)
    90.02
    """
    value = np.asarray(ops.convert_to_numpy(mean_nll), dtype="float64")
    with np.errstate(over="ignore"):
        result = np.exp(value)
    return float(result) if result.ndim == 0 else result


@keras.saving.register_keras_serializable(package="keras_seht")
class Perplexity(keras.metrics.Metric):
    r"""Perplexity: exp of the token-mean cross-entropy since the last reset.

    .. math::

        \mathrm{PPL} = \exp\Big(\frac{\sum_t w_t\,(-\log p_t(y_t))}
                                     {\sum_t w_t}\Big)

    The metric accumulates the weighted sum of the NLLs and the sum of the
    weights over every batch seen, so the result is exact across batches of
    different sizes: it is not a mean of per-batch perplexities. Before any
    update it is ``exp(0) = 1``.

    A token's weight :math:`w_t` is the product of its `sample_weight`
    (broadcast over the trailing axes, e.g. one weight per sequence), 0 if
    its target is `mask_token_id`, and 0 if the prediction carries a Keras
    mask (``mask_zero=True`` upstream) that is false there. In
    `model.compile`, Keras passes the data's sample weights only to
    ``weighted_metrics``: put the metric there when the weights matter (e.g.
    a padded :class:`keras_seht.data.wikitext.BPTTDataset`).

    Args:
        from_logits: Whether `y_pred` holds logits (the default, for a final
            ``Dense`` without softmax) rather than probabilities.
        mask_token_id: A target id to ignore (padding, or ``-100``), or
            None.
        name: Name of the metric (``"perplexity"``; logs show it as
            ``perplexity`` and ``val_perplexity``).
        dtype: Dtype of the accumulators and result (float32 by default;
            the sums are float32, which is enough for WikiText-2-sized
            splits).

    Example:
    >>> import numpy as np
    >>> m = Perplexity(from_logits=False)
    >>> m.update_state([0, 1], np.array([[0.5, 0.5], [0.25, 0.75]]))
    >>> round(float(m.result()), 4)  # exp((log 2 + log 4/3) / 2)
    1.633

    In a model::

        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras_seht.metrics.Perplexity()],
        )
    """

    def __init__(
        self,
        from_logits: bool = True,
        mask_token_id: int | None = None,
        name: str = "perplexity",
        dtype: Any = None,
        **kwargs: Any,
    ):
        super().__init__(name=name, dtype=dtype, **kwargs)
        if not isinstance(from_logits, (bool, np.bool_)):
            raise ValueError(
                "`from_logits` must be a bool. Received: "
                f"from_logits={from_logits!r}"
            )
        if mask_token_id is not None and (
            isinstance(mask_token_id, bool)
            or not isinstance(mask_token_id, (int, np.integer))
        ):
            raise ValueError(
                "`mask_token_id` must be an integer or None. Received: "
                f"mask_token_id={mask_token_id!r}"
            )
        self.from_logits = bool(from_logits)
        self.mask_token_id = (
            None if mask_token_id is None else int(mask_token_id)
        )
        self.total_nll = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="total_nll"
        )
        self.total_weight = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="total_weight"
        )

    def update_state(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None
    ) -> None:
        """Adds a batch of integer targets `y_true` and predictions `y_pred`.

        `y_true` has shape ``(...)`` (or ``(..., 1)``), `y_pred` has shape
        ``(..., vocab_size)``.
        """
        keras_mask = compat.get_keras_mask(y_pred)
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), self.dtype)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, axis=-1)
        y_true = ops.cast(y_true, "int32")
        rank = len(y_true.shape)

        weight = ops.ones_like(y_true, dtype=self.dtype)
        if self.mask_token_id is not None:
            keep = ops.not_equal(y_true, self.mask_token_id)
            y_true = ops.where(keep, y_true, ops.zeros_like(y_true))
            weight = ops.cast(keep, self.dtype)
        for extra in (keras_mask, sample_weight):
            if extra is None:
                continue
            extra = ops.cast(ops.convert_to_tensor(extra), self.dtype)
            if len(extra.shape) == rank + 1 and extra.shape[-1] == 1:
                extra = ops.squeeze(extra, axis=-1)
            while len(extra.shape) < rank:
                extra = ops.expand_dims(extra, axis=-1)
            weight = weight * extra

        nll = ops.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=self.from_logits
        )
        self.total_nll.assign_add(ops.sum(nll * weight))
        self.total_weight.assign_add(ops.sum(weight))

    def result(self) -> Any:
        """The perplexity so far: exp of the weighted mean NLL."""
        return ops.exp(ops.divide_no_nan(self.total_nll, self.total_weight))

    def get_config(self) -> dict[str, Any]:
        """The metric's config, for Keras serialization."""
        config = super().get_config()
        config.update(
            from_logits=self.from_logits, mask_token_id=self.mask_token_id
        )
        return config
