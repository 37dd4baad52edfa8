"""MNIST, CIFAR-10 and CIFAR-100 through tensorflow-datasets, as arrays.

`tensorflow_datasets` (and with it TensorFlow) is imported inside the
loaders, after Keras: importing it first crashes the torch backend, and
``import keras_seht`` must not need it. The data come back as NumPy
arrays, so every Keras backend trains on them the same way (through
`keras_seht.data.pipeline.ArrayDataset`); TensorFlow only reads files.

Images are float32, scaled to [0, 1] and, with ``normalize=True``,
standardized per channel with the training set's usual mean and standard
deviation (the constants below, as in the common PyTorch recipes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_seht._checks import check_choice, check_int

Split = tuple[np.ndarray, np.ndarray]

#: Per-channel mean and standard deviation of the training images in [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = tuple(NORMALIZATION)


class DatasetNotFoundError(FileNotFoundError):
    """A data set is neither on disk nor downloadable from here."""


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "Loading MNIST/CIFAR needs tensorflow-datasets: "
            "`pip install 'keras-seht[data]'` (or `pip install "
            "tensorflow-datasets`)."
        ) from err
    return tfds


def load_tfds_arrays(
    name: str,
    split: str,
    data_dir: str | None = None,
    limit: int | None = None,
    download: bool = True,
) -> Split:
    """Reads one split of a TFDS image-classification data set into memory.

    Args:
        name: ``"mnist"``, ``"cifar10"`` or ``"cifar100"``.
        split: A TFDS split name, ``"train"`` or ``"test"``.
        data_dir: The TFDS data directory (TFDS' default,
            ``~/tensorflow_datasets``, when None).
        limit: Keep only the first `limit` examples (for smoke runs).
        download: Let TFDS download and prepare the data when it is not
            in `data_dir`.

    Returns:
        ``(images, labels)``: uint8 ``(n, height, width, channels)`` and
        int64 ``(n,)``.

    Raises:
        DatasetNotFoundError: The data are not in `data_dir` and could not
            be downloaded; the message says how to get them.
        ImportError: tensorflow-datasets is not installed.
    """
    check_choice("name", name, DATASETS)
    if limit is not None:
        limit = check_int("limit", limit)
    tfds = _import_tfds()
    try:
        ds = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            as_supervised=True,
            download=download,
        )
        if limit is not None:
            ds = ds.take(limit)
        images, labels = [], []
        for x, y in tfds.as_numpy(ds.batch(1024)):
            images.append(x)
            labels.append(y)
    except Exception as err:  # TFDS raises many types; keep the cause.
        where = data_dir or "~/tensorflow_datasets (TFDS' default)"
        raise DatasetNotFoundError(
            f"Could not load the TFDS data set {name!r} (split {split!r}) "
            f"from the data directory {where}"
            f"{'' if download else ' with download=False'}: "
            f"{type(err).__name__}: {err}\n"
            "To get it, run on a machine with internet access:\n"
            f'    python -c "import tensorflow_datasets as tfds; '
            f"tfds.load('{name}', data_dir='DIR')\"\n"
            "then copy DIR here and pass it as `data_dir` (`--data-dir` "
            "in the example scripts)."
        ) from err
    if not images:
        raise DatasetNotFoundError(
            f"The TFDS data set {name!r} split {split!r} in {data_dir} is "
            "empty."
        )
    return np.concatenate(images), np.concatenate(labels).astype("int64")


def _prepare(images: np.ndarray, name: str, normalize: bool) -> np.ndarray:
    x = images.astype("float32") / 255.0
    if normalize:
        mean, std = NORMALIZATION[name]
        x = (x - np.asarray(mean, "float32")) / np.asarray(std, "float32")
    return x


def load_image_dataset(
    name: str,
    data_dir: str | None = None,
    normalize: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = True,
) -> tuple[Split, Split]:
    """Loads the train and test splits of MNIST, CIFAR-10 or CIFAR-100.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: float32 images
        ``(n, height, width, channels)`` in [0, 1], standardized per
        channel with `NORMALIZATION` when `normalize`, and int64 labels.

    Example (needs the data, or ``tfds.testing.mock_data``):

    >>> from keras_seht.data import load_image_dataset
    >>> (x, y), (x_test, y_test) = load_image_dataset(
    ...     "cifar10", train_limit=64, test_limit=64)  # doctest: +SKIP
    """
    train = load_tfds_arrays(name, "train", data_dir, train_limit, download)
    test = load_tfds_arrays(name, "test", data_dir, test_limit, download)
    return (
        (_prepare(train[0], name, normalize), train[1]),
        (_prepare(test[0], name, normalize), test[1]),
    )


def load_mnist(
    data_dir: str | None = None,
    normalize: bool = True,
    flatten: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = True,
) -> tuple[Split, Split]:
    """MNIST (60,000 train and 10,000 test 28x28 digits) from TFDS.

    With `flatten` the images are 784-vectors (for MLPs), else
    ``(28, 28, 1)``. See `load_image_dataset` for the other arguments.
    """
    (x, y), (x_test, y_test) = load_image_dataset(
        "mnist", data_dir, normalize, train_limit, test_limit, download
    )
    if flatten:
        x = x.reshape(len(x), -1)
        x_test = x_test.reshape(len(x_test), -1)
    return (x, y), (x_test, y_test)


def load_cifar(
    num_classes: int = 10,
    data_dir: str | None = None,
    normalize: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = True,
) -> tuple[Split, Split]:
    """CIFAR-10 or CIFAR-100 from TFDS; `num_classes` is 10 or 100.

    50,000 train and 10,000 test 32x32x3 images. See `load_image_dataset`.
    """
    check_choice("num_classes", num_classes, (10, 100))
    return load_image_dataset(
        f"cifar{num_classes}",
        data_dir,
        normalize,
        train_limit,
        test_limit,
        download,
    )
