"""Keras models that accept ``compile(seht=...)``.

`Model` and `Sequential` are drop-in replacements for ``keras.Model`` and
``keras.Sequential``; `wrap` turns an existing functional or Sequential
model (``keras.applications`` included) into one, sharing its layers and
weights. With ``seht=None`` they train exactly like plain Keras.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, cast

import keras
import numpy as np

from keras_seht import _keras_compat as compat
from keras_seht import backend as seht_backend
from keras_seht import distributed, regularizers, step
from keras_seht import safeguard as safeguards
from keras_seht.estimators import CurvatureEstimator
from keras_seht.layout import WeightLayout, weight_layout
from keras_seht.penalties import Penalty

SKIPPED_LOG_KEY = "seht_skipped"
UPDATE_SKIPPED_LOG_KEY = "seht_update_skipped"
STEP_SKIPPED_LOG_KEY = "seht_step_skipped"
NEGATIVE_LOG_KEY = "seht_negative_fraction"
BOUNDED_LOG_KEY = "seht_bounded"
BOUND_FACTOR_LOG_KEY = "seht_bound_factor"
#: The skip counts, in the order the warnings name them.
SKIP_LOG_KEYS = (SKIPPED_LOG_KEY, UPDATE_SKIPPED_LOG_KEY, STEP_SKIPPED_LOG_KEY)
#: The entry of the model's saved state that holds the probe seed state.
SEED_STATE_KEY = "seht_seed_state"


class SEHTTrainer:
    """Mixin adding ``compile(seht=...)`` to a Keras model class.

    Adds to the training logs (and the progress bar) the epoch mean of
    each penalty's value before it is scaled by ``strength``, under the
    penalty's ``log_name`` (``seht_trace`` for the SEHT estimate t,
    ``jacobian_norm``, ``negative_entropy``, ``gradient_norm_sq``), with a
    curvature estimator ``seht_negative_fraction`` (the share of the
    epoch's steps whose t was negative), and three counts of the epoch's
    steps that the non-finite guard changed (`keras_seht.step`):

    - ``seht_skipped``: a penalty value was NaN/Inf, so the penalties
      were left out (the step applied the plain loss gradient);
    - ``seht_update_skipped``: the values were finite but the penalized
      update was not (a NaN/Inf entry, or its float32 squared norm
      overflowed), so the step applied the plain loss gradient;
    - ``seht_step_skipped``: the plain loss gradient was NaN/Inf too, so
      no step was applied at all (weights and optimizer state unchanged).
      Always 0 under a ``LossScaleOptimizer``, which skips such steps
      itself (every fallback then is a non-finite gradient, so that it
      also lowers its scale).

    With ``seht_safeguard`` (`keras_seht.GradientBound`) it adds
    ``seht_bounded``, the share of the steps whose penalized update the
    bound shortened (c < 1), and ``seht_bound_factor``, the mean c. ``loss``
    is the total objective L + sum strength * R, as Keras logs weight
    regularization.
    """

    if TYPE_CHECKING:
        # Provided by the keras.Model this mixin is combined with.
        built: bool
        trainable_variables: list[Any]
        optimizer: Any
        jit_compile: Any
        # Set with object.__setattr__ (kept out of Keras' tracking).
        _seht: Penalty | list[Penalty] | None
        _seht_safeguard: safeguards.GradientBound | None
        _seht_layout: tuple[tuple[int, ...], WeightLayout] | None
        _seht_trackers: tuple[Any, ...] | None
        _seht_warned: frozenset[str]
        _seht_warned_step: bool

    def _seht_setup(self) -> None:
        # No Keras state here (the seed generator comes with the first
        # compile(seht=...)): with seht=None the model's variables and
        # state tree are exactly plain Keras'.
        object.__setattr__(self, "_seht", None)
        object.__setattr__(self, "_seht_safeguard", None)
        object.__setattr__(self, "_seht_layout", None)
        object.__setattr__(self, "_seht_trackers", None)
        object.__setattr__(self, "_seht_warned", frozenset())

    def _add_seht_seed_generator(self) -> None:
        """Creates ``seht_seed_generator``, once.

        Later compiles reuse it, a later ``compile(seht=None)`` included.

        The train step draws its probes from it. As a tracked attribute its
        state is one of the model's non-trainable variables from compile
        on, before ``fit`` builds the train function, so the JAX backend
        threads it through the compiled step (fresh probes every step).
        Keras locks the state of a built subclassed model; the generator is
        the one addition made past that lock.
        """
        if isinstance(
            getattr(self, "seht_seed_generator", None),
            keras.random.SeedGenerator,
        ):
            return
        with compat.unlocked_state(self):
            self.seht_seed_generator = keras.random.SeedGenerator(
                name="seht_seed_generator"
            )

    @property
    def seht(self) -> Penalty | list[Penalty] | None:
        """What ``compile(seht=...)`` was given, resolved.

        A penalty (e.g. the curvature estimator), a list of penalties, or None.
        """
        return getattr(self, "_seht", None)

    @property
    def seht_safeguard(self) -> safeguards.GradientBound | None:
        """The safeguard of ``compile(seht_safeguard=...)``.

        None without one, and with ``seht=None`` (which ignores it).
        """
        if self.seht is None:
            return None
        return getattr(self, "_seht_safeguard", None)

    @property
    def seht_penalties(self) -> list[Penalty]:
        """The penalties of ``compile(seht=...)`` as a list (maybe empty)."""
        return regularizers.as_list(self.seht)

    @property
    def seht_estimator(self) -> CurvatureEstimator | None:
        """The curvature estimator among the penalties, or None."""
        for penalty in self.seht_penalties:
            if isinstance(penalty, CurvatureEstimator):
                return penalty
        return None

    @property
    def seht_log_keys(self) -> tuple[str, ...]:
        """The log entries the penalties add (empty without ``seht``)."""
        names = tuple(p.log_name for p in self.seht_penalties)
        if not names:
            return ()
        if self.seht_estimator is not None:
            names += (NEGATIVE_LOG_KEY,)
        names += SKIP_LOG_KEYS
        if self.seht_safeguard is not None:
            names += (BOUNDED_LOG_KEY, BOUND_FACTOR_LOG_KEY)
        return names

    @property
    def seht_layout(self) -> WeightLayout:
        """Trainable variables grouped by layer.

        Computed once for a given list of trainable variables: setting a
        layer's ``trainable`` after ``compile`` makes the next step follow
        the change, as plain Keras does.
        """
        key = tuple(id(v) for v in self.trainable_variables)
        cached = self._seht_layout
        if cached is not None and cached[0] == key:
            return cached[1]
        layout = weight_layout(self)
        if self.built:  # an unbuilt model's variables are still to come
            object.__setattr__(self, "_seht_layout", (key, layout))
        return layout

    def compile(
        self,
        *args: Any,
        seht: Any = None,
        seht_safeguard: Any = None,
        **kwargs: Any,
    ) -> None:
        """Configures the model for training, with an optional SEHT penalty.

        Takes every argument of ``keras.Model.compile``, plus ``seht`` and
        ``seht_safeguard``.

        Args:
            *args: Positional arguments of ``keras.Model.compile``.
            seht: None (plain Keras training), an estimator such as
                ``SEHTD(p=0.01)``, another penalty of
                `keras_seht.regularizers` (``Jacobian``,
                ``ConfidencePenalty``, ``GradientNorm``), a registered name
                (``"seht_d"``, ``"seht_h"``, ``"jacobian"``, ...), a config
                dict (``{"class_name": "seht_d", "config": {"p": 0.05}}``),
                or a list of those, each added at its own ``strength``
                (``[SEHTD(p=0.01), Jacobian(strength=0.01)]``).
            seht_safeguard: None (the default: no bound), a
                `keras_seht.GradientBound`, a positive float (its
                ``max_ratio``) or its config dict: bounds the penalties'
                share of each update relative to the plain loss gradient.
                Ignored with ``seht=None``.
            **kwargs: Keyword arguments of ``keras.Model.compile``
                (``optimizer``, ``loss``, ``metrics``, ...).
        """
        # Every check comes first: a bad `seht` leaves the model as it was
        # (uncompiled, or with its previous compile).
        estimator = regularizers.get(seht)
        penalties = regularizers.as_list(estimator)
        safeguard = safeguards.get(seht_safeguard)
        if estimator is not None:
            compat.check_model(self)
            seht_backend.get()  # fail early on an unsupported backend
            if self.built and not self.trainable_variables:
                raise ValueError(
                    "`seht` was given for a model with no trainable weights: "
                    "there is no Hessian to regularize. Pass seht=None."
                )
        super().compile(*args, **kwargs)  # type: ignore[misc]
        if estimator is not None:
            self._add_seht_seed_generator()
        object.__setattr__(self, "_seht", estimator)
        object.__setattr__(
            self, "_seht_safeguard", None if estimator is None else safeguard
        )
        object.__setattr__(self, "_seht_layout", None)
        object.__setattr__(self, "_seht_warned", frozenset())
        object.__setattr__(self, "_seht_warned_step", False)
        object.__setattr__(self, "_seht_step_ran", False)
        if estimator is None:
            object.__setattr__(self, "_seht_trackers", None)
            return
        trackers = [_ComputedMean(name=p.log_name) for p in penalties]
        if any(isinstance(p, CurvatureEstimator) for p in penalties):
            trackers.append(_ComputedMean(name=NEGATIVE_LOG_KEY))
        trackers.extend(keras.metrics.Sum(name=key) for key in SKIP_LOG_KEYS)
        if safeguard is not None:
            trackers.append(_ComputedMean(name=BOUNDED_LOG_KEY))
            trackers.append(_ComputedMean(name=BOUND_FACTOR_LOG_KEY))
        object.__setattr__(self, "_seht_trackers", tuple(trackers))
        if (
            keras.config.backend() == "torch"
            and any(p.needs_double_backward for p in penalties)
            and self.jit_compile
        ):
            warnings.warn(
                "`jit_compile=True` is not supported with SEHT on the torch "
                "backend (torch.compile cannot trace a double backward); "
                "using jit_compile=False.",
                stacklevel=2,
            )
            self.jit_compile = False

    @property
    def metrics(self) -> list[Any]:
        """Keras' metrics, plus the SEHT trackers when ``seht`` is set."""
        metrics = list(super().metrics)  # type: ignore[misc]
        if self.seht is not None and self._seht_trackers is not None:
            metrics.extend(self._seht_trackers)
        return metrics

    def update_seht_trackers(self, values: Any, guard: step.Guard) -> None:
        """Records one step's penalty values (if finite), skips and bound.

        Args:
            values: One value R per penalty, in ``seht_penalties`` order.
            guard: What the step's guard decided (`keras_seht.step.Guard`).
        """
        if self._seht_trackers is None:  # seht=None (data-parallel step)
            return
        trackers = {
            t.name: t for t in cast(tuple[Any, ...], self._seht_trackers)
        }
        ops = keras.ops
        values = list(values)
        estimator = self.seht_estimator
        if estimator is not None:
            t = values[self.seht_penalties.index(estimator)]
            values.append(ops.cast(ops.less(t, 0.0), "float32"))
        finite = guard.finite
        weight = ops.cast(finite, "float32")
        names = [p.log_name for p in self.seht_penalties]
        if estimator is not None:
            names.append(NEGATIVE_LOG_KEY)
        for name, value in zip(names, values):
            safe = ops.where(finite, value, ops.zeros_like(value))
            trackers[name].update_state(safe, sample_weight=weight)
        used = ops.cast(guard.update_finite, "float32")
        trackers[SKIPPED_LOG_KEY].update_state(1.0 - weight)
        trackers[UPDATE_SKIPPED_LOG_KEY].update_state(weight - used)
        applied = 1.0 if guard.applied is None else guard.applied
        trackers[STEP_SKIPPED_LOG_KEY].update_state(
            1.0 - ops.cast(applied, "float32")
        )
        if guard.factor is not None and BOUNDED_LOG_KEY in trackers:
            bound = ops.cast(guard.bound, "float32")
            factor = ops.where(
                guard.update_finite, guard.factor, ops.ones_like(guard.factor)
            )
            trackers[BOUNDED_LOG_KEY].update_state(bound, sample_weight=used)
            trackers[BOUND_FACTOR_LOG_KEY].update_state(
                ops.cast(factor, "float32"), sample_weight=used
            )

    def warn_skipped_once(self, reason: str, loss_finite: bool = True) -> None:
        """Warns (once per compile and reason) that the guard changed steps.

        Args:
            reason: The log entry that counted them: ``seht_skipped`` (a
                penalty value was NaN/Inf), ``seht_update_skipped`` (the
                penalized update was) or ``seht_step_skipped`` (the plain
                loss gradient was too: no step).
            loss_finite: Whether the logged loss was finite.
        """
        if reason in self._seht_warned:
            return
        object.__setattr__(self, "_seht_warned", self._seht_warned | {reason})
        scaled = isinstance(
            getattr(self, "optimizer", None),
            keras.optimizers.LossScaleOptimizer,
        )
        if scaled:
            fallback = (
                "that step was skipped and the LossScaleOptimizer lowered "
                "its scale (an overflow of the scaled derivatives)"
            )
        else:
            fallback = "that step applied the plain loss gradient instead"
        if reason == SKIPPED_LOG_KEY:
            what = (
                "A `seht` penalty (e.g. the trace estimate) was NaN/Inf: "
                f"the penalties were left out of that step's update; "
                f"{fallback}. Such steps are counted in the `seht_skipped` "
                "log entry, and a penalty's logged value is NaN for an "
                "epoch whose steps were all skipped."
            )
        elif reason == UPDATE_SKIPPED_LOG_KEY:
            what = (
                "A `seht` penalty's gradient was NaN/Inf (or the update's "
                "squared norm overflowed float32) while the penalty values "
                f"were finite: the penalized update was dropped; {fallback}. "
                "Such steps are counted in the `seht_update_skipped` log "
                "entry. `seht_safeguard=keras_seht.GradientBound()` bounds "
                "the penalties' share of the update."
            )
        else:
            loss = "" if loss_finite else " (the logged loss is NaN/Inf)"
            what = (
                "The plain loss gradient was NaN/Inf too" + loss + ", so "
                "the optimizer step was not applied at all (weights and "
                "optimizer state unchanged). Such steps are counted in the "
                "`seht_step_skipped` log entry; check the data and the loss."
            )
        warnings.warn(
            f"{what} Consider a smaller learning rate or `strength`.",
            RuntimeWarning,
            stacklevel=2,
        )

    def warn_step_not_run(self) -> None:
        """Warns (once per compile) that ``fit`` trained without the SEHT step.

        A subclass overrides ``train_step`` and does not call it.
        """
        if self._seht_warned_step:
            return
        object.__setattr__(self, "_seht_warned_step", True)
        warnings.warn(
            f"`{type(self).__name__}` overrides `train_step` without "
            "calling `super().train_step(...)`, so the `seht` penalties "
            f"({', '.join(p.log_name for p in self.seht_penalties)}) are "
            "not applied, and their log entries stay NaN. Call "
            "`super().train_step(...)` in your `train_step`, or compile "
            "with seht=None.",
            RuntimeWarning,
            stacklevel=2,
        )

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``fit``; with ``seht``, it warns when steps were skipped.

        A compiled step traced for other trainable variables (a layer's
        ``trainable`` set since) is traced again, so that the step follows
        the change: plain Keras on TensorFlow would keep training the
        frozen layer with the old graph.
        """
        if _torch_data_parallel():
            _check_no_synchronized_batchnorm(self)
        if self.seht is not None:
            cached = self._seht_layout
            current = tuple(id(v) for v in self.trainable_variables)
            if cached is not None and cached[0] != current:
                self.train_function = None
            # `callbacks` is fit's sixth positional parameter.
            if len(args) > 5:
                args_list = list(args)
                args_list[5] = _with_skip_warning(self, args_list[5])
                args = tuple(args_list)
            else:
                kwargs["callbacks"] = _with_skip_warning(
                    self, kwargs.get("callbacks")
                )
        return super().fit(*args, **kwargs)  # type: ignore[misc]

    def train_step(self, *args: Any) -> Any:
        """Keras' train step, or `keras_seht.step.train_step` with ``seht``.

        Takes the arguments of the backend's ``train_step`` (``data``;
        ``state, data`` under JAX).

        With ``seht=None`` it is Keras' own step, except with several
        torch data-parallel workers (`keras_seht.distributed`): then the
        shared step (`keras_seht.step.train_step`) without penalties, so
        that the update is the workers' mean gradient, the plain gradient
        on the global batch (and its logs, metrics and BatchNorm
        statistics global), as with ``seht``. As there, a step whose mean
        gradient is not finite is not applied (Keras' own step would
        apply it).
        """
        if self.seht is None:
            if not _torch_data_parallel():
                return super().train_step(*args)  # type: ignore[misc]
            # Several torch workers: the shared step without penalties,
            # which averages the gradients, the loss, the metrics and the
            # BatchNorm statistics over the workers (Keras' own does not).
            return step.train_step(
                seht_backend.get().StepRun(self, *args), self
            )
        if self.built:
            self.check_trainable_weights()
        return step.train_step(seht_backend.get().StepRun(self, *args), self)

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function; under JAX, sparse probes pick a variant.

        On the JAX backend, a compiled SEHT-D step whose estimator leaves
        layers out runs through `keras_seht.backend.jax.SparseTrainStep`
        (a few compiled variants chosen per step on the host, each
        differentiating only the layers its probes can touch); every other
        case is Keras' own.
        """
        if self.train_function is not None and not force:
            return None
        dispatch = None
        if keras.backend.backend() == "jax" and self.seht is not None:
            from keras_seht.backend import jax as seht_jax

            if seht_jax.sparse_dispatch_applies(self):
                dispatch = seht_jax.SparseTrainStep(self)
        object.__setattr__(self, "seht_sparse_step", dispatch)
        if dispatch is None:
            return super().make_train_function(force)  # type: ignore[misc]
        self.train_function = self._make_function(dispatch)  # type: ignore[attr-defined]
        return None

    def check_trainable_weights(self) -> None:
        """Raises ValueError if SEHT is on but nothing is trainable."""
        if not self.trainable_variables:
            raise ValueError(
                "`seht` was given for a model with no trainable weights: "
                "there is no Hessian to regularize. Recompile with seht=None."
            )

    def test_step(self, *args: Any) -> Any:
        """Keras' test step, without the SEHT entries in its logs."""
        result = super().test_step(*args)  # type: ignore[misc]
        if self.seht is None:
            return result
        keys = self.seht_log_keys
        if isinstance(result, tuple):
            logs, state = result
            return _drop_keys(logs, keys), state
        return _drop_keys(result, keys)

    def save_own_variables(self, store: Any) -> None:
        """Saves Keras' state, plus the probe seed state when ``seht`` is set.

        Keras does not save a seed generator's state: without it a model
        saved and reloaded (``model.save``, ``save_weights``) would restart
        its probe stream, so continuing training after loading would draw
        other probes than an uninterrupted run. With ``seht=None`` nothing
        is added: the file holds exactly plain Keras' state.
        """
        super().save_own_variables(store)  # type: ignore[misc]
        generator = getattr(self, "seht_seed_generator", None)
        if self.seht is not None and generator is not None:
            store[SEED_STATE_KEY] = generator.state

    def load_own_variables(self, store: Any) -> None:
        """Loads Keras' state, and the probe seed state where saved.

        A saved seed state is restored when this model has a probe seed
        generator (``compile(seht=...)``), and ignored otherwise.
        """
        keys = list(store.keys())
        if SEED_STATE_KEY not in keys:
            super().load_own_variables(store)  # type: ignore[misc]
            return
        state = np.asarray(store[SEED_STATE_KEY])
        rest = {key: store[key] for key in keys if key != SEED_STATE_KEY}
        super().load_own_variables(rest)  # type: ignore[misc]
        generator = getattr(self, "seht_seed_generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            generator.state.assign(keras.ops.cast(state, generator.state.dtype))

    def get_compile_config(self) -> dict[str, Any]:
        """Keras' compile config, plus ``seht`` (serialized) when given."""
        config = super().get_compile_config()  # type: ignore[misc]
        if config and self.seht is not None:
            config["seht"] = regularizers.serialize(self.seht)
            if self.seht_safeguard is not None:
                config["seht_safeguard"] = safeguards.serialize(
                    self.seht_safeguard
                )
        return config

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compiles from a `get_compile_config` result, ``seht`` included."""
        config = dict(config)
        # Resolved first: a tampered entry raises before anything is built.
        seht = regularizers.get(config.pop("seht", None))
        safeguard = safeguards.get(config.pop("seht_safeguard", None))
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config, seht=seht, seht_safeguard=safeguard)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)


class _SkipWarning(keras.callbacks.Callback):
    """Turns non-zero skip counts in the logs into warnings (once each).

    ``seht_skipped``, ``seht_update_skipped`` and ``seht_step_skipped``:
    each warning names its reason.

    Compiled train steps (JAX, TensorFlow) cannot warn from inside, so the
    skip count travels in the logs and is checked here, on every backend.
    """

    def __init__(self, seht_model: SEHTTrainer) -> None:
        super().__init__()
        self._seht_model = seht_model

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        model = self._seht_model
        if not getattr(model, "_seht_step_ran", False):
            model.warn_step_not_run()
            return
        logs = logs or {}
        loss = logs.get("loss")
        loss_finite = loss is None or math.isfinite(float(loss))
        for key in SKIP_LOG_KEYS:
            skipped = logs.get(key)
            if skipped is not None and float(skipped) > 0:
                model.warn_skipped_once(key, loss_finite)


class _ComputedMean(keras.metrics.Mean):
    """A `Mean` that is NaN, not 0, before any value was recorded.

    A penalty tracker of an epoch whose steps were all skipped (or of a
    model whose ``train_step`` never computed the penalty) then logs NaN,
    never a value that was not computed.
    """

    def result(self) -> Any:
        count = keras.ops.cast(self.count, "float32")
        mean = keras.ops.cast(self.total, "float32") / keras.ops.maximum(
            count, 1.0
        )
        return keras.ops.where(count > 0, mean, float("nan"))


class _SehtProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar without the all-zero bookkeeping entries.

    The skip counts (``seht_skipped``, ``seht_update_skipped``,
    ``seht_step_skipped``), ``seht_negative_fraction`` and
    ``seht_bounded`` are left out of the bar while they are 0 (they stay
    in the logs and the history); once non-zero, Keras' bar keeps showing
    them.
    """

    QUIET_KEYS = (*SKIP_LOG_KEYS, NEGATIVE_LOG_KEY, BOUNDED_LOG_KEY)

    def _shown(self, logs: Any) -> Any:
        if not isinstance(logs, dict):
            return logs
        return {
            k: v
            for k, v in logs.items()
            if not (k in self.QUIET_KEYS and _is_zero(v))
        }

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Updates the bar with the batch's logs (zero entries left out)."""
        super().on_train_batch_end(batch, self._shown(logs))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Finishes the epoch's bar (zero entries left out)."""
        super().on_epoch_end(epoch, self._shown(logs))


def _torch_data_parallel() -> bool:
    """Whether this is one of several torch data-parallel workers."""
    return keras.config.backend() == "torch" and distributed.world_size() > 1


def _check_no_synchronized_batchnorm(model: keras.Model) -> None:
    """Refuses a ``BatchNormalization(synchronized=True)`` (torch workers).

    Keras implements synchronized batch statistics under TensorFlow only
    (and refuses ``synchronized=True`` under torch when the layer is
    built); one set afterwards would normalize each worker's batch with
    its own statistics.
    """
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and getattr(
            layer, "synchronized", False
        ):
            raise ValueError(
                f"Layer '{layer.name}' is a BatchNormalization with "
                "synchronized=True, which Keras implements under "
                "TensorFlow only: under torch each data-parallel worker "
                "would normalize with its own batch statistics. Use "
                "synchronized=False (each worker's local statistics, as "
                "torch's DistributedDataParallel without SyncBatchNorm; "
                "see keras_seht.distributed), or train under TensorFlow's "
                "MultiWorkerMirroredStrategy."
            )


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0.0
    except (TypeError, ValueError):
        return False


def _with_skip_warning(model: SEHTTrainer, callbacks: Any) -> Any:
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    callbacks = list(callbacks or [])
    callbacks.append(_SkipWarning(model))
    if not any(isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
        callbacks.append(_SehtProgbar())
    return callbacks


def _drop_keys(logs: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(logs, dict):
        return {k: v for k, v in logs.items() if k not in keys}
    return logs


@keras.saving.register_keras_serializable(package="keras_seht")
class Model(SEHTTrainer, keras.Model):
    """A ``keras.Model`` whose ``compile`` accepts ``seht=``.

    Works in both styles, like ``keras.Model``: functional
    (``keras_seht.Model(inputs, outputs)``) and subclassed (subclass it and
    define ``call``).

    Example:
    >>> import keras, keras_seht
    >>> inputs = keras.Input((4,))
    >>> outputs = keras.layers.Dense(3, activation="softmax")(inputs)
    >>> model = keras_seht.Model(inputs, outputs)
    >>> model.compile("sgd", "sparse_categorical_crossentropy",
    ...               seht=keras_seht.SEHTD(p=0.05))
    >>> model.seht.p
    0.05
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Creates a `FunctionalModel` for ``Model(inputs, outputs)`` calls."""
        if cls is Model and compat.is_functional_call(args, kwargs):
            return FunctionalModel.__new__(FunctionalModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._seht_setup()
        if compat.is_functional_call(args, kwargs):
            # keras.Model.__init__ would rewrite the bases of every class up
            # to keras.Model, `keras_seht.Model` included, which breaks all
            # later subclassed (non-functional) models. Only the subclass
            # being built functionally gets FunctionalModel as a base.
            if not isinstance(self, compat.functional_class()):
                _inject_functional_model(type(self))
            compat.init_functional(self, args, kwargs)
        else:
            super().__init__(*args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_seht")
class FunctionalModel(Model, compat.functional_class()):  # type: ignore[misc]
    """What ``keras_seht.Model(inputs, outputs)`` builds: a functional model.

    ``keras_seht.Model(inputs, outputs)`` returns an instance of this class,
    as ``keras.Model(inputs, outputs)`` returns a ``Functional``; it is a
    ``keras_seht.Model`` in every respect (``isinstance`` included).
    """


def _inject_functional_model(cls: type) -> type:
    """Puts FunctionalModel in place of Model in the bases of `cls`."""
    if cls is Model:
        return FunctionalModel
    if not issubclass(cls, Model) or issubclass(cls, FunctionalModel):
        return cls
    cls.__bases__ = tuple(_inject_functional_model(b) for b in cls.__bases__)
    return cls


@keras.saving.register_keras_serializable(package="keras_seht")
class Sequential(SEHTTrainer, keras.Sequential):
    """A ``keras.Sequential`` whose ``compile`` accepts ``seht=``.

    Example:
    >>> import keras, keras_seht
    >>> model = keras_seht.Sequential([
    ...     keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    >>> model.compile("sgd", "sparse_categorical_crossentropy", seht="seht_h")
    >>> type(model.seht).__name__
    'SEHTH'
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._seht_setup()
        super().__init__(*args, **kwargs)


def wrap(model: keras.Model) -> Model | Sequential:
    """Returns a keras-seht model sharing the layers and weights of `model`.

    Args:
        model: A functional ``keras.Model`` (``keras.applications`` models
            included) or a ``keras.Sequential``. Subclassed models cannot be
            rebuilt from outside: derive them from ``keras_seht.Model``
            instead.

    Returns:
        A `keras_seht.Model` (functional input) or `keras_seht.Sequential`,
        uncompiled; `model` itself if it already is one.

    Example:
    >>> import keras, keras_seht
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> wrapped = keras_seht.wrap(base)
    >>> wrapped.layers[-1] is base.layers[-1]
    True
    """
    if isinstance(model, SEHTTrainer):
        # Model and Sequential are the SEHTTrainer classes.
        return cast("Model | Sequential", model)
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a keras.Model. Received: "
            f"model={type(model).__name__}"
        )
    if isinstance(model, keras.Sequential):
        layers: list[Any] = list(model.layers)
        inputs = _functional_inputs(model)
        if inputs is not None:
            spec = keras.tree.flatten(inputs)[0]
            layers = [
                keras.Input(batch_shape=spec.shape, dtype=spec.dtype)
            ] + layers
        return Sequential(layers, name=model.name)
    if _functional_inputs(model) is None:
        raise TypeError(
            f"Cannot wrap the subclassed model {type(model).__name__!r}: only "
            "functional and Sequential models can be rebuilt. Make the class "
            "derive from `keras_seht.Model` instead of `keras.Model`."
        )
    return Model(inputs=model.input, outputs=model.output, name=model.name)


def _functional_inputs(model: keras.Model) -> Any:
    try:
        return model.input
    except (AttributeError, ValueError):
        return None
