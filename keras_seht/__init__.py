"""keras-seht: curvature regularization for Keras 3 in one line.

    model.compile(..., seht=keras_seht.SEHTD(p=0.01))

adds a stochastic estimate of the loss Hessian's trace to the loss.
"""

from keras_seht import regularizers
from keras_seht.estimators import SEHTD, SEHTH, CurvatureEstimator
from keras_seht.hessian import (
    exact_hessian_trace,
    hessian_diagonal,
    hessian_trace,
)
from keras_seht.layout import WeightLayout, weight_layout
from keras_seht.model import Model, Sequential, wrap
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
    # Hessian diagnostics
    "exact_hessian_trace",
    "hessian_diagonal",
    "hessian_trace",
    "WeightLayout",
    "weight_layout",
    "__version__",
]
