"""ResNet-18 for CIFAR (3x3 stem, no max-pool), as in the SEHT paper.

The architecture is the one of the widely used CIFAR ResNets
(kuangliu/pytorch-cifar ``models/resnet.py``, the model of the paper's
CIFAR-10 table): He et al.'s ResNet-18 with its 7x7 stride-2 stem and
max-pool replaced by a single 3x3 stride-1 convolution, so that 32x32
images keep their resolution in the first stage.

References:
    Kaiming He, Xiangyu Zhang, Shaoqing Ren, Jian Sun. "Deep Residual
    Learning for Image Recognition." CVPR 2016. arXiv:1512.03385.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_seht._checks import check_int
from keras_seht.model import Model

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 in Keras).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class SeedSequence:
    """Distinct initializer/dropout seeds derived from one base seed.

    With ``seed=None`` every call returns None, so each layer draws from
    Keras' global generator (``keras.utils.set_random_seed`` applies).
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None:
            seed = check_int("seed", seed, low=0)
        self._seed = seed
        self._count = 0

    def __call__(self) -> int | None:
        """The next seed (the base seed plus the call count), or None."""
        if self._seed is None:
            return None
        self._count += 1
        return self._seed + self._count - 1


def conv_initializer(seed: int | None) -> keras.initializers.Initializer:
    """He-normal initializer (``kaiming_normal_``, fan_out, ReLU gain).

    The PyTorch reference CIFAR ResNets and WRNs initialize their
    convolutions so.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal", seed=seed
    )


def channel_axis() -> int:
    """The channel axis of images under Keras' image data format."""
    return -1 if keras.config.image_data_format() == "channels_last" else 1


def batch_norm(name: str) -> keras.layers.BatchNormalization:
    """BatchNormalization with PyTorch's momentum and epsilon."""
    return keras.layers.BatchNormalization(
        axis=channel_axis(),
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        name=name,
    )


def conv3x3(
    x: Any, filters: int, strides: int, name: str, seeds: SeedSequence
) -> Any:
    """A bias-free 3x3 convolution with ``padding="same"``.

    At stride 2 Keras' "same" padding is asymmetric (0 pixels before, 1
    after, on even sizes) where PyTorch's ``padding=1`` pads 1 on each
    side: the same architecture and parameters, shifted by one pixel. An
    explicit ``ZeroPadding2D`` would match PyTorch but breaks SEHT on
    TensorFlow with XLA: the gradient of ``tf.pad`` is a ``Slice``, whose
    gradient under XLA is ``XlaDynamicUpdateSlice``, which has no gradient,
    so the third derivative the penalty needs does not exist.
    """
    return keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=conv_initializer(seeds()),
        name=name,
    )(x)


def conv1x1(
    x: Any, filters: int, strides: int, name: str, seeds: SeedSequence
) -> Any:
    """A bias-free 1x1 (projection shortcut) convolution.

    With ``strides > 1`` it is computed as a 1x1 pooling with that stride
    (keeping every ``strides``-th pixel) followed by a unit-stride 1x1
    convolution: the same function, with the same weights, as
    ``Conv2D(filters, 1, strides=strides)``. torch's CPU convolutions
    (oneDNN) crash on the weight gradient of a strided 1x1 convolution in
    channels-last layout with fewer than 8 (AVX2) or 16 (AVX-512) input
    channels (uxlfoundation/oneDNN#6035), which reduced widths hit.
    """
    if strides != 1:
        x = keras.layers.AveragePooling2D(
            pool_size=1, strides=strides, name=f"{name}_subsample"
        )(x)
    return keras.layers.Conv2D(
        filters,
        1,
        padding="valid",
        use_bias=False,
        kernel_initializer=conv_initializer(seeds()),
        name=name,
    )(x)


def image_input(
    input_shape: Sequence[int | None] | None, name: str
) -> keras.KerasTensor:
    """``keras.Input`` for images; None means CIFAR's 32x32x3."""
    if input_shape is None:
        if channel_axis() == -1:
            input_shape = (32, 32, 3)
        else:
            input_shape = (3, 32, 32)
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    valid = len(shape) == 3 and all(
        d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 1)
        for d in shape
    )
    if not valid:
        raise ValueError(
            "`input_shape` must be a tuple of 3 positive ints (height, "
            "width, channels), or None for (32, 32, 3). Received: "
            f"input_shape={input_shape!r}"
        )
    return keras.Input(shape, name=name)


def drop_block(
    x: Any, keep_prob: float, block_size: int, name: str, seed: int | None
) -> Any:
    """A `keras_seht.layers.DropBlock2D` after `x` (training only).

    Its `seed` is apart from the initializers' `SeedSequence`, so adding
    DropBlock leaves the initial weights of a seeded model unchanged.
    """
    from keras_seht.layers import DropBlock2D

    return DropBlock2D(
        block_size=block_size,
        keep_prob=keep_prob,
        seed=seed,
        name=f"{name}_dropblock",
    )(x)


def drop_block_seed(seed: int | None, index: int) -> int | None:
    """The seed of the `index`-th DropBlock of a model seeded `seed`."""
    return None if seed is None else seed + 1_000_003 * (index + 1)


def _basic_block(
    x: Any,
    filters: int,
    strides: int,
    name: str,
    seeds: SeedSequence,
) -> Any:
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""
    in_filters = x.shape[channel_axis()]
    h = conv3x3(x, filters, strides, f"{name}_conv1", seeds)
    h = batch_norm(f"{name}_bn1")(h)
    h = keras.layers.ReLU(name=f"{name}_relu1")(h)
    h = conv3x3(h, filters, 1, f"{name}_conv2", seeds)
    h = batch_norm(f"{name}_bn2")(h)
    shortcut = x
    if strides != 1 or in_filters != filters:
        shortcut = conv1x1(x, filters, strides, f"{name}_proj", seeds)
        shortcut = batch_norm(f"{name}_proj_bn")(shortcut)
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(h)


def resnet18_cifar(
    num_classes: int = 10,
    width: int = 64,
    input_shape: Sequence[int | None] | None = None,
    seed: int | None = None,
    name: str = "resnet18_cifar",
    dropblock: float | None = None,
    dropblock_size: int = 7,
) -> Model:
    r"""ResNet-18 with the CIFAR stem, returning logits.

    The model of the SEHT paper's CIFAR-10 experiments (ResNet-18, SGD,
    lr 0.01, momentum 0.9, weight decay 5e-4, batch 32, 200 epochs, cosine
    schedule), as in kuangliu/pytorch-cifar:

    - stem: 3x3 convolution (``width`` filters, stride 1), BatchNorm, ReLU;
      no max-pool;
    - 4 stages of 2 BasicBlocks (3x3 conv-BN-ReLU-3x3 conv-BN, plus the
      input, then ReLU) with ``width, 2*width, 4*width, 8*width`` filters
      (64-128-256-512 at full size); the first block of stages 2-4 has
      stride 2 and a 1x1 convolution + BatchNorm projection shortcut;
    - global average pooling and ``Dense(num_classes)`` **logits** (no
      softmax): compile with a ``from_logits=True`` loss, e.g.
      ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.

    Convolutions have no bias (each precedes a BatchNorm) and He-normal
    weights (fan_out, as PyTorch's ``kaiming_normal_``); BatchNorm uses
    PyTorch's momentum (0.9 in Keras terms) and epsilon (1e-5); strided
    3x3 convolutions use Keras' ``padding="same"`` (1 pixel after, none
    before, where PyTorch pads 1 on both sides; see `conv3x3`); the
    strided 1x1 projections are computed as a stride-2 subsampling and a
    unit-stride 1x1 convolution (the same function and weights; this
    avoids a oneDNN crash on torch CPUs at widths below 16). The
    ``Dense`` layer keeps Keras' defaults (Glorot-uniform weights, zero
    bias). Weight decay belongs to the optimizer
    (``keras.optimizers.SGD(weight_decay=5e-4)``) or to a kernel
    regularizer added by the caller.

    Parameters, for ``num_classes=10``: 11,173,962 trainable (the
    PyTorch model's count) plus 9,600 BatchNorm moving statistics, so
    ``count_params()`` is 11,183,562. Any input of at least 1x1 pixels
    works: stages 2-4 halve the resolution (rounding up).

    Args:
        num_classes: Number of classes (the logits' size). Integer >= 1.
        width: Filters of the first stage (64 in ResNet-18); the stages
            have ``width * (1, 2, 4, 8)``. A small width (e.g. 16) makes
            CPU benchmarks affordable. Integer >= 1.
        input_shape: Image shape without the batch dimension, in Keras'
            image data format; None means (32, 32, 3) (or (3, 32, 32) under
            ``channels_first``). Height and width may be None.
        seed: Base seed of the weight initializers (each layer gets its
            own seed derived from it), or None to draw from Keras' global
            generator (``keras.utils.set_random_seed``).
        name: The model's name.
        dropblock: None, or the keep probability of a
            `keras_seht.layers.DropBlock2D` (Ghiasi et al. 2018; the
            paper's baseline uses 0.9) after stages 2 and 3 (16x16 and
            8x8 maps for 32x32 images: a 7x7 block does not fit the last
            stage's 4x4 maps).
        dropblock_size: DropBlock's block side.

    Returns:
        An uncompiled functional `keras_seht.Model` mapping images
        ``(batch, height, width, channels)`` to logits
        ``(batch, num_classes)``; ``compile(seht=...)`` works on it.

    Example:
    >>> import keras, keras_seht
    >>> from keras_seht.applications import resnet18_cifar
    >>> model = resnet18_cifar(num_classes=10, width=16)
    >>> model.output_shape
    (None, 10)
    >>> model.compile(
    ...     optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     seht=keras_seht.SEHTD(p=0.01, strength=1e-3),
    ... )
    """
    num_classes = check_int("num_classes", num_classes)
    width = check_int("width", width)
    seeds = SeedSequence(seed)
    inputs = image_input(input_shape, name="image")
    x = conv3x3(inputs, width, 1, "stem_conv", seeds)
    x = batch_norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, multiplier in enumerate((1, 2, 4, 8), start=1):
        for block in (1, 2):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(
                x,
                width * multiplier,
                strides,
                name=f"stage{stage}_block{block}",
                seeds=seeds,
            )
        if dropblock is not None and stage in (2, 3):
            x = drop_block(
                x,
                dropblock,
                dropblock_size,
                f"stage{stage}",
                drop_block_seed(seed, stage),
            )
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seeds()),
        name="logits",
    )(x)
    return Model(inputs, outputs, name=name)
