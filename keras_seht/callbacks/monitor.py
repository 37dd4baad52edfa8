r"""A callback that logs curvature diagnostics of the loss during training.

`CurvatureMonitor` measures, every few epochs (or batches), the trace and
the top eigenvalue of the loss Hessian on a fixed probe batch, and writes
them into the callback ``logs``, so that ``History``, ``CSVLogger`` and
``TensorBoard`` record them next to the loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator

import keras
import numpy as np

from keras_seht import spectrum
from keras_seht._checks import (
    check_bool,
    check_choice,
    check_int,
    check_samples,
)
from keras_seht.operators import HessianOperator

UNITS = ("epoch", "batch")
#: The quantities measured, in order (the log keys are the prefix + these).
KEYS = ("trace", "trace_std_error", "trace_hutchpp", "top_eigenvalue")


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    """Restores the torch backend's global RNG state on exit.

    Keras' unseeded torch Dropout draws its masks from torch's global RNG,
    so a training-mode forward pass would shift the masks of the next
    training steps. JAX and TensorFlow draw from the model's seed
    variables, which the stateless HVP leaves untouched.
    """
    if keras.config.backend() != "torch":
        yield
        return
    import torch

    cpu_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    )
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class CurvatureMonitor(keras.callbacks.Callback):
    r"""Logs the Hessian trace and top eigenvalue on a fixed probe batch.

    Every ``every`` epochs (``unit="epoch"``, at ``on_epoch_end``) or
    training batches (``unit="batch"``, at ``on_train_batch_end``), it
    builds one Hessian-vector product (HVP) of the compiled loss (with
    ``model.losses``; never the SEHT penalty) on the batch
    ``(x, y, sample_weight)`` at the current trainable weights :math:`w`,
    and evaluates three estimators of `keras_seht.spectrum` with it:

    - ``{prefix}trace``: Hutchinson's estimate
      :math:`\hat t = \frac{1}{m}\sum_{k=1}^{m} \sigma_k^\top H\sigma_k`
      of :math:`\operatorname{tr}(H)`, :math:`H = \nabla_w^2 L(w)`, with
      :math:`m` = ``trace_samples`` Rademacher probes :math:`\sigma_k`
      (`spectrum.hutchinson_trace`); unbiased.
    - ``{prefix}trace_std_error``: its standard error, the sample
      standard deviation of the :math:`\sigma_k^\top H \sigma_k` over
      :math:`\sqrt m` (``inf`` when ``trace_samples=1``).
    - ``{prefix}trace_hutchpp``: the Hutch++ estimate of
      :math:`\operatorname{tr}(H)` with ``hutchpp_samples`` HVPs
      (`spectrum.hutchpp_trace`): the exact trace of :math:`H` on a
      sketched dominant subspace plus Hutchinson on the rest; unbiased,
      and of lower variance when a few eigenvalues dominate.
    - ``{prefix}top_eigenvalue``: the largest-magnitude eigenvalue of
      :math:`H`, signed, by at most ``eigen_iters`` steps of power
      iteration (`spectrum.top_eigenvalue`, relative tolerance 1e-6): the
      sharpness :math:`\lambda_{\max}(H)` near a minimum, a lower bound
      on :math:`|\lambda_1|` when not converged.

    A measurement with ``trace_samples=0``, ``hutchpp_samples=0`` or
    ``eigen_iters=0`` skips that estimator and writes none of its keys.
    The values are also kept in ``self.history``: a dict of lists with an
    ``"epoch"`` (0-based epoch index) or ``"step"`` (0-based index of
    the training batch, counted across epochs) list and one list per
    measured key without the prefix (``"trace"``, ...). It accumulates
    over successive ``fit`` calls with the same monitor.

    The logs. With ``unit="epoch"``, the values go into the epoch logs.
    Epochs that are not measured (``every > 1``) get NaN under every key,
    so that ``History`` lists stay aligned with the epochs and
    ``CSVLogger`` (which fixes its columns at the first epoch) keeps its
    columns; `keras_seht.plotting.plot_curvature` skips the NaNs. Epoch
    ``e`` (0-based) is measured when ``(e + 1) % every == 0``, as Keras'
    ``validation_freq``. With ``unit="batch"``, the values go into the
    logs of the measured training batches only (seen by ``TensorBoard``
    with ``update_freq="batch"`` and by the progress bar); Keras'
    ``History`` and ``CSVLogger`` record epoch logs only, so use
    ``self.history`` for them.

    Callback order. Keras calls the callbacks in list order with one
    logs dict, and ``fit`` appends its own ``History`` (and progress bar)
    after the callbacks it is given, so ``fit(...).history`` always holds
    the values. Callbacks that read the logs (``CSVLogger``,
    ``TensorBoard``, ``EarlyStopping``, ``ModelCheckpoint``, a ``History``
    passed by hand) must come *after* the monitor in ``callbacks=[...]``:
    one placed before it has already read the logs when the monitor
    writes them.

    Cost per measurement: ``trace_samples + hutchpp_samples +
    eigen_iters`` HVPs (fewer if power iteration converges early, or when
    Hutch++'s sketch spans every weight), each about 2-3 forward and
    backward passes of the probe batch, plus one gradient to set up the
    HVP (`keras_seht.operators.HessianOperator`; under TensorFlow, a
    tracing of the HVP; under JAX the HVP compiles at the first
    measurement only, as long as the probe batch and the model's
    compilation stay the same). Keep the probe batch small and ``every``
    large enough for the budget.

    Determinism and state. Measurement number ``i`` of this monitor
    (0-based) seeds every estimator with ``seed + i``, so the same model,
    data and ``seed`` give the same values. The HVP is evaluated
    statelessly: no weight, BatchNorm statistic, optimizer or random
    seed of the model changes (under torch, the global RNG that unseeded
    Dropout draws from is restored after the measurement), so training
    with or without the monitor gives the same weights. Under TensorFlow
    the measurement runs eagerly, between steps.

    Args:
        x: The probe batch's inputs (array-likes or tensors, as for
            ``model(x)``); fixed for the whole training.
        y: The probe batch's targets.
        sample_weight: Optional per-sample weights of the probe batch.
        every: Measure every this many epochs or batches (integer >= 1).
        unit: ``"epoch"`` or ``"batch"``.
        trace_samples: Hutchinson probes (integer >= 0; 0 disables
            ``trace`` and ``trace_std_error``).
        hutchpp_samples: Hutch++ HVP budget (integer >= 0; 0 disables).
        eigen_iters: Power-iteration steps (integer >= 0; 0 disables).
        seed: Base seed (integer >= 0), or None for fresh entropy at every
            measurement (not reproducible).
        training: Evaluate the loss in training mode (BatchNorm batch
            statistics; Dropout on, with stateless seeds); default
            inference mode, a deterministic function of the weights.
        prefix: Prefix of the log keys.
        verbose: 1 prints the values at every measurement.

    Example:
    >>> import keras, keras_seht, numpy as np
    >>> from keras_seht.callbacks.monitor import CurvatureMonitor
    >>> model = keras_seht.Sequential([
    ...     keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    >>> x, y = np.ones((8, 3)), np.array([0, 1] * 4)
    >>> monitor = CurvatureMonitor(x[:4], y[:4], trace_samples=5)
    >>> history = model.fit(x, y, epochs=2, callbacks=[monitor], verbose=0)
    >>> len(history.history["curvature_trace"])
    2
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        every: int = 1,
        unit: str = "epoch",
        trace_samples: int = 30,
        hutchpp_samples: int = 30,
        eigen_iters: int = 20,
        seed: int | None = 0,
        training: bool = False,
        prefix: str = "curvature_",
        verbose: int = 0,
    ) -> None:
        super().__init__()
        if x is None:
            raise ValueError("`x` must be the probe batch's inputs, not None.")
        samples = check_samples("x", x)
        for name, data in (("y", y), ("sample_weight", sample_weight)):
            if data is not None and check_samples(name, data) != samples:
                raise ValueError(
                    f"`x` and `{name}` must hold the same number of "
                    f"samples. Received: {samples} and "
                    f"{check_samples(name, data)}"
                )
        self.every = check_int("every", every)
        check_choice("unit", unit, UNITS)
        self.trace_samples = check_int("trace_samples", trace_samples, 0)
        self.hutchpp_samples = check_int("hutchpp_samples", hutchpp_samples, 0)
        self.eigen_iters = check_int("eigen_iters", eigen_iters, 0)
        if not (self.trace_samples or self.hutchpp_samples or self.eigen_iters):
            raise ValueError(
                "At least one of `trace_samples`, `hutchpp_samples` and "
                "`eigen_iters` must be >= 1: with all three 0 there is "
                "nothing to measure."
            )
        self.seed = spectrum._check_seed(seed)
        if not isinstance(training, (bool, np.bool_)):
            raise ValueError(
                f"`training` must be a bool. Received: training={training!r}"
            )
        if not isinstance(prefix, str):
            raise ValueError(
                f"`prefix` must be a string. Received: prefix={prefix!r}"
            )
        if verbose not in (0, 1) or isinstance(verbose, float):
            raise ValueError(
                f"`verbose` must be 0 or 1. Received: verbose={verbose!r}"
            )
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.unit = unit
        self.training = check_bool("training", training)
        self.prefix = prefix
        self.verbose = int(verbose)
        # In "epoch" mode on_train_batch_end does nothing, so it is safe
        # for Keras to dispatch batch ends asynchronously; in "batch" mode
        # the weights must not move while the monitor reads them.
        self.async_safe = unit == "epoch"
        self.history: dict[str, list[Any]] = {}
        self._calls = 0
        self._step = 0

    # ----------------------------------------------------------------------
    # Measurement
    # ----------------------------------------------------------------------

    def _keys(self) -> list[str]:
        """The measured keys, in the order of `KEYS`."""
        enabled = {
            "trace": self.trace_samples,
            "trace_std_error": self.trace_samples,
            "trace_hutchpp": self.hutchpp_samples,
            "top_eigenvalue": self.eigen_iters,
        }
        return [key for key in KEYS if enabled[key]]

    def measure(self) -> dict[str, float]:
        """Measures now, at the model's current weights.

        Uses (and advances) the monitor's seed sequence, without writing
        to ``self.history``. Returns the values keyed without the prefix.
        """
        seed = None if self.seed is None else self.seed + self._calls
        self._calls += 1
        with _global_rng_preserved():
            return self._estimate(seed)

    def _estimate(self, seed: int | None) -> dict[str, float]:
        # `self.model` syncs the JAX trainer's state into the variables.
        hessian = HessianOperator(
            self.model, self.x, self.y, self.sample_weight, self.training
        )
        shapes = hessian.shapes
        values: dict[str, float] = {}
        if self.trace_samples:
            trace, std_error = spectrum.hutchinson_trace(
                hessian, shapes, samples=self.trace_samples, seed=seed
            )
            values["trace"] = trace
            values["trace_std_error"] = std_error
        if self.hutchpp_samples:
            values["trace_hutchpp"] = spectrum.hutchpp_trace(
                hessian, shapes, samples=self.hutchpp_samples, seed=seed
            )
        if self.eigen_iters:
            values["top_eigenvalue"] = spectrum.top_eigenvalue(
                hessian, shapes, iters=self.eigen_iters, seed=seed
            )
        return values

    def _record(
        self, index_name: str, index: int, logs: dict | None
    ) -> dict[str, float]:
        start = time.perf_counter()
        values = self.measure()
        seconds = time.perf_counter() - start
        self.history.setdefault(index_name, []).append(index)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        if logs is not None:
            logs.update({self.prefix + k: v for k, v in values.items()})
        if self.verbose:
            text = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            label = "Epoch" if index_name == "epoch" else "Step"
            print(
                f"\n{label} {index + 1}: CurvatureMonitor {text} "
                f"({seconds:.2f}s)"
            )
        return values

    def get_state(self) -> dict[str, Any]:
        """The monitor's progress (JSON-able), for `set_state` after a resume.

        Its measurement and step counts and its history.
        """
        return {
            "calls": self._calls,
            "step": self._step,
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state` result.

        A resumed run's measurements then use the same seeds as an
        uninterrupted run's.
        """
        self._calls = int(state["calls"])
        self._step = int(state["step"])
        self.history = {k: list(v) for k, v in state["history"].items()}

    # ----------------------------------------------------------------------
    # Keras hooks
    # ----------------------------------------------------------------------

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Measures every `every` epochs (``unit="epoch"``); else logs NaN."""
        if self.unit != "epoch":
            return
        if (epoch + 1) % self.every == 0:
            self._record("epoch", int(epoch), logs)
        elif logs is not None:
            logs.update({self.prefix + k: math.nan for k in self._keys()})

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """With ``unit="batch"``: measures every `every` training steps."""
        if self.unit != "batch":
            return
        step = self._step
        self._step += 1
        if (step + 1) % self.every == 0:
            self._record("step", step, logs)
