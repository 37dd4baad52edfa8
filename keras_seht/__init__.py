"""keras-seht: curvature regularization for Keras 3 in one line.

    model.compile(..., seht=keras_seht.SEHTD(p=0.01))

adds a stochastic estimate of the loss Hessian's trace to the loss.

keras-seht's default Keras backend is torch: importing ``keras_seht``
before ``keras``, with ``KERAS_BACKEND`` unset and torch installed, selects
it. Set ``KERAS_BACKEND=jax`` or ``tensorflow`` (or import keras first) to
choose another.
"""

import os as _os
import sys as _sys

if "keras" not in _sys.modules and "KERAS_BACKEND" not in _os.environ:
    import importlib.util as _util

    if _util.find_spec("torch") is not None:
        _os.environ["KERAS_BACKEND"] = "torch"

from keras_seht import (  # noqa: E402
    applications,
    callbacks,
    data,
    distributed,
    layers,
    losses,
    metrics,
    regularizers,
)
from keras_seht.estimators import SEHTD, SEHTH, CurvatureEstimator
from keras_seht.hessian import (
    exact_hessian_trace,
    gauss_newton_factors,
    hessian_diagonal,
    hessian_trace,
)
from keras_seht.layout import WeightLayout, weight_layout
from keras_seht.model import Model, Sequential, wrap
from keras_seht.safeguard import GradientBound
from keras_seht.sharpness import ASAM, SAM
from keras_seht.spectrum import hessian_top_eigenvalue, hessian_trace_hutchpp
from keras_seht.version import __version__

__all__ = [
    # Models
    "Model",
    "Sequential",
    "wrap",
    # Estimators
    "CurvatureEstimator",
    "SEHTD",
    "SEHTH",
    "regularizers",
    # Safeguard: a bound on the penalties' share of the update
    "GradientBound",
    # Sharpness-aware minimization
    "SAM",
    "ASAM",
    # Callbacks: Hessian re-initialization
    "callbacks",
    # Baselines: label smoothing, Cutout, DropBlock
    "layers",
    "losses",
    # Data-parallel training across processes (torchrun)
    "distributed",
    # Models, data loaders and the perplexity metric of the examples
    "applications",
    "data",
    "metrics",
    # Hessian diagnostics
    "exact_hessian_trace",
    "gauss_newton_factors",
    "hessian_diagonal",
    "hessian_trace",
    "hessian_trace_hutchpp",
    "hessian_top_eigenvalue",
    "WeightLayout",
    "weight_layout",
    "__version__",
]
