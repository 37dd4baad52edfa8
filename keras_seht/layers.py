r"""Regularization layers for the paper's baselines that Keras does not ship.

Cutout and DropBlock are two of the baselines the SEHT paper compares
against; both are random in training and the identity at inference, and
draw their randomness from a `keras.random.SeedGenerator` owned by the
layer, so they work inside compiled (``jit_compile``) train steps on every
backend.

Not here, because Keras has them: mixup is `keras.layers.MixUp` (it mixes
the labels too, so it needs one-hot or soft labels, e.g.
``keras.ops.one_hot`` with `keras.losses.CategoricalCrossentropy`), and
dropout is `keras.layers.Dropout`.

Example:
>>> import keras, keras_seht
>>> model = keras.Sequential([
...     keras.Input((8, 8, 3)),
...     keras_seht.layers.Cutout(4),
...     keras.layers.Conv2D(4, 3, padding="same"),
...     keras_seht.layers.DropBlock2D(block_size=3, keep_prob=0.9),
... ])
>>> model.output_shape
(None, 8, 8, 4)

References:
    Terrance DeVries, Graham W. Taylor. "Improved Regularization of
    Convolutional Neural Networks with Cutout." arXiv:1708.04552, 2017.

    Golnaz Ghiasi, Tsung-Yi Lin, Quoc V. Le. "DropBlock: A regularization
    method for convolutional networks." NeurIPS 2018. arXiv:1810.12890.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_seht._checks import check_int


def _check_data_format(data_format: str | None) -> str:
    if data_format is None:
        return keras.config.image_data_format()
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            "`data_format` must be 'channels_last', 'channels_first' or "
            f"None. Received: data_format={data_format!r}"
        )
    return data_format


def _spatial_shape(
    layer: keras.layers.Layer, input_shape: Any
) -> tuple[int | None, int | None]:
    """(height, width) of a 4D image batch, checking the rank."""
    shape = tuple(input_shape)
    if len(shape) != 4:
        raise ValueError(
            f"`{type(layer).__name__}` expects 4D image batches; received "
            f"input_shape={shape}"
        )
    if layer.data_format == "channels_last":
        return shape[1], shape[2]
    return shape[2], shape[3]


def _check_fits(name: str, value: int, height: Any, width: Any) -> None:
    for dim in (height, width):
        if dim is not None and value > dim:
            raise ValueError(
                f"`{name}` must be at most the image height and width "
                f"({height}x{width}). Received: {name}={value}"
            )


@keras.saving.register_keras_serializable(package="keras_seht")
class Cutout(keras.layers.Layer):
    r"""Cutout: zeros one random ``size`` x ``size`` square per image.

    In training, each image of the batch gets its own square centre
    :math:`(c_y, c_x)` drawn uniformly over all pixels (as in DeVries &
    Taylor, so the square may extend past the border), and the pixels

    .. math::

        c_y - \lfloor s/2 \rfloor \le i < c_y - \lfloor s/2 \rfloor + s,
        \qquad
        c_x - \lfloor s/2 \rfloor \le j < c_x - \lfloor s/2 \rfloor + s,

    with :math:`s` = ``size``, clipped to the image, are set to 0 in every
    channel. A square fully inside the image has area :math:`s^2`; at
    the border only the part inside is zeroed. (For even :math:`s` this is
    the paper's code exactly; for odd :math:`s` the paper's code cuts
    :math:`s-1` rows, this cuts :math:`s`.) At inference
    (``training=False`` or None) the layer is the identity.

    The paper's settings: 16x16 on CIFAR-10, 8x8 on CIFAR-100 (on 32x32
    inputs normalized to zero mean, so zero is the mean pixel).

    Mixup and dropout are not re-implemented here: use
    `keras.layers.MixUp` (it needs one-hot or soft labels) and
    `keras.layers.Dropout`.

    Args:
        size: Side of the square in pixels, an integer >= 1 and at most
            the image height and width.
        data_format: ``"channels_last"`` (NHWC) or ``"channels_first"``
            (NCHW); defaults to ``keras.config.image_data_format()``.
        seed: Int seed of the layer's `keras.random.SeedGenerator`.
        **kwargs: Standard `keras.layers.Layer` arguments (``name``, ...).

    Example:
    >>> import numpy as np
    >>> layer = Cutout(2, seed=0)
    >>> x = np.ones((1, 4, 4, 1), "float32")
    >>> out = keras.ops.convert_to_numpy(layer(x, training=True))
    >>> int((out == 0).sum()) in (1, 2, 4)  # a 2x2 square, maybe clipped
    True
    >>> bool((keras.ops.convert_to_numpy(layer(x)) == x).all())  # inference
    True

    References:
        DeVries & Taylor. "Improved Regularization of Convolutional Neural
        Networks with Cutout." 2017. https://arxiv.org/abs/1708.04552
    """

    def __init__(
        self,
        size: int,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = check_int("size", size, 1)
        self.data_format = _check_data_format(data_format)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        """Checks that ``size`` fits the input's height and width."""
        height, width = _spatial_shape(self, input_shape)
        _check_fits("size", self.size, height, width)
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Zeroes one square per image in training; the identity otherwise."""
        if not training:
            return inputs
        if self.data_format == "channels_last":
            _, height, width, _ = ops.shape(inputs)
        else:
            _, _, height, width = ops.shape(inputs)
        batch = ops.shape(inputs)[0]
        centres = keras.random.uniform(
            (batch, 2), dtype="float32", seed=self.seed_generator
        )
        rows = self._inside(centres[:, 0], height)  # (batch, height)
        cols = self._inside(centres[:, 1], width)  # (batch, width)
        cut = ops.logical_and(rows[:, :, None], cols[:, None, :])
        axis = -1 if self.data_format == "channels_last" else 1
        cut = ops.expand_dims(cut, axis)
        return ops.where(cut, ops.zeros_like(inputs), inputs)

    def _inside(self, uniform: Any, length: Any) -> Any:
        """Whether each pixel index is inside the cut, one row per image."""
        length_f = ops.cast(length, "float32")
        centre = ops.minimum(ops.floor(uniform * length_f), length_f - 1.0)
        start = ops.cast(centre, "int32") - self.size // 2
        index = ops.arange(length, dtype="int32")[None, :]
        start = start[:, None]
        return ops.logical_and(index >= start, index < start + self.size)

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The input shape: the layer keeps it."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The layer's config, for Keras serialization."""
        config = super().get_config()
        config.update(
            {
                "size": self.size,
                "data_format": self.data_format,
                "seed": self.seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_seht")
class DropBlock2D(keras.layers.Layer):
    r"""DropBlock: drops contiguous ``block_size`` squares of feature maps.

    Algorithm 1 of Ghiasi et al. (2018), for a feature map of height
    :math:`H` and width :math:`W`, block size :math:`b` and keep
    probability :math:`\kappa` (``keep_prob``):

    1. Draw block seeds :math:`M^0_{ij} \sim \text{Bernoulli}(\gamma)`,
       independently for every example, channel and position of the
       :math:`(H-b+1) \times (W-b+1)` region where a whole block fits,
       with

       .. math::

           \gamma = \frac{1-\kappa}{b^2}
               \cdot \frac{H W}{(H-b+1)(W-b+1)},

       so that about a fraction :math:`1-\kappa` of the units is dropped
       (less where blocks overlap).
    2. Grow each seed into a :math:`b \times b` block (a stride-1 max-pool
       of the seeds) and drop it: :math:`M = 1 - \text{maxpool}_b(M^0)`.
    3. Output :math:`A \cdot M \cdot \text{count}(M) / \text{sum}(M)`, the
       count and sum taken over the whole batch, so the mean activation is
       kept.

    As in the authors' reference implementation, each channel gets its own
    mask. At inference (``training=False`` or None) the layer is the
    identity. With ``warmup_steps > 0``, the keep probability used in
    training decreases linearly from 1 to ``keep_prob`` over the first
    ``warmup_steps`` training calls (the paper's "scheduled DropBlock"),

    .. math::

        \kappa_t = 1 - (1 - \kappa) \min(t / T_{\text{warmup}}, 1),

    with :math:`t` the number of earlier training calls, counted in a
    non-trainable variable ``step`` (saved with the model).

    The paper's settings: ``block_size=7``, ``keep_prob=0.9`` (the SEHT
    paper's DropBlock baseline), applied after ResNet groups 3 and 4.

    Mixup and dropout are not re-implemented here: use
    `keras.layers.MixUp` (it needs one-hot or soft labels) and
    `keras.layers.Dropout`.

    Args:
        block_size: Side :math:`b` of the dropped squares, an integer >= 1
            and at most the feature map's height and width. 1 is
            dropout with rate :math:`1-\kappa` (and the same rescaling).
        keep_prob: :math:`\kappa`, in (0, 1]; 1 disables the layer.
        warmup_steps: Training calls over which ``keep_prob`` is ramped
            down from 1; an integer >= 0 (0: no warm-up).
        data_format: ``"channels_last"`` (NHWC) or ``"channels_first"``
            (NCHW); defaults to ``keras.config.image_data_format()``.
        seed: Int seed of the layer's `keras.random.SeedGenerator`.
        **kwargs: Standard `keras.layers.Layer` arguments (``name``, ...).

    Example:
    >>> import numpy as np
    >>> layer = DropBlock2D(block_size=3, keep_prob=0.9, seed=0)
    >>> x = np.ones((2, 8, 8, 4), "float32")
    >>> out = keras.ops.convert_to_numpy(layer(x, training=True))
    >>> bool(((out == 0) | (out >= 1)).all())  # dropped, or scaled up
    True
    >>> bool((keras.ops.convert_to_numpy(layer(x)) == x).all())  # inference
    True

    References:
        Ghiasi, Lin & Le. "DropBlock: A regularization method for
        convolutional networks." NeurIPS 2018.
        https://arxiv.org/abs/1810.12890
    """

    def __init__(
        self,
        block_size: int = 7,
        keep_prob: float = 0.9,
        warmup_steps: int = 0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.block_size = check_int("block_size", block_size, 1)
        try:
            keep = float(keep_prob)
        except (TypeError, ValueError):
            keep = float("nan")
        if isinstance(keep_prob, bool) or not (0.0 < keep <= 1.0):
            raise ValueError(
                "`keep_prob` must be in the interval (0, 1]. Received: "
                f"keep_prob={keep_prob!r}"
            )
        self.keep_prob = keep
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.data_format = _check_data_format(data_format)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self.step: Any = None  # the warm-up counter variable, once built

    def build(self, input_shape: Any) -> None:
        """Checks ``block_size`` against the input; adds the warm-up counter."""
        height, width = _spatial_shape(self, input_shape)
        _check_fits("block_size", self.block_size, height, width)
        if self.warmup_steps > 0:
            self.step = self.add_weight(
                shape=(),
                dtype="int32",
                initializer="zeros",
                trainable=False,
                name="step",
            )
        self.built = True

    def _current_keep_prob(self) -> Any:
        """keep_prob for this training call; advances the warm-up counter."""
        if self.warmup_steps == 0:
            return self.keep_prob
        step = ops.convert_to_tensor(self.step)
        fraction = ops.minimum(
            ops.cast(step, "float32") / float(self.warmup_steps), 1.0
        )
        self.step.assign(ops.minimum(step + 1, self.warmup_steps))
        return 1.0 - (1.0 - self.keep_prob) * fraction

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Drops blocks of the feature maps in training; else the identity."""
        if not training or self.keep_prob == 1.0:
            return inputs
        keep_prob = self._current_keep_prob()
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None:
            height, width = ops.shape(x)[1], ops.shape(x)[2]
        b = self.block_size
        valid_h, valid_w = height - b + 1, width - b + 1
        gamma = (
            (1.0 - keep_prob)
            / float(b * b)
            * ops.cast(height * width, "float32")
            / ops.cast(valid_h * valid_w, "float32")
        )
        noise = keras.random.uniform(
            ops.shape(x), dtype="float32", seed=self.seed_generator
        )
        seeds = ops.cast(noise[:, :valid_h, :valid_w, :] < gamma, "float32")
        if b > 1:
            # A seed at (a, c) drops rows a..a+b-1 and columns c..c+b-1:
            # zero-pad by b-1 and max-pool with a b x b window, stride 1.
            pad = [[0, 0], [b - 1, b - 1], [b - 1, b - 1], [0, 0]]
            seeds = ops.max_pool(
                ops.pad(seeds, pad),
                b,
                strides=1,
                padding="valid",
                data_format="channels_last",
            )
        mask = 1.0 - seeds
        scale = ops.cast(ops.size(mask), "float32") / ops.maximum(
            ops.sum(mask), 1.0
        )
        if self.data_format == "channels_first":
            mask = ops.transpose(mask, (0, 3, 1, 2))
        return inputs * ops.cast(mask * scale, inputs.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The input shape: the layer keeps it."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The layer's config, for Keras serialization."""
        config = super().get_config()
        config.update(
            {
                "block_size": self.block_size,
                "keep_prob": self.keep_prob,
                "warmup_steps": self.warmup_steps,
                "data_format": self.data_format,
                "seed": self.seed,
            }
        )
        return config
