r"""Losses for the paper's baselines that Keras does not ship.

Keras' `keras.losses.CategoricalCrossentropy` smooths one-hot labels, but
its sparse (integer-label) counterpart has no ``label_smoothing``; the
label-smoothing baseline of the paper's tables (CIFAR-10/100 with integer
labels, WikiText-2 with integer token targets) needs exactly that.

Example:
>>> import keras, keras_seht, numpy as np
>>> sparse = keras_seht.losses.SparseCategoricalCrossentropy(
...     label_smoothing=0.1)
>>> dense = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
>>> y = np.array([0, 2])
>>> p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
>>> bool(np.isclose(float(sparse(y, p)), float(dense(np.eye(3)[y], p))))
True

References:
    Christian Szegedy, Vincent Vanhoucke, Sergey Ioffe, Jon Shlens, Zbigniew
    Wojna. "Rethinking the Inception Architecture for Computer Vision."
    CVPR 2016, Sec. 7. arXiv:1512.00567.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def _check_label_smoothing(label_smoothing: Any) -> float:
    try:
        value = float(label_smoothing)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(label_smoothing, bool) or not (0.0 <= value < 1.0):
        raise ValueError(
            "`label_smoothing` must be in the interval [0, 1). Received: "
            f"label_smoothing={label_smoothing!r}"
        )
    return value


def _log_probabilities(y_pred: Any, from_logits: bool) -> Any:
    """Log-probabilities over the last axis, computed the way Keras does.

    From logits: a numerically stable ``log_softmax``. From probabilities:
    renormalized to sum to one and clipped to
    ``[epsilon, 1 - epsilon]`` (``keras.config.epsilon()``) before the
    log, as Keras' cross-entropies do.
    """
    if from_logits:
        return ops.log_softmax(y_pred, axis=-1)
    eps = keras.config.epsilon()
    probs = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
    return ops.log(ops.clip(probs, eps, 1.0 - eps))


@keras.saving.register_keras_serializable(package="keras_seht")
class SparseCategoricalCrossentropy(keras.losses.Loss):
    r"""Cross-entropy with integer labels and label smoothing.

    For a label :math:`y \in \{0, \dots, K-1\}` and predicted probabilities
    :math:`p` over :math:`K` classes (the last axis of ``y_pred``), label
    smoothing with :math:`\varepsilon` = ``label_smoothing`` replaces the
    one-hot target by

    .. math::

        \tilde y_k = (1 - \varepsilon)\,[k = y] + \frac{\varepsilon}{K},

    and the loss is :math:`-\sum_k \tilde y_k \log p_k`, i.e.

    .. math::

        \ell(y, p) = (1 - \varepsilon)\,(-\log p_y)
            + \varepsilon \cdot \frac{1}{K} \sum_{k} (-\log p_k),

    computed in this form, without building a :math:`K`-wide one-hot
    tensor (for language models with large vocabularies). This is the same
    target as `keras.losses.CategoricalCrossentropy(label_smoothing=...)`
    applied to one-hot labels. The first term is Keras' own
    `keras.losses.sparse_categorical_crossentropy`, so with
    ``label_smoothing=0`` the loss *is* Keras' sparse categorical
    cross-entropy (including, under TensorFlow, Keras' use of the logits
    cached on a softmax output). The smoothing term uses ``log_softmax``
    of logits (``from_logits=True``) or the log of the probabilities
    renormalized and clipped to ``[epsilon, 1 - epsilon]`` with
    ``keras.config.epsilon()``, as Keras does.

    Labels may have shape ``(N,)`` or ``(N, 1)`` for predictions of shape
    ``(N, K)``, and any extra axes, e.g. ``(N, T)`` token targets with
    ``(N, T, K)`` predictions. ``sample_weight`` and ``reduction`` behave as
    in every `keras.losses.Loss`, and so does a Keras mask carried by
    ``y_pred`` (e.g. from ``Embedding(mask_zero=True)``): use either one to
    leave out padding, in place of Keras' ``ignore_class``.

    Args:
        label_smoothing: :math:`\varepsilon`, in [0, 1). 0 gives the plain
            sparse cross-entropy; 0.1 is the usual choice (Szegedy et al.).
        from_logits: Whether ``y_pred`` holds logits (True) or
            probabilities (False, the default, as in Keras).
        reduction: As in `keras.losses.Loss`; defaults to
            ``"sum_over_batch_size"``.
        name: Name of the loss instance.
        dtype: Dtype of the loss computation (defaults to
            ``keras.config.floatx()``), as in `keras.losses.Loss`.

    Example:
    >>> import numpy as np
    >>> loss = SparseCategoricalCrossentropy(label_smoothing=0.1)
    >>> y_true = np.array([0, 1])
    >>> y_pred = np.array([[0.5, 0.5], [0.5, 0.5]])
    >>> round(float(loss(y_true, y_pred)), 4)  # log 2, whatever the labels
    0.6931

    Usage with ``compile``:

    ```python
    model.compile(
        optimizer="sgd",
        loss=keras_seht.losses.SparseCategoricalCrossentropy(0.1),
        seht=keras_seht.SEHTD(p=0.01),
    )
    ```

    References:
        Szegedy et al. "Rethinking the Inception Architecture for Computer
        Vision." CVPR 2016, Sec. 7. https://arxiv.org/abs/1512.00567
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        from_logits: bool = False,
        reduction: str | None = "sum_over_batch_size",
        name: str = "sparse_categorical_crossentropy",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        if not isinstance(from_logits, bool):
            raise ValueError(
                "`from_logits` must be a bool. Received: from_logits="
                f"{from_logits!r}"
            )
        self.from_logits = from_logits

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """The per-example loss, shaped like ``y_pred`` without its last axis.

        Args:
            y_true: Integer class ids, shaped like ``y_pred`` without its
                last axis, or with a trailing axis of size 1.
            y_pred: Probabilities or logits, classes on the last axis.

        Returns:
            The unreduced smoothed cross-entropy.
        """
        nll = keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=self.from_logits
        )
        eps = self.label_smoothing
        if eps == 0.0:
            return nll
        uniform = -ops.mean(_log_probabilities(y_pred, self.from_logits), -1)
        return (1.0 - eps) * nll + eps * ops.cast(uniform, nll.dtype)

    def get_config(self) -> dict[str, Any]:
        """The loss's config, for Keras serialization."""
        config = super().get_config()
        config.update(
            {
                "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits,
            }
        )
        return config

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(label_smoothing={self.label_smoothing!r}, "
            f"from_logits={self.from_logits!r})"
        )
