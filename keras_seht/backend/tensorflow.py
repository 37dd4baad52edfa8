"""SEHT autodiff on the TensorFlow backend: the step's primitives.

The step's logic lives in `keras_seht.step`; this module gives it nested
``tf.GradientTape``s around a single forward pass, inside the same
``tf.function`` as Keras' own TensorFlow ``train_step`` (XLA-compiled
when ``jit_compile=True``):

    outer ( middle ( inner ( forward, f = s L ) ; g = df/dw ;
            v_k = g . sigma_k ) ; h_k = dv_k/dw = H sigma_k ;
            R_j from the context )
    update = g + outer.gradient(sum_j strength_j phi_j(s R_j))

``inner`` gives the loss gradient g. Because ``inner.gradient`` runs while
``middle`` and ``outer`` record, g is itself a differentiable function of
the weights, and so is every Hessian-vector product ``middle`` takes of it;
``outer`` then differentiates the penalties (a third derivative of L for
SEHT). The loss gradient g is reused for the update, never recomputed. A
fourth tape, ``inputs``, watches the float inputs for input products.

The plan is made after the forward pass (Keras builds an unbuilt model in
the first traced forward pass, and the probes need its variables).
BatchNormalization's batch moments are made twice differentiable for the
step (``_keras_compat.exact_tf_moments``).

A built model whose plan reads only the exact Hessian quadratic form (an
exact SEHT estimator, with or without penalties of the outputs) takes a
faster path instead (`StepRun._forward_mode`): a forward-over-reverse
HVP per probe, ``tf.autodiff.ForwardAccumulator`` around one tape, and ONE
reverse pass of the objective. For SEHT-D on a model of at least
``keras_seht.variants.MIN_VARIANT_LAYERS`` layers, a ``tf.switch_case``
picks per step one of a few variants (`keras_seht.variants`) whose
accumulators watch only the variables from the lowest probed layer's
bucket up (in a graph the untaken branches do not run; the first step
traces them all). Models whose forward pass TensorFlow's forward mode
cannot differentiate (Keras' RNN layers: their while loops' TensorList
ops) keep the nested tapes. (Forward-over-forward, two nested
accumulators, gives the right t but a wrong reverse-mode gradient of it
in TensorFlow 2.21: measured against nested tapes.) The costs are in
``docs/performance.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import keras

from keras_seht import _keras_compat as compat
from keras_seht import functional, output_split, step, variants
from keras_seht.context import StepPlan
from keras_seht.penalties import flatten_outputs, float_inputs

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
    """Dense gradients of `target`, zeros for variables it does not depend on.

    E.g. dt/dw when the Hessian is constant.

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


def _replica_context() -> Any:
    """The replica context of a strategy with several replicas, or None.

    None without a ``tf.distribute`` strategy, with one replica, or in
    cross-replica code.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _all_reduce_mean(tensors: Any) -> Any:
    """The mean over the replicas of each tensor of a structure.

    One batched all-reduce; a boolean becomes True where it is True on
    every replica (the mean of its 0/1 values is 1). Without a strategy
    (or with one replica) `tensors` is returned as it is.
    """
    import tensorflow as tf

    context = _replica_context()
    if context is None:
        return tensors
    flat = [tf.convert_to_tensor(t) for t in keras.tree.flatten(tensors)]
    numbers = [
        tf.cast(t, tf.float32) if t.dtype == tf.bool else t for t in flat
    ]
    reduced = context.all_reduce(tf.distribute.ReduceOp.MEAN, numbers)
    reduced = [
        tf.equal(r, 1.0) if t.dtype == tf.bool else r
        for t, r in zip(flat, reduced)
    ]
    return keras.tree.pack_sequence_as(tensors, reduced)


def _apply_if(
    applied: Any,
    optimizer: Any,
    gradients: list[Any],
    variables: list[Any],
) -> None:
    """``optimizer.apply(gradients, variables)`` where `applied` is True.

    Without a strategy, a conditional. Keras' TensorFlow optimizer
    all-reduces the gradients with a ``merge_call``, which TensorFlow does
    not allow inside a conditional in a replica context; so under a
    strategy, as ``keras.optimizers.LossScaleOptimizer`` does, the
    conditional runs in the cross-replica context and calls the optimizer
    on every replica. `applied` is first made the same on every replica
    (True only where it is True on all: a replica that skipped alone
    would leave the others waiting in the optimizer's all-reduce).
    """
    import tensorflow as tf

    def apply() -> None:
        optimizer.apply(gradients, variables)

    context = _replica_context()
    if context is None:
        keras.ops.cond(applied, apply, lambda: None)
        return
    applied = _all_reduce_mean(applied)
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        keras.ops.cond(applied, apply, lambda: None)
        return

    def cross_replica(distribution: Any, applied: Any, gradients: Any) -> None:
        # The same on every replica: the first replica's answer.
        first = distribution.experimental_local_results(applied)[0]

        def apply_everywhere() -> None:
            distribution.extended.call_for_each_replica(
                optimizer.apply, args=(gradients, variables)
            )

        keras.ops.cond(first, apply_everywhere, lambda: None)

    context.merge_call(cross_replica, args=(applied, gradients))


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
    is the derivative of the Gauss-Newton output loss's gradient
    (`output_split.gauss_newton_loss`: the compiled loss, split at the
    logits for softmax/sigmoid cross-entropy outputs) along u, taken at a
    copy of the outputs so that only the loss is differentiated; its
    reference point is the outputs themselves (unwatched by the inner
    tapes), so H_z stays differentiable in w.
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
            output_loss = output_split.gauss_newton_loss(
                model, y, packed, sample_weight, reference=y_pred
            )
            output_loss = tf.cast(output_loss, scale.dtype) * scale
        output_grads = _gradient(first, output_loss, copies)
        along = [_dot(output_grads, u) for u in us]
    values = [_dot(u, _gradient(second, a, copies)) for u, a in zip(us, along)]
    return tf.add_n(values) / len(probes)


def _state_variables(model: keras.Model) -> list[Any]:
    """The variables a forward pass may assign (each once).

    The non-trainable ones (BatchNorm statistics, seed states) and the
    metrics' (the compiled loss's trackers).
    """
    seen, out = set(), []
    for v in list(model.non_trainable_variables) + list(
        model.metrics_variables
    ):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _training_loss(run: StepRun) -> tuple[Any, Any, Any]:
    """The training-mode forward pass: outputs, loss and scaled loss."""
    model = run.model
    if compat.call_has_training_arg(model):
        y_pred = model(run.x, training=True)
    else:
        y_pred = model(run.x)
    loss = compat.compute_loss(
        model, run.x, run.y, y_pred, run.sample_weight, True
    )
    return y_pred, loss, model.optimizer.scale_loss(loss)


class _Context:
    """The step context (`keras_seht.context.StepContext`), on tapes.

    Built while `outer` records, after the forward pass; `middle` recorded
    the loss gradient g, `inputs` the forward pass from the float inputs.
    """

    def __init__(self, run: StepRun, plan: StepPlan) -> None:
        import tensorflow as tf

        self.model, self.x, self.y = run.model, run.x, run.y
        self.sample_weight, self.scale = run.sample_weight, run.scale
        self.outputs, self.scaled_loss = run.y_pred, run.scaled_loss
        if plan.constant_loss:
            self.scaled_loss = tf.stop_gradient(run.scaled_loss)
        self.weights = [v.value for v in run.trainable]
        self.batch_size = step.static_batch_size(run.x)
        self._run, self._plan = run, plan

    def loss_gradient(
        self, differentiable: bool = True, part: tuple[int, int] | None = None
    ) -> list[Any]:
        """The loss gradient (see `keras_seht.context.StepContext`)."""
        import tensorflow as tf

        if differentiable:
            if part is not None:
                raise ValueError("A part's loss gradient is a constant.")
            return self._run.grads
        if part is None:
            return [tf.stop_gradient(g) for g in self._run.grads]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            loss = self._loss_of(self.weights, part)
        return [
            tf.stop_gradient(g) for g in _gradient(tape, loss, self.weights)
        ]

    def _loss_of(self, weights: list[Any], part: tuple[int, int] | None) -> Any:
        """The scaled loss at `weights` on the batch (or its slice `part`)."""
        import tensorflow as tf

        batch = (self.x, self.y, self.sample_weight)
        if part is not None:
            start, stop = part
            batch = keras.tree.map_structure(
                lambda t: None if t is None else t[start:stop], batch
            )
        loss = functional.stateless_loss(
            self.model, weights, self._run.non_trainable, *batch, training=True
        )[0]
        return tf.cast(loss, self.scale.dtype) * self.scale

    def loss_at(
        self, shift: list[Any], part: tuple[int, int] | None = None
    ) -> Any:
        """f(w + shift), recorded by `outer`."""
        import tensorflow as tf

        shift = [tf.stop_gradient(s) for s in shift]
        return self._loss_of(functional.shifted(self.weights, shift, 1.0), part)

    def quadratic_form(self) -> Any:
        import tensorflow as tf

        run, probes = self._run, self._plan.probes or []
        if self._plan.curvature == "gauss_newton":
            return _gauss_newton_estimate(
                self.model,
                run.inner,
                self.y,
                self.outputs,
                self.sample_weight,
                probes,
                self.scale,
            )
        forms = []
        for sigma, product in zip(probes, run.products):
            h = _gradient(run.middle, product, run.trainable)
            forms.append(_dot(sigma, h))
        return tf.add_n(forms) / len(probes)

    def perturbed_loss(self) -> Any:
        """The mean_k [f(w + e s_k) + f(w - e s_k)], from stateless passes.

        The passes use the non-trainable values of before the step's forward
        pass.
        """
        import tensorflow as tf

        run, epsilon = self._run, float(self._plan.epsilon or 0.0)
        probes = self._plan.probes or []
        trainable = [v.value for v in self.model.trainable_variables]
        pairs = []
        for probe in probes:
            for shift in (epsilon, -epsilon):
                loss = functional.stateless_loss(
                    self.model,
                    functional.shifted(trainable, probe, shift),
                    run.non_trainable,
                    self.x,
                    self.y,
                    self.sample_weight,
                    training=True,
                )[0]
                pairs.append(tf.cast(loss, self.scale.dtype) * self.scale)
        return tf.add_n(pairs) / len(probes)

    def input_products(self) -> list[list[Any]]:
        import tensorflow as tf

        run = self._run
        if not run.leaves:
            float_inputs(self.x)  # raises: no floating-point input
        products = []
        for v in self._plan.input_cotangents or []:
            with run.inputs:  # resumed: <V, Z> joins the recorded forward
                z = flatten_outputs(self.outputs)
                projected = tf.reduce_sum(tf.cast(v, z.dtype) * z)
            products.append(_gradient(run.inputs, projected, run.leaves))
        return products


# --------------------------------------------------------------------------
# The exact Hessian quadratic form by forward-over-forward autodiff
# --------------------------------------------------------------------------

#: What a failed forward-mode trace raises (TensorFlow's forward mode has
#: no rule for TensorList ops, in the while loops of Keras' RNN layers: it
#: cannot make the ones-like "forwardprop aid" of a variant tensor).
_FORWARD_MODE_ERRORS = (
    TypeError,
    ValueError,
    LookupError,
    NotImplementedError,
)


def forward_mode_plan(plan: StepPlan) -> bool:
    """Whether the plan reads nothing but the Hessian quadratic form.

    Besides the forward pass (the outputs, the loss): the plan of an exact
    SEHT estimator, alone or with penalties of the outputs. Anything else
    (a differentiable loss gradient, input products, shifted or perturbed
    losses, the Gauss-Newton form) takes the nested tapes.
    """
    return (
        plan.probes is not None
        and plan.epsilon is None
        and plan.curvature == "hessian"
        and plan.input_cotangents is None
        and not plan.loss_gradient
        and not plan.first_order_gradient
        and not plan.shifted_losses
        and not plan.constant_loss
    )


def _variant_starts(groups: Sequence[Sequence[int]]) -> list[int]:
    """The first layer of each probed-variable variant, ascending.

    The starts of the hidden-layer buckets (`keras_seht.variants`) and the
    output layer (the last group).
    """
    count = len(groups)
    return sorted(set(variants.bucket_starts(count)) | {count - 1})


def _variant_index(
    probes: Sequence[Sequence[Any]],
    groups: Sequence[Sequence[int]],
    starts: Sequence[int],
) -> tf.Tensor:
    """The variant of this step's probes (an int32 scalar tensor).

    Variant j (of ``len(starts)``) differentiates the layers from
    ``starts[j]`` up; it is exact when no probe has a nonzero entry below
    that layer. The index is the last such j, or ``len(starts)`` (no
    curvature term at all) when every probe is zero.
    """
    import tensorflow as tf

    touched = []
    for group in groups:
        flags = [
            tf.reduce_any(tf.not_equal(sigma[i], 0))
            for sigma in probes
            for i in group
        ]
        touched.append(tf.reduce_any(tf.stack(flags)))
    below = tf.cumsum(tf.cast(tf.stack(touched), tf.int32))
    # Layers touched strictly below each start, and in all.
    counts = [below[s - 1] for s in starts[1:]] + [below[-1]]
    return tf.add_n([tf.cast(tf.equal(c, 0), tf.int32) for c in counts])


def curvature_estimate(
    forward: Callable[[], Any],
    primals: Sequence[tf.Tensor],
    tangents: Sequence[tf.Tensor],
) -> tuple[tf.Tensor, Any]:
    r"""sigma^T H sigma by forward-over-reverse, and the forward's result.

    ``forward()`` computes :math:`f` from the watched `primals` (and
    returns ``(f, aux)``). A tape gives :math:`g = \nabla f` over the
    `primals`, and a ``tf.autodiff.ForwardAccumulator`` around it, along
    the probe :math:`\sigma` (the `tangents`), its JVP

    .. math::

        H\sigma = \frac{d}{d\epsilon}
            \nabla f(w + \epsilon\sigma)\Big|_{\epsilon=0},
        \qquad t = \sigma^\top H \sigma.

    An enclosing ``tf.GradientTape`` records it all: its gradient of the
    result is the third-order term. (Forward-over-forward, two nested
    accumulators, gives the right :math:`t` but a wrong reverse-mode
    gradient of it in TensorFlow 2.21, and an internal error eagerly:
    measured against nested tapes.)
    """
    import tensorflow as tf

    zero = tf.UnconnectedGradients.ZERO
    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(primals)
            value, aux = forward()
        grads = _gradient(tape, value, primals)
    products = accumulator.jvp(grads, unconnected_gradients=zero)
    return _dot(tangents, products), (value, aux)


class _ForwardContext:
    """The step context of a forward-mode step: loss, outputs and t.

    Everything was computed while the step's tape recorded (so it is
    differentiable in the weights); the plan asked for nothing else.
    """

    def __init__(
        self,
        run: StepRun,
        outputs: Any,
        scaled_loss: Any,
        weights: list[Any],
        curvature: Any,
    ) -> None:
        self.model, self.x, self.y = run.model, run.x, run.y
        self.sample_weight, self.scale = run.sample_weight, run.scale
        self.outputs, self.scaled_loss = outputs, scaled_loss
        self.weights = weights
        self.batch_size = step.static_batch_size(run.x)
        self._curvature = curvature

    def quadratic_form(self) -> Any:
        return self._curvature

    def _unplanned(self, name: str) -> Any:
        raise ValueError(
            f"The step context's `{name}` was read but not planned: a "
            "penalty must record in `plan` what it reads (see "
            "`keras_seht.context.StepPlan`)."
        )

    def loss_gradient(
        self, differentiable: bool = True, part: tuple[int, int] | None = None
    ) -> list[Any]:
        return self._unplanned("loss_gradient")

    def loss_at(
        self, shift: list[Any], part: tuple[int, int] | None = None
    ) -> Any:
        return self._unplanned("loss_at")

    def perturbed_loss(self) -> Any:
        return self._unplanned("perturbed_loss")

    def input_products(self) -> list[list[Any]]:
        return self._unplanned("input_products")


class StepRun:
    """The primitives of one traced train step (`keras_seht.step`)."""

    sparse_probes = False

    def __init__(self, model: keras.Model, data: Any) -> None:
        self.model = model
        self.x, self.y, self.sample_weight = (
            keras.utils.unpack_x_y_sample_weight(data)
        )

    def differentiate(
        self,
        make_plan: Callable[[Callable[[], Any]], StepPlan],
        evaluate: Callable[[Any], tuple[list[Any], Any]],
    ) -> tuple[Any, list[Any]]:
        """One forward pass and the objective's gradient; see `StepRun`.

        Forward-over-reverse (`_forward_mode`) where the plan allows it and
        TensorFlow's forward mode covers the model; else nested tapes
        (`_nested_tapes`).
        """
        import tensorflow as tf

        model = self.model
        self._forward_mode_step = False
        self.non_trainable = [
            tf.identity(v.value) for v in model.non_trainable_variables
        ]
        if not model.built or _replica_context() is not None:
            # An unbuilt model gets its variables in the first forward
            # pass; data-parallel replicas keep the tapes' tested path.
            return self._nested_tapes(make_plan, evaluate)
        model.check_trainable_weights()
        plan = make_plan(lambda: step.output_shape(model, self.x))
        if forward_mode_plan(plan):
            result = self._forward_mode(plan, evaluate)
            if result is not None:
                return result
        return self._nested_tapes(lambda shape: plan, evaluate)

    def _forward_mode(
        self, plan: StepPlan, evaluate: Callable[[Any], tuple[list[Any], Any]]
    ) -> tuple[Any, list[Any]] | None:
        r"""The step by forward-over-forward t and ONE reverse pass.

        With :math:`w` the trainable values (read once, watched by one
        tape) and the loss evaluated statelessly at them
        (``keras.StatelessScope``; the first pass's BatchNorm statistics,
        seeds and loss trackers are written back afterwards), each probe's
        :math:`t_k = \sigma_k^\top H \sigma_k` comes from
        `curvature_estimate` (the first probe's primal pass is the step's
        forward pass; each further probe reruns it with the same
        non-trainable state, so the same Dropout masks), and the tape's
        gradient of :math:`s L + \sum_j \text{strength}_j \phi_j(s R_j)`
        is the update.

        Only the variables from the lowest probed layer up are watched
        by the accumulators: a ``tf.switch_case`` picks, per step, the
        variant (`_variant_starts`) whose variables cover every nonzero
        probe entry (`_variant_index`; exact, since a zero probe entry
        adds nothing to :math:`t`), so a SEHT-D step that probes only the
        output layer costs about a plain step; in a graph the untaken
        variants do not run.

        Traced inside a nested ``tf.function`` (eagerly: run as it is), so
        that a model TensorFlow's forward mode cannot differentiate (it
        has no rule for the TensorList ops of Keras' RNN loops) leaves
        nothing behind: then None, and the caller takes the tapes.
        """
        import tensorflow as tf

        model, optimizer = self.model, self.model.optimizer
        trainable = list(model.trainable_variables)
        self.trainable = trainable
        probes = [
            [
                tf.zeros(v.shape, v.dtype)
                if s is None
                else tf.cast(tf.convert_to_tensor(s), v.dtype)
                for s, v in zip(sigma, trainable)
            ]
            for sigma in plan.probes or []
        ]
        layout = model.seht_layout
        groups = layout.groups
        # One program where every layer is probed (SEHT-H) or the model is
        # small; else a variant per bucket (`keras_seht.variants`).
        sparse = variants.sparse_layers(model.seht_penalties, layout)
        starts = _variant_starts(groups) if sparse else [0]
        watched_sets: list[list[int] | None] = [
            sorted(i for group in groups[start:] for i in group)
            for start in starts
        ]
        watched_sets.append(None)
        state = _state_variables(model)
        self.scale = _loss_scale(optimizer, tf.float32)

        def forward(weights: list[Any]) -> tuple[Any, Any]:
            mapping = list(zip(trainable, weights))
            with (
                keras.StatelessScope(
                    state_mapping=mapping, collect_losses=True
                ) as scope,
                compat.exact_tf_moments(),
            ):
                y_pred, loss, scaled_loss = _training_loss(self)
            return scaled_loss, (loss, y_pred, scope)

        def variant(watched: list[int] | None) -> Callable[[], Any]:
            def run() -> Any:
                weights = [tf.identity(v.value) for v in trainable]
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(weights)
                    if watched is None:  # every probe is zero: t = 0
                        scaled_loss, extra = forward(weights)
                        curvature = tf.zeros((), scaled_loss.dtype)
                    else:
                        forms = []
                        for k, sigma in enumerate(probes):
                            form, result = curvature_estimate(
                                lambda: forward(weights),
                                [weights[i] for i in watched],
                                [sigma[i] for i in watched],
                            )
                            forms.append(form)
                            if k == 0:
                                scaled_loss, extra = result
                        curvature = tf.add_n(forms) / len(forms)
                    loss, y_pred, scope = extra
                    context = _ForwardContext(
                        self, y_pred, scaled_loss, weights, curvature
                    )
                    values, objective = evaluate(context)
                    total = scaled_loss + tf.cast(objective, scaled_loss.dtype)
                grads = _gradient(tape, total, weights)
                # The first pass's state updates (BatchNorm statistics,
                # seeds, loss trackers), once, after every pass read the
                # state of before the step.
                for v in state:
                    new = scope.get_current_value(v)
                    if new is not None:
                        v.assign(new)
                return loss, values, grads, y_pred

            return run

        def dispatch() -> Any:
            if not sparse:
                return variant(watched_sets[0])()
            branches = [variant(watched) for watched in watched_sets]
            index = _variant_index(probes, groups, starts)
            return tf.switch_case(index, branches)

        try:
            if tf.executing_eagerly():
                outputs = dispatch()
            else:
                outputs = tf.function(dispatch, autograph=False)()
        except _FORWARD_MODE_ERRORS:
            return None
        loss, values, self.grads, self.y_pred = outputs
        self.loss = loss
        self.constant_loss = False
        self._forward_mode_step = True
        return loss, list(values)

    def _nested_tapes(
        self,
        make_plan: Callable[[Callable[[], Any]], StepPlan],
        evaluate: Callable[[Any], tuple[list[Any], Any]],
    ) -> tuple[Any, list[Any]]:
        """The step on nested tapes (the module docstring's recipe)."""
        import tensorflow as tf

        model, optimizer = self.model, self.model.optimizer
        # The float inputs, as tensors the `inputs` tape can watch.
        flat = keras.tree.flatten(self.x)
        self.leaves = []
        for i, t in enumerate(flat):
            if t is not None and "float" in str(getattr(t, "dtype", "")):
                flat[i] = tf.convert_to_tensor(t)
                self.leaves.append(flat[i])
        self.x = keras.tree.pack_sequence_as(self.x, flat)
        # `non_trainable` was read before the stateful forward pass: the
        # perturbed passes of the smoothed methods run with the step's own
        # non-trainable state (an unbuilt model gets its variables in the
        # forward pass: read again below).
        self.outer = tf.GradientTape()
        self.middle = tf.GradientTape(persistent=True)
        self.inner = tf.GradientTape(persistent=True)
        self.inputs = tf.GradientTape(
            watch_accessed_variables=False, persistent=True
        )
        with self.outer:
            with self.middle:
                with self.inner, self.inputs, compat.exact_tf_moments():
                    self.inputs.watch(self.leaves)
                    y_pred, loss, scaled_loss = _training_loss(self)
                # Keras builds an unbuilt model in the first traced pass.
                model.check_trainable_weights()
                variables = model.non_trainable_variables
                if len(self.non_trainable) != len(variables):
                    self.non_trainable = [
                        tf.identity(v.value)
                        for v in model.non_trainable_variables
                    ]
                self.y_pred, self.loss = y_pred, loss
                self.scale = _loss_scale(optimizer, scaled_loss.dtype)
                self.scaled_loss = scaled_loss
                self.trainable = list(model.trainable_weights)

                def output_shape() -> tuple[Any, int]:
                    z = flatten_outputs(y_pred)
                    batch = z.shape[0]
                    return (
                        tf.shape(z)[0] if batch is None else int(batch),
                        int(z.shape[1]),
                    )

                plan = make_plan(output_shape)
                self.constant_loss = plan.constant_loss
                # Recorded by `middle` and `outer`: g stays differentiable.
                self.grads = _gradient(self.inner, scaled_loss, self.trainable)
                self.products = []
                if plan.epsilon is None and plan.curvature == "hessian":
                    self.products = [
                        _dot(self.grads, sigma) for sigma in plan.probes or []
                    ]
            # Recorded by `outer`: every value stays differentiable.
            values, self.objective = evaluate(_Context(self, plan))
        self.grad_penalty = _gradient(
            self.outer, self.objective, self.trainable
        )
        del self.middle, self.inputs, self.inner
        return loss, values

    def objective_gradients(self, finite: Any) -> list[Any]:
        """The objective's gradient g; see `StepRun.objective_gradients`.

        The loss's own gradient g_L plus the penalties', unless a penalty
        replaces it (its objective then holds the loss as a constant).
        """
        import tensorflow as tf

        if self._forward_mode_step:  # the tape's gradient of the total
            return list(self.grads)
        return [
            tf.cast(gp, g.dtype)
            if self.constant_loss
            else g + tf.cast(gp, g.dtype)
            for g, gp in zip(self.grads, self.grad_penalty)
        ]

    def loss_gradients(self, needed: Any = None) -> list[Any]:
        """The plain loss gradient g_L; see `StepRun.loss_gradients`.

        The inner tape's, always at hand; after a forward-mode step, one
        plain backward pass of a stateless forward pass with the step's
        non-trainable state of before it (the same Dropout masks and
        BatchNorm mode), inside a ``tf.cond`` when it is only `needed`
        sometimes.
        """
        import tensorflow as tf

        if not self._forward_mode_step:
            return list(self.grads)
        model = self.model

        def plain() -> list[Any]:
            weights = [tf.identity(v.value) for v in self.trainable]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(weights)
                loss = functional.stateless_loss(
                    model,
                    weights,
                    self.non_trainable,
                    self.x,
                    self.y,
                    self.sample_weight,
                    training=True,
                )[0]
                scaled_loss = tf.cast(loss, self.scale.dtype) * self.scale
            return _gradient(tape, scaled_loss, weights)

        if needed is None:
            return plain()
        return tf.cond(
            needed, plain, lambda: [tf.zeros_like(g) for g in self.grads]
        )

    def all_reduce_mean(self, tensors: Any) -> Any:
        r"""The mean of each tensor over the replicas of a strategy.

        Under a ``tf.distribute`` strategy with :math:`R` replicas, Keras
        divides each replica's loss by :math:`R` (so that the optimizer's
        sum all-reduce averages the gradients), and every quantity of the
        step carries that factor: replica :math:`k` holds
        :math:`L_k/R`, :math:`s R_j(k)/R` and :math:`g_k/R`. The mean over
        the replicas keeps the convention: every replica then holds the
        global value divided by :math:`R` (so the guard decides the same
        everywhere), the optimizer's sum gives the global gradient
        :math:`\frac1R\sum_k g_k` once, and the logs multiply by
        :math:`R` (`_unscale_for_distribution`). The gradients are thus
        all-reduced twice, here and in the optimizer. Booleans become
        True where they are True on every replica. Without a strategy,
        `tensors` unchanged.

        Args:
            tensors: A structure of tensors (gradients, values, flags).

        Returns:
            The same structure, reduced.
        """
        return _all_reduce_mean(tensors)

    def apply(
        self,
        gradients: list[Any],
        total: Any,
        values: list[Any],
        guard: step.Guard,
    ) -> Any:
        """Applies the optimizer, trackers and metrics; see `StepRun.apply`.

        A step that is not applied is skipped inside a conditional (as
        ``LossScaleOptimizer`` skips a non-finite step).
        """
        step.update_trackers(
            self.model,
            self.x,
            _unscale_for_distribution(total),
            [_unscale_for_distribution(v) for v in values],
            guard,
        )
        optimizer = self.model.optimizer
        if guard.applied is None:
            optimizer.apply(gradients, self.trainable)
        else:
            _apply_if(guard.applied, optimizer, gradients, self.trainable)
        return self.model.compute_metrics(
            self.x, self.y, self.y_pred, sample_weight=self.sample_weight
        )


def strategy_from_environment(timeout: float | None = None) -> Any:
    """The strategy ``TF_CONFIG`` describes, made TensorFlow's default.

    With ``TF_CONFIG`` set (one process per worker, as for any
    ``tf.distribute.MultiWorkerMirroredStrategy`` job), creates a
    ``MultiWorkerMirroredStrategy`` and installs it as the default strategy
    (``tf.distribute.experimental_set_strategy``): models built and
    compiled afterwards live in it without a ``strategy.scope()``, and
    ``fit`` shards each global batch across the workers (tf.data's
    auto-sharding: give every worker the same, whole data set). Call it
    first, before any other TensorFlow work, and seed every worker alike
    (``keras.utils.set_random_seed``). Without ``TF_CONFIG``, does
    nothing.

    Args:
        timeout: Seconds a collective waits for the other workers before
            it fails (None: no limit). It also bounds the first step's
            wait while the other workers trace their step function.

    Returns:
        The strategy, or None without ``TF_CONFIG``.
    """
    import os

    import tensorflow as tf

    if not os.environ.get("TF_CONFIG"):
        return None
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=timeout
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=options
    )
    tf.distribute.experimental_set_strategy(strategy)
    return strategy


# --------------------------------------------------------------------------
# Diagnostics: curvature products at a fixed batch (keras_seht.operators)
# --------------------------------------------------------------------------


class CurvatureProducts:
    r"""Curvature products of the compiled loss at a fixed batch.

    The loss is a function of copies of the current weight values,
    evaluated statelessly (``functional.stateless_loss``: no variable,
    BatchNorm statistic or seed of the model changes), with twice
    differentiable BatchNorm moments (`compat.exact_tf_moments`). Each
    product reruns the forward pass inside a ``tf.function`` (on small
    models ~15x faster than replaying a persistent eager tape). With
    :math:`L(w)` the loss, :math:`z(w)` every output entry of the batch
    flattened (:math:`M` of them) and :math:`\ell(z)` the loss given to
    ``compile``:

    - ``hvp(v)`` :math:`= \nabla_w^2 L\,v`: the inner tape's gradient
      :math:`g` is recorded by an outer tape whose VJP with cotangent
      :math:`v` is :math:`J_g^\top v = Hv`; ``hvp_rows(V)`` the same for
      each row of a (k, n) flat ``V``, vectorized over the rows
      (``tf.vectorized_map``, one forward pass);
    - ``jvp(v)`` :math:`= Jv \in \mathbb{R}^M`, :math:`J = \partial z /
      \partial w` (``tf.autodiff.ForwardAccumulator``);
    - ``vjp(u)`` :math:`= J^\top u`; ``vjp_rows(U)`` for each row of a
      (k, M) ``U``, flat (k, n), vectorized;
    - ``output_hvp(u)`` :math:`= \nabla_z^2 \ell\,u` at :math:`z(w)`;
      ``output_hvp_rows(U)`` for each row of a (k, M) ``U``. Softmax and
      sigmoid outputs with a probability cross-entropy are split at the
      logits (`keras_seht.output_split`): there :math:`\ell` is the
      surrogate whose Hessian gives the canonical Gauss-Newton matrix.
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
        self._y_pred: Any = None
        self._hvp = tf.function(self._hessian_vector_product)
        self._hvp_rows = tf.function(self._hessian_rows, reduce_retracing=True)
        self._jvp = tf.function(self._jacobian_vector_product)
        self._vjp = tf.function(self._vector_jacobian_product)
        self._vjp_rows = tf.function(self._jacobian_rows, reduce_retracing=True)
        self._output_hvp = tf.function(self._output_rows)

    # Pure functions of the weights (traced by the tf.functions).

    def _forward(self, params: Sequence[tf.Tensor]) -> tuple[Any, Any]:
        """(L(params), y_pred), statelessly."""
        x, y, sample_weight = self._batch
        loss, y_pred, _ = functional.stateless_loss(
            self._model,
            params,
            self._non_trainable,
            x,
            y,
            sample_weight,
            self._training,
        )
        return loss, y_pred

    def _flat_outputs(self, params: Sequence[tf.Tensor]) -> tf.Tensor:
        """z(params): every output entry of the batch, flat."""
        import tensorflow as tf

        with compat.exact_tf_moments():
            _, y_pred = self._forward(params)
        leaves = keras.tree.flatten(y_pred)
        return tf.concat([tf.reshape(z, [-1]) for z in leaves], 0)

    def _gradient_tape(self) -> tuple[tf.GradientTape, list[tf.Tensor]]:
        """An outer tape that recorded the loss gradient g (flat pieces)."""
        import tensorflow as tf

        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self.params)
            with (
                tf.GradientTape(watch_accessed_variables=False) as inner,
                compat.exact_tf_moments(),
            ):
                inner.watch(self.params)
                loss, _ = self._forward(self.params)
            grads = _gradient(inner, loss, self.params)
        return outer, grads

    def _hessian_vector_product(
        self, vectors: Sequence[tf.Tensor]
    ) -> list[tf.Tensor]:
        outer, grads = self._gradient_tape()
        return _gradient(
            outer, grads, self.params, output_gradients=list(vectors)
        )

    def _hessian_rows(self, rows: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf

        outer, grads = self._gradient_tape()
        sizes = [p.shape.num_elements() for p in self.params]

        def row(v: tf.Tensor) -> tf.Tensor:
            pieces = [
                tf.reshape(tf.cast(piece, p.dtype), p.shape)
                for piece, p in zip(tf.split(v, sizes), self.params)
            ]
            out = _gradient(outer, grads, self.params, pieces)
            return tf.concat([tf.reshape(h, [-1]) for h in out], 0)

        return tf.cast(tf.vectorized_map(row, rows), rows.dtype)

    def _jacobian_vector_product(
        self, vectors: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        import tensorflow as tf

        with tf.autodiff.ForwardAccumulator(self.params, list(vectors)) as acc:
            z = self._flat_outputs(self.params)
        return acc.jvp(z, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _vector_jacobian_product(self, u: tf.Tensor) -> list[tf.Tensor]:
        import tensorflow as tf

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.params)
            z = self._flat_outputs(self.params)
        u = tf.cast(u, z.dtype)
        return _gradient(tape, z, self.params, output_gradients=u)

    def _jacobian_rows(self, rows: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.params)
            z = self._flat_outputs(self.params)

        def row(u: tf.Tensor) -> tf.Tensor:
            out = _gradient(tape, z, self.params, tf.cast(u, z.dtype))
            return tf.concat([tf.reshape(g, [-1]) for g in out], 0)

        return tf.cast(tf.vectorized_map(row, rows), rows.dtype)

    def _output_rows(self, z: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """(k, M): rows of U H_z, the derivative of U (d ell / dz) in z."""
        import tensorflow as tf

        _, y, sample_weight = self._batch
        leaves = keras.tree.flatten(self._y_pred)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(z)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(z)
                pieces, offset = [], 0
                for leaf in leaves:
                    size = leaf.shape.num_elements()
                    piece = z[offset : offset + size]
                    pieces.append(tf.reshape(piece, leaf.shape))
                    offset += size
                packed = keras.tree.pack_sequence_as(self._y_pred, pieces)
                reference = keras.tree.map_structure(
                    tf.stop_gradient, self._y_pred
                )
                loss = output_split.gauss_newton_loss(
                    self._model, y, packed, sample_weight, reference
                )
            grad = inner.gradient(loss, z)
        return tf.vectorized_map(
            lambda u: _gradient(outer, grad, [z], tf.cast(u, z.dtype))[0],
            rows,
        )

    # The products.

    def _vectors(self, vectors: Sequence[Any]) -> list[tf.Tensor]:
        """One tensor per variable, in its dtype and shape."""
        import tensorflow as tf

        return [
            tf.reshape(tf.cast(tf.convert_to_tensor(v), p.dtype), p.shape)
            for v, p in zip(vectors, self.params)
        ]

    def _outputs(self) -> tf.Tensor:
        """z(w), flat (computed once, eagerly)."""
        import tensorflow as tf

        if self._y_pred is None:
            with compat.exact_tf_moments():
                _, self._y_pred = self._forward(self.params)
            # Builds the compiled loss eagerly, not inside a tf.function.
            _, y, sample_weight = self._batch
            compat.compiled_loss(self._model, y, self._y_pred, sample_weight)
        leaves = keras.tree.flatten(self._y_pred)
        return tf.concat([tf.reshape(z, [-1]) for z in leaves], 0)

    @property
    def loss(self) -> float:
        """The loss L(w) at the frozen weights."""
        return float(self._forward(self.params)[0])

    @property
    def num_outputs(self) -> int:
        """M, the number of output entries of the batch."""
        return int(self._outputs().shape[0])

    def hvp(self, vectors: Sequence[Any]) -> list[tf.Tensor]:
        """H v, one tensor per variable."""
        return list(self._hvp(self._vectors(vectors)))

    def hvp_rows(self, rows: Any) -> tf.Tensor:
        """(k, n): row b is H v_b for row v_b of `rows`, flattened."""
        return self._hvp_rows(rows)

    def jvp(self, vectors: Sequence[Any]) -> tf.Tensor:
        """J v, (M,)."""
        return self._jvp(self._vectors(vectors))

    def vjp(self, cotangent: Any) -> list[tf.Tensor]:
        """J^T u, one tensor per variable."""
        return list(self._vjp(cotangent))

    def vjp_rows(self, rows: Any) -> tf.Tensor:
        """(k, n): row b is J^T u_b for row u_b of `rows`, flattened."""
        return self._vjp_rows(rows)

    def output_hvp(self, u: Any) -> tf.Tensor:
        """H_z u, (M,)."""
        import tensorflow as tf

        return self._output_hvp(self._outputs(), tf.expand_dims(u, 0))[0]

    def output_hvp_rows(self, rows: Any) -> tf.Tensor:
        """(k, M): row b is H_z u_b for row u_b of `rows`."""
        return self._output_hvp(self._outputs(), rows)
