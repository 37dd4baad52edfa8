"""scripts/synthetic_wikitext.py: a corpus the WikiText-2 loader reads."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from keras_seht.data import load_wikitext2

# A NumPy script and a pure-Python loader: one backend (conftest).
pytestmark = pytest.mark.single_backend

SCRIPT = (
    pathlib.Path(__file__).resolve().parents[1]
    / "scripts"
    / "synthetic_wikitext.py"
)


def test_synthetic_wikitext_is_a_loadable_corpus(tmp_path):
    args = [str(tmp_path), "--vocab", "50", "--train-tokens", "3000"]
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True)
    corpus = load_wikitext2(str(tmp_path), source="local")
    words = set(corpus.vocab) - {"<eos>", "<unk>"}
    assert words and all(w.startswith("w") for w in words)
    assert 3000 <= len(corpus.train) <= 3000 + 3000 // 5
    assert 300 <= len(corpus.valid) <= 300 + 300 // 2
    # A Markov chain: far fewer distinct bigrams than a uniform stream.
    pairs = set(zip(corpus.train[:-1], corpus.train[1:]))
    assert len(pairs) < 0.5 * (len(corpus.train) - 1)
