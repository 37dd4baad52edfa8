"""SEHT autodiff on the PyTorch backend: the step's primitives.

The step's logic lives in `keras_seht.step`; this module gives it eager
PyTorch autodiff. An exact Hessian quadratic form t = sigma^T H sigma is
taken forward over forward where the model allows (`_TaylorForward`: a
functional model of layers with Taylor rules, or stateless ones): one
forward pass carries each tensor's second-order Taylor coefficients along
the probes, and ONE backward of s L + sum_j strength_j phi_j(s R_j) gives
the update. Otherwise (and for the Gauss-Newton form) one forward pass,
one graph-building backward for g = dL/dw over the variables a penalty
reads it for (with a SEHT-D probe, only the drawn layers: autograd prunes
everything below the first), an HVP h = d(g . sigma)/dw per probe, and
ONE backward of the objective: the loss's share rides along the
penalties' (they meet at the same activations), and the loss gradient g
is never recomputed.

With a loss-scaling optimizer (``LossScaleOptimizer`` under
``mixed_float16``, or ``loss_scale_factor``) the scaled loss s * L is
differentiated, as in Keras' own step, so that small float16 gradients do
not underflow: g, t and dt/dw all come out scaled by s, the optimizer
unscales the update, and the step divides the logged values by s.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from typing import Any, Callable, Sequence

import keras
import torch

from keras_seht import _keras_compat as compat
from keras_seht import distributed, functional, output_split, step
from keras_seht.context import StepPlan
from keras_seht.penalties import flatten_outputs, float_inputs


def _grad(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    create_graph: bool,
    grad_outputs: Any = None,
    batched: bool = False,
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """autograd.grad with zeros (not None) for inputs the output ignores.

    ``retain_graph=False`` for a graph's last backward: its saved tensors
    are then freed as the backward pass reaches them, which lowers the
    step's peak memory.
    """
    if not inputs:
        return []
    rows = (grad_outputs.shape[0],) if batched else ()
    if not output.requires_grad:
        grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
    else:
        # A batched backward falls back to a loop for ops without batching
        # rules, and says so.
        quiet = (
            warnings.catch_warnings() if batched else contextlib.nullcontext()
        )
        with quiet:
            if batched:
                warnings.simplefilter("ignore")
            grads = torch.autograd.grad(
                output,
                list(inputs),
                grad_outputs=grad_outputs,
                create_graph=create_graph,
                retain_graph=retain_graph or create_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
    return [
        torch.zeros(rows + tuple(p.shape), device=p.device, dtype=p.dtype)
        if g is None
        else g
        for g, p in zip(grads, inputs)
    ]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    total = None
    for u, v in zip(a, b):
        term = torch.sum(u * v)
        total = term if total is None else total + term
    assert total is not None
    return total


def probe_estimate(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor]],
    create_graph: bool,
) -> torch.Tensor:
    """mean_k sigma_k^T H sigma_k from a graph-connected gradient.

    `grads`, `params` and each probe may cover a subset of the variables
    (those the probes touch).
    """
    values = []
    for sigma in probes:
        hv = _grad(_dot(grads, sigma), params, create_graph=create_graph)
        values.append(_dot(sigma, hv))
    return torch.stack(values).mean()


def gauss_newton_estimate(
    model: keras.Model,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor]],
    scale: torch.Tensor,
) -> torch.Tensor:
    """mean_k u_k^T H_z u_k, u_k = J sigma_k, differentiable in the weights.

    u = J sigma comes from two reverse passes (the "double-vjp" trick):
    J^T v for a dummy cotangent v, built with ``create_graph``, is linear
    in v, so its derivative with respect to v along sigma is J sigma.
    H_z u is the derivative of the Gauss-Newton output loss's gradient
    (`output_split.gauss_newton_loss`: the compiled loss, split at the
    logits for softmax/sigmoid cross-entropy outputs) along u, taken at a
    copy of the outputs so that only the loss (not u, which reaches the
    outputs through saved activations) is differentiated. Its reference
    point is the outputs themselves, so H_z stays differentiable in w.
    """
    outputs = keras.tree.flatten(y_pred)
    dummies = [torch.zeros_like(z, requires_grad=True) for z in outputs]
    jacobian_t_v = _grad(_dot(dummies, outputs), params, create_graph=True)
    copies = [z.clone() for z in outputs]
    output_loss = output_split.gauss_newton_loss(
        model,
        y,
        keras.tree.pack_sequence_as(y_pred, copies),
        sample_weight,
        reference=y_pred,
    )
    output_grads = _grad(output_loss * scale, copies, create_graph=True)
    values = []
    for sigma in probes:
        u = _grad(_dot(jacobian_t_v, sigma), dummies, create_graph=True)
        h_u = _grad(_dot(output_grads, u), copies, create_graph=True)
        values.append(_dot(u, h_u))
    return torch.stack(values).mean()


def _densify(
    probe: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    indices: Sequence[int],
) -> list[torch.Tensor]:
    """The probe's tensors at `indices`, zeros where it is None."""
    dense = []
    for i in indices:
        sigma = probe[i]
        dense.append(torch.zeros_like(params[i]) if sigma is None else sigma)
    return dense


class _KnownGradient(torch.autograd.Function):
    """A value whose gradients with respect to `params` are known already.

    ``apply(value, *params, *gradients)`` returns `value`; its backward
    sends ``upstream * gradients[i]`` to ``params[i]``. The perturbed
    passes of the smoothed methods are each differentiated as soon as they
    ran (one pass's graph alive at a time); this joins their sum to the
    step's objective, which is then differentiated as a whole.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *tensors: torch.Tensor) -> Any:
        ctx.count = len(tensors) // 2
        ctx.save_for_backward(*tensors[ctx.count :])
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> Any:
        grads = [upstream * g for g in ctx.saved_tensors]
        return (None, *grads, *([None] * ctx.count))


def _perturbed_losses(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor | None]],
    epsilon: float,
    scale: torch.Tensor,
) -> torch.Tensor:
    """mean_k [f(w + e s_k) + f(w - e s_k)], f = s L, with its gradient.

    Each pass runs statelessly with the model's current non-trainable
    values (call it before the step's stateful forward pass: the passes
    then see the step's own seeds and BatchNorm statistics) and is
    differentiated at once, so one pass's graph is alive at a time (peak
    memory as a plain step's).
    """
    non_trainable = [v.value for v in model.non_trainable_variables]
    x, y, sample_weight = functional.as_tensors(x, y, sample_weight)
    value = torch.zeros((), dtype=scale.dtype, device=scale.device)
    gradients = [torch.zeros_like(p) for p in params]
    for probe in probes:
        for shift in (epsilon, -epsilon):
            shifted = functional.shifted(params, probe, shift)
            loss = functional.stateless_loss(
                model, shifted, non_trainable, x, y, sample_weight, True
            )[0]
            scaled = loss * scale.to(loss.dtype) / len(probes)
            grads = _grad(scaled, params, False, retain_graph=False)
            for g, d in zip(gradients, grads):
                g.add_(d)
            value = value + scaled.detach()
    return _KnownGradient.apply(value, *params, *gradients)


# --------------------------------------------------------------------------
# Forward over forward: t by second-order Taylor propagation
# --------------------------------------------------------------------------


class _Unsupported(Exception):
    """A layer or model the Taylor forward pass has no rule for."""


class _Jet:
    r"""A tensor's second-order Taylor coefficients along K probes.

    For the forward pass :math:`x(w)` and probes :math:`\sigma_k`,
    ``data`` stacks along the batch axis (B rows each) :math:`x`, the
    first derivatives :math:`x'_k = \frac{d}{d\epsilon} x(w +
    \epsilon\sigma_k)|_0` (k = 1..K), then the sum of the second ones,
    :math:`x'' = \sum_k \frac{d^2}{d\epsilon^2} x(w +
    \epsilon\sigma_k)|_0`. One sum suffices: every layer's second
    coefficient is linear in its input's (:math:`y''_k = J x''_k +
    Q(x'_k, \sigma_k)`), and so is the loss's, whose sum over the probes
    is :math:`K t`. ``probes`` is K, or 0 for a tensor the probes do not
    reach yet (``data`` is then :math:`x` alone). Stacking lets a layer
    that is linear in its input (a convolution with its kernel fixed, a
    pooling) run once over every coefficient.
    """

    __slots__ = ("data", "probes", "rows", "_parts")

    def __init__(self, data: torch.Tensor, probes: int, rows: int) -> None:
        self.data, self.probes, self.rows = data, probes, rows
        self._parts: tuple[torch.Tensor, ...] | None = None

    def blocks(self) -> torch.Tensor:
        """``data`` as (K + 2, B, ...)."""
        return self.data.view(self.probes + 2, self.rows, *self.shape)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, x', x''), shaped (B, ...), (K, B, ...), (B, ...).

        One ``torch.split`` for every use: its backward concatenates the
        parts' gradients, where each slice of ``data`` would write its
        own full-size gradient of zeros.
        """
        if self._parts is None:
            x, first, second = torch.split(self.blocks(), [1, self.probes, 1])
            self._parts = (x[0], first, second[0])
        x, first, second = self._parts
        return x, first, second

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one row."""
        return tuple(self.data.shape[1:])

    @property
    def primal(self) -> torch.Tensor:
        """The tensor x itself."""
        if self.probes == 0:
            return self.data
        return self.parts()[0]

    def with_probes(self, count: int) -> _Jet:
        """This jet with `count` probes.

        Zero coefficients where it had none.
        """
        if self.probes == count:
            return self
        zeros = self.data.new_zeros(((count + 1) * self.rows, *self.shape))
        return _Jet(torch.cat([self.data, zeros]), count, self.rows)


def _training(operation: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with ``training=True`` where the operation takes it.

    As ``Functional.call`` passes it.
    """
    if "training" in getattr(operation, "_call_context_args", ()):
        return {**kwargs, "training": True}
    return kwargs


def _cast(jet: _Jet, dtype: str) -> _Jet:
    """A float jet in `dtype`, as ``Layer.__call__`` casts its inputs."""
    target = getattr(torch, dtype)
    if not jet.data.is_floating_point() or jet.data.dtype == target:
        return jet
    return _Jet(jet.data.to(target), jet.probes, jet.rows)


def _channels_last_conv(
    layer: Any,
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """(prepare, apply) of a channels_last Conv layer's convolution.

    ``convolution_op`` (Keras' torch ``conv``) copies its input twice,
    to channels-first and back to the channels-last memory format, and
    the convolution saves that copy for its backward pass; for the stack
    of Taylor coefficients and its slices this makes a copy per product.
    Here ``prepare`` views the stack as channels-first (a permutation of
    the same memory, already channels-last in torch's terms) and pads it
    once, as Keras does, and ``apply`` convolves it or a batch slice of
    it; the output is the channels_last view of torch's, as Keras'.
    None where Keras' helpers are not found (``convolution_op`` then).
    """
    if layer.data_format != "channels_last" or layer.rank not in (1, 2, 3):
        return None
    try:
        from keras.src.backend.torch import nn as keras_nn

        same_padding = keras_nn._apply_same_padding
        transpose_kernel = keras_nn._transpose_conv_kernel
        channels_last = keras_nn._maybe_convert_to_channels_last
    except (ImportError, AttributeError):
        return None
    rank = layer.rank
    to_first = (0, rank + 1, *range(1, rank + 1))
    to_last = (0, *range(2, rank + 2), 1)
    conv = getattr(torch.nn.functional, f"conv{rank}d")
    padding: list[Any] = [0]

    def prepare(data: torch.Tensor) -> torch.Tensor:
        inputs = data.permute(to_first)
        if layer.padding == "same":
            inputs, padding[0] = same_padding(
                inputs,
                layer.kernel_size,
                layer.strides,
                layer.data_format,
                "conv",
                layer.dilation_rate,
            )
        return channels_last(inputs)

    def apply(inputs: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        out = conv(
            inputs,
            channels_last(transpose_kernel(kernel)),
            stride=layer.strides,
            padding=padding[0],
            dilation=layer.dilation_rate,
            groups=layer.groups,
        )
        return out.permute(to_last)

    return prepare, apply


def _stack(blocks: Sequence[torch.Tensor], probes: int, rows: int) -> _Jet:
    return _Jet(torch.cat(list(blocks)), probes, rows)


def _nested_jvp(
    fn: Callable[..., Any],
    primals: tuple[torch.Tensor, ...],
    first: tuple[torch.Tensor, ...],
    second: tuple[torch.Tensor, ...],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    r"""(y, y', y'') of ``y = fn(*p)`` at the curve p + e p' + e^2/2 p''.

    The outer ``torch.func.jvp`` differentiates the inner one's
    :math:`(y, J p')` along :math:`(p', p'')`: its tangent of
    :math:`J p'` is :math:`D^2 y[p', p'] + J p''`, the second derivative
    of :math:`y` along the curve. Exact for any function with forward-mode
    derivatives (the rule of layers without a specific one).
    """

    def inner(p: tuple, u: tuple) -> Any:
        return torch.func.jvp(fn, p, u)

    outer: Any = torch.func.jvp(inner, (primals, first), (first, second))
    (y, y1), (_, y2) = outer
    flat = keras.tree.flatten
    return flat(y), flat(y1), flat(y2)


class _TaylorForward:
    r"""The forward pass of a functional model, in second-order Taylor mode.

    Every tensor of the graph becomes a `_Jet` along the probes; with the
    loss's coefficients,

    .. math::

        \sigma_k^\top H \sigma_k = \frac{d^2}{d\epsilon^2}
            f(w + \epsilon\sigma_k)\Big|_{\epsilon=0} = f''_k,

    the two nested forward-mode derivatives of the JAX step
    (``keras_seht.backend.jax.curvature_estimate``), propagated layer by
    layer: Conv, Dense, BatchNormalization (training), ReLU, Dropout, Add
    and linear per-sample layers (pooling, reshapes) by closed-form rules that
    share one kernel call among the coefficients, any other stateless
    layer by nested ``torch.func.jvp`` (`_nested_jvp`). The coefficients
    are ordinary tensors of the weights, so ONE reverse pass of
    :math:`f + \text{strength}\,t` then gives the update (a third-order
    derivative of :math:`f`), where the reverse-over-reverse step needs a
    graph-building gradient, an HVP and a backward through both.

    A layer the probes have not reached yet (no tangents in, none on its
    weights) runs as in a plain forward pass, so SEHT-D's probe of the
    output layer costs a plain forward pass and a small tail.
    """

    def __init__(
        self,
        model: keras.Model,
        params: Sequence[torch.Tensor],
        probes: Sequence[Sequence[torch.Tensor | None]],
    ) -> None:
        self.model, self.count = model, len(probes)
        self._sigma: dict[int, list[torch.Tensor]] = {}
        for i, variable in enumerate(model.trainable_variables):
            column = [probe[i] for probe in probes]
            if all(s is None for s in column):
                continue
            self._sigma[id(variable)] = [
                torch.zeros_like(params[i]) if s is None else s.detach()
                for s in column
            ]
        self._rule_table = self._rules()

    def tangents(self, variable: Any) -> list[torch.Tensor] | None:
        """sigma_k of `variable` (None where every probe is zero there)."""
        if variable is None:
            return None
        return self._sigma.get(id(variable))

    # -- running the graph ------------------------------------------------

    def outputs(self, x: Any) -> Any:
        """The model's outputs at `x`, as jets (a structure like y_pred)."""
        model = self.model
        functional_type = compat.functional_class()
        graph = model
        if not isinstance(model, functional_type):
            graph = getattr(model, "_functional", None)
            if not isinstance(model, keras.Sequential) or graph is None:
                raise _Unsupported("not a functional model")
            if type(model).call is not keras.Sequential.call:
                raise _Unsupported("Sequential.call overridden")
        elif type(model).call is not functional_type.call:
            raise _Unsupported("Functional.call overridden")
        inputs = graph._standardize_inputs(x)
        jets = [_Jet(t, 0, int(t.shape[0])) for t in inputs]
        outputs = self._run_through_graph(graph, jets)
        if not all(isinstance(j, _Jet) for j in keras.tree.flatten(outputs)):
            raise _Unsupported("an output that is not a tensor")
        return outputs

    def _run_through_graph(self, graph: Any, inputs: list[_Jet]) -> Any:
        """``Functional._run_through_graph`` with each node's `_rule`.

        Keras' keeps every tensor of the graph until the end of the pass;
        this one drops a jet after its last use, so that a stack the
        reverse pass does not save (a convolution's output, say) is freed
        at once: the forward pass's peak memory is then about what the
        reverse pass saves.
        """
        nodes = [
            node
            for depth in sorted(graph._nodes_by_depth, reverse=True)
            for node in graph._nodes_by_depth[depth]
            if node.operation and not node.is_input
        ]
        uses: dict[int, int] = {}
        for x in [t for n in nodes for t in n.input_tensors] + list(
            graph.outputs
        ):
            uses[id(x)] = uses.get(id(x), 0) + 1
        values: dict[int, Any] = {
            id(x): y for x, y in zip(graph.inputs, inputs)
        }
        for node in nodes:
            if any(id(x) not in values for x in node.input_tensors):
                continue  # not computable from these inputs
            args, kwargs = node.arguments.fill_in(values)
            for x in node.input_tensors:
                uses[id(x)] -= 1
                if uses[id(x)] == 0:
                    del values[id(x)]
            outputs = self._rule(node.operation)(*args, **kwargs)
            del args, kwargs
            for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
                values[id(x)] = y
        missing = [x for x in graph.outputs if id(x) not in values]
        if missing:
            raise _Unsupported("an output not connected to the inputs")
        return keras.tree.pack_sequence_as(
            graph._outputs_struct, [values[id(x)] for x in graph.outputs]
        )

    def _rule(self, operation: Any) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            jets = [
                j
                for j in keras.tree.flatten((args, kwargs))
                if isinstance(j, _Jet)
            ]
            weights = list(getattr(operation, "trainable_variables", []))
            probed = any(self.tangents(v) is not None for v in weights)
            if not probed and all(j.probes == 0 for j in jets):
                return self._plain(operation, args, kwargs)
            if kwargs.get("mask") is not None:
                raise _Unsupported("masks")
            rule = self._rule_table.get(type(operation))
            if rule is not None and len(args) == 1 and len(jets) == 1:
                out = rule(operation, _cast(jets[0], operation.compute_dtype))
                if out is not None:
                    return out
            if type(operation) is keras.layers.Add and len(jets) > 1:
                return self._add(jets)
            return self._generic(operation, args, kwargs, weights)

        return call

    def _plain(self, operation: Any, args: Any, kwargs: Any) -> Any:
        """A layer the probes have not reached: its plain (stateful) call."""
        args, kwargs = keras.tree.map_structure(
            lambda a: a.data if isinstance(a, _Jet) else a, (args, kwargs)
        )
        out = operation(*args, **_training(operation, kwargs))
        return keras.tree.map_structure(
            lambda t: _Jet(t, 0, int(t.shape[0])), out
        )

    def _rules(self) -> dict[type, Callable[[Any, _Jet], _Jet | None]]:
        layers = keras.layers
        rules: dict[type, Callable[[Any, _Jet], _Jet | None]] = {
            layers.Conv1D: self._conv,
            layers.Conv2D: self._conv,
            layers.Conv3D: self._conv,
            layers.Dense: self._dense,
            layers.BatchNormalization: self._batch_norm,
            layers.ReLU: self._relu_layer,
            layers.Dropout: self._dropout,
            layers.Activation: lambda op, x: self._activation(op.activation, x),
        }
        for linear in (
            layers.AveragePooling1D,
            layers.AveragePooling2D,
            layers.AveragePooling3D,
            layers.GlobalAveragePooling1D,
            layers.GlobalAveragePooling2D,
            layers.GlobalAveragePooling3D,
            layers.Flatten,
            layers.Reshape,
            layers.Permute,
            layers.ZeroPadding1D,
            layers.ZeroPadding2D,
            layers.ZeroPadding3D,
            layers.Cropping1D,
            layers.Cropping2D,
            layers.Cropping3D,
            layers.Identity,
        ):
            rules[linear] = self._linear
        return rules

    # -- the rules ----------------------------------------------------------

    def _linear(self, layer: Any, x: _Jet) -> _Jet | None:
        """A per-sample layer linear in its input: once over every block."""
        if layer.trainable_variables or layer.non_trainable_variables:
            return None
        return _Jet(layer(x.data), x.probes, x.rows)

    def _affine(
        self,
        layer: Any,
        x: _Jet,
        apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        bias_shape: tuple[int, ...],
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> _Jet | None:
        r"""Y = a(A(x; W) + b) for A bilinear in (x, W) (conv, matmul).

        With :math:`W'_k = \sigma_{W,k}`, :math:`W'' = 0`: :math:`z'_k =
        A(x'_k, W) + A(x, \sigma_{W,k}) + \sigma_{b,k}`, :math:`z'' =
        A(x'', W) + 2 \sum_k A(x'_k, \sigma_{W,k})`. ``apply(p, W)``
        takes ``prepare(x)`` (the stack, or a batch slice of it): the
        products then share its one copy.
        """
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None
        ):
            return None
        variable = layer._kernel
        count = self.count
        s_kernel = self.tangents(variable)
        data = x.data if prepare is None else prepare(x.data)
        z = apply(data, variable.value)
        if x.probes == 0:  # the first probed layer: x' = x'' = 0
            blocks = [z]
            if s_kernel is not None:
                blocks += [apply(data, sigma) for sigma in s_kernel]
            else:
                blocks += [torch.zeros_like(z)] * count
            blocks.append(torch.zeros_like(z))
            return self._bias_activation(layer, blocks, bias_shape)
        blocks = list(z.view(count + 2, x.rows, *z.shape[1:]).unbind(0))
        if s_kernel is not None:
            x0, *first = torch.split(data, x.rows)[: count + 1]
            curvature = None
            for k, sigma in enumerate(s_kernel):
                blocks[1 + k] = blocks[1 + k] + apply(x0, sigma)
                term = apply(first[k], sigma)
                curvature = term if curvature is None else curvature + term
            assert curvature is not None
            blocks[-1] = blocks[-1] + 2 * curvature
        return self._bias_activation(layer, blocks, bias_shape)

    def _bias_activation(
        self, layer: Any, blocks: list[torch.Tensor], bias_shape: tuple
    ) -> _Jet | None:
        """The activation of z + b from z's blocks (sigma_b in z'_k)."""
        bias, count = layer.bias, self.count
        if bias is not None:
            blocks[0] = blocks[0] + bias.value.reshape(bias_shape)
            s_bias = self.tangents(bias)
            if s_bias is not None:
                for k, sigma in enumerate(s_bias):
                    blocks[1 + k] = blocks[1 + k] + sigma.reshape(bias_shape)
        rows = int(blocks[0].shape[0])
        return self._activation(layer.activation, _stack(blocks, count, rows))

    def _conv(self, layer: Any, x: _Jet) -> _Jet | None:
        if type(layer).call is not keras.layers.Conv2D.call:
            return None  # Conv1D's causal padding
        if layer.data_format == "channels_last":
            shape = (1,) * (layer.rank + 1) + (layer.filters,)
        else:
            shape = (1, layer.filters) + (1,) * layer.rank
        parts = _channels_last_conv(layer)
        if parts is None:
            return self._affine(layer, x, layer.convolution_op, shape)
        return self._affine(layer, x, parts[1], shape, prepare=parts[0])

    def _dense(self, layer: Any, x: _Jet) -> _Jet | None:
        return self._affine(layer, x, keras.ops.matmul, (layer.units,))

    def _relu_layer(self, layer: Any, x: _Jet) -> _Jet | None:
        if (
            layer.max_value is not None
            or layer.negative_slope
            or layer.threshold
        ):
            return None
        return self._relu(x)

    def _relu(self, x: _Jet) -> _Jet:
        """The derivative of relu is the mask x > 0; its second one is 0."""
        if x.probes == 0:
            return _Jet(torch.relu(x.data), 0, x.rows)
        blocks = x.blocks()
        out = blocks * (x.primal > 0)  # saves the boolean mask alone
        return _Jet(out.view(x.data.shape), x.probes, x.rows)

    def _dropout(self, layer: Any, x: _Jet) -> _Jet:
        """Dropout in training mode: one mask for every coefficient.

        The layer drawing its (scaled) mask from ones makes the step's one
        draw from its seed, as a plain step's call does.
        """
        if layer.rate <= 0:
            return x
        mask = layer(torch.ones_like(x.primal), training=True)
        out = x.blocks() * mask  # saves the mask alone
        return _Jet(out.view(x.data.shape), x.probes, x.rows)

    def _activation(self, fn: Any, x: _Jet) -> _Jet | None:
        r"""An activation function a of x, coefficient by coefficient.

        :math:`y'_k = a'(x) x'_k`, :math:`y'' = a'(x) x'' + a''(x) \sum_k
        x_k'^2`: in closed form for linear, relu, tanh and sigmoid, else
        by `_generic_function`.
        """
        activations = keras.activations
        if fn is None or fn is activations.linear:
            return x
        if fn is activations.relu:
            return self._relu(x)
        if x.probes == 0:
            return _Jet(fn(x.data), 0, x.rows)
        if fn not in (activations.tanh, activations.sigmoid):
            return self._generic_function(fn, x)
        x0, first, second = x.parts()
        y = fn(x0)
        if fn is activations.tanh:
            slope = 1 - y * y
            curve = -2 * y * slope
        else:
            slope = y * (1 - y)
            curve = slope * (1 - 2 * y)
        squares = torch.sum(first * first, dim=0)
        out = [y[None], slope * first, (slope * second + curve * squares)[None]]
        return _Jet(torch.cat(out).view(x.data.shape), x.probes, x.rows)

    def _batch_norm(self, layer: Any, x: _Jet) -> _Jet | None:
        r"""BatchNormalization in training mode, with its batch moments.

        With :math:`c = x - \bar x` (means over the batch and spatial
        axes, each coefficient's own), :math:`v = \overline{c^2}`,
        :math:`r = (v + \varepsilon)^{-1/2}`: :math:`v'_k = 2
        \overline{c c'_k}`, :math:`\sum_k v''_k = 2 \overline{\sum_k
        c_k'^2 + c c''}`, :math:`r'_k = -\frac12 r^3 v'_k`, :math:`\sum_k
        r''_k = \frac34 r^5 \sum_k v_k'^2 - \frac12 r^3 \sum_k v''_k`,
        and :math:`y = \gamma c r + \beta` gives :math:`y'_k = \gamma
        (c'_k r + c r'_k) + \sigma_{\gamma,k} c r + \sigma_{\beta,k}`,
        :math:`y'' = \gamma (c'' r + \sum_k (2 c'_k r'_k + c r''_k)) + 2
        \sum_k \sigma_{\gamma,k} (c'_k r + c r'_k)`. The moving statistics
        advance from :math:`x` alone, as Keras' own call does.
        """
        if (
            getattr(layer, "renorm", False)
            or getattr(layer, "synchronized", False)
            or not layer.trainable
            or layer.compute_dtype not in ("float32", "float64")
            or x.data.dtype != getattr(torch, layer.compute_dtype)
        ):
            return None
        count, rows = self.count, x.rows
        x = x.with_probes(count)
        axis = layer.axis % (len(x.shape) + 1)
        blocks = x.blocks()  # (S, B, ...): the row axis is 1, `axis` + 1
        dims = [d for d in range(1, blocks.dim()) if d != axis + 1]
        shape = [1] * blocks.dim()
        shape[axis + 1] = blocks.shape[axis + 1]
        mean = torch.mean(blocks, dim=dims, keepdim=True)
        centred = blocks - mean
        c0, c1, c2 = _Jet(centred.view(x.data.shape), count, rows).parts()
        # The value of Keras' moments, E[x^2] - E[x]^2 (so the step's loss
        # and moving statistics are a plain step's), with the derivatives
        # of the equal E[c^2], which save c alone (saved anyway).
        inner = [d - 1 for d in dims]
        variance = torch.mean(c0 * c0, dim=inner, keepdim=True)
        with torch.no_grad():
            x0 = x.primal
            keras_variance = torch.mean(x0 * x0, dim=inner, keepdim=True)
            keras_variance -= mean[0] * mean[0]
        variance = variance + (keras_variance - variance).detach()
        with torch.no_grad():
            m = layer.momentum
            layer.moving_mean.assign(
                layer.moving_mean.value * m
                + mean[0].reshape(-1).detach() * (1.0 - m)
            )
            layer.moving_variance.assign(
                layer.moving_variance.value * m
                + variance.reshape(-1).detach() * (1.0 - m)
            )
        v1 = 2 * torch.mean(c0 * c1, dim=dims, keepdim=True)  # (K, 1...)
        v2 = 2 * torch.mean(
            torch.sum(c1 * c1, dim=0) + c0 * c2, dim=inner, keepdim=True
        )
        r = torch.rsqrt(variance + layer.epsilon)
        r3 = r * r * r
        r1 = -0.5 * r3 * v1
        r2 = 0.75 * r3 * r * r * torch.sum(v1 * v1, dim=0) - 0.5 * r3 * v2
        gamma = layer.gamma.value.reshape(shape[1:]) if layer.scale else 1.0
        beta = layer.beta.value.reshape(shape[1:]) if layer.center else 0.0
        zero = torch.zeros((), dtype=c0.dtype, device=c0.device)
        s_gamma = self.tangents(layer.gamma if layer.scale else None)
        s_beta = self.tangents(layer.beta if layer.center else None)
        sg = (
            torch.stack([s.reshape(shape[1:]) for s in s_gamma])
            if s_gamma is not None
            else zero
        )
        sb = (
            torch.stack([s.reshape(shape[1:]) for s in s_beta])
            if s_beta is not None
            else zero
        )
        scale = gamma * r
        y0 = c0 * scale + beta
        y1 = c1 * scale + c0 * (gamma * r1 + sg * r) + sb
        y2 = (
            c2 * scale
            + torch.sum(c1 * (2 * gamma * r1 + 2 * sg * r), dim=0)
            + c0 * (gamma * r2 + 2 * torch.sum(sg * r1, dim=0))
        )
        out = torch.cat([y0[None], y1, y2[None]])
        return _Jet(out.view(x.data.shape), count, rows)

    def _add(self, jets: Sequence[_Jet]) -> _Jet:
        count = max(j.probes for j in jets)
        total = None
        for j in jets:
            data = j.with_probes(count).data
            total = data if total is None else total + data
        assert total is not None
        return _Jet(total, count, jets[0].rows)

    def _generic_function(self, fn: Callable[..., Any], x: _Jet) -> _Jet:
        """A weightless function of one tensor, by `_nested_jvp`."""
        x0, first, second = x.parts()
        y, slopes, curvature = None, [], None
        for k in range(x.probes):
            # x'' rides along the first probe: y'' is linear in it.
            curve = second if k == 0 else torch.zeros_like(second)
            y0, y1, y2 = _nested_jvp(fn, (x0,), (first[k],), (curve,))
            y = y0[0] if y is None else y
            slopes.append(y1[0])
            curvature = y2[0] if curvature is None else curvature + y2[0]
        assert y is not None and curvature is not None
        return _stack([y, *slopes, curvature], x.probes, x.rows)

    def _generic(
        self, operation: Any, args: Any, kwargs: Any, weights: list[Any]
    ) -> Any:
        """Any stateless operation, by `_nested_jvp` per probe.

        Its weights and float inputs carry the tangents; other inputs
        (integer ids) enter as constants.
        """
        if getattr(operation, "non_trainable_variables", None):
            raise _Unsupported(f"stateful layer {operation.name}")
        count = self.count
        flat = keras.tree.flatten((args, kwargs))
        slots, jets = [], []
        for i, a in enumerate(flat):
            if isinstance(a, _Jet):
                if a.data.is_floating_point():
                    slots.append(i)
                    jets.append(a.with_probes(count))
                else:
                    flat[i] = a.primal
        structure: list[Any] = []

        def fn(*values: torch.Tensor) -> Any:
            w_values, x_values = values[: len(weights)], values[len(weights) :]
            filled = list(flat)
            for i, v in zip(slots, x_values):
                filled[i] = v
            a, kw = keras.tree.pack_sequence_as((args, kwargs), filled)
            mapping = list(zip(weights, w_values))
            with keras.StatelessScope(state_mapping=mapping):
                out = operation(*a, **_training(operation, kw))
            structure[:] = [keras.tree.map_structure(lambda t: None, out)]
            return out

        w0 = tuple(v.value for v in weights)
        parts = [j.parts() for j in jets]
        primals = w0 + tuple(p[0] for p in parts)
        outs = []
        for k in range(count):
            first, second = [], []
            for v in weights:
                sigma = self.tangents(v)
                zero = torch.zeros_like(v.value)
                first.append(zero if sigma is None else sigma[k])
                second.append(zero)
            first += [p[1][k] for p in parts]
            # x'' rides along the first probe: y'' is linear in it.
            second += [
                p[2] if k == 0 else torch.zeros_like(p[2]) for p in parts
            ]
            outs.append(_nested_jvp(fn, primals, tuple(first), tuple(second)))
        results = []
        for i, y in enumerate(outs[0][0]):
            curvature = outs[0][2][i]
            for o in outs[1:]:
                curvature = curvature + o[2][i]
            blocks = [y] + [o[1][i] for o in outs] + [curvature]
            results.append(_stack(blocks, count, int(y.shape[0])))
        return keras.tree.pack_sequence_as(structure[0], results)

    # -- the loss -------------------------------------------------------------

    def loss_curvature(
        self, outputs: Any, x: Any, y: Any, sample_weight: Any, scale: Any
    ) -> torch.Tensor:
        """mean_k f''_k from the outputs' jets, f = s L (loss only)."""
        jets = [j.with_probes(self.count) for j in keras.tree.flatten(outputs)]
        parts = [j.parts() for j in jets]

        def fn(*z: torch.Tensor) -> torch.Tensor:
            packed = keras.tree.pack_sequence_as(outputs, list(z))
            with keras.StatelessScope():
                loss = compat.compute_loss(
                    self.model, x, y, packed, sample_weight, True
                )
            return loss * scale.to(loss.dtype)

        total = None
        for k in range(self.count):
            # x'' rides along the first probe: f'' is linear in it.
            _, _, second = _nested_jvp(
                fn,
                tuple(p[0] for p in parts),
                tuple(p[1][k] for p in parts),
                tuple(
                    p[2] if k == 0 else torch.zeros_like(p[2]) for p in parts
                ),
            )
            total = second[0] if total is None else total + second[0]
        assert total is not None
        return total / self.count


#: Models the Taylor forward pass failed on (they keep reverse over reverse).
_REVERSE_ONLY: weakref.WeakSet[keras.Model] = weakref.WeakSet()


def _taylor_applies(model: keras.Model, plan: StepPlan) -> bool:
    """Whether the step takes t forward over forward (`_TaylorForward`).

    For the exact Hessian quadratic form of a probe that touches some
    variable, on a model without regularization losses (`_TaylorForward`
    walks the layers without their ``__call__``, which adds those) or
    mixed precision, that has not failed before.
    """
    probes = plan.probes
    if (
        not probes
        or plan.curvature != "hessian"
        or plan.epsilon is not None
        or model in _REVERSE_ONLY
        or all(s is None for probe in probes for s in probe)
    ):
        return False
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "activity_regularizer", None) is not None:
            return False
        if layer.compute_dtype != layer.variable_dtype:
            return False
    return all(
        getattr(v, "regularizer", None) is None
        for v in model.trainable_variables
    )


def _taylor_forward(
    model: keras.Model,
    x: Any,
    run: StepRun,
    probes: Sequence[Sequence[torch.Tensor | None]],
) -> tuple[Any, torch.Tensor, torch.Tensor, list[torch.Tensor]] | None:
    """(y_pred, L, s t, state) by `_TaylorForward`, or None without a rule.

    ``state``: the model's non-trainable values before the pass.

    Then the model's state (BatchNorm statistics, seeds) is put back as it
    was, the model is remembered in `_REVERSE_ONLY` and the step goes on
    by reverse over reverse.
    """
    state = [v.value.clone() for v in model.non_trainable_variables]
    try:
        taylor = _TaylorForward(model, run.params, probes)
        jets = taylor.outputs(x)
        y_pred = keras.tree.map_structure(lambda j: j.primal, jets)
        if model.losses:
            raise _Unsupported("a layer adds a loss")
        loss = compat.compute_loss(
            model, x, run.y, y_pred, run.sample_weight, True
        )
        t = taylor.loss_curvature(jets, x, run.y, run.sample_weight, run.scale)
    except Exception as error:  # no rule, no forward-mode formula, ...
        with torch.no_grad():
            for v, value in zip(model.non_trainable_variables, state):
                v.assign(value)
        _REVERSE_ONLY.add(model)
        logging.getLogger(__name__).info(
            "SEHT on %s: reverse over reverse (no forward-over-forward "
            "rule: %s)",
            model.name,
            error,
        )
        return None
    return y_pred, loss, t, state


def _watch_inputs(x: Any) -> tuple[Any, list[torch.Tensor]]:
    """`x` with its float leaves replaced by leaf tensors that need grad."""
    flat = keras.tree.flatten(x)
    leaves = []
    for i in float_inputs(x):
        flat[i] = torch.as_tensor(flat[i]).detach().requires_grad_(True)
        leaves.append(flat[i])
    return keras.tree.pack_sequence_as(x, flat), leaves


class _Context:
    """The step context (`keras_seht.context.StepContext`), eagerly.

    The forward pass runs at construction; the loss gradient, the
    quadratic forms and the input products are computed when a penalty
    first asks for them.
    """

    def __init__(self, run: StepRun, plan: StepPlan) -> None:
        model = run.model
        self.model, self.y = model, run.y
        self.sample_weight, self.scale = run.sample_weight, run.scale
        self._plan, self._params = plan, run.params
        self._pair = None
        if plan.epsilon is not None:
            self._pair = _perturbed_losses(
                model,
                run.x,
                run.y,
                run.sample_weight,
                run.params,
                plan.probes or [],
                plan.epsilon,
                run.scale,
            )
        self.weights = run.params
        self.batch_size = step.static_batch_size(run.x)
        # Before the stateful forward pass: `loss_at` sees the step's own
        # seeds and BatchNorm statistics (cloned: they change in place).
        self._non_trainable = [
            v.value.clone() if plan.shifted_losses else v.value
            for v in model.non_trainable_variables
        ]
        x, self._leaves = run.x, list[torch.Tensor]()
        if plan.input_cotangents is not None:
            x, self._leaves = _watch_inputs(x)
        self.x = x
        graph = plan.forward_graph or plan.first_order_gradient
        self._graph_freed = False
        self._first_order: list[torch.Tensor] | None = None
        self._curvature: torch.Tensor | None = None
        self._state_before: list[torch.Tensor] = []
        taylor = None
        if graph and _taylor_applies(model, plan):
            taylor = _taylor_forward(model, x, run, plan.probes or [])
        if taylor is not None:
            y_pred, loss, self._curvature, self._state_before = taylor
            model.zero_grad()
        else:
            with contextlib.nullcontext() if graph else torch.no_grad():
                if compat.call_has_training_arg(model):
                    y_pred = model(x, training=True)
                else:
                    y_pred = model(x)
                model.zero_grad()
                loss = compat.compute_loss(
                    model, x, run.y, y_pred, run.sample_weight, True
                )
        self.outputs, self.loss = y_pred, loss
        self.live_loss = loss * run.scale.to(loss.dtype)
        self.scaled_loss = (
            self.live_loss.detach() if plan.constant_loss else self.live_loss
        )
        self._gradients: dict[tuple[int, ...], list[torch.Tensor]] = {}

    def _gradient_over(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The graph-connected loss gradient over `indices`, built once."""
        key = tuple(indices)
        if key not in self._gradients:
            params = [self._params[i] for i in key]
            self._gradients[key] = _grad(self.live_loss, params, True)
        return self._gradients[key]

    def _probed(self) -> list[int]:
        """The variables whose gradient the step builds.

        All with a `loss_gradient` request, else those a probe touches.
        """
        everything = list(range(len(self._params)))
        if self._plan.loss_gradient:
            return everything
        probes = self._plan.probes or []
        return [i for i in everything if any(s[i] is not None for s in probes)]

    def loss_gradient(
        self, differentiable: bool = True, part: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """The loss gradient (see `keras_seht.context.StepContext`)."""
        everything = tuple(range(len(self._params)))
        if differentiable:
            if part is not None:
                raise ValueError("A part's loss gradient is a constant.")
            return self._gradient_over(everything)
        if part is not None:
            loss = self._loss_of(self._params, part)
            grads = _grad(loss, self._params, False, retain_graph=False)
            return [g.detach() for g in grads]
        if everything in self._gradients:
            return [g.detach() for g in self._gradients[everything]]
        if self._first_order is None:
            # The forward graph is freed here unless the objective or a
            # penalty differentiates through it later.
            keep = self._plan.forward_graph
            grads = _grad(
                self.live_loss, self._params, False, retain_graph=keep
            )
            self._first_order = [g.detach() for g in grads]
            self._graph_freed = not keep
        return self._first_order

    def _loss_of(
        self, params: Sequence[torch.Tensor], part: tuple[int, int] | None
    ) -> torch.Tensor:
        """The scaled loss at `params` on the batch (or its slice `part`)."""
        batch = functional.as_tensors(self.x, self.y, self.sample_weight)
        if part is not None:
            start, stop = part
            batch = keras.tree.map_structure(
                lambda t: None if t is None else t[start:stop], batch
            )
        loss = functional.stateless_loss(
            self.model, params, self._non_trainable, *batch, training=True
        )[0]
        return loss * self.scale.to(loss.dtype)

    def loss_at(
        self, shift: list[Any], part: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """f(w + shift), differentiated at once (one graph alive at a time)."""
        params = self._params
        shifted = functional.shifted(params, [s.detach() for s in shift], 1.0)
        loss = self._loss_of(shifted, part)
        grads = _grad(loss, params, False, retain_graph=False)
        return _KnownGradient.apply(loss.detach(), *params, *grads)

    def quadratic_form(self) -> torch.Tensor:
        if self._curvature is not None:  # forward over forward
            return self._curvature
        probes = self._plan.probes or []
        params = self._params
        if self._plan.curvature == "gauss_newton":
            everything = range(len(params))
            return gauss_newton_estimate(
                self.model,
                self.y,
                self.outputs,
                self.sample_weight,
                params,
                [_densify(s, params, everything) for s in probes],
                self.scale,
            )
        touched = self._probed()
        if not touched:  # no layer drawn: t = 0 exactly
            return torch.zeros_like(self.live_loss)
        return probe_estimate(
            self._gradient_over(touched),
            [params[i] for i in touched],
            [_densify(s, params, touched) for s in probes],
            True,
        )

    def perturbed_loss(self) -> torch.Tensor:
        if self._pair is None:
            raise ValueError("The step's plan has no finite-difference step.")
        return self._pair

    def input_products(self) -> list[list[torch.Tensor]]:
        z = flatten_outputs(self.outputs)
        return [
            _grad(torch.sum(v.to(z.dtype) * z), self._leaves, True)
            for v in self._plan.input_cotangents or []
        ]


def _model_state(model: keras.Model) -> list[Any]:
    """The model's non-trainable float variables (BatchNorm statistics).

    Seed-generator states (integers) are left out: they advance alike on
    every worker.
    """
    return [
        v
        for v in model.non_trainable_variables
        if keras.backend.is_float_dtype(v.dtype)
    ]


def _metric_variables(model: keras.Model) -> list[Any]:
    """The state variables of the metrics the step updates locally.

    Those of the compiled metrics and losses (and any other metric of the
    model), not the ``loss`` and ``seht_*`` trackers: the step feeds
    those the workers' means already.
    """
    skip = {id(compat.loss_tracker(model))}
    skip.update(id(t) for t in getattr(model, "_seht_trackers", None) or ())
    found: dict[int, Any] = {}
    for metric in model.metrics:
        if id(metric) not in skip:
            for v in metric.variables:
                found.setdefault(id(v), v)
    return list(found.values())


class StepRun:
    """The primitives of one eager train step (`keras_seht.step.StepRun`).

    Probes are sparse: the step leaves the variables of undrawn layers out
    of every derivative.

    With several workers (`keras_seht.distributed`), `all_reduce_mean`
    averages the step's gradients, values and loss, and `apply` makes the
    metrics and the BatchNorm statistics global (see `apply`).
    """

    sparse_probes = True

    def __init__(self, model: keras.Model, data: Any) -> None:
        self.model = model
        self.x, self.y, self.sample_weight = (
            keras.utils.unpack_x_y_sample_weight(data)
        )
        self.trainable = model.trainable_weights[:]
        self.params = [v.value for v in self.trainable]
        first = self.params[0]
        one = torch.ones((), dtype=first.dtype, device=first.device)
        self.scale = torch.as_tensor(model.optimizer.scale_loss(one)).detach()
        self._context: _Context | None = None
        self._objective: Any = None
        self._unneeded: list[torch.Tensor] | None = None
        self.workers = distributed.world_size()
        self._state: list[Any] = []
        self._state_before: list[torch.Tensor] = []
        if self.workers > 1:
            # Before the forward pass, which moves the BatchNorm statistics.
            self._state = _model_state(model)
            self._state_before = [v.value.clone() for v in self._state]

    def all_reduce_mean(self, tensors: Any) -> Any:
        """The mean over the workers of a structure of tensors.

        One ``torch.distributed.all_reduce`` per dtype over a flattened
        buffer (`keras_seht.distributed.all_reduce_mean`). `tensors`
        itself (no work) with one worker, and for the placeholder zeros
        that `loss_gradients` returns where it was not needed (every
        worker decided so alike).
        """
        if self.workers == 1 or tensors is self._unneeded:
            return tensors
        flat = keras.tree.flatten(tensors)
        return keras.tree.pack_sequence_as(
            tensors, distributed.all_reduce_mean(flat)
        )

    def differentiate(
        self,
        make_plan: Callable[[Callable[[], Any]], StepPlan],
        evaluate: Callable[[Any], tuple[list[Any], Any]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass and the objective's gradient; see `StepRun`."""
        plan = make_plan(lambda: step.output_shape(self.model, self.x))
        self._context = _Context(self, plan)
        values, self._objective = evaluate(self._context)
        self.x = self._context.x
        return self._context.loss.detach(), [v.detach() for v in values]

    def objective_gradients(self, finite: Any) -> list[torch.Tensor]:
        """The objective's gradient g; see `StepRun.objective_gradients`.

        Not computed (NaN) where `finite` is False. Its backward frees the
        forward graph.
        """
        context = self._context
        assert context is not None  # differentiate ran
        if not bool(finite):
            return [torch.full_like(p, float("nan")) for p in self.params]
        objective = context.scaled_loss
        if self._objective is not None:  # None without penalties
            objective = objective + self._objective
        grads = _grad(objective, self.params, False, retain_graph=False)
        context._graph_freed = True
        return grads

    def loss_gradients(self, needed: Any = None) -> list[torch.Tensor]:
        """The plain loss gradient g_L; see `StepRun.loss_gradients`.

        The context's own where it has it (the graph-connected gradient
        of every variable, or the first-order one); else a backward of the
        step's forward graph (kept for the objective's backward), or, with
        no graph left or a Taylor forward pass, of a stateless forward
        pass.
        """
        params = self.params
        if needed is not None and not bool(needed):
            self._unneeded = [torch.zeros_like(p) for p in params]
            return self._unneeded
        context = self._context
        assert context is not None
        everything = tuple(range(len(params)))
        if everything in context._gradients:
            return [g.detach() for g in context._gradients[everything]]
        if context._first_order is not None:
            return context._first_order
        if context._curvature is not None:
            # The Taylor pass's products mix the probes' coefficients into
            # the loss's (a NaN probe would make g_L NaN): a plain
            # stateless pass at the step's own state instead.
            loss = functional.stateless_loss(
                self.model,
                params,
                context._state_before,
                self.x,
                self.y,
                self.sample_weight,
                True,
            )[0]
            return _grad(loss * self.scale, params, False, retain_graph=False)
        loss = context.live_loss
        if not loss.requires_grad or context._graph_freed:  # no graph left
            nt = [v.value for v in self.model.non_trainable_variables]
            loss = (
                self.scale
                * functional.stateless_loss(
                    self.model,
                    params,
                    nt,
                    self.x,
                    self.y,
                    self.sample_weight,
                    True,
                )[0]
            )
            return _grad(loss, params, False, retain_graph=False)
        return [g.detach() for g in _grad(loss, params, False)]

    def apply(
        self,
        gradients: list[torch.Tensor],
        total: Any,
        values: list[Any],
        guard: step.Guard,
    ) -> Any:
        r"""Applies the optimizer, trackers and metrics; see `StepRun.apply`.

        With :math:`K` workers, then one ``all_reduce`` (sum) of this
        step's changes :math:`\Delta_k` of the compiled metrics' state
        variables and of the model's non-trainable float variables
        (`_model_state`): a metric variable becomes :math:`v +
        \sum_k \Delta_k` (metric states are sums over samples, so the
        metrics are those of the global batch, exactly), a BatchNorm
        statistic :math:`v + \frac1K \sum_k \Delta_k` (the same on
        every worker; for a moving mean, the single-process update on the
        global batch). A variable the step left alone keeps its value
        bit for bit (:math:`\Delta_k = 0`).
        """
        context = self._context
        assert context is not None
        model = self.model
        step.update_trackers(model, self.x, total, values, guard)
        if guard.applied is None or bool(guard.applied):
            with torch.no_grad():
                model.optimizer.apply(gradients, self.trainable)
        self._context = self._objective = None
        if self.workers == 1:
            return model.compute_metrics(
                self.x, self.y, context.outputs, self.sample_weight
            )
        metrics = _metric_variables(model)
        metrics_before = [v.value.clone() for v in metrics]
        model.compute_metrics(
            self.x, self.y, context.outputs, self.sample_weight
        )
        self._add_changes(metrics, metrics_before)
        return model.get_metrics_result()

    def _add_changes(self, metrics: list[Any], before: list[Any]) -> None:
        """Adds the workers' summed changes of the metrics (`apply`).

        And their mean changes of the model's state, and of a metric
        variable declared with ``aggregation="mean"``.
        """
        variables = metrics + self._state
        before = before + self._state_before
        averaged = [
            i >= len(metrics) or getattr(v, "aggregation", "sum") == "mean"
            for i, v in enumerate(variables)
        ]
        with torch.no_grad():
            changes = [v.value - b for v, b in zip(variables, before)]
            summed = distributed.all_reduce_sum(changes)
            for v, b, d, mean in zip(variables, before, summed, averaged):
                v.assign(b + (d / self.workers if mean else d).to(b.dtype))


# --------------------------------------------------------------------------
# Diagnostics: curvature products at a fixed batch (keras_seht.operators)
# --------------------------------------------------------------------------


def _flat(
    tensors: Sequence[torch.Tensor], rows: int | None = None
) -> torch.Tensor:
    """Concatenation of flattened tensors (keeping `rows` leading rows)."""
    if rows is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


class CurvatureProducts:
    r"""Curvature products of the compiled loss at a fixed batch.

    One forward pass, statelessly at copies of the current weights
    (``functional.stateless_loss``: no variable, BatchNorm statistic or
    seed of the model changes), whose graph every product reuses. With
    :math:`L(w)` the compiled loss (with ``model.losses``), :math:`z(w)`
    every output entry of the batch flattened (:math:`M` of them) and
    :math:`\ell(z)` the loss given to ``compile``:

    - ``hvp(v)`` :math:`= \nabla_w^2 L\,v`, reverse over reverse;
      ``hvp_rows(V)`` the same for each row of a (k, n) flat ``V``
      (``is_grads_batched``);
    - ``jvp(v)`` :math:`= Jv \in \mathbb{R}^M`, :math:`J = \partial z /
      \partial w`, as the derivative in :math:`u` of :math:`(J^\top u)
      \cdot v` (two reverse passes, no forward mode needed);
    - ``vjp(u)`` :math:`= J^\top u`; ``vjp_rows(U)`` for each row of
      a (k, M) ``U``, flat (k, n);
    - ``output_hvp(u)`` :math:`= \nabla_z^2 \ell\,u` at :math:`z(w)`;
      ``output_hvp_rows(U)`` for each row of a (k, M) ``U``. Softmax and
      sigmoid outputs with a probability cross-entropy are split at the
      logits (`keras_seht.output_split`): there :math:`\ell` is the
      surrogate whose Hessian gives the canonical Gauss-Newton matrix.

    Weight-space vectors are lists of tensors, one per trainable
    variable; batched ones, and output-space ones, flat tensors.
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        training: bool = False,
    ) -> None:
        self._model = model
        self._y = y
        self._sample_weight = sample_weight
        self.params = [
            v.value.detach().clone().requires_grad_(True)
            for v in model.trainable_variables
        ]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with torch.enable_grad():
            self._loss, self._y_pred, _ = functional.stateless_loss(
                model, self.params, non_trainable, x, y, sample_weight, training
            )
            self._outputs = _flat(keras.tree.flatten(self._y_pred))
        self.num_outputs = int(self._outputs.numel())
        self._grads: list[torch.Tensor] | None = None
        self._dummy: torch.Tensor | None = None
        self._transposed: list[torch.Tensor] | None = None
        self._z: torch.Tensor | None = None
        self._output_grad: torch.Tensor | None = None

    @property
    def loss(self) -> float:
        """The loss L(w) at the frozen weights."""
        return float(self._loss.detach())

    def _gradient(self) -> list[torch.Tensor]:
        """The gradient g = dL/dw, differentiable (made on first use)."""
        if self._grads is None:
            with torch.enable_grad():
                self._grads = _grad(self._loss, self.params, True)
        return self._grads

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v = d(g . v)/dw, one tensor per variable."""
        grads = self._gradient()
        with torch.enable_grad():
            dot = sum(torch.sum(g * v) for g, v in zip(grads, vectors))
            assert isinstance(dot, torch.Tensor)
            out = _grad(dot, self.params, False)
        return [o.detach() for o in out]

    def hvp_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, n): row b is H v_b for row v_b of `rows`, flattened."""
        flat = _flat(self._gradient())
        with torch.enable_grad():
            out = _grad(flat, self.params, False, rows, batched=True)
        return _flat(out, rows.shape[0]).detach()

    def jvp(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """J v, (M,): d/du of (J^T u) . v, linear in u."""
        if self._transposed is None:
            with torch.enable_grad():
                self._dummy = torch.zeros_like(
                    self._outputs, requires_grad=True
                )
                self._transposed = _grad(
                    self._outputs, self.params, True, self._dummy
                )
        assert self._dummy is not None
        with torch.enable_grad():
            dot = sum(
                torch.sum(t * v) for t, v in zip(self._transposed, vectors)
            )
            assert isinstance(dot, torch.Tensor)
            (out,) = _grad(dot, [self._dummy], False)
        return out.detach()

    def vjp(self, cotangent: torch.Tensor) -> list[torch.Tensor]:
        """J^T u, one tensor per variable."""
        u = cotangent.to(self._outputs.dtype)
        with torch.enable_grad():
            out = _grad(self._outputs, self.params, False, u)
        return [o.detach() for o in out]

    def vjp_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, n): row b is J^T u_b for row u_b of `rows`, flattened."""
        u = rows.to(self._outputs.dtype)
        with torch.enable_grad():
            out = _grad(self._outputs, self.params, False, u, batched=True)
        return _flat(out, rows.shape[0]).detach()

    def _output_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, d ell / dz), differentiable in the leaf z (made once)."""
        if self._z is None or self._output_grad is None:
            leaves = keras.tree.flatten(self._y_pred)
            z = self._outputs.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                pieces, offset = [], 0
                for leaf in leaves:
                    pieces.append(z[offset : offset + leaf.numel()])
                    pieces[-1] = pieces[-1].view_as(leaf)
                    offset += leaf.numel()
                packed = keras.tree.pack_sequence_as(self._y_pred, pieces)
                reference = keras.tree.map_structure(
                    lambda t: t.detach(), self._y_pred
                )
                loss = output_split.gauss_newton_loss(
                    self._model, self._y, packed, self._sample_weight, reference
                )
                (self._output_grad,) = _grad(loss, [z], True)
            self._z = z
        return self._z, self._output_grad

    def output_hvp(self, u: torch.Tensor) -> torch.Tensor:
        """H_z u, (M,)."""
        z, grad = self._output_gradient()
        with torch.enable_grad():
            (out,) = _grad(grad, [z], False, u.to(z.dtype))
        return out.detach()

    def output_hvp_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, M): row b is H_z u_b for row u_b of `rows`."""
        z, grad = self._output_gradient()
        u = rows.to(z.dtype)
        with torch.enable_grad():
            (out,) = _grad(grad, [z], False, u, batched=True)
        return out.detach()
