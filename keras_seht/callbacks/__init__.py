"""Keras callbacks: Hessian-guided re-initialization and curvature logs."""

from keras_seht.callbacks.monitor import CurvatureMonitor
from keras_seht.callbacks.reinit import HessianReinit

__all__ = ["CurvatureMonitor", "HessianReinit"]
