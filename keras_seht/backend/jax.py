r"""SEHT autodiff on the JAX backend.

The train step replaces Keras' ``JAXTrainer.train_step`` and has the same
stateless signature, ``train_step(model, state, data) -> (logs, state)``,
so it runs under ``jax.jit`` (the Keras default), eagerly, and under a
``keras.distribution`` (XLA partitions the compiled step like Keras' own).

The loss is evaluated as a pure function of the trainable *values*,

.. math::

    f(w) = \text{model.compute\_loss\_and\_updates}(w, \ldots)

which is what Keras differentiates in its own JAX step: a
``stateless_call`` followed by ``stateless_compute_loss``, both inside
stateless scopes, so weight and activity regularizers (``model.losses``)
are functions of the traced ``w``. (A loss computed from the model's
variables outside such a scope treats the regularizers as constants: their
gradient, and their Hessian, silently come out zero.)

For each probe :math:`\sigma_k` the Hessian-vector product is taken
**forward-over-reverse**,

.. math::

    (g, H\sigma_k) = \texttt{jax.jvp}(\nabla f, (w,), (\sigma_k,)),

one forward-mode pass through the gradient computation. Compared with
reverse-over-reverse (``grad`` of ``g . sigma``) it needs no second tape of
the backward pass, costs about one extra gradient, and returns the gradient
:math:`g = \nabla L` itself as its primal output, so the loss gradient is
computed once and reused (for the NaN fallback below). The probes of one
step are pushed through a single ``jax.vmap`` of that JVP, which shares the
primal forward and backward passes among them. Then

.. math::

    t = \frac{1}{K} \sum_k \sigma_k^\top H \sigma_k,

and the update direction is the reverse-mode gradient of
:math:`L + \text{strength}\cdot t` (``jax.value_and_grad`` through the JVP:
a third-order derivative of :math:`L`). The probes do not depend on
:math:`w`, so they are drawn once, before differentiating.

State handling mirrors Keras: the probes are drawn from the model's
``seht_seed_generator`` inside a ``keras.StatelessScope`` over the
non-trainable values (the advanced seed comes back in the returned state);
the single training-mode forward pass yields the new non-trainable values
(BatchNorm moving statistics and Dropout seeds advance exactly once per
step, and the same Dropout mask is used for :math:`L` and :math:`t`).

With a ``LossScaleOptimizer`` (``mixed_float16``), :math:`f` is the
*scaled* loss, as in Keras: :math:`\nabla f`, :math:`H\sigma` and the
update direction are all scaled by the same factor, which the optimizer
removes, and the logged trace is divided by it. A non-finite t is then
treated as an overflow of the scaled HVP: the optimizer receives a
non-finite gradient, so it skips the step and lowers its scale, as it does
for any overflow (without this, the scale and t would stay overflowing).
Without loss scaling, a non-finite t makes the step apply the plain loss
gradient. Either way the step counts in ``seht_skipped``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import keras

from keras_seht import _keras_compat as compat

State = tuple[list[Any], list[Any], list[Any], list[Any]]


def _dot(a: Sequence[Any], b: Sequence[Any]) -> jax.Array:
    """Inner product of two vectors stored as lists of arrays."""
    terms = [jnp.sum(jnp.asarray(u) * jnp.asarray(v)) for u, v in zip(a, b)]
    return jnp.sum(jnp.stack(terms))


def _draw_probes(
    model: keras.Model,
    non_trainable_values: Sequence[Any],
    dtypes: Sequence[Any],
) -> tuple[list[jax.Array], list[Any]]:
    """Draws ``max_iter`` probes, stacked along a leading axis per variable.

    Statelessly: the seed generator's state is read from (and its advance
    written back to) ``non_trainable_values``, so the probes are fresh at
    every step of a compiled loop and tracing never touches the variables.
    """
    estimator = model.seht
    mapping = list(zip(model.non_trainable_variables, non_trainable_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        probes = [
            estimator.sample_probes(
                model.seht_layout,
                seed=model.seht_seed_generator,
                dtype=dtypes[0],
            )
            for _ in range(estimator.max_iter)
        ]
    new_values = []
    for variable, value in zip(
        model.non_trainable_variables, non_trainable_values
    ):
        new = scope.get_current_value(variable)
        new_values.append(value if new is None else new)
    stacked = [
        jnp.stack([jnp.asarray(p[i], dtypes[i]) for p in probes])
        for i in range(len(dtypes))
    ]
    return stacked, new_values


def _loss_scale(model: keras.Model, optimizer_values: Sequence[Any]) -> Any:
    """The factor ``optimizer.scale_loss`` multiplies the loss by (or 1)."""
    mapping = list(zip(model.optimizer.variables, optimizer_values))
    with keras.StatelessScope(state_mapping=mapping):
        scale = model.optimizer.scale_loss(jnp.ones((), "float32"))
    return jnp.asarray(scale, "float32")


def probe_estimate(
    loss_fn: Callable[[list[Any]], tuple[Any, Any]],
    trainable_values: list[Any],
    probes: list[Any],
) -> tuple[jax.Array, tuple[Any, ...]]:
    """mean_k sigma_k^T H sigma_k, with f(w), grad f(w) as by-products.

    Args:
        loss_fn: ``w -> (f(w), aux)``, a pure function of the trainable
            values (aux: anything not differentiated).
        trainable_values: The point ``w``.
        probes: One array per variable, each with a leading probe axis.

    Returns:
        ``t = mean_k sigma_k^T H sigma_k`` (differentiable in ``w``) and,
        as primal values, ``f(w)``, ``g = grad f(w)`` and the aux of the
        (single) forward pass.
    """

    def grad_fn(w: list[Any]) -> tuple[Any, Any]:
        (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(w)
        return grads, (value, aux)

    def jvp_one(sigma: list[Any]) -> tuple[Any, Any]:
        primal_out, tangent_out = jax.jvp(
            grad_fn, (trainable_values,), (sigma,)
        )
        return primal_out, tangent_out[0]

    # The primal outputs do not depend on the probe: vmap leaves them
    # unbatched, so the forward and backward pass are shared by all probes.
    (grads, (value, aux)), h_sigma = jax.vmap(jvp_one, out_axes=(None, 0))(
        probes
    )
    per_probe = jax.vmap(_dot)(probes, h_sigma)
    return jnp.mean(per_probe), (value, grads, aux)


def train_step(
    model: keras.Model, state: State, data: Any
) -> tuple[Any, State]:
    """One SEHT step: the stateless counterpart of ``JAXTrainer.train_step``.

    Args:
        model: A compiled keras-seht model with ``model.seht`` set.
        state: ``(trainable, non_trainable, optimizer, metrics)`` values.
        data: One batch, ``(x, y, sample_weight)`` or a prefix of it.

    Returns:
        ``(logs, new_state)``.
    """
    (
        trainable_values,
        non_trainable_values,
        optimizer_values,
        metrics_values,
    ) = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    strength = model.seht.strength

    dtypes = [jnp.asarray(v).dtype for v in trainable_values]
    probes, non_trainable_values = _draw_probes(
        model, non_trainable_values, dtypes
    )
    scale = _loss_scale(model, optimizer_values)

    def loss_fn(w: list[Any]) -> tuple[Any, Any]:
        # Keras' own stateless loss (scaled by a LossScaleOptimizer).
        return model.compute_loss_and_updates(
            w,
            non_trainable_values,
            metrics_values,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_values,
        )

    def total_fn(w: list[Any]) -> tuple[Any, Any]:
        scaled_t, (scaled_loss, grads, aux) = probe_estimate(loss_fn, w, probes)
        return scaled_loss + strength * scaled_t, (scaled_t, grads, aux)

    (_, (scaled_t, loss_grads, aux)), total_grads = jax.value_and_grad(
        total_fn, has_aux=True
    )(trainable_values)
    unscaled_loss, y_pred, non_trainable_values, metrics_values = aux
    trace = scaled_t / scale
    finite = jnp.isfinite(trace)
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        # A non-finite t under loss scaling is (almost always) an overflow
        # of the scaled HVP: hand the optimizer a non-finite gradient so
        # that, as for any overflow, it skips the update and lowers the
        # scale. Falling back to the finite loss gradient would keep the
        # scale, and t, overflowing forever.
        fallback = [jnp.full_like(g, jnp.nan) for g in loss_grads]
    else:
        fallback = loss_grads
    # Select, never multiply: 0 * NaN would still be NaN.
    grads = [jnp.where(finite, gt, gf) for gt, gf in zip(total_grads, fallback)]
    total_loss = jnp.where(
        finite, unscaled_loss + strength * trace, unscaled_loss
    )

    trainable_values, optimizer_values = model.optimizer.stateless_apply(
        optimizer_values, grads, trainable_values
    )

    mapping = list(zip(model.metrics_variables, metrics_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        batch_size = next(
            i for i in keras.tree.flatten(x) if i is not None
        ).shape[0]
        compat.loss_tracker(model).update_state(
            total_loss, sample_weight=batch_size
        )
        model.update_seht_trackers(trace, finite)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    new_metrics_values = []
    for variable, value in zip(model.metrics_variables, metrics_values):
        new = scope.get_current_value(variable)
        new_metrics_values.append(value if new is None else new)

    return logs, (
        trainable_values,
        non_trainable_values,
        optimizer_values,
        new_metrics_values,
    )


class HessianVectorProduct:
    """Hessian-vector products of the compiled loss at the current weights.

    The loss is that of ``model.compute_loss_and_updates`` (compiled loss
    plus ``model.losses``, unscaled), evaluated statelessly at the current
    variable values: no weight, BatchNorm statistic, seed or metric of the
    model changes. Products are forward-over-reverse
    (``jax.jvp(jax.grad(f), (w,), (v,))``), jit-compiled once per object.
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        training: bool = False,
    ) -> None:
        self.params = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        metrics = [v.value for v in model.metrics_variables]
        optimizer = getattr(model, "optimizer", None)
        optimizer_values = (
            [v.value for v in optimizer.variables]
            if optimizer is not None
            else None
        )

        def loss_fn(w: list[Any]) -> jax.Array:
            _, aux = model.compute_loss_and_updates(
                w,
                non_trainable,
                metrics,
                x,
                y,
                sample_weight,
                training=training,
                optimizer_variables=optimizer_values,
            )
            return aux[0]  # the unscaled loss

        grad_fn = jax.grad(loss_fn)

        def hvp(w: list[Any], v: list[Any]) -> list[Any]:
            return jax.jvp(grad_fn, (w,), (v,))[1]

        self._hvp = jax.jit(hvp)
        self._loss_fn = loss_fn
        self.loss = float(jax.jit(loss_fn)(self.params))

    def __call__(self, vectors: Sequence[Any]) -> list[jax.Array]:
        """H v for one vector given as one tensor per variable."""
        v = [
            jnp.asarray(vec, p.dtype).reshape(p.shape)
            for vec, p in zip(vectors, self.params)
        ]
        return list(self._hvp(self.params, v))

    def quadratic_form(self, vectors: Sequence[Any]) -> float:
        """v^T H v."""
        return float(_dot(vectors, self(vectors)))

    def diagonal(self, chunk_size: int = 256) -> list[jax.Array]:
        """The exact Hessian diagonal, by vmapped batches of Hessian rows.

        Each chunk pushes ``chunk_size`` basis vectors e_i through one
        ``vmap`` of the HVP and keeps entry i of row i. The last chunk is
        padded to the same size so the function compiles once.
        """
        shapes = [p.shape for p in self.params]
        sizes = [int(p.size) for p in self.params]
        n = sum(sizes)
        chunk = max(1, min(int(chunk_size), n))
        params = self.params
        hvp = self._hvp
        dtype = jnp.result_type(*params)

        def unflatten(flat: jax.Array) -> list[jax.Array]:
            out, offset = [], 0
            for p, size in zip(params, sizes):
                piece = flat[offset : offset + size]
                out.append(piece.reshape(p.shape).astype(p.dtype))
                offset += size
            return out

        @jax.jit
        def diag_chunk(start: jax.Array) -> jax.Array:
            idx = start + jnp.arange(chunk)
            basis = jax.nn.one_hot(idx, n, dtype=dtype)

            def row(e: jax.Array) -> jax.Array:
                hv = hvp(params, unflatten(e))
                return jnp.concatenate([jnp.ravel(h).astype(dtype) for h in hv])

            rows = jax.vmap(row)(basis)
            # Padded indices (>= n) hit all-zero rows: clip, drop later.
            return rows[jnp.arange(chunk), jnp.minimum(idx, n - 1)]

        pieces = [
            diag_chunk(jnp.asarray(start, "int32"))
            for start in range(0, n, chunk)
        ]
        diag = jnp.concatenate(pieces)[:n]
        out, offset = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(diag[offset : offset + size].reshape(shape))
            offset += size
        return out
