r"""SEHT autodiff on the JAX backend: the step's primitives.

The step's logic lives in `keras_seht.step`; this module gives it the
stateless JAX form of Keras' ``JAXTrainer.train_step``, ``(logs, state)``
from ``(state, data)``, so it runs under ``jax.jit`` (the Keras default),
eagerly, and under a ``keras.distribution`` (XLA partitions the compiled
step like Keras' own).

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
computation. The objective :math:`s L + \sum_j \text{strength}_j
\phi_j(s R_j)` is then differentiated by ONE reverse-mode pass
(``jax.vjp``: a third-order derivative of :math:`L`). Measured on a CIFAR
ResNet-18 (XLA, CPU), this is about 2.4x faster than reverse over a
forward-over-reverse HVP, with the same values. A model whose loss
contains a ``custom_vjp`` (``keras.ops.custom_gradient``, quantized Dense
layers), which has no forward mode, keeps the forward-over-reverse HVP,
:math:`H\sigma_k = \texttt{jax.jvp}(\nabla f, (w,), (\sigma_k,))_1`,
which needs only the custom backward rule (`probe_estimate`).

SEHT-D's probes are dense arrays inside one compiled step (static
shapes), mostly zeros. Skipping the untouched layers at run time would take
a ``jax.lax.cond``, and XLA:CPU runs a ResNet's gradient about 9x slower
inside a conditional than outside (measured). So a compiled SEHT-D step
runs through `SparseTrainStep` instead: the host picks, per step, one of a
few compiled variants (`keras_seht.variants`) whose forward-mode tangents
start at the lowest layer the step's probes can touch (``StepRun``'s
``tangents``; the other variables are closed over, `_restricted`).

State handling mirrors Keras: the plan's random draws come from the
model's ``seht_seed_generator`` inside a ``keras.StatelessScope`` over the
non-trainable values (the advanced seed comes back in the returned state);
the single training-mode forward pass yields the new non-trainable values
(BatchNorm moving statistics and Dropout seeds advance exactly once per
step, and the same Dropout mask is used for :math:`L` and :math:`t`). The
plain loss gradient that replaces a non-finite objective's is computed
inside a ``jax.lax.cond``, only when it is needed.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import keras

from keras_seht import _keras_compat as compat
from keras_seht import functional, output_split, step, variants
from keras_seht.context import StepPlan
from keras_seht.penalties import flatten_outputs, float_inputs

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


def _loss_scale(model: keras.Model, optimizer_values: Sequence[Any]) -> Any:
    """The factor ``optimizer.scale_loss`` multiplies the loss by (or 1)."""
    mapping = list(zip(model.optimizer.variables, optimizer_values))
    with keras.StatelessScope(state_mapping=mapping):
        scale = model.optimizer.scale_loss(jnp.ones((), "float32"))
    return jnp.asarray(scale, "float32")


def _restricted(
    fn: Callable[[list[Any]], Any],
    trainable_values: list[Any],
    probes: list[Any],
) -> tuple[Callable[[list[Any]], Any], list[Any], list[Any]]:
    """`fn` as a function of the probed variables alone.

    A None entry of `probes` is a probe that is zero on that variable
    (SEHT-D's undrawn layers, `SparseTrainStep`). Returns ``(fn_S, w_S,
    probes_S)`` with ``fn_S(w_S) = fn(w)`` where ``w_S`` are the values of
    the variables with a probe: a forward-mode pass of ``fn_S`` carries
    tangents only from the first probed layer on, exactly the directional
    derivatives of ``fn`` along the probes (zero elsewhere). The other
    values are closed over, so an outer derivative still reaches them.
    """
    indices = [i for i, p in enumerate(probes) if p is not None]
    if len(indices) == len(probes):
        return fn, list(trainable_values), list(probes)

    def fn_s(w_s: list[Any]) -> Any:
        full = list(trainable_values)
        for i, value in zip(indices, w_s):
            full[i] = value
        return fn(full)

    return (
        fn_s,
        [trainable_values[i] for i in indices],
        [probes[i] for i in indices],
    )


def _dense(probes: list[Any], trainable_values: list[Any]) -> list[Any]:
    """Stacked probes with zeros for the None (zero) entries."""
    count = next((int(p.shape[0]) for p in probes if p is not None), 1)
    return [
        jnp.zeros((count, *jnp.shape(v)), jnp.asarray(v).dtype)
        if p is None
        else p
        for p, v in zip(probes, trainable_values)
    ]


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
        probes: One array per variable, each with a leading probe axis;
            None where every probe is zero (only the other variables then
            carry tangents, `_restricted`).

    Returns:
        ``t = mean_k sigma_k^T H sigma_k`` (differentiable in ``w``) and
        ``(f(w), aux)`` (also differentiable: the primal computation).
    """
    fn, point, probes = _restricted(fn, trainable_values, probes)
    if not probes:  # sigma = 0: t = 0, and the plain forward pass
        return jnp.zeros((), "float32"), fn(point)

    def second(sigma: list[Any]) -> tuple[Any, Any]:
        def first(w: list[Any]) -> tuple[Any, Any]:
            value, slope, aux = jax.jvp(fn, (w,), (sigma,), has_aux=True)
            return slope, (value, aux)

        _, curvature, primal = jax.jvp(first, (point,), (sigma,), has_aux=True)
        return curvature, primal

    # A loop, not a vmap: XLA:CPU ran five vmapped probes on a ResNet 2.8x
    # slower than five unrolled ones (measured).
    count = int(probes[0].shape[0])
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
    output_loss: Callable[[Any, Any], Any],
) -> tuple[jax.Array, tuple[Any, Any]]:
    """mean_k u_k^T H_z u_k with u_k = J sigma_k, and f(w) as a by-product.

    Args:
        fn: ``w -> (f(w), extra)`` with the model outputs at
            ``extra[0][1]`` (the aux of ``compute_loss_and_updates``).
        trainable_values: The point ``w``.
        probes: One array per variable, each with a leading probe axis;
            None where every probe is zero (`_restricted`).
        output_loss: ``(z, reference) -> loss`` as a function of the model
            outputs z, around the outputs `reference` (held constant in z).

    Returns:
        ``t`` (differentiable in ``w``) and ``(f(w), extra)``.

    u = J sigma is one forward-mode pass (``jax.jvp``) through the same
    forward computation as the loss, vmapped over the probes (the primal
    pass is shared); H_z u is a forward-over-reverse product of
    `output_loss` in output space, around the outputs themselves (so that
    H_z stays differentiable in w; see `keras_seht.output_split`).
    """
    fn, point, probes = _restricted(fn, trainable_values, probes)
    if not probes:  # sigma = 0: t = 0, and the plain forward pass
        return jnp.zeros((), "float32"), fn(point)

    def primal(w: list[Any]) -> tuple[Any, Any]:
        value, extra = fn(w)
        return (value, extra[0][1]), extra

    def jvp_one(sigma: list[Any]) -> tuple[Any, Any, Any]:
        primals, tangents, extra = jax.jvp(
            primal, (point,), (sigma,), has_aux=True
        )
        return primals, extra, tangents[1]

    (value, y_pred), extra, u = jax.vmap(jvp_one, out_axes=(None, None, 0))(
        probes
    )
    grad_z = jax.grad(lambda z: output_loss(z, y_pred))

    def quadratic(du: Any) -> jax.Array:
        h_u = jax.jvp(grad_z, (y_pred,), (du,))[1]
        return _dot(jax.tree.leaves(du), jax.tree.leaves(h_u))

    return jnp.mean(jax.vmap(quadratic)(u)), (value, extra)


def _has_custom_vjp(fn: Callable[[Any], Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` traces to a ``custom_vjp`` call anywhere.

    Nested jaxprs of control flow and calls included.
    """

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


class _Context:
    """The step context (`keras_seht.context.StepContext`) at weights `w`.

    Built inside the objective that `StepRun.differentiate` hands to
    ``jax.vjp``, so everything it gives is differentiable in `w`. The
    forward pass is computed once: by the exact Hessian quadratic form
    (whose primal it is), the Gauss-Newton one, or on its own.
    """

    def __init__(self, run: StepRun, plan: StepPlan, w: list[Any]) -> None:
        self.model, self.x, self.y = run.model, run.x, run.y
        self.sample_weight, self.scale = run.sample_weight, run.scale
        self._run, self._plan, self._w = run, plan, w
        self.weights = w
        self.batch_size = step.static_batch_size(run.x)
        self._grads = None
        self._first_order = None
        self._t = None
        probes = run.stacked_probes or []
        if plan.first_order_gradient and not probes:
            # One forward and backward pass give f(w) and its gradient.
            (scaled_loss, extra), grads = jax.value_and_grad(
                run.base_fn, has_aux=True
            )(w)
            self._first_order = jax.lax.stop_gradient(grads)
        elif run.exact_hessian and run.forward_over_forward:
            self._t, (scaled_loss, extra) = curvature_estimate(
                run.base_fn, w, probes
            )
        elif run.exact_hessian:  # the loss gradient comes with the HVPs
            self._t, (scaled_loss, self._grads, extra) = probe_estimate(
                run.base_fn, w, _dense(probes, w)
            )
        elif probes and plan.epsilon is None:
            self._t, (scaled_loss, extra) = gauss_newton_estimate(
                run.base_fn, w, probes, run.output_loss
            )
        else:
            scaled_loss, extra = run.base_fn(w)
        self.aux, self._products = extra
        self.outputs = self.aux[1]
        self.live_loss = scaled_loss
        self.scaled_loss = (
            jax.lax.stop_gradient(scaled_loss)
            if plan.constant_loss
            else scaled_loss
        )

    def loss_gradient(
        self, differentiable: bool = True, part: tuple[int, int] | None = None
    ) -> list[Any]:
        """The loss gradient (see `keras_seht.context.StepContext`)."""
        run = self._run
        if differentiable:
            if part is not None:
                raise ValueError("A part's loss gradient is a constant.")
            if self._grads is None:
                base_fn = run.base_fn
                self._grads = jax.grad(lambda v: base_fn(v)[0])(self._w)
            return self._grads
        if part is not None:
            grads = jax.grad(lambda v: run.loss_fn(v, run.leaves, part)[0])
            return jax.lax.stop_gradient(grads(self._w))
        if self._first_order is None:
            self._first_order = jax.lax.stop_gradient(
                self._grads
                if self._grads is not None
                else jax.grad(lambda v: run.base_fn(v)[0])(self._w)
            )
        return self._first_order

    def loss_at(
        self, shift: list[Any], part: tuple[int, int] | None = None
    ) -> Any:
        """f(w + shift), with the step's non-trainable values."""
        run = self._run
        shift = jax.lax.stop_gradient(list(shift))
        shifted = functional.shifted(self._w, shift, 1.0)
        return run.loss_fn(shifted, run.leaves, part)[0]

    def quadratic_form(self) -> Any:
        return self._t

    def perturbed_loss(self) -> Any:
        # The losses at w +- e sigma_k, run with the step's non-trainable
        # values (same Dropout masks); their state updates are dropped.
        plan, run = self._plan, self._run
        probes = _dense(run.stacked_probes or [], self._w)
        epsilon = float(plan.epsilon or 0.0)
        count = len(plan.probes or [])
        total = 0.0
        for k in range(count):
            probe = [p[k] for p in probes]
            for shift in (epsilon, -epsilon):
                shifted = functional.shifted(self._w, probe, shift)
                total = total + run.loss_fn(shifted, run.leaves)[0]
        return total / count

    def input_products(self) -> list[list[Any]]:
        return self._products


class StepRun:
    """The primitives of one stateless train step (`keras_seht.step`).

    Args:
        model: The compiled keras-seht model.
        state: ``(trainable, non_trainable, optimizer, metrics)`` values.
        data: One batch, ``(x, y, sample_weight)`` or a prefix of it.
        tangents: The indices of the trainable variables the probes may
            touch (`SparseTrainStep`); the probes are certainly zero on
            the others, which then carry no tangent. None: all of them.
    """

    sparse_probes = False

    def __init__(
        self,
        model: keras.Model,
        state: State,
        data: Any,
        tangents: frozenset[int] | None = None,
    ) -> None:
        self.model = model
        self.tangents = tangents
        (
            self.trainable_values,
            self.non_trainable_values,
            self.optimizer_values,
            self.metrics_values,
        ) = state
        self.x, self.y, self.sample_weight = (
            keras.utils.unpack_x_y_sample_weight(data)
        )
        built_for = compat.optimizer_variable_count(model.optimizer)
        if built_for not in (None, len(self.trainable_values)):
            # Keras' JAX trainer applies the optimizer statelessly, one
            # slot per variable it was built for: plain Keras fails here
            # too, with a less helpful message.
            raise ValueError(
                "The model's trainable variables changed since its "
                f"optimizer was built ({built_for} then, "
                f"{len(self.trainable_values)} now): a layer's `trainable` "
                "was set after training began. On the JAX backend, compile "
                "the model again (`model.compile(...)`) after changing "
                "`trainable`."
            )
        self.scale = _loss_scale(model, self.optimizer_values)
        self.leaves: list[Any] = []
        self._positions: list[int] = []
        self.stacked_probes: list[Any] | None = None
        self.exact_hessian = self.forward_over_forward = False

    def loss_fn(
        self,
        w: list[Any],
        leaves: Sequence[Any],
        part: tuple[int, int] | None = None,
    ) -> tuple[Any, Any]:
        """Keras' own stateless loss (scaled by a LossScaleOptimizer).

        The float inputs at `_positions` are replaced by `leaves`; with
        `part`, on that slice of the batch alone.
        """
        flat = list(keras.tree.flatten(self.x))
        for i, leaf in zip(self._positions, leaves):
            flat[i] = leaf
        batch = (
            keras.tree.pack_sequence_as(self.x, flat),
            self.y,
            self.sample_weight,
        )
        if part is not None:
            start, stop = part
            batch = keras.tree.map_structure(
                lambda t: None if t is None else t[start:stop], batch
            )
        return self.model.compute_loss_and_updates(
            w,
            self.non_trainable_values,
            self.metrics_values,
            *batch,
            training=True,
            optimizer_variables=self.optimizer_values,
        )

    def base_fn(self, w: list[Any]) -> tuple[Any, Any]:
        """The step's forward pass: w -> (s L, (aux, input products))."""
        cotangents = self._plan.input_cotangents
        if cotangents is None:
            scaled_loss, aux = self.loss_fn(w, self.leaves)
            return scaled_loss, (aux, None)

        def outputs(inputs: Sequence[Any]) -> tuple[Any, Any]:
            scaled_loss, aux = self.loss_fn(w, inputs)
            return flatten_outputs(aux[1]), (scaled_loss, aux)

        z, vjp_fn, (scaled_loss, aux) = jax.vjp(
            outputs, self.leaves, has_aux=True
        )
        products = [vjp_fn(jnp.asarray(v, z.dtype))[0] for v in cotangents]
        return scaled_loss, (aux, products)

    def output_loss(self, z: Any, reference: Any) -> Any:
        """The Gauss-Newton output loss of the outputs z (scaled like f).

        `output_split.gauss_newton_loss` around the outputs `reference`:
        the compiled loss, split at the logits for softmax/sigmoid
        cross-entropy outputs. Its metric trackers' updates are discarded.

        The scope maps the metric variables to the step's values: inside
        Keras' compiled JAX step the variables hold no value of their own
        (a multi-output loss updates its per-output loss trackers).
        """
        mapping = list(zip(self.model.metrics_variables, self.metrics_values))
        with keras.StatelessScope(state_mapping=mapping):
            loss = output_split.gauss_newton_loss(
                self.model, self.y, z, self.sample_weight, reference
            )
        return loss * self.scale

    def _output_shape(self) -> tuple[Any, int]:
        spec = jax.eval_shape(
            lambda w: flatten_outputs(self.loss_fn(w, self.leaves)[1][1]),
            self.trainable_values,
        )
        return spec.shape[0], int(spec.shape[1])

    def differentiate(
        self,
        make_plan: Callable[[Callable[[], Any]], StepPlan],
        evaluate: Callable[[Any], tuple[list[Any], Any]],
    ) -> tuple[Any, list[Any]]:
        """One forward pass and the objective's gradient; see `StepRun`."""
        plan, self.non_trainable_values = _draw(
            self.model,
            self.non_trainable_values,
            lambda: make_plan(self._output_shape),
        )
        self._plan = plan
        if plan.input_cotangents is not None:
            self._positions = float_inputs(self.x)
            flat = keras.tree.flatten(self.x)
            self.leaves = [flat[i] for i in self._positions]
        w = self.trainable_values
        if plan.probes is not None:
            dtypes = [jnp.asarray(v).dtype for v in w]
            self.stacked_probes = [
                None
                if self.tangents is not None and i not in self.tangents
                else jnp.stack(
                    [jnp.asarray(p[i], dtypes[i]) for p in plan.probes]
                )
                for i in range(len(w))
            ]
        self.exact_hessian = (
            plan.probes is not None
            and plan.epsilon is None
            and plan.curvature == "hessian"
        )
        # A custom_vjp (``keras.ops.custom_gradient``, quantized Dense
        # layers) has no forward mode, and the failure only shows when XLA
        # lowers the step: such models keep forward-over-reverse, which
        # needs only the custom backward rule.
        self.forward_over_forward = self.exact_hessian and not _has_custom_vjp(
            lambda v: self.base_fn(v)[0], w
        )

        def objective(w: list[Any]) -> tuple[Any, Any]:
            context = _Context(self, plan, w)
            values, penalty = evaluate(context)
            # The loss gradient where the context computed it anyway.
            known = context._grads
            if known is None:
                known = context._first_order
            return (context.scaled_loss, penalty), (values, known, context.aux)

        # One forward (and its tapes) and one cotangent (1, 1): the
        # objective's gradient.
        (scaled_loss, _), vjp_fn, (values, grads, aux) = jax.vjp(
            objective, w, has_aux=True
        )
        one = jnp.ones_like(scaled_loss)
        self._total_grads = vjp_fn((one, one))[0]
        self._loss_grads = grads
        self._aux = aux
        return aux[0], values

    def all_reduce_mean(self, tensors: Any) -> Any:
        r"""The mean over the data-parallel workers: `tensors` themselves.

        Under a ``keras.distribution`` (``DataParallel`` or
        ``ModelParallel``, on one process or across several started by
        `initialize_from_environment`) the step is ONE global program:
        the batch is a global ``jax.Array`` sharded over the devices, so
        the mean loss :math:`L = \frac{1}{B}\sum_{i=1}^{B} \ell_i` is
        already the mean over the global batch of :math:`B` samples (XLA
        inserts the cross-device reduction; between CPU processes it runs
        over gloo), and so are the penalty values and the gradients
        derived from it: they are the global values, the same on every
        device and process. Averaging them again would change nothing.
        Without a distribution there is one worker. Either way the mean is
        the identity (measured: two processes give the single-process
        update, ``loss`` and ``seht_trace`` to float32 round-off,
        ``tests/test_distributed_jax.py``).

        Args:
            tensors: Any structure of tensors (gradients, penalty values,
                the loss).

        Returns:
            `tensors` itself, the same object (which `keras_seht.step`
            reads as "nothing was reduced").
        """
        return tensors

    def objective_gradients(self, finite: Any) -> list[Any]:
        """The objective's gradient g; see `StepRun.objective_gradients`."""
        return self._total_grads

    def loss_gradients(self, needed: Any = None) -> list[Any]:
        """The plain loss gradient g_L; see `StepRun.loss_gradients`.

        The one the step computed where it has it; else a plain backward
        pass, inside a ``jax.lax.cond`` when it is only `needed` sometimes.
        Not as ``vjp_fn((1, 0))``: a zero cotangent times a non-finite
        tangent of the forward-over-forward pass would still be NaN.
        """
        if self._loss_grads is not None:
            return list(self._loss_grads)

        def plain() -> list[Any]:
            return jax.grad(lambda v: self.loss_fn(v, self.leaves)[0])(
                self.trainable_values
            )

        if needed is None:
            return plain()
        zeros = [jnp.zeros_like(g) for g in self._total_grads]
        return jax.lax.cond(needed, plain, lambda: zeros)

    def apply(
        self,
        gradients: list[Any],
        total: Any,
        values: list[Any],
        guard: step.Guard,
    ) -> tuple[Any, State]:
        """Applies the optimizer, trackers and metrics; see `StepRun.apply`.

        A step that is not applied selects the old trainable and optimizer
        values (what ``LossScaleOptimizer`` does for a non-finite step).
        """
        model = self.model
        _, y_pred, non_trainable_values, metrics_values = self._aux
        trainable_values, optimizer_values = model.optimizer.stateless_apply(
            self.optimizer_values, gradients, self.trainable_values
        )
        if guard.applied is not None:
            applied = guard.applied
            trainable_values = [
                jnp.where(applied, new, old)
                for new, old in zip(trainable_values, self.trainable_values)
            ]
            optimizer_values = [
                jnp.where(applied, new, old)
                for new, old in zip(optimizer_values, self.optimizer_values)
            ]
        mapping = list(zip(model.metrics_variables, metrics_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            step.update_trackers(model, self.x, total, values, guard)
            logs = model.compute_metrics(
                self.x, self.y, y_pred, self.sample_weight
            )
        metrics_values = functional.scope_values(
            scope, model.metrics_variables, metrics_values
        )
        return logs, (
            trainable_values,
            non_trainable_values,
            optimizer_values,
            metrics_values,
        )


# --------------------------------------------------------------------------
# Sparse probes in a compiled step: a few step variants, chosen on the host
# --------------------------------------------------------------------------

_logger = logging.getLogger("keras_seht")


def probe_support(model: keras.Model, state: State, data: Any) -> jax.Array:
    """Which trainable variables the step's probes touch (a bool vector).

    Runs the step's plan (`keras_seht.step.plan_step`) on the same seed
    state as the step itself will, so its draws are the step's: entry i is
    True where some probe is nonzero on variable i. Compiled, everything
    but the probes' draws is dead code.
    """
    run = StepRun(model, state, data)
    penalties = model.seht_penalties
    plan, _ = _draw(
        model,
        run.non_trainable_values,
        lambda: step.plan_step(model, penalties, run, run._output_shape),
    )
    count = len(run.trainable_values)
    if plan.probes is None:
        return jnp.ones((count,), bool)
    return jnp.stack(
        [
            jnp.any(jnp.stack([jnp.any(p[i] != 0) for p in plan.probes]))
            for i in range(count)
        ]
    )


def sparse_dispatch_applies(model: keras.Model) -> bool:
    """Whether `SparseTrainStep` runs the model's compiled train step.

    Where the step's probes leave layers out (`keras_seht.variants`), and
    the step is compiled on one program without a ``keras.distribution``.
    """
    if model.run_eagerly or not model.jit_compile:
        return False
    if keras.distribution.distribution() is not None:
        return False
    return variants.sparse_layers(model.seht_penalties, model.seht_layout)


def _state_copy(variables: Sequence[Sequence[Any]]) -> State:
    """Fresh copies of the variables' values, as a step's state."""
    copies = [[jnp.array(v.value, copy=True) for v in vs] for vs in variables]
    return tuple(copies)  # type: ignore[return-value]


class SparseTrainStep:
    r"""The compiled train step for sparse probes (SEHT-D): a few variants.

    In one compiled program every SEHT-D step would cost a SEHT-H step:
    the probes are dense arrays, mostly zeros, and skipping the untouched
    layers at run time would take a ``jax.lax.cond``, in which XLA:CPU
    ran a ResNet's gradient about 9x slower (measured). Instead, before
    each step a small compiled function (`probe_support`) draws the
    step's probes from the same seed state as the step will and reports
    on the host which variables they touch; the step then runs in the
    variant compiled for that support (`keras_seht.variants`): forward-mode
    tangents start at the first layer of its bucket (at the output layer
    when no hidden layer is drawn), so a variant differentiates
    :math:`t` only through the layers above. The probes, and so every
    value and update, are the one-program step's (to float round-off):
    each variant is exact, since the probes are zero outside its tangent
    set.

    At most ``keras_seht.variants.MAX_HIDDEN_VARIANTS + 1`` variants are
    compiled (+ 1 where the output layer may go unprobed), each on first
    use (logged on the ``keras_seht`` logger);
    their names and use counts are in `counts`.

    Args:
        model: The compiled keras-seht model.
    """

    def __init__(self, model: keras.Model) -> None:
        self._model_ref = _weak(model)
        self._support = jax.jit(
            lambda state, data: probe_support(self._model_ref(), state, data)
        )
        self._variants: dict[frozenset[int], Callable[..., Any]] = {}
        self.counts: dict[str, int] = {}

    def _variant(self, tangents: frozenset[int]) -> Callable[..., Any]:
        model_ref = self._model_ref

        def train_step(state: State, data: Any) -> Any:
            model = model_ref()
            model.check_trainable_weights()
            return step.train_step(StepRun(model, state, data, tangents), model)

        return jax.jit(train_step, donate_argnums=0)

    def _function(self, name: str, tangents: frozenset[int]) -> Any:
        """The variant for `tangents`, made (and logged) on first use."""
        function = self._variants.get(tangents)
        if function is None:
            _logger.info(
                "keras_seht: compiling the JAX train step for probes on "
                "%s (%d of at most %d variants).",
                name,
                len(self._variants) + 1,
                len(self.variants()),
            )
            function = self._variants[tangents] = self._variant(tangents)
        return function

    def variants(self) -> list[tuple[str, frozenset[int]]]:
        """Every variant the model can run: ``(name, tangents)``."""
        model = self._model_ref()
        return variants.all_variants(model.seht_penalties, model.seht_layout)

    def precompile(self, data: Any) -> None:
        """Compiles every variant for batches shaped like `data`.

        E.g. to keep compile time out of a benchmark's timed steps: each
        variant runs once on a copy of the model's state (the jit cache is
        filled by calls), whose result is discarded; the model, its
        optimizer and `counts` are left as they were. The model and its
        optimizer must be built (train one batch first).

        Args:
            data: One batch, ``(x, y)`` or ``(x, y, sample_weight)``.
        """
        model = self._model_ref()
        variables = (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
        data = tuple(data)
        jax.block_until_ready(self._support(_state_copy(variables), data))
        for name, tangents in self.variants():
            function = self._function(name, tangents)
            jax.block_until_ready(function(_state_copy(variables), data))

    def __call__(self, state: State, data: Any) -> Any:
        """One step: ``(logs, state)`` from ``(state, data)``."""
        layout = self._model_ref().seht_layout
        support = jax.device_get(self._support(state, data))
        name, tangents = variants.variant_of(layout, support)
        self.counts[name] = self.counts.get(name, 0) + 1
        return self._function(name, tangents)(state, data)


#: Each setting of a multi-process run under Keras' variable name
#: (``keras.distribution.initialize``) and JAX's (``JAX_COORDINATOR_ADDRESS``
#: is read by ``jax.distributed.initialize`` itself; the other two are named
#: after its arguments).
PROCESS_VARIABLES = {
    "coordinator": (
        "KERAS_DISTRIBUTION_JOB_ADDRESSES",
        "JAX_COORDINATOR_ADDRESS",
    ),
    "num_processes": ("KERAS_DISTRIBUTION_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("KERAS_DISTRIBUTION_PROCESS_ID", "JAX_PROCESS_ID"),
}


def _process_setting(
    environ: Mapping[str, str], key: str
) -> tuple[str, str] | None:
    """``(variable, value)`` of one setting, None where it is unset.

    Raises ValueError where its two names are set to different values.
    """
    found = [
        (name, environ[name])
        for name in PROCESS_VARIABLES[key]
        if environ.get(name, "").strip()
    ]
    if key == "coordinator":  # Keras' list starts with the coordinator
        found = [(name, value.split(",")[0].strip()) for name, value in found]
    if len({value for _, value in found}) > 1:
        raise ValueError(
            f"{found[0][0]}={found[0][1]!r} and {found[1][0]}="
            f"{found[1][1]!r} disagree: set one of them (or both alike)."
        )
    return found[0] if found else None


def _process_integer(
    setting: tuple[str, str], minimum: int, maximum: int | None
) -> int:
    """The integer value of `setting`, in [minimum, maximum]."""
    name, value = setting
    allowed = (
        f"an integer >= {minimum}"
        if maximum is None
        else f"an integer in [{minimum}, {maximum}]"
    )
    try:
        number = int(value)
    except ValueError:
        number = None
    if (
        number is None
        or number < minimum
        or (maximum is not None and number > maximum)
    ):
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return number


def initialize_from_environment(
    environ: Mapping[str, str] | None = None, set_distribution: bool = True
) -> Any:
    r"""Joins a multi-process JAX run described by environment variables.

    Each process of a run of :math:`P` processes sets three variables
    (Keras' names, or JAX's in parentheses):

    - ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (``JAX_COORDINATOR_ADDRESS``):
      ``host:port`` of process 0, the coordinator (Keras' comma-separated
      list of every process's address also works: its first entry is the
      coordinator);
    - ``KERAS_DISTRIBUTION_NUM_PROCESSES`` (``JAX_NUM_PROCESSES``):
      :math:`P \ge 1`;
    - ``KERAS_DISTRIBUTION_PROCESS_ID`` (``JAX_PROCESS_ID``): this
      process's rank, in :math:`[0, P - 1]`.

    This calls ``keras.distribution.initialize`` (that is,
    ``jax.distributed.initialize``, and then one global seed for every
    process: every ``keras.random.SeedGenerator`` without an explicit seed,
    ``seht_seed_generator`` among them, starts from the same state on every
    process) and returns ``keras.distribution.DataParallel`` over the
    devices of all processes, ``jax.devices()``, set as the global
    distribution unless ``set_distribution=False``. Call it before anything
    runs a JAX computation (``jax.distributed.initialize`` refuses
    afterwards), and before building the model.

    **What each process feeds.** ``auto_shard_dataset`` is False: every
    process passes its own shard of each global batch (arrays, a
    ``PyDataset`` or a ``tf.data.Dataset``, per-process batch size
    :math:`B / P`), and Keras assembles the global batch with
    ``jax.make_array_from_process_local_data``. (Set
    ``distribution.auto_shard_dataset = True`` to let Keras shard one
    ``tf.data.Dataset`` that every process reads whole.)

    **Why the step is exact.** The compiled step is one global program
    over the global batch (`StepRun.all_reduce_mean`): the probe
    :math:`\sigma` is drawn once from the replicated seed state (the same
    on every process, and advanced identically), and the loss, the
    penalty values, their gradients, the finiteness guard and the logs are
    those of a single worker on the global batch. On CPU the cross-process
    collectives run over gloo (JAX's default
    ``jax_cpu_collectives_implementation``).

    Args:
        environ: The variables (default ``os.environ``).
        set_distribution: Whether to make the returned distribution the
            global one (``keras.distribution.set_distribution``).

    Returns:
        The ``DataParallel`` distribution, or None (and nothing is done)
        where neither coordinator variable is set.

    Raises:
        ValueError: The coordinator is set but the process count or rank
            is not, a value is out of range, a setting's two names
            disagree, or JAX was already initialized for another run.

    Example:
        >>> from keras_seht.backend.jax import initialize_from_environment
        >>> initialize_from_environment({}) is None  # a single process
        True
    """
    environ = os.environ if environ is None else environ
    settings = {
        key: _process_setting(environ, key) for key in PROCESS_VARIABLES
    }
    coordinator = settings["coordinator"]
    if coordinator is None:
        return None
    num_processes, process_id = (
        settings["num_processes"],
        settings["process_id"],
    )
    if num_processes is None or process_id is None:
        missing = [
            " or ".join(PROCESS_VARIABLES[key])
            for key in ("num_processes", "process_id")
            if settings[key] is None
        ]
        raise ValueError(
            f"{coordinator[0]} is set, so a multi-process JAX run needs "
            f"{' and '.join(missing)} too."
        )
    count = _process_integer(num_processes, 1, None)
    rank = _process_integer(process_id, 0, count - 1)
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (count, rank):
            raise ValueError(
                "JAX is already initialized as process "
                f"{jax.process_index()} of {jax.process_count()}, not "
                f"{rank} of {count} as the environment says."
            )
    else:
        keras.distribution.initialize(
            job_addresses=coordinator[1],
            num_processes=count,
            process_id=rank,
        )
    distribution = keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False
    )
    if set_distribution:
        keras.distribution.set_distribution(distribution)
    return distribution


# --------------------------------------------------------------------------
# Diagnostics: curvature products at a fixed batch (keras_seht.operators)
# --------------------------------------------------------------------------


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference to `obj` (a strong one if it takes none)."""
    import weakref

    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _flat_leaves(tree: Any) -> jax.Array:
    """Every leaf of `tree` flattened, concatenated: z as one vector."""
    return jnp.concatenate([jnp.ravel(z) for z in jax.tree.leaves(tree)])


class _CurvatureFunctions:
    """The jitted pure functions of one model in one mode.

    Every function takes the frozen state ``(trainable, non_trainable,
    metrics, optimizer)`` values and the batch ``(x, y, sample_weight)``
    as arguments, so ``jax.jit`` compiles once per input signature and
    the compilations are shared by every `CurvatureProducts` of the model
    (a `CurvatureMonitor` measures without recompiling). They reach the
    model through a weak reference, so the cache does not keep it alive.
    """

    def __init__(self, model: keras.Model, training: bool, key: tuple) -> None:
        self.key = [_weak(obj) for obj in key]
        model_ref = _weak(model)

        def loss_fn(w: list[Any], state: Any, batch: Any) -> jax.Array:
            _, non_trainable, metrics, optimizer_values = state
            x, y, sample_weight = batch
            _, aux = model_ref().compute_loss_and_updates(
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

        def outputs_fn(w: list[Any], state: Any, batch: Any) -> Any:
            y_pred, _ = model_ref().stateless_call(
                w, state[1], batch[0], training=training
            )
            return y_pred

        def flat_outputs(w: list[Any], state: Any, batch: Any) -> jax.Array:
            return _flat_leaves(outputs_fn(w, state, batch))

        def output_loss(z: jax.Array, y_pred: Any, batch: Any) -> jax.Array:
            pieces, offset = [], 0
            for leaf in jax.tree.leaves(y_pred):
                piece = z[offset : offset + leaf.size]
                pieces.append(piece.reshape(leaf.shape))
                offset += leaf.size
            packed = jax.tree.unflatten(jax.tree.structure(y_pred), pieces)
            with keras.StatelessScope():
                return output_split.gauss_newton_loss(
                    model_ref(), batch[1], packed, batch[2], y_pred
                )

        grad_fn = jax.grad(loss_fn)
        output_grad = jax.grad(output_loss)

        def hvp(state: Any, batch: Any, v: list[Any]) -> list[Any]:
            def grad_at(w: list[Any]) -> list[Any]:
                return grad_fn(w, state, batch)

            return jax.jvp(grad_at, (state[0],), (v,))[1]

        def hvp_rows(state: Any, batch: Any, rows: jax.Array) -> jax.Array:
            params = state[0]
            sizes = [p.size for p in params]

            def row(flat: jax.Array) -> jax.Array:
                pieces, offset = [], 0
                for p, size in zip(params, sizes):
                    piece = flat[offset : offset + size]
                    pieces.append(piece.reshape(p.shape).astype(p.dtype))
                    offset += size
                out = hvp(state, batch, pieces)
                return jnp.concatenate(
                    [jnp.ravel(h).astype(rows.dtype) for h in out]
                )

            return jax.vmap(row)(rows)

        def jvp(state: Any, batch: Any, v: list[Any]) -> jax.Array:
            return jax.jvp(
                lambda w: flat_outputs(w, state, batch), (state[0],), (v,)
            )[1]

        def jvp_by_transpose(state: Any, batch: Any, v: list[Any]) -> jax.Array:
            # J v as the VJP of the (linear) pullback u -> J^T u: reverse
            # mode only, for losses with a custom_vjp (no forward mode).
            z, pullback = jax.vjp(
                lambda w: flat_outputs(w, state, batch), state[0]
            )
            _, transpose = jax.vjp(pullback, jnp.zeros_like(z))
            return transpose((v,))[0]

        def vjp(state: Any, batch: Any, u: jax.Array) -> list[Any]:
            z, pullback = jax.vjp(
                lambda w: flat_outputs(w, state, batch), state[0]
            )
            return pullback(u.astype(z.dtype))[0]

        def vjp_rows(state: Any, batch: Any, rows: jax.Array) -> jax.Array:
            z, pullback = jax.vjp(
                lambda w: flat_outputs(w, state, batch), state[0]
            )

            def row(u: jax.Array) -> jax.Array:
                grads = pullback(u.astype(z.dtype))[0]
                return jnp.concatenate(
                    [jnp.ravel(g).astype(rows.dtype) for g in grads]
                )

            return jax.vmap(row)(rows)

        def output_hvp(y_pred: Any, batch: Any, u: jax.Array) -> jax.Array:
            z = _flat_leaves(y_pred)
            return jax.jvp(
                lambda z: output_grad(z, y_pred, batch),
                (z,),
                (u.astype(z.dtype),),
            )[1]

        self.loss = jax.jit(
            lambda state, batch: loss_fn(state[0], state, batch)
        )
        self.outputs = jax.jit(
            lambda state, batch: outputs_fn(state[0], state, batch)
        )
        self.hvp = jax.jit(hvp)
        self.hvp_rows = jax.jit(hvp_rows)
        self.jvp = jax.jit(jvp)
        self.jvp_by_transpose = jax.jit(jvp_by_transpose)
        self.forward_mode = True
        self.vjp = jax.jit(vjp)
        self.vjp_rows = jax.jit(vjp_rows)
        self.output_hvp = jax.jit(output_hvp)
        self.output_hvp_rows = jax.jit(jax.vmap(output_hvp, (None, None, 0)))


class _FunctionCache:
    """Per model (held weakly): {training: _CurvatureFunctions}."""

    def __init__(self) -> None:
        import weakref

        self.models: Any = weakref.WeakKeyDictionary()


_CACHE = _FunctionCache()


def _curvature_functions(
    model: keras.Model, training: bool
) -> _CurvatureFunctions:
    """The model's cached functions.

    Rebuilt when it was recompiled or its variables changed.
    """
    key = (
        getattr(model, "_compile_loss", None),
        getattr(model, "optimizer", None),
        *model.trainable_variables,
        *model.non_trainable_variables,
    )
    try:
        entries = _CACHE.models.setdefault(model, {})
    except TypeError:  # not weakly referenceable: no cache
        return _CurvatureFunctions(model, training, key)
    entry = entries.get(training)
    if (
        entry is None
        or len(entry.key) != len(key)
        or any(ref() is not obj for ref, obj in zip(entry.key, key))
    ):
        entry = entries[training] = _CurvatureFunctions(model, training, key)
    return entry


class CurvatureProducts:
    r"""Curvature products of the compiled loss at a fixed batch.

    The loss is that of ``model.compute_loss_and_updates`` (compiled loss
    plus ``model.losses``, unscaled), the outputs those of
    ``model.stateless_call``, both evaluated statelessly at the current
    variable values: no weight, BatchNorm statistic, seed or metric of the
    model changes. With :math:`L(w)` the loss, :math:`z(w)` every output
    entry of the batch flattened (:math:`M` of them) and :math:`\ell(z)`
    the loss given to ``compile``:

    - ``hvp(v)`` :math:`= \nabla_w^2 L\,v`, forward over reverse
      (``jax.jvp(jax.grad(L), (w,), (v,))``); ``hvp_rows(V)`` the same,
      vmapped, for each row of a (k, n) flat ``V``;
    - ``jvp(v)`` :math:`= Jv \in \mathbb{R}^M`, :math:`J = \partial z /
      \partial w` (``jax.jvp``; a model with a ``custom_vjp``, which has
      no forward mode, transposes the VJP instead);
    - ``vjp(u)`` :math:`= J^\top u`; ``vjp_rows(U)`` for each row of a
      (k, M) ``U``, flat (k, n);
    - ``output_hvp(u)`` :math:`= \nabla_z^2 \ell\,u` at :math:`z(w)`;
      ``output_hvp_rows(U)`` for each row of a (k, M) ``U``. Softmax and
      sigmoid outputs with a probability cross-entropy are split at the
      logits (`keras_seht.output_split`): there :math:`\ell` is the
      surrogate whose Hessian gives the canonical Gauss-Newton matrix.

    The functions are jit-compiled once per model, mode and input
    signature (`_curvature_functions`), not once per object.
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
        optimizer = getattr(model, "optimizer", None)
        self._state = (
            self.params,
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.metrics_variables],
            [v.value for v in optimizer.variables]
            if optimizer is not None
            else None,
        )
        self._batch = (x, y, sample_weight)
        self._fns = _curvature_functions(model, bool(training))
        self._y_pred: Any = None

    @property
    def loss(self) -> float:
        """The loss L(w) at the frozen weights."""
        return float(self._fns.loss(self._state, self._batch))

    @property
    def num_outputs(self) -> int:
        """M, the number of output entries of the batch."""
        return int(sum(z.size for z in jax.tree.leaves(self._outputs())))

    def _outputs(self) -> Any:
        """The outputs z(w) (their pytree), computed once."""
        if self._y_pred is None:
            self._y_pred = self._fns.outputs(self._state, self._batch)
        return self._y_pred

    def _vectors(self, vectors: Sequence[Any]) -> list[jax.Array]:
        """One array per variable, in its dtype and shape."""
        return [
            jnp.asarray(v, p.dtype).reshape(p.shape)
            for v, p in zip(vectors, self.params)
        ]

    def hvp(self, vectors: Sequence[Any]) -> list[jax.Array]:
        """H v, one array per variable."""
        v = self._vectors(vectors)
        return list(self._fns.hvp(self._state, self._batch, v))

    def hvp_rows(self, rows: jax.Array) -> jax.Array:
        """(k, n): row b is H v_b for row v_b of `rows`, flattened."""
        return self._fns.hvp_rows(self._state, self._batch, jnp.asarray(rows))

    def jvp(self, vectors: Sequence[Any]) -> jax.Array:
        """J v, (M,)."""
        v = self._vectors(vectors)
        if self._fns.forward_mode:
            try:
                return self._fns.jvp(self._state, self._batch, v)
            except TypeError:  # a custom_vjp: no forward mode
                self._fns.forward_mode = False
        return self._fns.jvp_by_transpose(self._state, self._batch, v)

    def vjp(self, cotangent: jax.Array) -> list[jax.Array]:
        """J^T u, one array per variable."""
        return list(self._fns.vjp(self._state, self._batch, cotangent))

    def vjp_rows(self, rows: jax.Array) -> jax.Array:
        """(k, n): row b is J^T u_b for row u_b of `rows`, flattened."""
        return self._fns.vjp_rows(self._state, self._batch, jnp.asarray(rows))

    def output_hvp(self, u: jax.Array) -> jax.Array:
        """H_z u, (M,)."""
        return self._fns.output_hvp(self._outputs(), self._batch, u)

    def output_hvp_rows(self, rows: jax.Array) -> jax.Array:
        """(k, M): row b is H_z u_b for row u_b of `rows`."""
        return self._fns.output_hvp_rows(
            self._outputs(), self._batch, jnp.asarray(rows)
        )
