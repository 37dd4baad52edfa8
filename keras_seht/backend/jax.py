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

For each probe :math:`\sigma_k` the quadratic form is taken
**forward-over-forward**, as the second derivative along the probe,

.. math::

    \sigma_k^\top H \sigma_k = \frac{d^2}{d\epsilon^2}
        f(w + \epsilon\sigma_k)\Big|_{\epsilon=0}
        = \texttt{jax.jvp}(w \mapsto \texttt{jax.jvp}(f, (w,),
        (\sigma_k,))_1, (w,), (\sigma_k,))_1,

two nested forward-mode passes through the forward computation alone (no
Hessian-vector product of the backward pass), whose primal is the
ordinary forward pass: f(w) and its aux come out of the same
computation. Then

.. math::

    t = \frac{1}{K} \sum_k \sigma_k^\top H \sigma_k,

and the update direction is ONE reverse-mode pass over that computation
(``jax.vjp`` of :math:`L + \text{strength}\cdot t`: a third-order
derivative of :math:`L`). Measured on a CIFAR ResNet-18 (XLA, CPU), this
is about 2.4x faster than reverse over a forward-over-reverse HVP, with
the same values. The probes do not depend on :math:`w`, so they are drawn
once, before differentiating. A model whose loss contains a
``custom_vjp`` (``keras.ops.custom_gradient``, quantized Dense layers),
which has no forward mode, keeps the former forward-over-reverse HVP,
:math:`H\sigma_k = \texttt{jax.jvp}(\nabla f, (w,), (\sigma_k,))_1`,
which needs only the custom backward rule (`probe_estimate`).

SEHT-D's probes are dense arrays here (a compiled step has static
shapes), mostly zeros, so an exact SEHT-D step costs what a SEHT-H one
does. Skipping the untouched layers at run time would take a
``jax.lax.cond`` between a full and an output-layer-only branch, and
XLA:CPU runs a ResNet's gradient about 9x slower inside a conditional
than outside (measured), which costs more than the branch saves.

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
from keras_seht import functional
from keras_seht.penalties import (
    ConfidencePenalty,
    GradientNorm,
    Jacobian,
    flatten_outputs,
    float_inputs,
)

State = tuple[list[Any], list[Any], list[Any], list[Any]]


def _dot(a: Sequence[Any], b: Sequence[Any]) -> jax.Array:
    """Inner product of two vectors stored as lists of arrays."""
    terms = [jnp.sum(jnp.asarray(u) * jnp.asarray(v)) for u, v in zip(a, b)]
    return jnp.sum(jnp.stack(terms))


def _draw(
    model: keras.Model,
    non_trainable_values: Sequence[Any],
    draw: Callable[[], Any],
) -> tuple[Any, list[Any]]:
    """Runs ``draw()`` (random draws from ``model.seht_seed_generator``).

    Statelessly: the seed generator's state is read from (and its advance
    written back to) ``non_trainable_values``, so the draws are fresh at
    every step of a compiled loop and tracing never touches the variables.
    """
    mapping = list(zip(model.non_trainable_variables, non_trainable_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        result = draw()
    new_values = functional.scope_values(
        scope, model.non_trainable_variables, non_trainable_values
    )
    return result, new_values


def _draw_probes(
    model: keras.Model,
    non_trainable_values: Sequence[Any],
    dtypes: Sequence[Any],
) -> tuple[list[jax.Array], list[Any]]:
    """Draws ``max_iter`` probes, stacked along a leading axis per variable."""
    estimator = model.seht_estimator

    def draw() -> list[Any]:
        return [
            estimator.sample_probes(
                model.seht_layout,
                seed=model.seht_seed_generator,
                dtype=dtypes[0],
            )
            for _ in range(estimator.max_iter)
        ]

    probes, new_values = _draw(model, non_trainable_values, draw)
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


def curvature_estimate(
    fn: Callable[[list[Any]], tuple[Any, Any]],
    trainable_values: list[Any],
    probes: list[Any],
) -> tuple[jax.Array, tuple[Any, Any]]:
    """mean_k sigma_k^T H sigma_k by forward-over-forward, and f(w).

    ``sigma^T H sigma`` is the second derivative of ``e -> f(w + e sigma)``
    at 0: two nested ``jax.jvp`` (both along sigma) give it, with f(w) and
    the aux of the primal forward pass as by-products (the probes'
    primal passes are identical computations, which XLA can merge).

    Args:
        fn: ``w -> (f(w), aux)``, a pure function of the trainable values.
        trainable_values: The point ``w``.
        probes: One array per variable, each with a leading probe axis.

    Returns:
        ``t = mean_k sigma_k^T H sigma_k`` (differentiable in ``w``) and
        ``(f(w), aux)`` (also differentiable: the primal computation).
    """

    def second(sigma: list[Any]) -> tuple[Any, Any]:
        def first(w: list[Any]) -> tuple[Any, Any]:
            value, slope, aux = jax.jvp(fn, (w,), (sigma,), has_aux=True)
            return slope, (value, aux)

        _, curvature, primal = jax.jvp(
            first, (trainable_values,), (sigma,), has_aux=True
        )
        return curvature, primal

    # A loop, not a vmap: XLA:CPU ran five vmapped probes on a ResNet 2.8x
    # slower than five unrolled ones (measured).
    count = int(probes[0].shape[0]) if probes else 1
    curvature, primal = second([p[0] for p in probes])
    curvatures = [curvature]
    for k in range(1, count):
        curvatures.append(second([p[k] for p in probes])[0])
    return jnp.mean(jnp.stack(curvatures)), primal


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


def gauss_newton_estimate(
    fn: Callable[[list[Any]], tuple[Any, Any]],
    trainable_values: list[Any],
    probes: list[Any],
    output_loss: Callable[[Any], Any],
) -> tuple[jax.Array, tuple[Any, Any]]:
    """mean_k u_k^T H_z u_k with u_k = J sigma_k, and f(w) as a by-product.

    Args:
        fn: ``w -> (f(w), extra)`` with the model outputs at
            ``extra[0][1]`` (the aux of ``compute_loss_and_updates``).
        trainable_values: The point ``w``.
        probes: One array per variable, each with a leading probe axis.
        output_loss: ``z -> loss`` as a function of the model outputs.

    Returns:
        ``t`` (differentiable in ``w``) and ``(f(w), extra)``.

    u = J sigma is one forward-mode pass (``jax.jvp``) through the same
    forward computation as the loss, vmapped over the probes (the primal
    pass is shared); H_z u is a forward-over-reverse product of
    `output_loss` in output space.
    """

    def primal(w: list[Any]) -> tuple[Any, Any]:
        value, extra = fn(w)
        return (value, extra[0][1]), extra

    def jvp_one(sigma: list[Any]) -> tuple[Any, Any, Any]:
        primals, tangents, extra = jax.jvp(
            primal, (trainable_values,), (sigma,), has_aux=True
        )
        return primals, extra, tangents[1]

    (value, y_pred), extra, u = jax.vmap(jvp_one, out_axes=(None, None, 0))(
        probes
    )
    grad_z = jax.grad(output_loss)

    def quadratic(du: Any) -> jax.Array:
        h_u = jax.jvp(grad_z, (y_pred,), (du,))[1]
        return _dot(jax.tree.leaves(du), jax.tree.leaves(h_u))

    return jnp.mean(jax.vmap(quadratic)(u)), (value, extra)


def _has_custom_vjp(fn: Callable[[Any], Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` traces to a ``custom_vjp`` call anywhere
    (nested jaxprs of control flow and calls included)."""

    def walk(jaxpr: Any) -> bool:
        for eqn in jaxpr.eqns:
            if "custom_vjp" in eqn.primitive.name:
                return True
            for param in eqn.params.values():
                items = param if isinstance(param, (list, tuple)) else [param]
                for item in items:
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns") and walk(inner):
                        return True
        return False

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def train_step(
    model: keras.Model, state: State, data: Any
) -> tuple[Any, State]:
    """One SEHT step: the stateless counterpart of ``JAXTrainer.train_step``.

    Minimizes L + sum_j strength_j R_j over the penalties of
    ``model.seht_penalties``, all from one forward pass: the SEHT estimate
    by `curvature_estimate`, ``GradientNorm`` from the loss gradient,
    ``Jacobian`` by a ``jax.vjp`` of the outputs with respect to the
    inputs, ``ConfidencePenalty`` from the outputs.

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
    penalties = model.seht_penalties
    estimator = model.seht_estimator
    jacobian = next((p for p in penalties if isinstance(p, Jacobian)), None)
    gradient_norm = any(isinstance(p, GradientNorm) for p in penalties)
    smoothed = estimator is not None and estimator.method != "exact"

    dtypes = [jnp.asarray(v).dtype for v in trainable_values]
    probes: list[Any] = []
    if estimator is not None:
        probes, non_trainable_values = _draw_probes(
            model, non_trainable_values, dtypes
        )
    scale = _loss_scale(model, optimizer_values)
    flat_x = keras.tree.flatten(x)
    positions = float_inputs(x) if jacobian is not None else []

    def loss_fn(w: list[Any], leaves: Sequence[Any]) -> tuple[Any, Any]:
        # Keras' own stateless loss (scaled by a LossScaleOptimizer).
        flat = list(flat_x)
        for i, leaf in zip(positions, leaves):
            flat[i] = leaf
        return model.compute_loss_and_updates(
            w,
            non_trainable_values,
            metrics_values,
            keras.tree.pack_sequence_as(x, flat),
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_values,
        )

    leaves = [flat_x[i] for i in positions]
    projections: list[Any] = []
    if jacobian is not None:
        z_spec = jax.eval_shape(
            lambda: flatten_outputs(loss_fn(trainable_values, leaves)[1][1])
        )
        (projections, weight), non_trainable_values = _draw(
            model,
            non_trainable_values,
            lambda: jacobian.projections(
                z_spec.shape, z_spec.dtype, model.seht_seed_generator
            ),
        )

    def output_loss(z: Any) -> Any:
        # The compiled loss of the outputs z (scaled like f); its metric
        # trackers' updates are discarded.
        with keras.StatelessScope():
            return compat.compiled_loss(model, y, z, sample_weight) * scale

    def base_fn(w: list[Any]) -> tuple[Any, Any]:
        """w -> (scaled L, (aux, {index: scaled first-order R_j}))."""
        first_order = {}
        if jacobian is None:
            scaled_loss, aux = loss_fn(w, leaves)
        else:

            def outputs(inputs: Sequence[Any]) -> tuple[Any, Any]:
                scaled_loss, aux = loss_fn(w, inputs)
                return flatten_outputs(aux[1]), (scaled_loss, aux)

            z, vjp_fn, (scaled_loss, aux) = jax.vjp(
                outputs, leaves, has_aux=True
            )
            products = [vjp_fn(v)[0] for v in projections]
            first_order[penalties.index(jacobian)] = (
                jacobian.norm_from_products(products, weight, z.shape[0])
                * scale
            )
        for j, penalty in enumerate(penalties):
            if isinstance(penalty, ConfidencePenalty):
                first_order[j] = (
                    penalty.value(model, aux[1], sample_weight) * scale
                )
        return scaled_loss, (aux, first_order)

    # A custom_vjp (``keras.ops.custom_gradient``, quantized Dense layers)
    # has no forward mode, and the failure only shows when XLA lowers the
    # step: such models keep forward-over-reverse, which needs only the
    # custom backward rule.
    forward_over_forward = (
        estimator is not None
        and estimator.curvature == "hessian"
        and not smoothed
        and not _has_custom_vjp(lambda w: base_fn(w)[0], trainable_values)
    )

    def objective(w: list[Any]) -> tuple[Any, Any]:
        """w -> ((scaled L, sum_j strength_j scaled R_j), by-products)."""
        grads = None
        if estimator is not None and estimator.curvature == "gauss_newton":
            scaled_t, (scaled_loss, (aux, first_order)) = gauss_newton_estimate(
                base_fn, w, probes, output_loss
            )
            if gradient_norm:
                grads = jax.grad(lambda v: base_fn(v)[0])(w)
        elif smoothed:
            # t_eps from the losses at w +- e sigma_k, run with the step's
            # non-trainable values (same Dropout masks); their updates are
            # dropped. Antithetic: the loss at w gets no gradient, so
            # L + strength t_eps differentiates as (L+ + L-) / 2 alone.
            scaled_loss, (aux, first_order) = base_fn(w)
            if gradient_norm:
                grads = jax.grad(lambda v: base_fn(v)[0])(w)
            epsilon = estimator.step_epsilon
            count = estimator.max_iter  # probes: a leading probe axis
            pair = (
                sum(
                    loss_fn(
                        functional.shifted(w, [p[k] for p in probes], s), leaves
                    )[0]
                    for k in range(count)
                    for s in (epsilon, -epsilon)
                )
                / count
            )
            if estimator.method == "antithetic":
                scaled_loss = jax.lax.stop_gradient(scaled_loss)
            scaled_t = (pair - 2.0 * scaled_loss) / epsilon**2
        elif estimator is not None:
            if forward_over_forward:
                scaled_t, (scaled_loss, (aux, first_order)) = (
                    curvature_estimate(base_fn, w, probes)
                )
                if gradient_norm:
                    grads = jax.grad(lambda v: base_fn(v)[0])(w)
            else:  # the loss gradient comes with the HVPs
                scaled_t, (scaled_loss, grads, (aux, first_order)) = (
                    probe_estimate(base_fn, w, probes)
                )
        elif gradient_norm:
            (scaled_loss, (aux, first_order)), grads = jax.value_and_grad(
                base_fn, has_aux=True
            )(w)
        else:
            scaled_loss, (aux, first_order) = base_fn(w)
        scaled_values = []
        for j, penalty in enumerate(penalties):
            if penalty is estimator:
                scaled_values.append(scaled_t)
            elif isinstance(penalty, GradientNorm):
                assert grads is not None  # gradient_norm: computed above
                scaled_values.append(_dot(grads, grads) / scale)
            elif j in first_order:
                scaled_values.append(first_order[j])
            else:
                raise TypeError(f"Unsupported `seht` penalty: {penalty!r}")
        penalty_sum = sum(
            p.strength * p.objective_value(v)
            for p, v in zip(penalties, scaled_values)
        )
        return (scaled_loss, penalty_sum), (scaled_values, grads, aux)

    # One forward (and its tapes) and one cotangent (1, 1): the
    # objective's gradient.
    (scaled_loss, _), vjp_fn, (scaled_values, loss_grads, aux) = jax.vjp(
        objective, trainable_values, has_aux=True
    )
    one = jnp.ones_like(scaled_loss)
    total_grads = vjp_fn((one, one))[0]
    if loss_grads is None:
        # The fallback of a non-finite penalty: the plain loss gradient,
        # computed (inside the cond) only when it is needed. Not as
        # vjp_fn((1, 0)): a zero cotangent times a non-finite tangent of
        # the forward-over-forward pass would still be NaN.
        def plain_grads() -> list[Any]:
            return jax.grad(lambda v: loss_fn(v, leaves)[0])(trainable_values)

        loss_grads = jax.lax.cond(
            jnp.all(jnp.isfinite(jnp.stack(scaled_values))),
            lambda: [jnp.zeros_like(g) for g in total_grads],
            plain_grads,
        )
    unscaled_loss, y_pred, non_trainable_values, metrics_values = aux
    values = [v / scale for v in scaled_values]
    finite = jnp.all(jnp.isfinite(jnp.stack(values)))
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
    penalty_total = sum(
        p.strength * p.objective_value(v) for p, v in zip(penalties, values)
    )
    total_loss = jnp.where(finite, unscaled_loss + penalty_total, unscaled_loss)

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
        model.update_seht_trackers(values, finite)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    new_metrics_values = functional.scope_values(
        scope, model.metrics_variables, metrics_values
    )

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


def gauss_newton_factors(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    training: bool = False,
) -> tuple[Any, Any]:
    """The dense output Jacobian J (M x n) and output Hessian H_z (M x M).

    M counts every output entry of the batch, n every trainable weight;
    G = J^T H_z J. ``jax.jacrev`` of the stateless forward pass and
    ``jax.hessian`` of the compiled loss, at the current weights.
    """
    import numpy as np

    params = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def outputs(w: list[Any]) -> jax.Array:
        y_pred, _ = model.stateless_call(w, non_trainable, x, training=training)
        return jnp.concatenate([jnp.ravel(z) for z in jax.tree.leaves(y_pred)])

    y_pred, _ = model.stateless_call(
        params, non_trainable, x, training=training
    )
    leaves = jax.tree.leaves(y_pred)
    jac = jax.jit(jax.jacrev(outputs))(params)
    m = int(sum(z.size for z in leaves))
    jacobian = np.concatenate(
        [np.asarray(j, "float64").reshape(m, -1) for j in jac], axis=1
    )

    def output_loss(z_flat: jax.Array) -> jax.Array:
        pieces, offset = [], 0
        for z in leaves:
            pieces.append(z_flat[offset : offset + z.size].reshape(z.shape))
            offset += z.size
        packed = jax.tree.unflatten(jax.tree.structure(y_pred), pieces)
        with keras.StatelessScope():
            return compat.compiled_loss(model, y, packed, sample_weight)

    flat = jnp.concatenate([jnp.ravel(z) for z in leaves])
    hessian = np.asarray(jax.hessian(output_loss)(flat), "float64")
    return jacobian, hessian
