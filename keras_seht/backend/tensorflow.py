"""SEHT autodiff on the TensorFlow backend, with nested ``tf.GradientTape``.

The train step replaces Keras' TensorFlow ``train_step`` and runs inside
the same ``tf.function`` (XLA-compiled when ``jit_compile=True``). Three
tapes are nested around a single forward pass:

    outer ( middle ( inner ( forward, L ) ; g = dL/dw ; v_k = g . sigma_k )
            ; h_k = dv_k/dw = H sigma_k ; t = mean_k sigma_k . h_k )
    dt/dw = outer.gradient(t)

``inner`` gives the loss gradient g. Because ``inner.gradient`` runs while
``middle`` and ``outer`` record, g is itself a differentiable function of
the weights, and so is every Hessian-vector product ``middle`` takes of it;
``outer`` then differentiates the trace estimate t (a third derivative of
L). The loss gradient g is reused for the update, never recomputed:

    update direction = g + strength * dt/dw.

With a loss-scaling optimizer (``LossScaleOptimizer`` under
``mixed_float16``, or ``loss_scale_factor``) the scaled loss s * L is
differentiated, as in Keras' own step: g, t and dt/dw all come out scaled
by s, the optimizer unscales the update, and the logged t is divided by s.
A non-finite t under a ``LossScaleOptimizer`` is treated as an overflow:
the optimizer gets a non-finite gradient, skips the step and lowers its
scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import keras

from keras_seht import _keras_compat as compat
from keras_seht import functional
from keras_seht.penalties import (
    ConfidencePenalty,
    GradientNorm,
    Jacobian,
    flatten_outputs,
    float_inputs,
)

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported inside each function, never at import time: under
# the torch backend, importing tensorflow before keras segfaults.


def _dot(a: Sequence[Any], b: Sequence[Any]) -> tf.Tensor:
    """sum_i <a_i, b_i> over two lists of same-shaped tensors."""
    import tensorflow as tf

    terms = [tf.reduce_sum(u * tf.cast(v, u.dtype)) for u, v in zip(a, b)]
    return tf.add_n(terms)


def _gradient(
    tape: tf.GradientTape,
    target: Any,
    variables: Sequence[Any],
    output_gradients: Any = None,
) -> list[tf.Tensor]:
    """Dense gradients of `target`, zeros where it does not depend on a
    variable (e.g. dt/dw when the Hessian is constant).

    ``unconnected_gradients=ZERO`` cannot be used with Keras variables
    (TensorFlow reads their ``dtype``, a string in Keras 3), and
    ``IndexedSlices`` (embedding gradients) are made dense so that they can
    be dotted with probes.
    """
    import tensorflow as tf

    grads = tape.gradient(target, variables, output_gradients=output_gradients)
    return [
        tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
        for g, v in zip(grads, variables)
    ]


def _unscale_for_distribution(value: tf.Tensor) -> tf.Tensor:
    """Per-replica loss -> global loss, like Keras' own TF train step.

    Under a ``tf.distribute`` strategy Keras divides each replica's loss by
    the number of replicas (so that summing gradients averages them); the
    logged values are multiplied back.
    """
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * tf.cast(replicas, value.dtype)
    return value


def _loss_scale(optimizer: Any, dtype: tf.DType) -> tf.Tensor:
    """The factor s with ``optimizer.scale_loss(L) == s * L``."""
    import tensorflow as tf

    one = tf.ones((), dtype)
    if optimizer is None:
        return one
    return tf.cast(optimizer.scale_loss(one), dtype)


def _gauss_newton_estimate(
    model: keras.Model,
    inner: tf.GradientTape,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    probes: Sequence[Sequence[Any]],
    scale: tf.Tensor,
) -> tf.Tensor:
    """mean_k u_k^T H_z u_k, u_k = J sigma_k, recorded by enclosing tapes.

    `inner` (persistent) recorded the forward pass. u = J sigma comes from
    the "double-vjp" trick: J^T v = ``inner.gradient(z, w, v)`` is linear
    in a watched dummy v, and its derivative along sigma is J sigma. H_z u
    is the derivative of the compiled loss's output gradient along u,
    taken at a copy of the outputs so that only the loss is differentiated.
    """
    import tensorflow as tf

    trainable = list(model.trainable_weights)
    outputs = keras.tree.flatten(y_pred)
    with tf.GradientTape(
        watch_accessed_variables=False, persistent=len(probes) > 1
    ) as dummy_tape:
        dummies = [tf.zeros_like(z) for z in outputs]
        dummy_tape.watch(dummies)
        jacobian_t_v = _gradient(inner, outputs, trainable, dummies)
        directional = [_dot(jacobian_t_v, sigma) for sigma in probes]
    us = [_gradient(dummy_tape, d, dummies) for d in directional]
    del dummy_tape
    copies = [tf.identity(z) for z in outputs]
    with tf.GradientTape(
        watch_accessed_variables=False, persistent=len(probes) > 1
    ) as second:
        second.watch(copies)
        with tf.GradientTape(watch_accessed_variables=False) as first:
            first.watch(copies)
            packed = keras.tree.pack_sequence_as(y_pred, copies)
            output_loss = compat.compiled_loss(model, y, packed, sample_weight)
            output_loss = tf.cast(output_loss, scale.dtype) * scale
        output_grads = _gradient(first, output_loss, copies)
        along = [_dot(output_grads, u) for u in us]
    values = [_dot(u, _gradient(second, a, copies)) for u, a in zip(us, along)]
    return tf.add_n(values) / len(probes)


def train_step(model: keras.Model, data: Any) -> dict[str, Any]:
    """One step of L + sum_j strength_j R_j (``model.seht`` is not None).

    Mirrors ``keras.src.backend.tensorflow.trainer.TensorFlowTrainer.
    train_step``: one forward pass in training mode (BatchNorm statistics
    and other state update once), the compiled loss including
    ``model.losses``, ``optimizer.scale_loss`` before differentiating,
    ``optimizer.apply``, and ``compute_metrics``. Graph-safe: no Python
    branch depends on a tensor value, so it compiles with ``tf.function``
    and XLA. BatchNormalization's batch moments are made twice
    differentiable for the step (``_keras_compat.exact_tf_moments``).

    The penalties of ``model.seht_penalties`` are recorded by ``outer``:
    the SEHT estimate from HVPs taken by ``middle``, ``GradientNorm`` from
    the loss gradient, ``Jacobian`` from input gradients of the outputs
    taken by a fourth tape (``inputs``) around the forward pass,
    ``ConfidencePenalty`` from the outputs.

    Returns:
        The logs of ``model.compute_metrics``.
    """
    import tensorflow as tf

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    penalties = model.seht_penalties
    estimator = model.seht_estimator
    jacobian = next((p for p in penalties if isinstance(p, Jacobian)), None)
    optimizer = model.optimizer
    num_probes = estimator.max_iter if estimator is not None else 0
    gauss_newton = (
        estimator is not None and estimator.curvature == "gauss_newton"
    )
    leaves = []
    if jacobian is not None:
        flat = keras.tree.flatten(x)
        leaves = [flat[i] for i in float_inputs(x)]
    seed = model.seht_seed_generator
    smoothed = estimator is not None and estimator.method != "exact"
    # Read before the stateful forward pass: the perturbed passes of the
    # smoothed methods run with the step's own non-trainable state.
    non_trainable = (
        [tf.identity(v.value) for v in model.non_trainable_variables]
        if smoothed
        else []
    )

    with tf.GradientTape() as outer:
        with tf.GradientTape(persistent=num_probes > 1) as middle:
            with (
                tf.GradientTape(persistent=gauss_newton) as inner,
                tf.GradientTape(
                    watch_accessed_variables=False,
                    persistent=jacobian is not None
                    and (jacobian.exact or jacobian.n_proj > 1),
                ) as inputs,
                compat.exact_tf_moments(),
            ):
                inputs.watch(leaves)
                # Keras' TF trainer builds an unbuilt model here, in the
                # first traced forward pass: the variables (and so the
                # probes) are read only after it.
                if compat.call_has_training_arg(model):
                    y_pred = model(x, training=True)
                else:
                    y_pred = model(x)
                loss = compat.compute_loss(
                    model, x, y, y_pred, sample_weight, True
                )
                scaled_loss = (
                    loss if optimizer is None else optimizer.scale_loss(loss)
                )
                if jacobian is not None:
                    # <V_k, Z> must be recorded by the `inputs` tape.
                    z = flatten_outputs(y_pred)
                    vectors, weight = jacobian.projections(
                        tuple(keras.ops.shape(z)), z.dtype, seed
                    )
                    projected = [tf.reduce_sum(v * z) for v in vectors]
            model.check_trainable_weights()
            trainable = list(model.trainable_weights)
            scale = _loss_scale(optimizer, scaled_loss.dtype)
            probes = [
                estimator.sample_probes(
                    model.seht_layout, seed=seed, dtype=trainable[0].dtype
                )
                for _ in range(num_probes)
            ]
            # Recorded by `middle` and `outer`: g stays differentiable.
            grads = _gradient(inner, scaled_loss, trainable)
            products = []
            if not (gauss_newton or smoothed):
                products = [_dot(grads, sigma) for sigma in probes]
        # Recorded by `outer`: every R_j stays differentiable.
        scaled_values = []
        for penalty in penalties:
            if penalty is estimator and gauss_newton:
                value = _gauss_newton_estimate(
                    model, inner, y, y_pred, sample_weight, probes, scale
                )
            elif penalty is estimator and smoothed:
                # t_eps = (L(w + e s) + L(w - e s) - 2 L(w)) / e^2: its
                # gradient through `outer` needs first-order passes only.
                value = _smoothed_trace(
                    model,
                    x,
                    y,
                    sample_weight,
                    non_trainable,
                    probes,
                    scaled_loss,
                    scale,
                )
            elif penalty is estimator:
                quadratic_forms = []
                for sigma, product in zip(probes, products):
                    h = _gradient(middle, product, trainable)
                    quadratic_forms.append(_dot(sigma, h))
                value = tf.add_n(quadratic_forms) / num_probes
            elif isinstance(penalty, GradientNorm):
                value = _dot(grads, grads) / scale
            elif isinstance(penalty, Jacobian):
                input_grads = [_gradient(inputs, p, leaves) for p in projected]
                value = scale * penalty.norm_from_products(
                    input_grads, weight, tf.shape(z)[0]
                )
            elif isinstance(penalty, ConfidencePenalty):
                value = scale * penalty.value(model, y_pred, sample_weight)
            else:
                raise TypeError(f"Unsupported `seht` penalty: {penalty!r}")
            scaled_values.append(tf.cast(value, scale.dtype))
        objective = tf.add_n(
            [
                p.strength * p.objective_value(v)
                for p, v in zip(penalties, scaled_values)
            ]
        )
    grad_penalty = _gradient(outer, objective, trainable)
    del middle, inputs, inner

    values = [v / scale for v in scaled_values]
    finite = tf.reduce_all(tf.math.is_finite(tf.stack(values)))
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # A non-finite t under loss scaling is (almost always) an overflow
        # of the scaled HVP: hand the optimizer a non-finite gradient so
        # that, as for any overflow, it skips the update and lowers the
        # scale (the finite loss gradient would keep t overflowing).
        fallback = [
            tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype))
            for g in grads
        ]
    else:
        fallback = grads
    # tf.where, not a multiplication by 0: NaN * 0 is NaN.
    gradients = [
        tf.where(finite, g + tf.cast(gp, g.dtype), gf)
        for g, gp, gf in zip(grads, grad_penalty, fallback)
    ]
    loss = tf.cast(loss, scale.dtype)
    penalty_total = tf.add_n(
        [p.strength * p.objective_value(v) for p, v in zip(penalties, values)]
    )
    total = tf.where(finite, loss + penalty_total, loss)

    first_input = next(i for i in keras.tree.flatten(x) if i is not None)
    batch_size = tf.shape(first_input)[0]
    compat.loss_tracker(model).update_state(
        _unscale_for_distribution(total), sample_weight=batch_size
    )
    model.update_seht_trackers(
        [_unscale_for_distribution(v) for v in values], finite
    )
    optimizer.apply(gradients, trainable)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _smoothed_trace(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    non_trainable: Sequence[Any],
    probes: Sequence[Sequence[Any]],
    scaled_loss: Any,
    scale: Any,
) -> Any:
    """(mean_k [L(w + e s_k) + L(w - e s_k)] - 2 L(w)) / e^2, scaled."""
    import tensorflow as tf

    epsilon = model.seht_estimator.step_epsilon
    trainable = [v.value for v in model.trainable_variables]
    pairs = []
    for probe in probes:
        for step in (epsilon, -epsilon):
            loss = functional.stateless_loss(
                model,
                functional.shifted(trainable, probe, step),
                non_trainable,
                x,
                y,
                sample_weight,
                training=True,
            )[0]
            pairs.append(tf.cast(loss, scale.dtype) * scale)
    pair = tf.add_n(pairs) / len(probes)
    return (pair - 2.0 * tf.cast(scaled_loss, scale.dtype)) / epsilon**2


def uniform(
    shape: Sequence[int],
    seed: int | keras.random.SeedGenerator | None = None,
    dtype: str = "float32",
) -> tf.Tensor:
    """U[0, 1) samples, fast under XLA on CPU (a drop-in for probes).

    ``keras.random.uniform`` calls ``tf.random.stateless_uniform`` with
    the default ``alg="auto_select"``, which XLA's CPU backend runs ~50x
    slower than without XLA (measured: 52 ms vs 1 ms for 784 x 256 draws);
    SEHT probes draw one number per weight every step. The Philox
    algorithm, chosen explicitly, is fast with and without XLA. Seeds are
    consumed like ``keras.random``: a `SeedGenerator` advances by one
    draw, an int is a fixed seed, None falls back to ``keras.random``.
    """
    import tensorflow as tf

    if seed is None:
        return keras.random.uniform(shape, dtype=dtype)
    if isinstance(seed, keras.random.SeedGenerator):
        seed_tensor = tf.convert_to_tensor(seed.next())
        if seed_tensor.dtype != tf.int32:
            seed_tensor = tf.cast(
                tf.math.floormod(seed_tensor, tf.int32.max - 1), tf.int32
            )
    else:
        seed_tensor = tf.constant([int(seed), 0], tf.int32)
    return tf.random.stateless_uniform(
        shape, seed=seed_tensor, dtype=dtype, alg="philox"
    )


class HessianVectorProduct:
    """Hessian-vector products of the compiled loss at the current weights.

    The loss is a function of copies of the current weight values,
    evaluated statelessly (``functional.stateless_loss``: no variable,
    BatchNorm statistic or seed of the model changes). A product is
    reverse-over-reverse autodiff in one ``tf.function``: the inner tape's
    gradient g is recorded by an outer tape, whose vector-Jacobian product
    with cotangent v is J_g^T v = H^T v = H v (``output_gradients=v``).
    Each call reruns the forward pass in graph mode; on small models that
    is ~15x faster than replaying a persistent eager tape.

    Args:
        model: A compiled, built Keras model.
        x, y, sample_weight: One batch (tensors).
        training: Run the forward pass in training mode.

    Attributes:
        loss: The loss at the current weights (float).
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        training: bool = False,
    ) -> None:
        import tensorflow as tf

        self._model = model
        self._batch = functional.as_tensors(x, y, sample_weight)
        self._training = training
        self.params = [
            tf.identity(tf.convert_to_tensor(v.value))
            for v in model.trainable_variables
        ]
        self._non_trainable = [
            tf.identity(tf.convert_to_tensor(v.value))
            for v in model.non_trainable_variables
        ]
        loss, _, _ = functional.stateless_loss(
            model, self.params, self._non_trainable, *self._batch, training
        )
        self.loss = float(loss)
        self._hvp = tf.function(self._hessian_vector_product)
        self._quadratic_form = tf.function(
            lambda vectors: _dot(vectors, self._hessian_vector_product(vectors))
        )
        self._diagonal_rows: Any = None  # a tf.function, made on first use

    def _loss_and_grads(
        self, params: Sequence[tf.Tensor]
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """L(params) and its gradient, differentiable by enclosing tapes."""
        import tensorflow as tf

        x, y, sample_weight = self._batch
        with (
            tf.GradientTape(watch_accessed_variables=False) as inner,
            compat.exact_tf_moments(),
        ):
            inner.watch(params)
            loss, _, _ = functional.stateless_loss(
                self._model,
                params,
                self._non_trainable,
                x,
                y,
                sample_weight,
                self._training,
            )
        grads = _gradient(inner, loss, params)
        return loss, grads

    def _as_vectors(self, vectors: Sequence[Any]) -> list[tf.Tensor]:
        import tensorflow as tf

        return [
            tf.cast(tf.convert_to_tensor(v), p.dtype)
            for v, p in zip(vectors, self.params)
        ]

    def _hessian_vector_product(
        self, vectors: Sequence[tf.Tensor]
    ) -> list[tf.Tensor]:
        import tensorflow as tf

        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self.params)
            _, grads = self._loss_and_grads(self.params)
        return outer.gradient(
            grads,
            self.params,
            output_gradients=list(vectors),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    def __call__(self, vectors: Sequence[Any]) -> list[tf.Tensor]:
        """H v for one vector given as one tensor per variable."""
        return self._hvp(self._as_vectors(vectors))

    def quadratic_form(self, vectors: Sequence[Any]) -> float:
        """v^T H v."""
        return float(self._quadratic_form(self._as_vectors(vectors)))

    def diagonal(self, chunk_size: int = 256) -> list[tf.Tensor]:
        """The exact Hessian diagonal, by chunks of Hessian rows.

        For the weight indices [start, start + chunk) the rows of H are the
        Jacobian of g[start:start + chunk] with respect to the weights, one
        vectorized (``pfor``) reverse pass per chunk inside a
        ``tf.function``; the diagonal entries are picked out of those rows.
        """
        import tensorflow as tf

        sizes = [int(tf.size(p)) for p in self.params]
        n = sum(sizes)
        if self._diagonal_rows is None:
            self._diagonal_rows = self._make_diagonal_rows()
        pieces = []
        for start in range(0, n, chunk_size):
            count = min(chunk_size, n - start)
            pieces.append(
                self._diagonal_rows(
                    tf.constant(start, tf.int32), tf.constant(count, tf.int32)
                )
            )
        diag = tf.concat(pieces, axis=0)
        return [
            tf.reshape(d, p.shape)
            for d, p in zip(tf.split(diag, sizes), self.params)
        ]

    def _make_diagonal_rows(self) -> Any:
        import tensorflow as tf

        params = self.params

        @tf.function(reduce_retracing=True)
        def diagonal_rows(start: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                outer.watch(params)
                _, grads = self._loss_and_grads(params)
                flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
                rows_of = flat[start : start + count]
            rows = outer.jacobian(
                rows_of,
                params,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            rows = tf.concat([tf.reshape(r, [count, -1]) for r in rows], axis=1)
            index = tf.range(count)
            return tf.gather_nd(rows, tf.stack([index, start + index], 1))

        return diagonal_rows


def gauss_newton_factors(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    training: bool = False,
) -> tuple[Any, Any]:
    """The dense output Jacobian J (M x n) and output Hessian H_z (M x M).

    M counts every output entry of the batch, n every trainable weight;
    G = J^T H_z J. ``tape.jacobian`` (vectorized) of the stateless
    forward pass, and of the compiled loss's output gradient.
    """
    import numpy as np
    import tensorflow as tf

    x, y, sample_weight = functional.as_tensors(x, y, sample_weight)
    params = [
        tf.identity(tf.convert_to_tensor(v.value))
        for v in model.trainable_variables
    ]
    non_trainable = [
        tf.convert_to_tensor(v.value) for v in model.non_trainable_variables
    ]
    with (
        tf.GradientTape(watch_accessed_variables=False) as tape,
        compat.exact_tf_moments(),
    ):
        tape.watch(params)
        _, y_pred, _ = functional.stateless_loss(
            model, params, non_trainable, x, y, sample_weight, training
        )
        leaves = keras.tree.flatten(y_pred)
        flat = tf.concat([tf.reshape(z, [-1]) for z in leaves], 0)
    m = int(flat.shape[0])
    jac = tape.jacobian(
        flat, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    jacobian = np.concatenate(
        [np.asarray(j, "float64").reshape(m, -1) for j in jac], axis=1
    )
    z_flat = tf.identity(flat)
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(z_flat)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(z_flat)
            pieces, offset = [], 0
            for z in leaves:
                size = int(np.prod(z.shape))
                pieces.append(
                    tf.reshape(z_flat[offset : offset + size], z.shape)
                )
                offset += size
            packed = keras.tree.pack_sequence_as(y_pred, pieces)
            loss = compat.compiled_loss(model, y, packed, sample_weight)
        grad = inner.gradient(loss, z_flat)
    hessian = outer.jacobian(grad, z_flat)
    return jacobian, np.asarray(hessian, "float64")
