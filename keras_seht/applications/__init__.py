"""Ready-made models of the SEHT paper's experiments (a model zoo).

Each builder returns an uncompiled functional `keras_seht.Model` that
outputs **logits**: compile it with a ``from_logits=True`` loss and, for
curvature regularization, ``seht=...``.

- `resnet18_cifar`: ResNet-18 with the CIFAR stem (CIFAR-10).
- `wide_resnet`: WRN-depth-width, e.g. WRN-28-10 (CIFAR-100).
- `rnn_language_model`: stacked LSTM/GRU word-level language model
  (WikiText-2); `reset_rnn_states` for its stateful variant; its
  recurrent layers `SEHTLSTM` / `SEHTGRU`.

Example:
>>> import keras, keras_seht
>>> from keras_seht.applications import resnet18_cifar
>>> model = resnet18_cifar(width=16)
>>> model.compile(
...     optimizer="sgd",
...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
...     seht=keras_seht.SEHTH(max_iter=1, strength=1e-3),
... )
"""

from keras_seht.applications.resnet import resnet18_cifar
from keras_seht.applications.rnn import (
    SEHTGRU,
    SEHTLSTM,
    reset_rnn_states,
    rnn_language_model,
)
from keras_seht.applications.wide_resnet import wide_resnet

__all__ = [
    "resnet18_cifar",
    "wide_resnet",
    "rnn_language_model",
    "reset_rnn_states",
    "SEHTLSTM",
    "SEHTGRU",
]
