"""Wide residual networks (WRN-d-k), as in the SEHT paper's CIFAR-100 runs.

References:
    Sergey Zagoruyko, Nikos Komodakis. "Wide Residual Networks." BMVC 2016.
    arXiv:1605.07146. Reference code: szagoruyko/wide-residual-networks
    (``models/wide-resnet.lua``) and its PyTorch ports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_seht._checks import check_int
from keras_seht.applications.resnet import (
    SeedSequence,
    batch_norm,
    channel_axis,
    conv1x1,
    conv3x3,
    drop_block,
    drop_block_seed,
    image_input,
)
from keras_seht.model import Model


def check_rate(name: str, value: Any) -> float:
    """`value` as a float in [0, 1) (a dropout rate)."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if isinstance(value, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(
            f"`{name}` must be a number in [0, 1). Received: {name}={value!r}"
        )
    return rate


def _wide_basic(
    x: Any,
    filters: int,
    strides: int,
    dropout: float,
    name: str,
    seeds: SeedSequence,
) -> Any:
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3.

    When the shape changes, the 1x1 shortcut convolution takes the
    pre-activated input (after the first BN-ReLU), as in the reference code.
    """
    in_filters = x.shape[channel_axis()]
    preact = batch_norm(f"{name}_bn1")(x)
    preact = keras.layers.ReLU(name=f"{name}_relu1")(preact)
    h = conv3x3(preact, filters, strides, f"{name}_conv1", seeds)
    h = batch_norm(f"{name}_bn2")(h)
    h = keras.layers.ReLU(name=f"{name}_relu2")(h)
    if dropout > 0:
        h = keras.layers.Dropout(dropout, seed=seeds(), name=f"{name}_dropout")(
            h
        )
    h = conv3x3(h, filters, 1, f"{name}_conv2", seeds)
    if strides != 1 or in_filters != filters:
        shortcut = conv1x1(preact, filters, strides, f"{name}_proj", seeds)
    else:
        shortcut = x
    return keras.layers.Add(name=f"{name}_add")([h, shortcut])


def wide_resnet(
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
    num_classes: int = 100,
    input_shape: Sequence[int | None] | None = None,
    seed: int | None = None,
    name: str | None = None,
    dropblock: float | None = None,
    dropblock_size: int = 7,
) -> Model:
    r"""WRN-depth-width (Zagoruyko & Komodakis), returning logits.

    The SEHT paper's CIFAR-100 model is WRN-28-10 (SGD, lr 0.1 divided by
    5 at epochs 60, 120 and 160, weight decay 5e-4, batch 32, 200 epochs;
    its best result adds ``dropout=0.3``). The network:

    - a 3x3 convolution with 16 filters;
    - 3 groups of ``n = (depth - 4) / 6`` pre-activation wide blocks,
      BN-ReLU-conv3x3-BN-ReLU-[Dropout]-conv3x3 plus the input, with
      ``16*width, 32*width, 64*width`` filters; the first block of groups
      2 and 3 has stride 2; where the shape changes the shortcut is a 1x1
      convolution of the pre-activated input;
    - BN-ReLU, global average pooling and ``Dense(num_classes)`` **logits**
      (no softmax): compile with a ``from_logits=True`` loss.

    Dropout sits between the two convolutions of each block, after the
    second ReLU, as in the reference implementation. Convolutions have no
    bias and He-normal weights (fan_out); BatchNorm uses PyTorch's momentum
    and epsilon; the ``Dense`` layer keeps Keras' defaults.

    Parameters: WRN-28-10 with 100 classes has 36,536,884 trainable
    weights (the paper's "36.5M") plus 17,952 BatchNorm moving statistics
    (``count_params()`` 36,554,836). For 10 classes, 36,479,194 trainable.

    Args:
        depth: Total depth d; ``(depth - 4)`` must be divisible by 6 (10,
            16, 22, 28, 40, ...). Integer >= 10.
        width: Widening factor k. Integer >= 1.
        dropout: Dropout rate between the convolutions of each block, in
            [0, 1). 0 adds no Dropout layer.
        num_classes: Number of classes (the logits' size). Integer >= 1.
        input_shape: Image shape without the batch dimension, in Keras'
            image data format; None means (32, 32, 3) (or (3, 32, 32) under
            ``channels_first``). Height and width may be None.
        seed: Base seed of the weight initializers and dropout layers
            (each gets its own seed derived from it), or None to draw from
            Keras' global generator (``keras.utils.set_random_seed``).
        name: The model's name; None means ``"wrn_{depth}_{width}"``.
        dropblock: None, or the keep probability of a
            `keras_seht.layers.DropBlock2D` (the paper's baseline: 0.9)
            after groups 2 and 3 (16x16 and 8x8 maps for 32x32 images).
        dropblock_size: DropBlock's block side.

    Returns:
        An uncompiled functional `keras_seht.Model` mapping images
        ``(batch, height, width, channels)`` to logits
        ``(batch, num_classes)``; ``compile(seht=...)`` works on it.

    Example:
    >>> import keras, keras_seht
    >>> from keras_seht.applications import wide_resnet
    >>> model = wide_resnet(depth=10, width=1, dropout=0.3, num_classes=100)
    >>> model.name
    'wrn_10_1'
    >>> model.compile(
    ...     optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     seht=keras_seht.SEHTD(p=0.01, strength=1e-3),
    ... )
    """
    depth = check_int("depth", depth, low=10)
    if (depth - 4) % 6 != 0:
        raise ValueError(
            "`depth` must satisfy (depth - 4) % 6 == 0 (10, 16, 22, 28, 40, "
            f"...). Received: depth={depth}"
        )
    width = check_int("width", width)
    dropout = check_rate("dropout", dropout)
    num_classes = check_int("num_classes", num_classes)
    if name is None:
        name = f"wrn_{depth}_{width}"
    blocks = (depth - 4) // 6
    seeds = SeedSequence(seed)
    inputs = image_input(input_shape, name="image")
    x = conv3x3(inputs, 16, 1, "stem_conv", seeds)
    for group, multiplier in enumerate((16, 32, 64), start=1):
        for block in range(1, blocks + 1):
            strides = 2 if group > 1 and block == 1 else 1
            x = _wide_basic(
                x,
                width * multiplier,
                strides,
                dropout,
                name=f"group{group}_block{block}",
                seeds=seeds,
            )
        if dropblock is not None and group in (2, 3):
            x = drop_block(
                x,
                dropblock,
                dropblock_size,
                f"group{group}",
                drop_block_seed(seed, group),
            )
    x = batch_norm("final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seeds()),
        name="logits",
    )(x)
    return Model(inputs, outputs, name=name)
