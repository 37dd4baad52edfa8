r"""Hessian traces and diagonals of a compiled model's loss.

All functions evaluate the Hessian of the model's compiled loss (including
``model.losses``) on one fixed batch, with respect to its trainable weights,
at the current weights. They never modify the model: no weight, BatchNorm
statistic or random seed of the model changes.

By default the forward pass runs in inference mode (``training=False``:
BatchNorm uses its moving statistics and Dropout is off), which makes the
loss a deterministic function of the weights. Pass ``training=True`` for
the training-mode loss that the train step regularizes.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_seht import operators, regularizers, spectrum
from keras_seht._checks import check_choice, check_int
from keras_seht._checks import seed_generator as seed_generator_for
from keras_seht.estimators import CURVATURES, SEHTH, CurvatureEstimator
from keras_seht.layout import weight_layout
from keras_seht.operators import (
    GaussNewtonOperator,
    HessianOperator,
    check_dense_size,
    check_exact_size,
    prepare_batch,
)

#: Above this many trainable weights `exact_hessian_trace` refuses to run
#: unless forced: it costs one Hessian row per weight.
MAX_EXACT_WEIGHTS = operators.MAX_EXACT_WEIGHTS

#: `gauss_newton_factors` refuses batches whose dense factors (output
#: Jacobian and output Hessian) would hold more entries unless forced.
MAX_JACOBIAN_ENTRIES = operators.MAX_DENSE_ENTRIES


def hessian_trace(
    model: keras.Model,
    x: Any,
    y: Any,
    estimator: Any = None,
    samples: int = 100,
    seed: int | None = 0,
    sample_weight: Any = None,
    training: bool = False,
    return_std_error: bool = False,
    verbose: int = 0,
) -> float | tuple[float, float]:
    r"""Monte-Carlo estimate of the Hessian trace with a SEHT estimator.

    Averages ``samples`` independent draws of the estimator's
    :math:`t = \frac{1}{K}\sum_{k=1}^{K} \sigma_k^\top H \sigma_k`
    (``K = estimator.max_iter``) on the batch ``(x, y)``: the probes are
    the estimator's (``estimator.sample_probes``), the quadratic forms
    and the standard error those of `keras_seht.spectrum`
    (`spectrum.quadratic_forms`, `spectrum.mean_and_std_error`) on
    `keras_seht.operators.HessianOperator`, one Hessian-vector product
    per probe. With an estimator of ``curvature="gauss_newton"``,
    :math:`H` is the Gauss-Newton matrix :math:`G = J^\top H_z J`
    (`keras_seht.operators.GaussNewtonOperator`: a Jacobian-vector
    product, an output-space Hessian-vector product and a vector-Jacobian
    product per probe, never a dense Jacobian), and the result estimates
    its trace instead. ``clip_negative`` does not apply: this is the raw
    :math:`t`.
    The result estimates ``estimator.expectation(...)``: the full trace
    for `SEHTH` and for ``SEHTD(unbiased=True)``, a weighted partial trace
    otherwise.

    Args:
        model: A compiled Keras model.
        x: The batch's inputs (array-likes or tensors).
        y: Its targets.
        estimator: An estimator, registry name or config; default `SEHTH`.
        samples: Number of estimator draws to average.
        seed: Seed of the probes (int), or None for the global Keras seed.
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.
        return_std_error: Also return the standard error of the mean.
        verbose: 1 shows a progress bar.

    Returns:
        The mean estimate as a float, or ``(mean, standard_error)``.

    Example:
    One-hot inputs to a single sigmoid unit give a diagonal Hessian
    (:math:`\sum_i p_i(1 - p_i)\,x_i x_i^\top`), and on a diagonal
    Hessian every Rademacher probe is exact, :math:`\sigma^\top H \sigma
    = \sum_i H_{ii}\sigma_i^2 = \operatorname{tr}(H)`:

    >>> import keras, keras_seht, numpy as np
    >>> model = keras_seht.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(1, activation="sigmoid", use_bias=False)])
    >>> model.compile(loss="binary_crossentropy")
    >>> x = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    >>> y = np.array([[0.0], [1.0], [1.0], [0.0]])
    >>> t, std_error = keras_seht.hessian_trace(
    ...     model, x, y, samples=10, return_std_error=True)
    >>> exact = keras_seht.exact_hessian_trace(model, x, y)
    >>> bool(abs(t - exact) < 1e-4 * exact), bool(std_error < 1e-4 * exact)
    (True, True)
    """
    estimator = regularizers.get(estimator) or SEHTH(max_iter=1)
    if not isinstance(estimator, CurvatureEstimator):
        raise ValueError(
            "`estimator` must be a curvature estimator (SEHTH, SEHTD). "
            f"Received: estimator={estimator!r}"
        )
    samples = check_int("samples", samples)
    curvature = (
        GaussNewtonOperator
        if estimator.curvature == "gauss_newton"
        else HessianOperator
    )
    operator = curvature(model, x, y, sample_weight, training)
    layout = weight_layout(model)
    seed_generator = seed_generator_for(seed)
    dtype = model.trainable_variables[0].dtype

    def probes() -> Any:
        for _ in range(estimator.max_iter):
            yield estimator.sample_probes(layout, seed_generator, dtype)

    progbar = keras.utils.Progbar(samples) if verbose else None
    draws = []
    for i in range(samples):
        values = spectrum.quadratic_forms(operator, operator.shapes, probes())
        draws.append(float(np.mean(values)))
        if progbar is not None:
            progbar.update(i + 1, [("trace", float(np.mean(draws)))])
    mean, std_error = spectrum.mean_and_std_error(draws)
    return (mean, std_error) if return_std_error else mean


def hessian_diagonal(
    model: keras.Model,
    x: Any,
    y: Any,
    method: str = "exact",
    samples: int = 100,
    seed: int | None = 0,
    sample_weight: Any = None,
    training: bool = False,
    max_weights: int = MAX_EXACT_WEIGHTS,
    force: bool = False,
    verbose: int = 0,
) -> list[np.ndarray]:
    r"""The diagonal of the loss Hessian, one array per trainable variable.

    ``method="exact"`` computes every diagonal entry from batched rows of
    the Hessian (one Hessian-vector product per weight). ``"hutchinson"``
    averages :math:`\sigma \odot H\sigma` over ``samples`` Rademacher probes,
    an unbiased estimate (Bekas et al., 2007) at ``samples`` HVPs.

    Args:
        model: A compiled Keras model.
        x: The batch's inputs.
        y: Its targets.
        method: ``"exact"`` or ``"hutchinson"``.
        samples: Probes for ``"hutchinson"``.
        seed: Seed of the probes.
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.
        max_weights: ``"exact"`` refuses larger models unless ``force``.
        force: Run ``"exact"`` whatever the model size.
        verbose: For ``"exact"``: 0 silent (default), 1 a Keras progress
            bar over the Hessian rows (minutes near the size limit), 2
            one line at the end.

    Returns:
        NumPy arrays shaped and ordered like ``model.trainable_variables``.

    Example:
    For a linear model with the mean squared error,
    :math:`L = \frac{1}{N}\sum_n (w^\top x_n + b - y_n)^2`, the diagonal
    is :math:`\frac{2}{N}\sum_n x_{ni}^2` for the kernel and 2 for the
    bias:

    >>> import keras, keras_seht, numpy as np
    >>> model = keras_seht.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(loss="mse")
    >>> x = np.arange(12, dtype="float32").reshape(4, 3) / 10
    >>> kernel, bias = keras_seht.hessian_diagonal(model, x, np.zeros((4, 1)))
    >>> kernel.shape, bias.shape
    ((3, 1), (1,))
    >>> bool(np.allclose(kernel[:, 0], 2 * np.mean(x**2, axis=0)))
    True
    >>> bool(np.allclose(bias, 2.0))
    True
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(
            "`method` must be 'exact' or 'hutchinson'. Received: "
            f"method={method!r}"
        )
    verbose = operators.check_verbose(verbose)
    x, y, sample_weight = prepare_batch(model, x, y, sample_weight)
    if method == "exact":
        check_exact_size(operators.num_weights(model), max_weights, force)
    hessian = HessianOperator(model, x, y, sample_weight, training)
    if method == "exact":
        return hessian.diagonal(verbose=verbose)
    samples = check_int("samples", samples)
    layout = weight_layout(model)
    seed_generator = seed_generator_for(seed)
    dtype = model.trainable_variables[0].dtype
    probes = (
        SEHTH().sample_probes(layout, seed_generator, dtype)
        for _ in range(samples)
    )
    diagonal = spectrum.hutchinson_diagonal(hessian, hessian.shapes, probes)
    return [d.astype("float32") for d in diagonal]


def exact_hessian_trace(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    training: bool = False,
    max_weights: int = MAX_EXACT_WEIGHTS,
    force: bool = False,
    curvature: str = "hessian",
    verbose: int = 0,
) -> float:
    r"""The exact trace of the loss Hessian (or of its Gauss-Newton part).

    The reference the estimators are tested against. For
    ``curvature="hessian"`` it is the sum of the exact Hessian diagonal,
    at one Hessian-vector product per trainable weight (computed in
    batches). For ``"gauss_newton"`` it is

    .. math::

        \operatorname{tr}(J^\top H_z J)
            = \sum_{k,l} (H_z)_{kl} \, (J J^\top)_{kl},

    from the dense output Jacobian and output Hessian
    (`gauss_newton_factors`; one reverse pass per output entry of the
    batch; ``model.losses`` are not part of it). Refuses models with more
    than ``max_weights`` weights unless ``force=True``.

    Args:
        model: A compiled Keras model.
        x: The batch's inputs.
        y: Its targets.
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.
        max_weights: Size limit (default 20,000 weights).
        force: Run whatever the model size.
        curvature: ``"hessian"`` or ``"gauss_newton"``.
        verbose: For ``"hessian"``: 0 silent (default), 1 a Keras
            progress bar over the Hessian rows, 2 one line at the end.

    Returns:
        The trace as a float.

    Example:
    A linear model with the mean squared error has the Hessian trace
    :math:`\frac{2}{N}\sum_n \lVert x_n\rVert^2 + 2` (kernel, bias), and
    its Hessian is its Gauss-Newton matrix:

    >>> import keras, keras_seht, numpy as np
    >>> model = keras_seht.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(loss="mse")
    >>> x = np.arange(12, dtype="float32").reshape(4, 3) / 10
    >>> y = np.zeros((4, 1))
    >>> exact = keras_seht.exact_hessian_trace(model, x, y)
    >>> bool(np.isclose(exact, 2 * np.mean(np.sum(x**2, axis=1)) + 2))
    True
    >>> gauss_newton = keras_seht.exact_hessian_trace(
    ...     model, x, y, curvature="gauss_newton")
    >>> bool(np.isclose(gauss_newton, exact))
    True
    """
    check_choice("curvature", curvature, CURVATURES)
    verbose = operators.check_verbose(verbose)
    if curvature == "gauss_newton":
        jacobian, output_hessian = gauss_newton_factors(
            model,
            x,
            y,
            sample_weight=sample_weight,
            training=training,
            max_weights=max_weights,
            force=force,
        )
        return float(np.sum(output_hessian * (jacobian @ jacobian.T)))
    diagonal = hessian_diagonal(
        model,
        x,
        y,
        method="exact",
        sample_weight=sample_weight,
        training=training,
        max_weights=max_weights,
        force=force,
        verbose=verbose,
    )
    return float(sum(np.sum(d, dtype="float64") for d in diagonal))


def gauss_newton_factors(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    training: bool = False,
    max_weights: int = MAX_EXACT_WEIGHTS,
    force: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The dense factors of the generalized Gauss-Newton matrix.

    .. math::

        G = J^\top H_z J, \qquad J = \frac{\partial z}{\partial w}
        \in \mathbb{R}^{M\times n}, \quad
        H_z = \nabla_z^2 \ell(z) \in \mathbb{R}^{M \times M},

    with :math:`z` every output entry of the batch (flattened, ``M`` of
    them), :math:`w` the ``n`` trainable weights (in
    ``model.trainable_variables`` order, each flattened) and :math:`\ell`
    the loss given to ``compile`` (without ``model.losses``). An output
    that ends in softmax (sigmoid) with a cross-entropy of probabilities
    is split at the logits (`keras_seht.output_split`): its block of
    :math:`H_z` is the Hessian of the surrogate :math:`\psi` there
    (:math:`c_n W_n \operatorname{diag}(1/p_n)` for a softmax sample), so
    that :math:`J^\top H_z J` is the canonical Gauss-Newton matrix
    :math:`\sum_n W_n c_n J_{z,n}^\top (\operatorname{diag}(p_n) - p_n
    p_n^\top) J_{z,n}` of the logits, while :math:`J` stays the Jacobian
    of the outputs the model returns. Costs one reverse pass per output
    entry. No state of the model changes.

    Args:
        model: A compiled Keras model.
        x: The batch's inputs.
        y: Its targets.
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.
        max_weights: Refuse more trainable weights unless ``force``.
        force: Run whatever the size.

    Returns:
        ``(J, H_z)`` as float64 NumPy arrays.

    Example:
    Four samples through ``Dense(1)`` (3 kernel weights and a bias) give
    four outputs; the mean squared error has :math:`H_z = \frac{2}{N} I`:

    >>> import keras, keras_seht, numpy as np
    >>> model = keras_seht.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(loss="mse")
    >>> x = np.arange(12, dtype="float32").reshape(4, 3) / 10
    >>> y = np.zeros((4, 1))
    >>> jacobian, output_hessian = keras_seht.gauss_newton_factors(model, x, y)
    >>> jacobian.shape, output_hessian.shape
    ((4, 4), (4, 4))
    >>> bool(np.allclose(output_hessian, 0.5 * np.eye(4)))
    True
    >>> bool(np.allclose(jacobian[:, :3], x))  # d(w.x + b)/dw = x
    True
    """
    x, y, sample_weight = prepare_batch(model, x, y, sample_weight)
    check_dense_size(
        operators.num_outputs(model, x),
        operators.num_weights(model),
        max_weights,
        force,
    )
    return GaussNewtonOperator(model, x, y, sample_weight, training).factors()
