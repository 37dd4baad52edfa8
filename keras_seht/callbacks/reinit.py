r"""Hessian-guided weight re-initialization, as a Keras callback.

The method of "Using Hessians as a Regularization Technique": after an
optimizer update, the weights of the last layers whose loss curvature
:math:`|H_{ii}|` is largest (the top ``k`` percent) are re-initialized,
which moves the model away from sharp directions.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import keras
import numpy as np

from keras_seht import _keras_compat as compat
from keras_seht import spectrum
from keras_seht._checks import (
    check_bool,
    check_choice,
    check_int,
    check_samples,
)
from keras_seht.layout import weight_layout
from keras_seht.operators import HessianOperator

GRANULARITIES = ("weight", "unit")
AGGREGATES = ("sum", "mean")
DIAGONALS = ("exact", "hutchinson", "auto")


def _initializer(value: Any, name: str) -> keras.initializers.Initializer:
    try:
        initializer = keras.initializers.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be a Keras initializer or its name (e.g. 'zeros', "
            f"'random_uniform', 'glorot_uniform'). Received: {name}={value!r}"
        ) from e
    if initializer is None:
        raise ValueError(f"`{name}` must not be None.")
    return initializer


def _seeded(initializer: Any, seed: int) -> Any:
    """A copy of `initializer` drawing from `seed` (if it takes a seed)."""
    if not hasattr(initializer, "get_config"):
        return initializer
    config = initializer.get_config()
    if "seed" not in config:
        return initializer
    config["seed"] = seed
    return type(initializer).from_config(config)


class HessianReinit(keras.callbacks.Callback):
    r"""Re-initializes the weights of highest loss curvature during training.

    Every ``every`` optimizer updates, for the last ``n_layers`` layers
    that own trainable weights:

    1. compute the diagonal :math:`d_i = H_{ii}` of the Hessian of the
       compiled loss with respect to those layers' weights, on a batch of
       ``batch_size`` samples drawn from ``(x, y)`` (Keras callbacks do not
       see the training batch: pass the training data, or a subset);
    2. score by :math:`|d_i|`; with ``granularity="unit"``, score each
       output unit (the last axis of the kernel: a Dense neuron or a
       convolution filter) by the sum or mean (``aggregate``) of
       :math:`|d_i|` over its incoming weights and its bias;
    3. in each layer, re-initialize the top ``k`` percent of weights (or
       of units: all their incoming weights and their bias). Kernels get
       ``initializer``, biases (1-D variables) ``bias_initializer``;
    4. with ``reset_optimizer_state=True``, zero the optimizer's slots
       (SGD momentum, Adam's moments, ...) at the re-initialized entries,
       so that stale momentum does not undo the re-initialization (the
       iteration count is shared and left alone).

    The diagonal (``diagonal``):

    - ``"exact"``: every :math:`H_{ii}`, from batched rows of the Hessian:
      one Hessian-vector product per trainable weight of the *model*,
      affordable for models up to ``max_exact_weights`` weights;
    - ``"hutchinson"``: :math:`\hat d = \frac{1}{S}\sum_s \sigma_s \odot
      H\sigma_s` with Rademacher :math:`\sigma_s` supported on the
      selected layers only (``samples`` = S HVPs), unbiased since
      :math:`E[\sigma_i\sigma_j] = \delta_{ij}`; its error on
      :math:`d_i` is :math:`\sqrt{\sum_{j\ne i} H_{ij}^2 / S}`;
    - ``"auto"``: exact when the model has at most ``max_exact_weights``
      trainable weights, else Hutchinson.

    A diagonal with NaN/Inf entries re-initializes nothing; the step is
    counted in the ``hessian_reinit_skipped`` log entry and warned about
    once. ``hessian_reinit_weights`` logs how many weights were
    re-initialized in the epoch. The same model, data and seed give the
    same choices and values.

    The paper's MNIST setting (seed-001): MLP 784-1000-1000-500-200-10
    with ReLU, ``k=10`` worked well, 20 worse, 30 was unstable.

    Args:
        x: Inputs to draw the Hessian's batch from (array-likes).
        y: Their targets.
        k: Percentage of weights (or units) re-initialized per layer, in
            (0, 100).
        n_layers: How many of the last weight-bearing layers to treat.
        initializer: Keras initializer (name or object) for kernels, e.g.
            ``"zeros"``, ``"random_uniform"``, ``"glorot_uniform"``.
        bias_initializer: Initializer for 1-D variables (biases).
        every: Re-initialize after every ``every``-th optimizer update.
        granularity: ``"weight"`` or ``"unit"``.
        aggregate: ``"sum"`` or ``"mean"``, for ``granularity="unit"``.
        diagonal: ``"exact"``, ``"hutchinson"`` or ``"auto"``.
        samples: Hutchinson probes per re-initialization.
        batch_size: Samples of ``(x, y)`` the Hessian is taken on.
        seed: Seed of the batches, probes and initializers.
        training: Forward pass in training mode for the Hessian.
        reset_optimizer_state: Zero the optimizer slots of re-initialized
            entries.
        max_exact_weights: Model size up to which ``"auto"`` is exact.

    Example:
    >>> import keras, keras_seht, numpy as np
    >>> x = np.random.rand(64, 4).astype("float32")
    >>> y = np.random.randint(0, 3, 64)
    >>> model = keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True))
    >>> reinit = keras_seht.callbacks.HessianReinit(x, y, k=10, n_layers=2)
    >>> _ = model.fit(x, y, epochs=1, callbacks=[reinit], verbose=0)
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        k: float = 10.0,
        n_layers: int = 1,
        initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        every: int = 1,
        granularity: str = "weight",
        aggregate: str = "sum",
        diagonal: str = "auto",
        samples: int = 100,
        batch_size: int = 128,
        seed: int = 0,
        training: bool = False,
        reset_optimizer_state: bool = True,
        max_exact_weights: int = 20_000,
    ) -> None:
        super().__init__()
        try:
            k_value = float(k)
        except (TypeError, ValueError):
            k_value = float("nan")
        if isinstance(k, bool) or not (0.0 < k_value < 100.0):
            raise ValueError(
                f"`k` must be a percentage in (0, 100). Received: k={k!r}"
            )
        self.k = k_value
        self.n_layers = check_int("n_layers", n_layers)
        self.initializer = _initializer(initializer, "initializer")
        self.bias_initializer = _initializer(
            bias_initializer, "bias_initializer"
        )
        self.every = check_int("every", every)
        self.granularity = check_choice(
            "granularity", granularity, GRANULARITIES
        )
        self.aggregate = check_choice("aggregate", aggregate, AGGREGATES)
        self.diagonal = check_choice("diagonal", diagonal, DIAGONALS)
        self.samples = check_int("samples", samples)
        self.batch_size = check_int("batch_size", batch_size)
        self.max_exact_weights = check_int(
            "max_exact_weights", max_exact_weights
        )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an integer. Received: {seed!r}")
        self.seed = int(seed)
        self.training = check_bool("training", training)
        self.reset_optimizer_state = check_bool(
            "reset_optimizer_state", reset_optimizer_state
        )
        self._num_samples = check_samples("x", x)
        y_samples = check_samples("y", y)
        if y_samples != self._num_samples:
            raise ValueError(
                "`x` and `y` must hold the same number of samples. Received: "
                f"{self._num_samples} and {y_samples}"
            )
        self._x = keras.tree.map_structure(np.asarray, x)
        self._y = keras.tree.map_structure(np.asarray, y)
        self._rng = np.random.default_rng(self.seed)
        self._updates = 0
        self._calls = 0
        self._epoch_weights = 0
        self._epoch_skipped = 0
        self._warned = False
        #: Per re-initialization: the number of weights re-initialized.
        self.history: list[int] = []

    # -------------------------------------------------------------- selection

    def _selected_layers(self) -> list[list[int]]:
        """Variable indices (into trainable_variables) of the last layers."""
        layout = weight_layout(self.model)
        if self.n_layers > layout.num_layers:
            raise ValueError(
                f"`n_layers`={self.n_layers} is larger than the number of "
                f"layers with trainable weights ({layout.num_layers})."
            )
        return [list(g) for g in layout.groups[-self.n_layers :]]

    def _batch(self) -> tuple[Any, Any]:
        size = min(self.batch_size, self._num_samples)
        idx = np.sort(self._rng.choice(self._num_samples, size, replace=False))
        return (
            keras.tree.map_structure(lambda a: a[idx], self._x),
            keras.tree.map_structure(lambda a: a[idx], self._y),
        )

    def _use_exact(self) -> bool:
        if self.diagonal != "auto":
            return self.diagonal == "exact"
        total = sum(math.prod(v.shape) for v in self.model.trainable_variables)
        return total <= self.max_exact_weights

    def hessian_diagonal(self, indices: list[int]) -> list[np.ndarray]:
        """|diag H| estimate for the trainable variables at `indices`."""
        x, y = self._batch()
        hessian = HessianOperator(self.model, x, y, None, self.training)
        if self._use_exact():
            full = hessian.diagonal()
            return [np.asarray(full[i], "float64") for i in indices]
        rng = np.random.default_rng([self.seed, self._calls])
        variables = self.model.trainable_variables
        chosen = set(indices)

        def probes() -> Iterator[list[np.ndarray]]:
            # Rademacher on the chosen variables, zero elsewhere.
            for _ in range(self.samples):
                yield [
                    (
                        rng.choice([-1.0, 1.0], size=v.shape)
                        if i in chosen
                        else np.zeros(v.shape)
                    ).astype("float32")
                    for i, v in enumerate(variables)
                ]

        diagonal = spectrum.hutchinson_diagonal(
            hessian, hessian.shapes, probes()
        )
        return [diagonal[i] for i in indices]

    def _masks(
        self, indices: list[int], diag: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Boolean masks of the entries to re-initialize in one layer."""
        scores = [np.abs(d) for d in diag]
        variables = self.model.trainable_variables
        if self.granularity == "weight":
            flat = np.concatenate([s.ravel() for s in scores])
            count = int(math.ceil(self.k / 100.0 * flat.size))
            order = np.argsort(-flat, kind="stable")[:count]
            chosen = np.zeros(flat.size, bool)
            chosen[order] = True
            masks, offset = [], 0
            for s in scores:
                masks.append(chosen[offset : offset + s.size].reshape(s.shape))
                offset += s.size
            return masks
        units = scores[0].shape[-1] if scores[0].ndim else 0
        for i, s in zip(indices, scores):
            if s.ndim == 0 or s.shape[-1] != units:
                raise ValueError(
                    "`granularity='unit'` needs layers whose variables all "
                    "end in the unit axis (Dense, Conv); "
                    f"{variables[i].path} has shape {s.shape} where "
                    f"{units} units were expected."
                )
        totals = sum(s.reshape(-1, units).sum(axis=0) for s in scores)
        if self.aggregate == "mean":
            totals = totals / sum(s.size // units for s in scores)
        count = int(math.ceil(self.k / 100.0 * units))
        chosen_units = np.argsort(-totals, kind="stable")[:count]
        unit_mask = np.zeros(units, bool)
        unit_mask[chosen_units] = True
        return [np.broadcast_to(unit_mask, s.shape).copy() for s in scores]

    # ---------------------------------------------------------- application

    def _apply(self, indices: list[int], masks: list[np.ndarray]) -> int:
        variables = self.model.trainable_variables
        slots = (
            compat.optimizer_slots(self.model.optimizer)
            if self.reset_optimizer_state
            and getattr(self.model, "optimizer", None) is not None
            else {}
        )
        changed = 0
        for slot, (i, mask) in enumerate(zip(indices, masks)):
            if not mask.any():
                continue
            variable = variables[i]
            seed = self.seed * 1_000_003 + self._calls * 1009 + slot
            init = self.bias_initializer if mask.ndim == 1 else self.initializer
            fresh = keras.ops.convert_to_numpy(
                _seeded(init, seed)(variable.shape, dtype=variable.dtype)
            )
            old = keras.ops.convert_to_numpy(variable.value)
            variable.assign(np.where(mask, fresh, old).astype(old.dtype))
            for optimizer_variable in slots.get(variable.path, []):
                value = keras.ops.convert_to_numpy(optimizer_variable.value)
                optimizer_variable.assign(
                    np.where(mask, 0, value).astype(value.dtype)
                )
            changed += int(mask.sum())
        return changed

    def reinitialize(self) -> int:
        """One re-initialization now; returns the number of weights changed.

        The number is 0 when the diagonal was not finite.
        """
        changed = 0
        finite = True
        pending = []
        for indices in self._selected_layers():
            diag = self.hessian_diagonal(indices)
            if not all(np.all(np.isfinite(d)) for d in diag):
                finite = False
                break
            pending.append((indices, self._masks(indices, diag)))
        self._calls += 1
        if not finite:
            self._epoch_skipped += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "HessianReinit: the Hessian diagonal was NaN/Inf; no "
                    "weight was re-initialized at this step (counted in the "
                    "`hessian_reinit_skipped` log entry).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.history.append(0)
            return 0
        for indices, masks in pending:
            changed += self._apply(indices, masks)
        self.history.append(changed)
        return changed

    # ----------------------------------------------------------- checkpoint

    def get_state(self) -> dict[str, Any]:
        """The callback's progress (JSON-able), for `set_state` after a resume.

        Its batch RNG, counters and history.
        """
        return {
            "rng": self._rng.bit_generator.state,
            "updates": self._updates,
            "calls": self._calls,
            "history": list(self.history),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state` result.

        The resumed run then draws the same batches, probes and initial values
        as an uninterrupted one.
        """
        self._rng.bit_generator.state = state["rng"]
        self._updates = int(state["updates"])
        self._calls = int(state["calls"])
        self.history = [int(n) for n in state["history"]]

    # ------------------------------------------------------------ callbacks

    def on_train_begin(self, logs: Any = None) -> None:
        """Checks ``n_layers`` against the model before training starts."""
        self._selected_layers()  # fail early on a bad n_layers

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Resets the epoch's counts of changed weights and skips."""
        self._epoch_weights = 0
        self._epoch_skipped = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Re-initializes after every `every`-th training step."""
        self._updates += 1
        if self._updates % self.every == 0:
            self._epoch_weights += self.reinitialize()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Logs the epoch's counts of changed weights and skips."""
        if logs is not None:
            logs["hessian_reinit_weights"] = float(self._epoch_weights)
            logs["hessian_reinit_skipped"] = float(self._epoch_skipped)
