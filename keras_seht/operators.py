r"""Curvature operators of a compiled model's loss on one batch.

In the style of curvlinops' ``_torch_base``, an operator is a symmetric
:math:`n \times n` matrix over the model's :math:`n` trainable weights
(:math:`w`, every variable of ``model.trainable_variables`` flattened in
order) that is only ever touched through its matrix-vector product. One
base class, `CurvatureOperator`, prepares the batch, freezes the weights
and converts vectors; the operators differ in their ``matvec`` only:

- `HessianOperator`: :math:`v \mapsto Hv`, :math:`H = \nabla_w^2 L(w)`,
  the Hessian of the compiled loss (with ``model.losses``);
- `GaussNewtonOperator`: :math:`v \mapsto Gv = J^\top H_z J v`, the
  generalized Gauss-Newton matrix, with :math:`J = \partial z/\partial w`
  the Jacobian of every output entry of the batch and :math:`H_z =
  \nabla_z^2 \ell(z)` the Hessian of the loss given to ``compile`` (no
  ``model.losses``) in the outputs; one JVP, one output-space HVP and one
  VJP per product, never a dense matrix.

Both are built once from the backend's primitives
(``keras_seht.backend.<name>.CurvatureProducts``: ``hvp``, ``jvp``,
``vjp`` and ``output_hvp``, with batched forms), evaluated statelessly at
the weights of the moment they are built: no weight, BatchNorm statistic
or seed of the model changes. Calling an operator with a list of arrays
(one per trainable variable) returns NumPy arrays of the same shapes,
which is the ``matvec`` that the estimators of `keras_seht.spectrum`
take:

>>> import keras, keras_seht, numpy as np
>>> from keras_seht import spectrum
>>> from keras_seht.operators import HessianOperator
>>> model = keras_seht.Sequential([
...     keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
>>> model.compile(loss="mse")
>>> x, y = np.eye(3) * [[1.0], [2.0], [3.0]], np.zeros((3, 1))
>>> hessian = HessianOperator(model, x, y)  # H = 2 diag(1, 4, 9) / 3
>>> round(spectrum.hutchinson_trace(hessian, hessian.shapes)[0], 4)
9.3333

The size guards (`check_exact_size`, `check_dense_size`) protect the
paths that cost one product per weight or per output entry, or that
build dense matrices.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from keras_seht import backend as seht_backend
from keras_seht import functional
from keras_seht._checks import check_bool, check_samples

#: Above this many trainable weights the exact paths (Hessian diagonal,
#: exact trace, dense Gauss-Newton factors) refuse to run unless forced:
#: they cost one product per weight.
MAX_EXACT_WEIGHTS = 20_000

#: The dense Gauss-Newton factors (M x n Jacobian and M x M output
#: Hessian, M output entries, n weights) may hold at most this many
#: entries together unless forced.
MAX_DENSE_ENTRIES = 50_000_000

#: Products per batched call in the exact paths.
CHUNK_SIZE = 256


# --------------------------------------------------------------------------
# Arguments and size guards
# --------------------------------------------------------------------------


def prepare_batch(
    model: keras.Model, x: Any, y: Any, sample_weight: Any
) -> tuple[Any, Any, Any]:
    """Checks the model and converts one batch to backend tensors.

    The model must be a compiled ``keras.Model`` with trainable weights;
    an unbuilt one is built by calling it on ``x``.

    Returns:
        ``(x, y, sample_weight)`` as backend tensors (None stays None).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: {type(model).__name__}"
        )
    if not model.compiled:
        raise ValueError(
            "`model` must be compiled: the Hessian is that of the compiled "
            "loss. Call `model.compile(loss=...)` first."
        )
    count = check_samples("x", x)
    if check_samples("y", y) != count:
        raise ValueError(
            f"`x` and `y` must hold the same number of samples. Received: "
            f"{count} and {check_samples('y', y)}"
        )
    if (
        sample_weight is not None
        and check_samples("sample_weight", sample_weight) != count
    ):
        raise ValueError(
            f"`sample_weight` must hold one weight per sample of `x` ({count})."
        )
    x, y, sample_weight = functional.as_tensors(x, y, sample_weight)
    if not model.built:
        model(x)
    if not model.trainable_variables:
        raise ValueError("`model` has no trainable weights.")
    return x, y, sample_weight


def num_weights(model: keras.Model) -> int:
    """The number n of trainable weights (scalars) of a built model."""
    return sum(math.prod(v.shape) for v in model.trainable_variables)


def num_outputs(model: keras.Model, x: Any) -> int:
    """The number M of output entries of the batch ``x`` (all outputs).

    From the output spec: nothing is computed.
    """
    outputs = keras.tree.flatten(model.compute_output_spec(x))
    return sum(math.prod(o.shape) for o in outputs)


def check_exact_size(weights: int, max_weights: int, force: bool) -> None:
    """Refuses an exact path (one product per weight) on a large model.

    Raises:
        ValueError: ``weights > max_weights`` and not ``force``.
    """
    if not check_bool("force", force) and weights > max_weights:
        raise ValueError(
            f"The model has {weights} trainable weights, more than "
            f"`max_weights`={max_weights}: the exact computation costs one "
            "Hessian-vector product per weight. Pass force=True to run it "
            "anyway, or use a stochastic estimate (`hessian_trace`, "
            "method='hutchinson')."
        )


def check_dense_size(
    outputs: int, weights: int, max_weights: int, force: bool
) -> None:
    r"""Refuses dense Gauss-Newton factors that would be too large.

    The factors are :math:`J \in \mathbb{R}^{M\times n}` and :math:`H_z
    \in \mathbb{R}^{M\times M}` (``outputs`` = M, ``weights`` = n); they
    cost one reverse pass per output entry.

    Raises:
        ValueError: ``weights > max_weights``, or :math:`M(n + M)` above
            `MAX_DENSE_ENTRIES`, and not ``force``.
    """
    if check_bool("force", force):
        return
    if weights > max_weights:
        raise ValueError(
            f"The model has {weights} trainable weights, more than "
            f"`max_weights`={max_weights}. Pass force=True to run anyway."
        )
    entries = outputs * (weights + outputs)
    if entries > MAX_DENSE_ENTRIES:
        raise ValueError(
            f"The dense output Jacobian ({outputs} x {weights}) and output "
            f"Hessian ({outputs} x {outputs}) would hold {entries} entries "
            f"(more than {MAX_DENSE_ENTRIES}); use a smaller batch or pass "
            "force=True."
        )


def to_numpy(x: Any) -> np.ndarray:
    """A tensor (or array-like) as a NumPy array, without NumPy warnings.

    ``keras.ops.convert_to_numpy`` converts a torch tensor with
    ``np.array(tensor)``, which under NumPy 2 gives a DeprecationWarning
    (torch's ``__array__`` takes no ``copy`` keyword) on every call; a
    torch tensor is converted with ``.numpy()`` here instead.
    """
    if keras.config.backend() == "torch":
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:
                x = x.float()
            return x.numpy()
    return ops.convert_to_numpy(x)


def check_verbose(verbose: Any) -> int:
    """``verbose`` as 0, 1 or 2 (Keras' progress-bar settings).

    Raises:
        ValueError: For anything else.
    """
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(
            "`verbose` must be 0 (silent), 1 (progress bar) or 2 (one line "
            f"at the end). Received: verbose={verbose!r}"
        )
    return int(verbose)


def _chunks(total: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, rows per chunk), balanced.

    Padding the last chunk to the common size (one compilation under JAX
    and TensorFlow) then wastes fewer rows than there are chunks.
    """
    count = -(-total // max(1, int(chunk_size)))
    return count, -(-total // count)


def _basis_rows(start: int, rows: int, total: int, dtype: str) -> Any:
    """A (rows, total) tensor: rows of the identity of size ``total``.

    Rows ``e_start, ..., e_{start + rows - 1}``; rows past the end are zero.
    """
    index = ops.arange(start, start + rows)
    columns = ops.arange(total)
    return ops.cast(ops.equal(index[:, None], columns[None, :]), dtype)


# --------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------


class CurvatureOperator:
    r"""A symmetric curvature matrix :math:`A` over the trainable weights.

    Built once per batch: the backend's `CurvatureProducts` freeze the
    weights, non-trainable state and batch of the moment. Subclasses
    define `matvec`. Calling the operator is the ``matvec`` of
    `keras_seht.spectrum`: one array per trainable variable in (NumPy
    arrays or tensors), NumPy arrays of the same shapes out.

    Args:
        model: A compiled Keras model (built on ``x`` if needed).
        x: The batch's inputs (array-likes or tensors).
        y: Its targets.
        sample_weight: Optional per-sample loss weights.
        training: Run the forward pass in training mode.

    Attributes:
        shapes: The shape of each trainable variable, in order.
        num_weights: :math:`n`, the total number of trainable weights.
        dtype: The float dtype of the weight-space vectors.
        products: The backend's ``CurvatureProducts``.
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        training: bool = False,
    ) -> None:
        x, y, sample_weight = prepare_batch(model, x, y, sample_weight)
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(int(d) for d in v.shape) for v in self.variables]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.num_weights = sum(self.sizes)
        self.dtype = keras.backend.result_type(
            *[v.dtype for v in self.variables]
        )
        self.products = seht_backend.get().CurvatureProducts(
            model, x, y, sample_weight, bool(training)
        )

    def as_tensors(self, vectors: Sequence[Any]) -> list[Any]:
        """One backend tensor per variable, in its dtype and shape."""
        if len(vectors) != len(self.variables):
            raise ValueError(
                f"Expected {len(self.variables)} arrays, one per trainable "
                f"variable. Received: {len(vectors)}."
            )
        return [
            ops.reshape(ops.convert_to_tensor(v, dtype=var.dtype), shape)
            for v, var, shape in zip(vectors, self.variables, self.shapes)
        ]

    def split(self, flat: Any) -> list[Any]:
        """A flat (n,) tensor as one tensor per variable."""
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(ops.reshape(flat[offset : offset + size], shape))
            offset += size
        return out

    def matvec(self, vectors: Sequence[Any]) -> list[Any]:
        """:math:`A v`, on and to backend tensors (one per variable)."""
        raise NotImplementedError

    def __call__(self, vectors: Sequence[Any]) -> list[np.ndarray]:
        """:math:`A v` as NumPy arrays: the ``matvec`` of `spectrum`."""
        products = self.matvec(self.as_tensors(vectors))
        return [to_numpy(p) for p in products]


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla_w^2 L(w)` of the compiled loss.

    :math:`L` is the compiled loss with ``model.losses`` (weight and
    activity regularizers), never the SEHT penalty, on the batch at the
    current weights. ``matvec`` is one Hessian-vector product.
    """

    def matvec(self, vectors: Sequence[Any]) -> list[Any]:
        """:math:`Hv`."""
        return list(self.products.hvp(list(vectors)))

    def diagonal(
        self, chunk_size: int = CHUNK_SIZE, verbose: int = 0
    ) -> list[np.ndarray]:
        r"""The exact diagonal :math:`H_{ii}`, one array per variable.

        Rows of :math:`H` come from batched products with the basis
        vectors :math:`e_i` (``chunk_size`` at a time; one HVP per
        weight), and entry :math:`i` of row :math:`i` is kept. No size
        guard here: callers apply `check_exact_size`.

        Args:
            chunk_size: Hessian rows per batched product.
            verbose: 0 silent, 1 a `keras.utils.Progbar` over the Hessian
                rows (updated after each chunk), 2 one line at the end.

        Returns:
            NumPy arrays shaped like the trainable variables.
        """
        verbose = check_verbose(verbose)
        n = self.num_weights
        count, rows = _chunks(n, chunk_size)
        progbar = (
            keras.utils.Progbar(n, verbose=verbose, unit_name="Hessian row")
            if verbose
            else None
        )
        pieces = []
        for chunk in range(count):
            start = chunk * rows
            h_rows = self.products.hvp_rows(
                _basis_rows(start, rows, n, self.dtype)
            )
            index = ops.minimum(ops.arange(start, start + rows), n - 1)
            entries = ops.take_along_axis(h_rows, index[:, None], axis=1)
            pieces.append(to_numpy(entries[:, 0]))
            if progbar is not None:
                progbar.update(min(start + rows, n))
        diagonal = np.concatenate(pieces)[:n]
        return [
            p.reshape(shape)
            for p, shape in zip(
                np.split(diagonal, np.cumsum(self.sizes)[:-1]), self.shapes
            )
        ]


class GaussNewtonOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = J^\top H_z J`.

    :math:`J = \partial z / \partial w \in \mathbb{R}^{M\times n}`, with
    :math:`z` every output entry of the batch (flattened, all outputs
    concatenated), and :math:`H_z = \nabla_z^2 \ell(z)` the Hessian of the
    loss given to ``compile`` (without ``model.losses``) in the outputs.
    ``matvec`` is :math:`J^\top (H_z (J v))`: a Jacobian-vector product,
    an output-space Hessian-vector product and a vector-Jacobian product,
    with no dense matrix.
    """

    @property
    def num_outputs(self) -> int:
        """:math:`M`, the number of output entries of the batch."""
        return int(self.products.num_outputs)

    def matvec(self, vectors: Sequence[Any]) -> list[Any]:
        r""":math:`Gv = J^\top H_z J v`."""
        u = self.products.jvp(list(vectors))
        return list(self.products.vjp(self.products.output_hvp(u)))

    def factors(
        self, chunk_size: int = CHUNK_SIZE
    ) -> tuple[np.ndarray, np.ndarray]:
        r"""The dense :math:`(J, H_z)`, float64, :math:`H_z` symmetrized.

        Row :math:`m` of :math:`J` is :math:`J^\top e_m` and of
        :math:`H_z` is :math:`H_z e_m`, from batched products
        (``chunk_size`` at a time; one reverse pass per output entry).
        No size guard here: callers apply `check_dense_size`.
        """
        m = self.num_outputs
        count, rows = _chunks(m, chunk_size)
        jacobian, output_hessian = [], []
        for chunk in range(count):
            basis = _basis_rows(chunk * rows, rows, m, self.dtype)
            jacobian.append(
                np.asarray(
                    to_numpy(self.products.vjp_rows(basis)),
                    "float64",
                )
            )
            output_hessian.append(
                np.asarray(
                    to_numpy(self.products.output_hvp_rows(basis)),
                    "float64",
                )
            )
        j = np.concatenate(jacobian)[:m]
        h = np.concatenate(output_hessian)[:m]
        return j, 0.5 * (h + h.T)
