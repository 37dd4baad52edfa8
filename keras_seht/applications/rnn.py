"""Word-level LSTM/GRU language models, as in the SEHT paper's WikiText-2 runs.

The architecture and initialization follow PyTorch's classic
``examples/word_language_model`` (``RNNModel``), the recipe the paper's
language-modelling experiments use: 2 layers of 512 units, 40 epochs,
batch 20, BPTT 35, gradient clipping 0.25 (a global norm:
``global_clipnorm`` in Keras), SGD lr 20 divided by 4 when
validation perplexity stops improving, dropout 0.5 (LSTM) or 0.3 (GRU).

References:
    Wojciech Zaremba, Ilya Sutskever, Oriol Vinyals. "Recurrent Neural
    Network Regularization." arXiv:1409.2329, 2014.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from keras_seht._checks import check_choice, check_int
from keras_seht.applications.wide_resnet import check_rate
from keras_seht.model import Model

#: The recurrent cells `rnn_language_model` accepts.
CELLS = ("lstm", "gru")
#: How the recurrent layers' weights are initialized.
RNN_INITS = ("keras", "torch")
#: The values Keras' LSTM/GRU accept for ``use_cudnn``.
USE_CUDNN = (False, True, "auto")


class _SEHTRecurrent:
    """What `SEHTLSTM` and `SEHTGRU` add to Keras' LSTM and GRU.

    1. The ``stateful=True`` hidden state is a tracked non-trainable
       variable. Keras (3.10 to 3.15 at least) creates it untracked, so it
       is not among the model's ``non_trainable_variables``; the JAX
       backend's train step is stateless and returns only tracked
       variables' new values, so with Keras' own layers the state assigned
       in a compiled step is dropped and every batch starts from the state
       the step was traced with (zeros). Tracked, it carries over on every
       backend (it also appears in ``model.weights`` and is saved).
    2. On TensorFlow the layer reports ``supports_jit = False``, so that
       ``compile``'s default ``jit_compile="auto"`` runs the train step as
       a plain ``tf.function``: XLA cannot compile the third derivative of
       the recurrent ``while`` loop that an exact SEHT penalty needs (a
       shape inside the loop's nested gradient is not a compile-time
       constant). Passing ``jit_compile=True`` with ``seht=`` fails there.
    """

    if TYPE_CHECKING:
        # Provided by the Keras LSTM/GRU this mixin is combined with.
        stateful: bool
        states: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if keras.config.backend() == "tensorflow":
            self.supports_jit = False

    def build(
        self, sequences_shape: Any, initial_state_shape: Any = None
    ) -> None:
        super().build(  # type: ignore[misc]
            sequences_shape, initial_state_shape
        )
        if self.stateful and self.states is not None:
            # Assigning the attribute tracks the variables it holds.
            self.states = list(keras.tree.flatten(self.states))


@keras.saving.register_keras_serializable(package="keras_seht")
class SEHTLSTM(_SEHTRecurrent, keras.layers.LSTM):
    """``keras.layers.LSTM`` made fit for SEHT training on every backend.

    Its ``stateful`` state carries over on JAX, and on TensorFlow it keeps
    the train step out of XLA (see `rnn_language_model`).
    """


@keras.saving.register_keras_serializable(package="keras_seht")
class SEHTGRU(_SEHTRecurrent, keras.layers.GRU):
    """``keras.layers.GRU`` made fit for SEHT training on every backend.

    Its ``stateful`` state carries over on JAX, and on TensorFlow it keeps
    the train step out of XLA (see `rnn_language_model`).
    """


_RNN_LAYERS: dict[str, type[keras.layers.RNN]] = {
    "lstm": SEHTLSTM,
    "gru": SEHTGRU,
}


def _rnn_initializers(
    rnn_init: str, units: int, cell: str, seed: int | None
) -> dict[str, Any]:
    if rnn_init == "keras":
        kwargs: dict[str, Any] = {
            "kernel_initializer": keras.initializers.GlorotUniform(seed=seed),
            "recurrent_initializer": keras.initializers.Orthogonal(
                seed=None if seed is None else seed + 1
            ),
        }
        return kwargs
    # PyTorch's nn.LSTM / nn.GRU: every weight and bias U[-1/sqrt(units),
    # 1/sqrt(units)], no forget-gate bias of 1.
    limit = units**-0.5

    def uniform(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.RandomUniform(
            -limit, limit, seed=None if seed is None else seed + offset
        )

    kwargs = {
        "kernel_initializer": uniform(0),
        "recurrent_initializer": uniform(1),
        "bias_initializer": uniform(2),
    }
    if cell == "lstm":
        kwargs["unit_forget_bias"] = False
    return kwargs


def rnn_language_model(
    vocab_size: int,
    cell: str = "lstm",
    embed_dim: int = 512,
    units: int = 512,
    layers: int = 2,
    dropout: float = 0.5,
    use_cudnn: bool | str = False,
    stateful: bool = False,
    batch_size: int | None = None,
    rnn_init: str = "keras",
    seed: int | None = None,
    name: str | None = None,
) -> Model:
    r"""A stacked LSTM/GRU word-level language model, returning logits.

    The model of PyTorch's ``word_language_model`` example, used by the
    SEHT paper on WikiText-2 (2-layer LSTM 512/512 with dropout 0.5, or
    GRU with dropout 0.3):

        ids (batch, time) -> Embedding(vocab_size, embed_dim) -> Dropout
        -> [LSTM|GRU(units, return_sequences=True) -> Dropout] x layers
        -> Dense(vocab_size) -> logits (batch, time, vocab_size)

    The output is **logits** (no softmax): compile with
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` on
    integer targets of shape ``(batch, time)`` (the ids shifted by one);
    perplexity is ``exp`` of that loss. Embedding and output weights are
    drawn from U[-0.1, 0.1] and the output bias is zero, as in the
    recipe's ``init_weights``. The recurrent layers keep Keras' defaults
    with ``rnn_init="keras"`` (Glorot-uniform kernel, orthogonal recurrent
    kernel, zero bias, LSTM forget-gate bias 1), or PyTorch's
    U[-1/sqrt(units), 1/sqrt(units)] for every recurrent weight and bias
    with ``rnn_init="torch"``.

    Parameters: ``embed_dim*vocab + (units+1)*vocab`` for the embedding
    and the output layer, plus per recurrent layer ``4*(in*units +
    units**2 + units)`` (LSTM) or ``3*(in*units + units**2 + 2*units)``
    (GRU, ``reset_after=True``), with ``in`` = ``embed_dim`` for the first
    layer and ``units`` after it. On WikiText-2 (vocab 33,278) at the
    defaults: LSTM 38,308,350, GRU 37,261,822 (PyTorch's LSTM counts 4,096
    more: it has two bias vectors per layer).

    cuDNN: ``use_cudnn`` is passed to the Keras LSTM/GRU layers. cuDNN
    kernels have no double backward (their backward pass is not itself
    differentiable), and an exact SEHT penalty differentiates a
    Hessian-vector product, so with ``compile(seht=...)`` it must stay
    ``False`` (the default). ``True`` or ``"auto"`` is for baselines
    trained without ``seht`` (or with a penalty that needs no double
    backward), on a GPU.

    The recurrent layers are `SEHTLSTM` / `SEHTGRU`, Keras' LSTM / GRU
    with two changes that SEHT training needs: a ``stateful`` state that
    carries over on JAX too, and, on TensorFlow, no XLA: XLA cannot
    compile the third derivative of a recurrent loop, so ``compile``'s
    default ``jit_compile="auto"`` gives a plain ``tf.function`` there
    (do not pass ``jit_compile=True`` with ``seht=`` on TensorFlow).

    Stateful training: with ``stateful=True`` the model has a fixed batch
    size ``batch_size`` and each recurrent layer carries its hidden state
    from one batch to the next, as the classic recipe carries it across
    consecutive BPTT windows (detached: no gradient flows between
    windows). Feed the windows in order (``fit(..., shuffle=False)``, a
    dataset whose sample count is a multiple of ``batch_size`` and whose
    row ``i`` of every batch continues row ``i`` of the previous one), and
    reset the states at the start of each epoch (and before evaluating)
    with `reset_rnn_states`, e.g. through
    ``keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs:
    reset_rnn_states(model))``.

    Args:
        vocab_size: Vocabulary size (ids are in ``[0, vocab_size)``).
            Integer >= 1.
        cell: ``"lstm"`` or ``"gru"``.
        embed_dim: Embedding size. Integer >= 1.
        units: Units of each recurrent layer. Integer >= 1.
        layers: Number of stacked recurrent layers. Integer >= 1.
        dropout: Dropout rate after the embedding and after each recurrent
            layer, in [0, 1). 0 adds no Dropout layers.
        use_cudnn: ``False`` (default; required with an exact SEHT
            penalty), ``True`` or ``"auto"``; see above.
        stateful: Carry the recurrent state across batches (needs
            ``batch_size``).
        batch_size: The fixed batch size of the model's input; required
            when ``stateful=True``, optional otherwise. Integer >= 1.
        rnn_init: ``"keras"`` or ``"torch"``: the recurrent layers'
            initialization (see above).
        seed: Base seed of the initializers and dropout layers (each gets
            its own seed derived from it), or None to draw from Keras'
            global generator (``keras.utils.set_random_seed``).
        name: The model's name; None means ``"{cell}_language_model"``.

    Returns:
        An uncompiled functional `keras_seht.Model` mapping int ids
        ``(batch, time)`` to logits ``(batch, time, vocab_size)``;
        ``compile(seht=...)`` works on it.

    Example:
    >>> import keras, keras_seht
    >>> from keras_seht.applications import rnn_language_model
    >>> model = rnn_language_model(
    ...     1000, cell="gru", embed_dim=64, units=64, dropout=0.3)
    >>> model.output_shape
    (None, None, 1000)
    >>> model.compile(
    ...     optimizer=keras.optimizers.SGD(20.0, global_clipnorm=0.25),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     seht=keras_seht.SEHTD(p=0.01, strength=1e-3),
    ... )
    """
    vocab_size = check_int("vocab_size", vocab_size)
    cell = check_choice("cell", cell, CELLS)
    embed_dim = check_int("embed_dim", embed_dim)
    units = check_int("units", units)
    layers = check_int("layers", layers)
    dropout = check_rate("dropout", dropout)
    if not (
        isinstance(use_cudnn, bool)
        or (isinstance(use_cudnn, str) and use_cudnn == "auto")
    ):
        raise ValueError(
            f"`use_cudnn` must be one of {USE_CUDNN}. Received: "
            f"use_cudnn={use_cudnn!r}"
        )
    if not isinstance(stateful, bool):
        raise ValueError(
            f"`stateful` must be a bool. Received: stateful={stateful!r}"
        )
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size)
    elif stateful:
        raise ValueError(
            "`stateful=True` needs a fixed `batch_size` (the hidden state "
            "has one row per sequence of the batch). Received: "
            "batch_size=None"
        )
    rnn_init = check_choice("rnn_init", rnn_init, RNN_INITS)
    if seed is not None:
        seed = check_int("seed", seed, low=0)
    if name is None:
        name = f"{cell}_language_model"

    # Offsets: 0 embedding, 1 output layer, 10*i + (0, 1, 2) recurrent
    # layer i, 10*i + 5 the dropout after it (i = 0: after the embedding).
    def next_seed(offset: int) -> int | None:
        return None if seed is None else seed + offset

    def drop(x: Any, index: int) -> Any:
        if dropout == 0:
            return x
        return keras.layers.Dropout(
            dropout, seed=next_seed(10 * index + 5), name=f"dropout_{index}"
        )(x)

    inputs = keras.Input(batch_shape=(batch_size, None), dtype="int32")
    x = keras.layers.Embedding(
        vocab_size,
        embed_dim,
        embeddings_initializer=keras.initializers.RandomUniform(
            -0.1, 0.1, seed=next_seed(0)
        ),
        name="embedding",
    )(inputs)
    x = drop(x, 0)
    for index in range(1, layers + 1):
        x = _RNN_LAYERS[cell](
            units,
            return_sequences=True,
            stateful=stateful,
            use_cudnn=use_cudnn,
            name=f"{cell}_{index}",
            **_rnn_initializers(rnn_init, units, cell, next_seed(10 * index)),
        )(x)
        x = drop(x, index)
    outputs = keras.layers.Dense(
        vocab_size,
        kernel_initializer=keras.initializers.RandomUniform(
            -0.1, 0.1, seed=next_seed(1)
        ),
        bias_initializer="zeros",
        name="logits",
    )(x)
    return Model(inputs, outputs, name=name)


def reset_rnn_states(model: keras.Model) -> None:
    """Zeroes the hidden state of every stateful recurrent layer of `model`.

    Keras 3 models have no ``reset_states()``; call this at the start of
    each epoch (and before evaluating) when training a stateful
    `rnn_language_model`. Nested models are searched too.

    Example:
    >>> import keras
    >>> from keras_seht.applications import (
    ...     reset_rnn_states, rnn_language_model)
    >>> model = rnn_language_model(
    ...     50, embed_dim=8, units=8, stateful=True, batch_size=4)
    >>> callback = keras.callbacks.LambdaCallback(
    ...     on_epoch_begin=lambda epoch, logs: reset_rnn_states(model))
    """
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            "`model` must be a Keras model or layer. Received: "
            f"model={type(model).__name__}"
        )
    stack = [model]
    while stack:
        layer = stack.pop()
        stateful_types = (keras.layers.RNN, keras.layers.Bidirectional)
        if isinstance(layer, stateful_types) and layer.stateful:
            layer.reset_state()
        stack.extend(getattr(layer, "layers", []))
