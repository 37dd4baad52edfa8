"""Writes a WikiText-2-shaped synthetic corpus, for runs without the data.

    python scripts/synthetic_wikitext.py OUT_DIR [--vocab 2000]
        [--train-tokens 200000] [--seed 0]

Writes ``wiki.train.tokens``, ``wiki.valid.tokens`` and
``wiki.test.tokens`` (valid and test a tenth of train each) drawn from a
random sparse second-order Markov chain over ``--vocab`` words with a
Zipf-like unigram law, so a language model can learn real structure (its
perplexity falls well below the vocabulary size) yet nothing of English.
It stands in for WikiText-2 on machines that cannot download it; numbers
measured on it are not WikiText-2 numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def markov_corpus(
    vocab: int, tokens: int, seed: int, walk: int, successors: int = 8
) -> list[str]:
    """Lines of words ``w0..w{vocab-1}``: walk number `walk` of a Markov chain.

    The sparse chain is drawn with `seed`: each word has `successors` possible
    next words, Zipf-distributed, with Dirichlet(0.5) probabilities.
    """
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab + 1)
    table = rng.choice(vocab, size=(vocab, successors), p=zipf / zipf.sum())
    weights = rng.dirichlet(np.full(successors, 0.5), size=vocab)
    rng = np.random.default_rng([seed, walk])
    lines, line, word = [], [], int(rng.integers(vocab))
    for _ in range(tokens):
        line.append(f"w{word}")
        if len(line) >= 5 and rng.random() < 0.05:
            lines.append(" " + " ".join(line) + " ")
            line = []
        word = int(table[word, rng.choice(successors, p=weights[word])])
    lines.append(" " + " ".join(line) + " ")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Writes the three synthetic WikiText-2 split files to ``out_dir``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--train-tokens", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    sizes = {
        "train": args.train_tokens,
        "valid": args.train_tokens // 10,
        "test": args.train_tokens // 10,
    }
    for walk, (split, tokens) in enumerate(sizes.items()):
        # One chain, an independent walk per split.
        lines = markov_corpus(args.vocab, tokens, args.seed, walk)
        path = os.path.join(args.out_dir, f"wiki.{split}.tokens")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {path}: {sum(len(x.split()) for x in lines)} tokens")


if __name__ == "__main__":
    main(sys.argv[1:])
