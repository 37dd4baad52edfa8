"""WikiText-2 for word-level language modeling, as in the classic recipe.

The SEHT paper's WikiText-2 results use the PyTorch ``word_language_model``
example (2-layer LSTM/GRU, truncated backpropagation through time). This
module reproduces its data pipeline for Keras:

- :func:`load_wikitext2` reads the three splits and maps words to ids the
  way that example's ``data.py`` does: every line (empty lines included) is
  split on whitespace and ends with an ``<eos>`` token, and ids are given in
  order of first appearance in the training split.
- :func:`batchify` cuts a token stream into ``batch_size`` parallel streams.
- :class:`BPTTDataset` serves consecutive ``(x, y)`` windows of
  ``seq_len`` tokens from those streams, in order, as a
  `keras.utils.PyDataset`.

Getting the data: either unzip ``wikitext-2-v1.zip`` (from
:data:`WIKITEXT2_URL`, the WikiText author's mirror; the original
``s3.amazonaws.com/research.metamind.io`` links are gone) and pass the
``wikitext-2`` folder it contains, or ``pip install datasets`` and let the
Hugging Face copy (``Salesforce/wikitext``, config ``wikitext-2-v1``) be
downloaded. Both give the same token ids. The copy in the PyTorch examples
repository (``word_language_model/data/wikitext-2/{train,valid,test}.txt``)
holds the same files under other names and is accepted too.

Example::

    from keras_seht.data.wikitext import BPTTDataset, load_wikitext2
    from keras_seht.metrics import Perplexity

    corpus = load_wikitext2("data/wikitext-2")  # corpus.vocab_size == 33278
    train = BPTTDataset(corpus.train, batch_size=20, seq_len=35)
    valid = BPTTDataset(corpus.valid, batch_size=10, seq_len=35)
    model.compile(..., metrics=[Perplexity()])  # logits, token-exact
    model.fit(train, validation_data=valid, shuffle=False)  # keep the order
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import keras
import numpy as np

from keras_seht._checks import check_choice, check_int

#: Where ``wikitext-2-v1.zip`` (the tokenized WikiText-2) can be downloaded.
WIKITEXT2_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"
#: The Hugging Face Hub dataset and configuration used by ``source="datasets"``.
HF_DATASET = "Salesforce/wikitext"
HF_CONFIG = "wikitext-2-v1"
#: Words in the WikiText-2 vocabulary, ``<eos>`` included.
WIKITEXT2_VOCAB_SIZE = 33278

#: The classic recipe's batch sizes and BPTT length.
TRAIN_BATCH_SIZE = 20
EVAL_BATCH_SIZE = 10
SEQ_LEN = 35

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
#: File names in the official zip, and in the PyTorch examples repository.
FILE_NAMES = {split: f"wiki.{split}.tokens" for split in SPLITS}
ALT_FILE_NAMES = {split: f"{split}.txt" for split in SPLITS}

_HOW_TO_GET = (
    f"Download {WIKITEXT2_URL}, unzip it and pass the `wikitext-2` folder it "
    "contains as `data_dir`; or `pip install datasets` and call "
    "load_wikitext2(source='datasets') to fetch the Hugging Face copy "
    f"({HF_DATASET}, {HF_CONFIG})."
)


@dataclass(frozen=True, eq=False, repr=False)
class Corpus:
    """A tokenized language-modeling corpus: a vocabulary and three splits.

    Attributes:
        vocab: The words; a word's id is its index.
        word_to_id: The inverse of `vocab`.
        train: int32 token ids of the training split, shape ``(n,)``.
        valid: int32 token ids of the validation split.
        test: int32 token ids of the test split.
        source: Where the text came from (a folder, or the Hugging Face
            dataset), for logs and result files.
    """

    vocab: list[str]
    word_to_id: dict[str, int]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of words in the vocabulary."""
        return len(self.vocab)

    def decode(self, ids: Any) -> str:
        """The words of `ids`, joined by spaces."""
        return " ".join(self.vocab[int(i)] for i in np.ravel(ids))

    def __repr__(self) -> str:
        return (
            f"Corpus(vocab_size={self.vocab_size}, train={len(self.train)}, "
            f"valid={len(self.valid)}, test={len(self.test)} tokens, "
            f"source={self.source!r})"
        )

    @classmethod
    def from_lines(
        cls,
        train: Iterable[str],
        valid: Iterable[str],
        test: Iterable[str],
        source: str = "",
    ) -> Corpus:
        """Tokenizes three splits given as lines of text.

        Each line is split on whitespace (`str.split`) and gets an ``<eos>``
        token appended, so an empty line becomes a lone ``<eos>``, exactly
        as in the classic ``data.py``. The vocabulary holds the words of
        `train`, numbered in order of first appearance, then ``<eos>`` and
        ``<unk>`` if `train` lacks them; words of `valid` and `test` that
        `train` lacks become ``<unk>``.

        The classic ``data.py`` also adds the valid and test words to its
        dictionary. WikiText-2 was built with the training vocabulary
        (other words are ``<unk>`` already), so on it the two agree: 33,278
        words, and every id the classic one. On other corpora, words seen
        only in valid or test become ``<unk>`` here rather than getting
        ids no training token ever had.
        """
        vocab: list[str] = []
        word_to_id: dict[str, int] = {}

        def add(word: str) -> int:
            index = word_to_id.get(word)
            if index is None:
                index = word_to_id[word] = len(vocab)
                vocab.append(word)
            return index

        train_ids = [add(w) for line in train for w in (*line.split(), EOS)]
        if not train_ids:
            raise ValueError("The training split is empty: no lines read.")
        add(EOS)
        unk = add(UNK)

        def encode(lines: Iterable[str]) -> np.ndarray:
            ids = [
                word_to_id.get(w, unk)
                for line in lines
                for w in (*line.split(), EOS)
            ]
            return np.asarray(ids, dtype="int32")

        return cls(
            vocab=vocab,
            word_to_id=word_to_id,
            train=np.asarray(train_ids, dtype="int32"),
            valid=encode(valid),
            test=encode(test),
            source=source,
        )


def _find_files(data_dir: str) -> dict[str, str] | None:
    """The three split files in `data_dir`, or None when they are not all there.

    They may be in its ``wikitext-2`` subfolder, under either naming.
    """
    for folder in (data_dir, os.path.join(data_dir, "wikitext-2")):
        for names in (FILE_NAMES, ALT_FILE_NAMES):
            paths = {s: os.path.join(folder, names[s]) for s in SPLITS}
            if all(os.path.isfile(p) for p in paths.values()):
                return paths
    return None


def _problem(data_dir: str) -> str:
    """What is missing from `data_dir`, naming the file and the folder."""
    folder = os.path.abspath(data_dir)
    if not os.path.isdir(folder):
        return f"WikiText-2 folder not found: {folder!r} does not exist."
    missing = [
        FILE_NAMES[s]
        for s in SPLITS
        if not os.path.isfile(os.path.join(folder, FILE_NAMES[s]))
    ]
    return (
        f"WikiText-2 file {missing[0]!r} not found in folder {folder!r} "
        f"(expected {', '.join(FILE_NAMES.values())}; missing: "
        f"{', '.join(missing)})."
    )


def _missing_error(data_dir: str) -> FileNotFoundError:
    """The error for a `data_dir` without the three split files."""
    return FileNotFoundError(f"{_problem(data_dir)} {_HOW_TO_GET}")


def _read_lines(path: str) -> Iterable[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


def _load_local(data_dir: str) -> Corpus:
    paths = _find_files(data_dir)
    if paths is None:
        raise _missing_error(data_dir)
    train, valid, test = (_read_lines(paths[s]) for s in SPLITS)
    return Corpus.from_lines(
        train,
        valid,
        test,
        source=os.path.dirname(os.path.abspath(paths["train"])),
    )


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "load_wikitext2(source='datasets') needs the Hugging Face "
            "`datasets` package: `pip install datasets`. Or download "
            f"{WIKITEXT2_URL}, unzip it and pass the `wikitext-2` folder as "
            "`data_dir`."
        ) from error
    return datasets


def _load_datasets(datasets: Any) -> Corpus:
    splits = datasets.load_dataset(HF_DATASET, HF_CONFIG)
    # Hugging Face rows are the files' lines ("" for blank ones).
    train, valid, test = (
        splits[name]["text"] for name in ("train", "validation", "test")
    )
    return Corpus.from_lines(
        train, valid, test, source=f"datasets:{HF_DATASET}/{HF_CONFIG}"
    )


def load_wikitext2(
    data_dir: str | os.PathLike | None = None, *, source: str = "auto"
) -> Corpus:
    """Loads WikiText-2 (tokenized, ``wikitext-2-v1``) as token ids.

    Tokenization follows the PyTorch ``word_language_model`` example used
    by the SEHT paper: each line of a split, empty lines included, is split
    on whitespace and followed by ``<eos>``; ids number the training words
    in order of first appearance. WikiText-2 already replaces rare words by
    ``<unk>``, so the vocabulary has 33,278 words (``<eos>`` is id 0,
    from the blank first line) and the splits have about 2.09M (train),
    218k (valid) and 246k (test) tokens. See :meth:`Corpus.from_lines` for
    the exact rules.

    Args:
        data_dir: Folder holding ``wiki.train.tokens``,
            ``wiki.valid.tokens`` and ``wiki.test.tokens`` (the
            ``wikitext-2`` folder of ``wikitext-2-v1.zip``; its parent, and
            the PyTorch examples' ``train.txt``/``valid.txt``/``test.txt``,
            work too).
        source: ``"local"`` reads `data_dir`; ``"datasets"`` loads the
            Hugging Face copy with the `datasets` library (downloaded once,
            then cached by `datasets`); ``"auto"`` reads `data_dir` when it
            holds the files, and otherwise uses `datasets` if installed (with
            a warning when a `data_dir` was given).

    Returns:
        A :class:`Corpus` with ``vocab``, ``word_to_id`` and int32 id arrays
        ``train``, ``valid``, ``test``.

    Raises:
        FileNotFoundError: The files are not in `data_dir` (the message
            names the file, the folder and how to get the data).
        ImportError: ``source="datasets"`` without the `datasets` package.
        ValueError: A bad `source`, or ``source="local"`` without
            `data_dir`.

    Example:
    >>> corpus = load_wikitext2("data/wikitext-2")  # doctest: +SKIP
    >>> corpus.vocab_size  # doctest: +SKIP
    33278
    """
    check_choice("source", source, ("auto", "local", "datasets"))
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
    if source == "local":
        if data_dir is None:
            raise ValueError(
                "load_wikitext2(source='local') needs `data_dir`, the folder "
                f"holding {', '.join(FILE_NAMES.values())}. Received: "
                f"data_dir=None. {_HOW_TO_GET}"
            )
        return _load_local(data_dir)
    if source == "datasets":
        return _load_datasets(_import_datasets())

    # source == "auto"
    if data_dir is not None and _find_files(data_dir) is not None:
        return _load_local(data_dir)
    try:
        datasets = _import_datasets()
    except ImportError as error:
        if data_dir is not None:
            raise _missing_error(data_dir) from error
        raise FileNotFoundError(
            "WikiText-2 not found: no `data_dir` was given and the `datasets` "
            f"package is not installed. {_HOW_TO_GET}"
        ) from error
    if data_dir is not None:
        warnings.warn(
            f"{_problem(data_dir)} Loading the Hugging Face copy with "
            "`datasets` instead.",
            UserWarning,
            stacklevel=2,
        )
    return _load_datasets(datasets)


def batchify(ids: Any, batch_size: int) -> np.ndarray:
    """Cuts a token stream into `batch_size` contiguous streams.

    As in the classic recipe, the last ``len(ids) % batch_size`` tokens are
    dropped and the rest reshaped so that row ``j`` holds tokens
    ``j*n .. (j+1)*n - 1`` (the classic code keeps the transpose, time
    first, where column ``j`` is that stream; Keras RNNs are batch-first).

    Args:
        ids: 1-D integer token ids.
        batch_size: Number of streams, >= 1.

    Returns:
        An int32 array of shape ``(batch_size, len(ids) // batch_size)``.

    Example:
    >>> batchify(np.arange(10), 3)
    array([[0, 1, 2],
           [3, 4, 5],
           [6, 7, 8]], dtype=int32)
    """
    batch_size = check_int("batch_size", batch_size)
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (
        ids.size == 0 or np.issubdtype(ids.dtype, np.integer)
    ):
        raise ValueError(
            "`ids` must be a 1-D array of integer token ids. Received: "
            f"shape={ids.shape}, dtype={ids.dtype}"
        )
    n = len(ids) // batch_size
    if n == 0:
        raise ValueError(
            f"`ids` has {len(ids)} tokens, fewer than batch_size={batch_size}."
        )
    return ids[: n * batch_size].reshape(batch_size, n).astype("int32")


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return bool(value)


class BPTTDataset(keras.utils.PyDataset):
    """Consecutive ``(x, y)`` windows for truncated BPTT, in order.

    The token stream is :func:`batchify`-ed into ``data`` of shape
    ``(batch_size, n)``; batch ``k`` is, with ``i = k * seq_len``::

        x = data[:, i : i + seq_len]
        y = data[:, i + 1 : i + 1 + seq_len]   # the next token of each x

    so row ``j`` of batch ``k + 1`` continues row ``j`` of batch ``k``: a
    stateful RNN can carry its hidden state across batches. The windows
    cover the ``n - 1`` predictable positions, and the last one is shorter
    when `seq_len` does not divide ``n - 1``. What to do with it:

    - keep it (the default, as in the classic recipe): every token is
      scored. JAX and TensorFlow compile the step once more for its shape,
      and a stateful Keras RNN may refuse it. **Under the TensorFlow
      backend it fails**: Keras fixes a `PyDataset`'s batch shapes from its
      first two batches there. Use one of the two options below with
      TensorFlow.
    - ``drop_remainder=True``: drop it; every batch has the same shape, and
      up to ``seq_len - 1`` positions per stream go unscored (fine for
      training).
    - ``pad_remainder=True``: pad it to `seq_len` with token id 0, and
      yield ``(x, y, sample_weight)`` batches whose ``(batch_size,
      seq_len)`` weights are 1 on real tokens and 0 on the padding: fixed
      shapes and every token scored, e.g. by
      :class:`keras_seht.metrics.Perplexity` passed as
      ``compile(weighted_metrics=[Perplexity()])`` (Keras gives sample
      weights to `weighted_metrics` only). The compiled loss of that last
      batch, a mean over all positions, is diluted by the padding; the
      weighted metric is exact.

    There is no shuffling. `model.fit` shuffles the batch order of a
    `PyDataset` unless told not to, so call ``model.fit(ds, shuffle=False)``
    when the order matters (a carried hidden state).

    Args:
        ids: 1-D integer token ids (e.g. ``corpus.train``).
        batch_size: Number of parallel streams (the classic recipe uses
            :data:`TRAIN_BATCH_SIZE` = 20 to train and
            :data:`EVAL_BATCH_SIZE` = 10 to evaluate).
        seq_len: Window length, the BPTT horizon (:data:`SEQ_LEN` = 35).
        drop_remainder: Drop the last window if it is shorter.
        pad_remainder: Pad the last window and add sample weights (see
            above); not together with `drop_remainder`.
        **kwargs: `keras.utils.PyDataset` arguments (``workers``,
            ``use_multiprocessing``, ``max_queue_size``).

    Example:
    >>> ds = BPTTDataset(np.arange(21), batch_size=2, seq_len=4)
    >>> ds.data
    array([[ 0,  1,  2,  3,  4,  5,  6,  7,  8,  9],
           [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]], dtype=int32)
    >>> len(ds), ds[2][0].tolist(), ds[2][1].tolist()
    (3, [[8], [18]], [[9], [19]])
    """

    def __init__(
        self,
        ids: Any,
        batch_size: int,
        seq_len: int = SEQ_LEN,
        *,
        drop_remainder: bool = False,
        pad_remainder: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.batch_size = check_int("batch_size", batch_size)
        self.seq_len = check_int("seq_len", seq_len)
        self.drop_remainder = _check_bool("drop_remainder", drop_remainder)
        self.pad_remainder = _check_bool("pad_remainder", pad_remainder)
        if self.drop_remainder and self.pad_remainder:
            raise ValueError(
                "Pass at most one of `drop_remainder` and `pad_remainder`. "
                "Received: drop_remainder=True, pad_remainder=True"
            )
        self.data = batchify(ids, self.batch_size)
        positions = self.data.shape[1] - 1
        if self.drop_remainder:
            self._num_batches = positions // self.seq_len
        else:
            self._num_batches = math.ceil(positions / self.seq_len)
        if self._num_batches == 0:
            raise ValueError(
                f"Too few tokens for one batch: {len(np.ravel(ids))} tokens "
                f"give {self.batch_size} streams of {self.data.shape[1]}, "
                f"and a window needs seq_len + 1 = {self.seq_len + 1} tokens "
                "per stream"
                + (" (drop_remainder=True)." if self.drop_remainder else ".")
            )

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        if index < 0:
            index += self._num_batches
        if not 0 <= index < self._num_batches:
            raise IndexError(
                f"BPTTDataset index {index} out of range for "
                f"{self._num_batches} batches."
            )
        start = index * self.seq_len
        stop = min(start + self.seq_len, self.data.shape[1] - 1)
        x = np.ascontiguousarray(self.data[:, start:stop])
        y = np.ascontiguousarray(self.data[:, start + 1 : stop + 1])
        if not self.pad_remainder:
            return x, y
        pad = self.seq_len - (stop - start)
        weight = np.ones((self.batch_size, self.seq_len), "float32")
        if pad:
            x = np.pad(x, ((0, 0), (0, pad)))
            y = np.pad(y, ((0, 0), (0, pad)))
            weight[:, self.seq_len - pad :] = 0.0
        return x, y, weight
