"""Keras callbacks: Hessian-guided re-initialization and curvature logs.

- `HessianReinit`: re-initializes the weights of largest Hessian diagonal
  ("Using Hessians as a Regularization Technique").
- `CurvatureMonitor`: writes Hessian trace and top-eigenvalue estimates on
  a fixed batch into the training logs.

Example:
>>> import keras, keras_seht, numpy as np
>>> x, y = np.ones((8, 3), "float32"), np.array([0, 1] * 4)
>>> model = keras_seht.Sequential(
...     [keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
>>> model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
>>> callbacks = [
...     keras_seht.callbacks.HessianReinit(x, y, k=10),
...     keras_seht.callbacks.CurvatureMonitor(x, y, trace_samples=5),
... ]
>>> history = model.fit(x, y, epochs=1, callbacks=callbacks, verbose=0)
>>> "curvature_trace" in history.history
True
"""

from keras_seht.callbacks.monitor import CurvatureMonitor
from keras_seht.callbacks.reinit import HessianReinit

__all__ = ["CurvatureMonitor", "HessianReinit"]
