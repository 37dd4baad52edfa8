"""WikiText-2 loading (on a tiny corpus written here), batchify, BPTTDataset."""

from __future__ import annotations

import sys
import types

import keras
import numpy as np
import pytest

from keras_seht.data import wikitext
from keras_seht.data.wikitext import (
    BPTTDataset,
    Corpus,
    batchify,
    load_wikitext2,
)
from keras_seht.metrics import Perplexity

# Lines as they appear in the files (WikiText lines start with a space).
TRAIN = [" the cat sat \n", "\n", " the dog <unk> ran \n"]
VALID = [" the cat barked \n", " dog \n"]
TEST = ["\n", " a bird <unk> \n"]

# By hand: ids in order of first appearance in train, <eos> after each line.
VOCAB = ["the", "cat", "sat", "<eos>", "dog", "<unk>", "ran"]
TRAIN_IDS = [0, 1, 2, 3, 3, 0, 4, 5, 6, 3]
VALID_IDS = [0, 1, 5, 3, 4, 3]  # barked -> <unk>
TEST_IDS = [3, 5, 5, 5, 3]  # a, bird -> <unk>


def write_corpus(folder, names=wikitext.FILE_NAMES, skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in zip(wikitext.SPLITS, (TRAIN, VALID, TEST)):
        if split not in skip:
            (folder / names[split]).write_text("".join(lines), "utf-8")
    return folder


@pytest.fixture
def no_datasets(monkeypatch):
    """Makes `import datasets` fail, as when it is not installed."""
    monkeypatch.setitem(sys.modules, "datasets", None)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module serving the tiny corpus, recording the
    arguments of `load_dataset`."""
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        # Hugging Face rows are the lines, "" for blank ones.
        rows = {
            name: {"text": [ln if ln.strip() else "" for ln in lines]}
            for name, lines in zip(
                ("train", "validation", "test"), (TRAIN, VALID, TEST)
            )
        }
        return rows

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def check_tiny(corpus):
    assert isinstance(corpus, Corpus)
    assert corpus.vocab == VOCAB
    assert corpus.vocab_size == len(VOCAB)
    assert corpus.word_to_id == {w: i for i, w in enumerate(VOCAB)}
    for split, expected in zip(
        (corpus.train, corpus.valid, corpus.test),
        (TRAIN_IDS, VALID_IDS, TEST_IDS),
    ):
        assert split.dtype == np.int32
        assert split.tolist() == expected


# Pure Python and NumPy: one backend is enough (conftest). The model
# fit at the end runs on every backend.
@pytest.mark.single_backend
class TestLoadLocal:
    def test_ids_by_hand(self, tmp_path):
        folder = write_corpus(tmp_path / "wikitext-2")
        corpus = load_wikitext2(folder, source="local")
        check_tiny(corpus)
        assert corpus.source == str(folder)
        assert corpus.decode(corpus.valid) == "the cat <unk> <eos> dog <eos>"
        assert "vocab_size=7" in repr(corpus)

    def test_auto_prefers_local(self, tmp_path, fake_datasets):
        check_tiny(load_wikitext2(str(write_corpus(tmp_path / "w"))))
        assert fake_datasets == []

    def test_every_line_ends_with_eos(self, tmp_path):
        corpus = load_wikitext2(write_corpus(tmp_path), source="local")
        eos = corpus.word_to_id["<eos>"]
        assert (corpus.train == eos).sum() == len(TRAIN)  # the blank one too
        assert (corpus.test == eos).sum() == len(TEST)

    def test_pytorch_examples_names_and_parent_folder(self, tmp_path):
        write_corpus(tmp_path / "pt", names=wikitext.ALT_FILE_NAMES)
        check_tiny(load_wikitext2(tmp_path / "pt", source="local"))
        write_corpus(tmp_path / "parent" / "wikitext-2")
        check_tiny(load_wikitext2(tmp_path / "parent", source="local"))

    def test_specials_added_when_train_lacks_them(self):
        corpus = Corpus.from_lines(["b a b"], ["a c"], [""])
        assert corpus.vocab == ["b", "a", "<eos>", "<unk>"]
        assert corpus.train.tolist() == [0, 1, 0, 2]
        assert corpus.valid.tolist() == [1, 3, 2]
        assert corpus.test.tolist() == [2]

    def test_empty_train_is_an_error(self):
        with pytest.raises(ValueError, match="training split is empty"):
            Corpus.from_lines([], ["a"], ["a"])


@pytest.mark.single_backend
class TestErrors:
    def test_missing_folder(self, tmp_path):
        folder = tmp_path / "nowhere"
        with pytest.raises(FileNotFoundError) as info:
            load_wikitext2(folder, source="local")
        message = str(info.value)
        assert str(folder) in message and "does not exist" in message
        assert wikitext.WIKITEXT2_URL in message
        assert "pip install datasets" in message

    def test_missing_one_file(self, tmp_path):
        folder = write_corpus(tmp_path / "w", skip=("valid",))
        with pytest.raises(FileNotFoundError) as info:
            load_wikitext2(folder, source="local")
        message = str(info.value)
        assert "'wiki.valid.tokens'" in message
        assert str(folder) in message
        assert wikitext.WIKITEXT2_URL in message

    def test_auto_without_datasets(self, tmp_path, no_datasets):
        folder = write_corpus(tmp_path / "w", skip=("test",))
        with pytest.raises(FileNotFoundError, match="wiki.test.tokens"):
            load_wikitext2(folder)
        with pytest.raises(FileNotFoundError, match="no `data_dir`"):
            load_wikitext2()

    def test_datasets_not_installed(self, no_datasets):
        with pytest.raises(ImportError, match="pip install datasets"):
            load_wikitext2(source="datasets")

    def test_bad_arguments(self, tmp_path):
        with pytest.raises(ValueError, match="`source` must be one of"):
            load_wikitext2(tmp_path, source="web")
        with pytest.raises(ValueError, match="needs `data_dir`"):
            load_wikitext2(source="local")


@pytest.mark.single_backend
class TestLoadDatasets:
    def test_same_ids_as_local(self, fake_datasets):
        corpus = load_wikitext2(source="datasets")
        check_tiny(corpus)
        assert fake_datasets == [(("Salesforce/wikitext", "wikitext-2-v1"), {})]
        assert corpus.source == "datasets:Salesforce/wikitext/wikitext-2-v1"

    def test_auto_falls_back_with_a_warning(self, tmp_path, fake_datasets):
        check_tiny(load_wikitext2())
        with pytest.warns(UserWarning, match="does not exist"):
            check_tiny(load_wikitext2(tmp_path / "nowhere"))
        folder = write_corpus(tmp_path / "w", skip=("train",))
        with pytest.warns(UserWarning, match="'wiki.train.tokens' not found"):
            check_tiny(load_wikitext2(folder))
        assert len(fake_datasets) == 3


@pytest.mark.single_backend
class TestBatchify:
    def test_shape_and_streams(self):
        data = batchify(np.arange(11), 3)
        assert data.dtype == np.int32
        np.testing.assert_array_equal(data, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
        assert batchify(np.arange(6), 1).tolist() == [list(range(6))]

    def test_errors(self):
        with pytest.raises(ValueError, match="`batch_size`"):
            batchify(np.arange(5), 0)
        with pytest.raises(ValueError, match="1-D"):
            batchify(np.zeros((2, 3), "int32"), 1)
        with pytest.raises(ValueError, match="1-D array of integer"):
            batchify(np.zeros(4, "float32"), 2)
        with pytest.raises(ValueError, match="fewer than batch_size=4"):
            batchify(np.arange(3), 4)


@pytest.mark.single_backend
class TestBPTTDataset:
    def test_windows(self):
        # 23 tokens, 2 streams of 11: 10 predictable positions per stream.
        ds = BPTTDataset(np.arange(23), batch_size=2, seq_len=4)
        assert isinstance(ds, keras.utils.PyDataset)
        assert ds.workers == 1  # super().__init__ ran (no warning)
        np.testing.assert_array_equal(
            ds.data, [np.arange(11), np.arange(11, 22)]
        )
        assert len(ds) == 3
        starts = [0, 4, 8]
        lengths = [4, 4, 2]  # the last window is shorter
        for k, (start, length) in enumerate(zip(starts, lengths)):
            x, y = ds[k]
            assert x.shape == y.shape == (2, length)
            assert x.dtype == y.dtype == np.int32
            np.testing.assert_array_equal(x, ds.data[:, start : start + length])
            np.testing.assert_array_equal(y, x + 1)  # the next tokens
        np.testing.assert_array_equal(ds[-1][0], ds[2][0])
        with pytest.raises(IndexError):
            ds[3]
        # Consecutive windows continue each stream (order for carried state).
        joined = np.concatenate([ds[k][0] for k in range(len(ds))], axis=1)
        np.testing.assert_array_equal(joined, ds.data[:, :-1])

    def test_drop_remainder(self):
        ds = BPTTDataset(np.arange(23), 2, 4, drop_remainder=True)
        assert len(ds) == 2
        assert [ds[k][0].shape for k in range(2)] == [(2, 4), (2, 4)]
        # seq_len dividing n - 1: nothing to drop.
        for drop in (False, True):
            ds = BPTTDataset(np.arange(22), 2, 5, drop_remainder=drop)
            assert len(ds) == 2 and ds[1][1].shape == (2, 5)

    def test_pad_remainder(self):
        ds = BPTTDataset(np.arange(23), 2, 4, pad_remainder=True)
        assert len(ds) == 3
        for k in range(2):
            x, y, w = ds[k]
            np.testing.assert_array_equal(x, ds.data[:, 4 * k : 4 * k + 4])
            np.testing.assert_array_equal(y, x + 1)
            assert w.dtype == np.float32 and (w == 1).all()
        x, y, w = ds[2]  # 2 real positions, 2 padded
        assert x.shape == y.shape == w.shape == (2, 4)
        np.testing.assert_array_equal(x, [[8, 9, 0, 0], [19, 20, 0, 0]])
        np.testing.assert_array_equal(y, [[9, 10, 0, 0], [20, 21, 0, 0]])
        np.testing.assert_array_equal(w, [[1, 1, 0, 0]] * 2)

    def test_defaults_and_kwargs(self):
        ds = BPTTDataset(np.arange(2000), wikitext.TRAIN_BATCH_SIZE, workers=2)
        assert ds.seq_len == wikitext.SEQ_LEN == 35
        assert ds.data.shape == (20, 100)
        assert ds.workers == 2 and wikitext.EVAL_BATCH_SIZE == 10

    def test_errors(self):
        with pytest.raises(ValueError, match="`seq_len`"):
            BPTTDataset(np.arange(20), 2, seq_len=0)
        with pytest.raises(ValueError, match="`drop_remainder`"):
            BPTTDataset(np.arange(20), 2, drop_remainder="yes")
        with pytest.raises(ValueError, match="at most one of"):
            BPTTDataset(
                np.arange(20), 2, drop_remainder=True, pad_remainder=True
            )
        with pytest.raises(ValueError, match="Too few tokens"):
            BPTTDataset(np.arange(9), 2, seq_len=4, drop_remainder=True)
        with pytest.raises(ValueError, match="Too few tokens"):
            BPTTDataset(np.arange(3), 3)


@pytest.mark.parametrize("remainder", ["keep", "pad"])
def test_tiny_language_model_fits_and_scores(tmp_path, remainder):
    """An Embedding + Dense LM fits an epoch of BPTT windows; Perplexity
    over the windows (the last one shorter) is exp of the token-mean NLL."""
    if remainder == "keep" and keras.config.backend() == "tensorflow":
        pytest.skip("Keras fixes PyDataset shapes from 2 batches under TF")
    corpus = load_wikitext2(write_corpus(tmp_path), source="local")
    ids = np.tile(corpus.train, 12)  # 120 tokens
    train = BPTTDataset(
        ids, batch_size=4, seq_len=7, pad_remainder=remainder == "pad"
    )  # 4 streams of 30 tokens: 29 positions, windows of 7, 7, 7, 7, 1
    assert len(train) == 5
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(corpus.vocab_size, 8),
            keras.layers.Dense(corpus.vocab_size),
        ]
    )
    # Keras passes sample weights (zero on the padding) to weighted_metrics
    # only.
    metrics = "weighted_metrics" if remainder == "pad" else "metrics"
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **{metrics: [Perplexity()]},
    )
    history = model.fit(train, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    logs = model.evaluate(train, verbose=0, return_dict=True)
    data = train.data
    logits = keras.ops.convert_to_numpy(model(data[:, :-1]))
    logits = logits.astype("float64")
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, data[:, 1:, None], -1)
    # The model has no memory: scoring the whole streams at once is the
    # same as scoring the windows.
    np.testing.assert_allclose(logs["perplexity"], np.exp(nll.mean()), 1e-4)
