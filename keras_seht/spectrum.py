r"""Curvature diagnostics as functions of a matrix-vector product.

In the style of curvlinops, the estimators here only ever touch a symmetric
linear operator :math:`A` (typically the loss Hessian :math:`H`) through a
``matvec`` callable, so one implementation serves every Keras backend:

- `hutchinson_trace`: Hutchinson's estimate of :math:`\operatorname{tr}(A)`;
- `hutchpp_trace`: Hutch++, a low-rank deflated, lower-variance version;
- `top_eigenvalue`: the largest-magnitude eigenvalue, by power iteration;
- `quadratic_forms` and `hutchinson_diagonal`: :math:`\sigma^\top A
  \sigma` and :math:`\sigma \odot A\sigma` for given probes (those of a
  SEHT estimator, say), and `mean_and_std_error` to average them.

A ``matvec`` maps a list of arrays, one per trainable variable (shaped like
``shapes``), to a list of arrays of the same shapes. The estimators draw
their probes with ``numpy.random.default_rng(seed)`` and do their linear
algebra in float64 NumPy on the flattened vectors; the arrays handed to
``matvec`` are float64 NumPy arrays, and it may return NumPy arrays or
backend tensors.

`hessian_top_eigenvalue` and `hessian_trace_hutchpp` apply them to the
Hessian of a compiled model's loss on one batch
(`keras_seht.operators.HessianOperator`), as `keras_seht.hessian`,
`CurvatureMonitor` and `HessianReinit` do. Like the functions of
`keras_seht.hessian`, they never modify the model (weights, BatchNorm
statistics, seeds).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Iterable, Sequence

import keras
import numpy as np

from keras_seht import operators
from keras_seht._checks import check_int

#: A matrix-vector product: one array per variable in, the same shapes out.
Matvec = Callable[[list[np.ndarray]], Sequence[Any]]


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            f"`seed` must be an integer >= 0 or None. Received: {seed!r}"
        )
    if seed < 0:
        raise ValueError(
            f"`seed` must be an integer >= 0 or None. Received: {seed}"
        )
    return int(seed)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise ValueError(
            f"`tol` must be a finite number >= 0. Received: {tol!r}"
        )
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"`tol` must be a finite number >= 0. Received: {tol}")
    return float(tol)


def _check_shapes(shapes: Any) -> list[tuple[int, ...]]:
    message = (
        "`shapes` must be a non-empty sequence of shapes (tuples of "
        "integers >= 0) with at least one element in total. "
        f"Received: {shapes!r}"
    )
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
        raise ValueError(message)
    out = []
    for shape in shapes:
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (shape,)
        try:
            dims = tuple(shape)
        except TypeError:
            raise ValueError(message) from None
        for dim in dims:
            if (
                isinstance(dim, bool)
                or not isinstance(dim, (int, np.integer))
                or dim < 0
            ):
                raise ValueError(message)
        out.append(tuple(int(d) for d in dims))
    if not out or sum(math.prod(s) for s in out) == 0:
        raise ValueError(message)
    return out


class _FlatOperator:
    """``matvec`` seen as a map of flat float64 vectors of length ``n``."""

    def __init__(self, matvec: Matvec, shapes: Any) -> None:
        if not callable(matvec):
            raise ValueError(
                f"`matvec` must be callable. Received: {type(matvec).__name__}"
            )
        self.matvec = matvec
        self.shapes = _check_shapes(shapes)
        self.sizes = [math.prod(s) for s in self.shapes]
        self.n = sum(self.sizes)
        self.calls = 0

    def flatten(self, vectors: Sequence[Any]) -> np.ndarray:
        """A vector of arrays or tensors, one per shape, as flat float64."""
        pieces = list(vectors)
        if len(pieces) != len(self.shapes):
            raise ValueError(
                f"A probe must hold {len(self.shapes)} arrays, one per shape "
                f"in `shapes`. Received: {len(pieces)}."
            )
        flat = [
            np.asarray(operators.to_numpy(p), "float64").reshape(-1)
            for p in pieces
        ]
        for i, (piece, size) in enumerate(zip(flat, self.sizes)):
            if piece.size != size:
                raise ValueError(
                    f"The probe's array at position {i} has {piece.size} "
                    f"elements, where `shapes` has {self.shapes[i]}."
                )
        return np.concatenate(flat)

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        """A flat vector as one array per shape."""
        pieces, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            pieces.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return pieces

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        outputs = list(self.matvec(self.unflatten(flat)))
        self.calls += 1
        if len(outputs) != len(self.shapes):
            raise ValueError(
                f"`matvec` must return {len(self.shapes)} arrays, one per "
                f"shape in `shapes`. It returned {len(outputs)}."
            )
        flat_out = []
        for i, (out, size) in enumerate(zip(outputs, self.sizes)):
            out = np.asarray(operators.to_numpy(out), "float64").reshape(-1)
            if out.size != size:
                raise ValueError(
                    f"`matvec` returned an array of {out.size} elements at "
                    f"position {i}, where `shapes` has {self.shapes[i]}."
                )
            flat_out.append(out)
        return np.concatenate(flat_out)


def _rademacher(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 2, size=shape).astype("float64") * 2.0 - 1.0


# --------------------------------------------------------------------------
# Backend-neutral estimators
# --------------------------------------------------------------------------


def quadratic_forms(
    matvec: Matvec,
    shapes: Sequence[Sequence[int]],
    probes: Iterable[Sequence[Any]],
) -> np.ndarray:
    r"""The quadratic forms :math:`\sigma_k^\top A \sigma_k` of given probes.

    One matvec per probe; the products are taken in float64. For probes
    with :math:`E[\sigma\sigma^\top] = I` (Rademacher: `hutchinson_trace`)
    each value is an unbiased estimate of :math:`\operatorname{tr}(A)`;
    for a SEHT estimator's probes, of its ``expectation``.

    Args:
        matvec: The product :math:`v \mapsto A v`, on lists of arrays.
        shapes: The shape of each array of a vector.
        probes: An iterable of probes, each a list of arrays or tensors
            shaped like ``shapes``. It is consumed one probe at a time,
            each after the previous product.

    Returns:
        The values, a float64 array with one entry per probe.

    Example:
    >>> import numpy as np
    >>> a = np.array([[2.0, 1.0], [1.0, 3.0]])
    >>> quadratic_forms(lambda v: [a @ v[0]], [(2,)],
    ...                 [[np.array([1.0, 1.0])], [np.array([1.0, -1.0])]])
    array([7., 3.])
    """
    op = _FlatOperator(matvec, shapes)
    values = []
    for probe in probes:
        sigma = op.flatten(probe)
        values.append(float(sigma @ op(sigma)))
    return np.asarray(values, "float64")


def mean_and_std_error(values: Any) -> tuple[float, float]:
    r"""The mean of i.i.d. draws and its standard error.

    .. math::

        \bar t = \frac{1}{m} \sum_k t_k, \qquad
        \operatorname{se} = \frac{s}{\sqrt m}, \quad
        s^2 = \frac{1}{m - 1} \sum_k (t_k - \bar t)^2,

    with ``inf`` as the standard error of a single draw.

    Args:
        values: The draws :math:`t_k` (a non-empty sequence of numbers).

    Returns:
        ``(mean, standard_error)`` as floats.
    """
    values = np.asarray(values, "float64").reshape(-1)
    if values.size == 0:
        raise ValueError("`values` must hold at least one draw.")
    mean = float(np.mean(values))
    if values.size == 1:
        return mean, float("inf")
    return mean, float(np.std(values, ddof=1) / math.sqrt(values.size))


def hutchinson_diagonal(
    matvec: Matvec,
    shapes: Sequence[Sequence[int]],
    probes: Iterable[Sequence[Any]],
) -> list[np.ndarray]:
    r"""Hutchinson-style estimate of the diagonal of a matrix :math:`A`.

    The estimate :math:`\frac{1}{m}\sum_k \sigma_k \odot A\sigma_k`
    of :math:`\operatorname{diag}(A)`.

    Unbiased for the diagonal when :math:`E[\sigma\sigma^\top] = I` on the
    entries of interest (Bekas, Kokiopoulou and Saad, 2007): entry
    :math:`i` has mean :math:`\sum_j A_{ij} E[\sigma_i\sigma_j] = A_{ii}`
    and, for Rademacher probes, variance :math:`\sum_{j \ne i}
    A_{ij}^2 / m`. Entries where every probe is zero come out zero. One
    matvec per probe, in float64.

    Args:
        matvec: The product :math:`v \mapsto A v`, on lists of arrays.
        shapes: The shape of each array of a vector.
        probes: A non-empty iterable of probes (lists of arrays or
            tensors shaped like ``shapes``), consumed one at a time.

    Returns:
        float64 NumPy arrays shaped like ``shapes``.

    Example:
    >>> import numpy as np
    >>> a = np.array([[2.0, 1.0], [1.0, 3.0]])
    >>> probes = [[np.array([1.0, 1.0])], [np.array([1.0, -1.0])]]
    >>> hutchinson_diagonal(lambda v: [a @ v[0]], [(2,)], probes)
    [array([2., 3.])]
    """
    op = _FlatOperator(matvec, shapes)
    total = np.zeros(op.n)
    count = 0
    for probe in probes:
        sigma = op.flatten(probe)
        total += sigma * op(sigma)
        count += 1
    if not count:
        raise ValueError("`probes` must hold at least one probe.")
    return op.unflatten(total / count)


def hutchinson_trace(
    matvec: Matvec,
    shapes: Sequence[Sequence[int]],
    samples: int = 100,
    seed: int | None = 0,
) -> tuple[float, float]:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}(A)`.

    .. math::

        \hat t = \frac{1}{m} \sum_{k=1}^{m} \sigma_k^\top A \sigma_k,
        \qquad \sigma_k \in \{-1, +1\}^n \text{ i.i.d. uniform},

    unbiased (Hutchinson, 1990) with per-probe variance
    :math:`2 \sum_{i \ne j} A_{ij}^2` for a symmetric :math:`A`. Costs
    ``samples`` matvecs.

    Args:
        matvec: The product :math:`v \mapsto A v`, on lists of arrays.
        shapes: The shape of each array of a vector.
        samples: Number of probes :math:`m`.
        seed: Seed of ``numpy.random.default_rng`` (None: fresh entropy).

    Returns:
        ``(estimate, standard_error)``: the mean of the ``samples`` values
        :math:`\sigma_k^\top A \sigma_k` and its standard error (the sample
        standard deviation over :math:`\sqrt{m}`; ``inf`` for one sample).

    Example:
    >>> import numpy as np
    >>> a = np.diag([1.0, 4.0, 2.0])
    >>> hutchinson_trace(lambda v: [a @ v[0]], [(3,)], samples=5)
    (7.0, 0.0)
    """
    samples = check_int("samples", samples)
    rng = np.random.default_rng(_check_seed(seed))
    op = _FlatOperator(matvec, shapes)
    probes = (op.unflatten(_rademacher(rng, (op.n,))) for _ in range(samples))
    return mean_and_std_error(quadratic_forms(matvec, shapes, probes))


def hutchpp_trace(
    matvec: Matvec,
    shapes: Sequence[Sequence[int]],
    samples: int = 99,
    seed: int | None = 0,
) -> float:
    r"""The Hutch++ estimate of :math:`\operatorname{tr}(A)`.

    Hutch++ (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic
    Trace Estimation", SOSA 2021) computes the trace of a low-rank
    approximation of :math:`A` exactly and runs Hutchinson's estimator on
    the rest only. With :math:`m` = ``samples``, :math:`k = \lfloor m/3
    \rfloor` and :math:`g = m - 2k`:

    .. math::

        S &\in \{\pm 1\}^{n \times k}, \quad
        Q = \operatorname{orth}(A S), \quad
        G \in \{\pm 1\}^{n \times g}, \quad P = I - Q Q^\top, \\
        \hat t &= \operatorname{tr}(Q^\top A Q)
          + \frac{1}{g} \operatorname{tr}(G^\top P A P G).

    It is unbiased, and its variance only involves :math:`PAP`, what
    :math:`A` has outside the subspace of its dominant eigenvectors that
    :math:`Q` approximates; for a matrix with a few large eigenvalues that
    is much less than Hutchinson's (relative error :math:`O(1/m)` instead
    of :math:`O(1/\sqrt m)` for positive semi-definite :math:`A`).

    Cost: exactly ``samples`` matvecs (:math:`k` for :math:`AS`,
    :math:`k` for :math:`AQ`, :math:`g` for the residual) when
    :math:`k \le n`. When :math:`k \ge n`, :math:`Q` spans the whole space
    and the trace is exact after :math:`k + n` matvecs; with
    ``samples < 3``, :math:`k = 0` and this is plain Hutchinson.

    Args:
        matvec: The product :math:`v \mapsto A v` of a symmetric
            :math:`A`, on lists of arrays.
        shapes: The shape of each array of a vector.
        samples: The matvec budget :math:`m`.
        seed: Seed of ``numpy.random.default_rng`` (None: fresh entropy).

    Returns:
        The estimate, a float.

    Example:
    >>> import numpy as np
    >>> a = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    >>> round(hutchpp_trace(lambda v: [a @ v[0]], [(3,)], samples=9), 6)
    7.0
    """
    samples = check_int("samples", samples)
    rng = np.random.default_rng(_check_seed(seed))
    op = _FlatOperator(matvec, shapes)
    n = op.n
    k = samples // 3
    g = samples - 2 * k
    sketch = _rademacher(rng, (n, k))
    probes = _rademacher(rng, (n, g))
    trace = 0.0
    if k:
        a_sketch = np.stack([op(sketch[:, j]) for j in range(k)], axis=1)
        q, _ = np.linalg.qr(a_sketch)  # n x min(n, k), orthonormal columns
        trace += float(sum(q[:, j] @ op(q[:, j]) for j in range(q.shape[1])))
        if q.shape[1] >= n:
            return trace  # Q spans everything: tr(Q^T A Q) = tr(A).
        probes = probes - q @ (q.T @ probes)  # P G
    residual = sum(probes[:, j] @ op(probes[:, j]) for j in range(g))
    return trace + float(residual) / g


class ConvergenceWarning(UserWarning):
    """Power iteration ran out of iterations before its tolerance was met."""


def _unconverged_message(
    iters: int, tol: float, eigenvalue: float, residual: float, change: float
) -> str:
    return (
        f"Power iteration stopped after iters={iters} iterations without "
        f"converging (tol={tol:g}): the last relative change of the "
        f"estimate was {change:.2e} and the relative residual "
        f"||Hv - λv|| / |λ| is {residual:.2e}, so the eigenvalue "
        f"{eigenvalue:.6g} may be too small in magnitude. Raise `iters`; "
        "`return_residual=True` returns the residual."
    )


def top_eigenvalue(
    matvec: Matvec,
    shapes: Sequence[Sequence[int]],
    iters: int = 100,
    seed: int | None = 0,
    tol: float = 1e-6,
    *,
    return_residual: bool = False,
    warn_unconverged: bool = False,
) -> Any:
    r"""The largest-magnitude eigenvalue of a symmetric :math:`A`, signed.

    Power iteration from a standard normal :math:`v_0`:

    .. math::

        w_k = A v_k, \qquad \lambda_k = v_k^\top w_k, \qquad
        v_{k+1} = w_k / \lVert w_k \rVert,

    stopped when :math:`|\lambda_k - \lambda_{k-1}| <`
    ``tol`` :math:`\cdot |\lambda_k|` or after ``iters`` matvecs (one
    per iteration). The Rayleigh quotient :math:`\lambda_k` carries the
    sign of the eigenvalue: a dominant negative eigenvalue (a saddle or a
    maximum of the loss) is returned negative.

    Convergence caveats: the error of :math:`\lambda_k` shrinks like
    :math:`|\lambda_2 / \lambda_1|^{2k}`, so it is slow when the two
    largest magnitudes are close, and the early stop can fire before
    convergence when progress is slow; when :math:`\lambda` and
    :math:`-\lambda` are both the largest magnitude the iterates oscillate
    and the value can lie anywhere in :math:`[-|\lambda|, |\lambda|]`. A
    start orthogonal to the top eigenvector (probability zero) finds the
    next one instead. The result is a lower bound on :math:`|\lambda_1|`
    up to rounding; raise ``iters`` and lower ``tol`` to tighten it.

    Args:
        matvec: The product :math:`v \mapsto A v` of a symmetric
            :math:`A`, on lists of arrays.
        shapes: The shape of each array of a vector.
        iters: Maximum number of iterations (= matvecs).
        seed: Seed of the start vector (None: fresh entropy).
        tol: Relative change of :math:`\lambda_k` that stops the
            iteration; 0 runs all ``iters``.
        return_residual: Also return the relative residual
            :math:`\lVert A v_k - \lambda_k v_k \rVert / |\lambda_k|` of
            the last iterate (:math:`\lVert v_k \rVert = 1`; 0 for an
            exact eigenvector; 0.0 if :math:`A v_k = 0`, NaN if not
            finite), which bounds the distance of :math:`\lambda_k` to
            an eigenvalue of :math:`A` relative to :math:`|\lambda_k|`.
        warn_unconverged: Give a `ConvergenceWarning`, stating the
            residual, when all ``iters`` ran with ``tol > 0`` not met.
            False here (the building block, called every epoch by
            `CurvatureMonitor`); True in `hessian_top_eigenvalue`.

    Returns:
        The eigenvalue estimate :math:`\lambda_k`, a float (0.0 if
        :math:`A v_k = 0`); with ``return_residual``, the pair
        ``(eigenvalue, residual)``.

    Example:
    >>> import numpy as np
    >>> a = np.diag([1.0, -3.0, 2.0])
    >>> round(top_eigenvalue(lambda v: [a @ v[0]], [(3,)], tol=1e-12), 6)
    -3.0
    """
    iters = check_int("iters", iters)
    tol = _check_tol(tol)
    eigenvalue, residual, unconverged = _power_iteration(
        matvec, shapes, iters, _check_seed(seed), tol
    )
    if warn_unconverged and unconverged is not None:
        warnings.warn(unconverged, ConvergenceWarning, stacklevel=2)
    if return_residual:
        return eigenvalue, residual
    return eigenvalue


def _power_iteration(
    matvec: Matvec,
    shapes: Any,
    iters: int,
    seed: int | None,
    tol: float,
) -> tuple[float, float, str | None]:
    """`top_eigenvalue`'s loop, on checked arguments.

    Returns:
        The eigenvalue, the relative residual, and None or (when all
        ``iters`` ran with ``tol > 0`` not met) the warning's message.
    """
    rng = np.random.default_rng(seed)
    op = _FlatOperator(matvec, shapes)
    v = rng.standard_normal(op.n)
    v /= np.linalg.norm(v)
    tiny = np.finfo("float64").tiny
    previous = None
    eigenvalue = residual = 0.0
    change = math.inf
    for _ in range(iters):
        w = op(v)
        eigenvalue = float(v @ w)
        norm = float(np.linalg.norm(w))
        if not math.isfinite(norm):
            return float("nan"), float("nan"), None
        if norm == 0.0:
            return 0.0, 0.0, None
        residual = float(np.linalg.norm(w - eigenvalue * v)) / max(
            abs(eigenvalue), tiny
        )
        change = math.inf if previous is None else abs(eigenvalue - previous)
        if change < tol * abs(eigenvalue):
            return eigenvalue, residual, None
        previous = eigenvalue
        v = w / norm
    if tol == 0:
        return eigenvalue, residual, None
    relative = change / max(abs(eigenvalue), tiny)
    message = _unconverged_message(iters, tol, eigenvalue, residual, relative)
    return eigenvalue, residual, message


# --------------------------------------------------------------------------
# Model-level diagnostics
# --------------------------------------------------------------------------


def hessian_top_eigenvalue(
    model: keras.Model,
    x: Any,
    y: Any,
    iters: int = 100,
    seed: int | None = 0,
    sample_weight: Any = None,
    training: bool = False,
    tol: float = 1e-6,
    *,
    return_residual: bool = False,
) -> Any:
    r"""The largest-magnitude eigenvalue of the loss Hessian, signed.

    Runs `top_eigenvalue` (power iteration on the Rayleigh quotient
    :math:`\lambda_k = v_k^\top H v_k`, :math:`v_{k+1} = Hv_k/\lVert Hv_k
    \rVert`) on the Hessian :math:`H = \nabla^2_w L` of the compiled loss
    (with ``model.losses``) on the batch ``(x, y)`` at the current
    trainable weights :math:`w`. At a minimum it is the sharpness
    :math:`\lambda_{\max}(H)`; a negative value means that the most curved
    direction is one of negative curvature. One Hessian-vector product per
    iteration; the model is not modified. See `top_eigenvalue` for the
    convergence caveats.

    Args:
        model: A compiled Keras model.
        x: The batch's inputs (array-likes or tensors).
        y: Its targets.
        iters: Maximum number of power iterations (integer >= 1).
        seed: Seed of the start vector (integer >= 0, or None).
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.
        tol: Relative change of the estimate that stops the iteration.
            When ``iters`` iterations run without meeting it (``tol >
            0``), a `ConvergenceWarning` states the residual: the value
            may then be well below the true eigenvalue.
        return_residual: Also return the relative residual
            :math:`\lVert H v - \lambda v \rVert / |\lambda|` of the
            final iterate (see `top_eigenvalue`).

    Returns:
        The eigenvalue, a float; with ``return_residual``, the pair
        ``(eigenvalue, residual)``.

    Example:
    >>> import keras, keras_seht, numpy as np
    >>> from keras_seht.spectrum import hessian_top_eigenvalue
    >>> model = keras_seht.Sequential([
    ...     keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.compile(loss="mse")
    >>> x, y = np.eye(3) * [[1.0], [2.0], [3.0]], np.zeros((3, 1))
    >>> round(hessian_top_eigenvalue(model, x, y), 3)  # 2 * 3**2 / 3
    6.0
    """
    iters = check_int("iters", iters)
    seed = _check_seed(seed)
    tol = _check_tol(tol)
    hessian = operators.HessianOperator(model, x, y, sample_weight, training)
    eigenvalue, residual, unconverged = _power_iteration(
        hessian, hessian.shapes, iters, seed, tol
    )
    if unconverged is not None:
        warnings.warn(unconverged, ConvergenceWarning, stacklevel=2)
    if return_residual:
        return eigenvalue, residual
    return eigenvalue


def hessian_trace_hutchpp(
    model: keras.Model,
    x: Any,
    y: Any,
    samples: int = 99,
    seed: int | None = 0,
    sample_weight: Any = None,
    training: bool = False,
) -> float:
    r"""The Hutch++ estimate of the loss Hessian's trace.

    Runs `hutchpp_trace` on the Hessian :math:`H = \nabla^2_w L` of the
    compiled loss on the batch ``(x, y)`` at the current trainable
    weights: :math:`\operatorname{tr}(Q^\top H Q)` for an orthonormal basis
    :math:`Q` of :math:`H S` (``samples // 3`` Rademacher columns
    :math:`S`), plus Hutchinson's estimate of the trace of
    :math:`(I - QQ^\top) H (I - QQ^\top)`. Unbiased for
    ``keras_seht.exact_hessian_trace`` and, when a few eigenvalues dominate
    the Hessian, of much lower variance than `keras_seht.hessian_trace` at
    the same number (``samples``) of Hessian-vector products. The model is
    not modified.

    Args:
        model: A compiled Keras model.
        x: The batch's inputs (array-likes or tensors).
        y: Its targets.
        samples: Number of Hessian-vector products (integer >= 1).
        seed: Seed of the probes (integer >= 0, or None).
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.

    Returns:
        The estimate, a float.

    Example:
    >>> import keras, keras_seht, numpy as np
    >>> from keras_seht.spectrum import hessian_trace_hutchpp
    >>> model = keras_seht.Sequential([
    ...     keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.compile(loss="mse")
    >>> x, y = np.eye(3) * [[1.0], [2.0], [3.0]], np.zeros((3, 1))
    >>> round(hessian_trace_hutchpp(model, x, y, samples=9), 3)  # 2 * 14 / 3
    9.333
    """
    samples = check_int("samples", samples)
    seed = _check_seed(seed)
    hessian = operators.HessianOperator(model, x, y, sample_weight, training)
    return hutchpp_trace(hessian, hessian.shapes, samples=samples, seed=seed)
