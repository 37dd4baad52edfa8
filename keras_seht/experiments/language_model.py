"""The WikiText-2 experiments of the SEHT paper (``examples/wikitext2_rnn.py``).

The classic PyTorch ``word_language_model`` recipe, in Keras:

- a 2-layer LSTM (dropout 0.5) or GRU (dropout 0.3) with 512-wide
  embeddings and states (`keras_seht.applications.rnn_language_model`,
  embedding and decoder U[-0.1, 0.1], recurrent weights PyTorch's
  U[-1/sqrt(512), 1/sqrt(512)]);
- BPTT: the training tokens as 20 parallel streams cut into windows of
  35 tokens; the hidden state carries over from one window to the next
  (stateful layers, reset at every epoch) and is not differentiated
  through; evaluation streams are 10 wide;
- plain SGD, learning rate 20, gradients clipped to a global norm of
  0.25, the learning rate divided by 4 after every epoch whose validation
  loss is not a new best; 40 epochs;
- the weights of the best validation epoch are kept (``best.weights.npz``)
  and give the final ``valid_perplexity`` and ``test_perplexity``.

Perplexity is exact over the whole split (`keras_seht.metrics.Perplexity`:
exp of the token-mean negative log-likelihood). The training windows drop
the last incomplete one (at most 34 tokens of each 100k-token stream);
evaluation pads it and gives the padding zero weight.

It runs as one process: under several data-parallel workers
(``torchrun``, ``TF_CONFIG``, a JAX coordinator; `keras_seht.distributed`)
it stops at once with a RuntimeError (`check_single_process`).

Methods: ``baseline``, ``seht-d``, ``seht-h`` (at ``--strength``, ``--p``,
``--max-iter``), ``confidence-penalty`` and ``label-smoothing``, ``+``
combining. Every method builds its recurrent layers without cuDNN
(``use_cudnn=False``): cuDNN kernels have no double backward, so SEHT
cannot use them, and the same kernels for every method keep the time
comparison fair (Keras' fused torch LSTM path also breaks stateful
training under torch: it assigns the state in place during the
backward's lifetime).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Sequence

import keras
import numpy as np

from keras_seht import distributed
from keras_seht._io import write_npz
from keras_seht.applications import reset_rnn_states, rnn_language_model
from keras_seht.data import BPTTDataset, load_wikitext2
from keras_seht.experiments import cli, recipes, report
from keras_seht.experiments.runner import run_training
from keras_seht.losses import SparseCategoricalCrossentropy
from keras_seht.metrics import Perplexity

METHODS = (
    "seht-d",
    "seht-h",
    "confidence-penalty",
    "label-smoothing",
)
#: Dropout per cell, as in the paper.
DROPOUT = {"lstm": 0.5, "gru": 0.3}
TRAIN_BATCH, EVAL_BATCH, SEQ_LEN = 20, 10, 35
#: Smoke mode: a tiny model and a few windows.
SMOKE = {"epochs": 2, "units": 16, "embed_dim": 16, "seq_len": 8}


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser of the WikiText-2 example."""
    parser = argparse.ArgumentParser(
        description="WikiText-2 word-level LSTM/GRU language model with "
        "SEHT (the SEHT paper's third table)."
    )
    cli.add_run_arguments(
        parser,
        methods=METHODS,
        default_methods=("baseline", "seht-d"),
        epochs=40,
        batch_size=TRAIN_BATCH,
        output_dir="runs/wikitext2",
        data_dir_help="folder holding wiki.train.tokens, wiki.valid.tokens "
        "and wiki.test.tokens (default: the `datasets` library's copy)",
        combine=True,
    )
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--strength", type=cli.non_negative_float, default=1e-3)
    parser.add_argument("--p", type=float, default=0.01)
    parser.add_argument("--max-iter", type=cli.positive_int, default=None)
    parser.add_argument("--learning-rate", type=float, default=20.0)
    parser.add_argument("--clipnorm", type=float, default=0.25)
    parser.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout (default: 0.5 for lstm, 0.3 for gru)",
    )
    parser.add_argument("--units", type=cli.positive_int, default=512)
    parser.add_argument("--embed-dim", type=cli.positive_int, default=512)
    parser.add_argument("--seq-len", type=cli.positive_int, default=SEQ_LEN)
    return parser


class StatefulEvaluation(keras.callbacks.Callback):
    """Validation of a stateful language model, and its best weights.

    At every epoch's start it resets the training model's hidden state;
    at its end it copies the weights into `eval_model` (the same network
    built for the evaluation batch size), measures the exact perplexity
    of `valid`, writes ``val_loss`` (its log) and ``val_perplexity`` into
    the logs, and saves the weights to `best_path` when ``val_loss`` is a
    new best. Its state (the best value) is checkpointed by the runner.
    """

    def __init__(
        self, eval_model: keras.Model, valid: BPTTDataset, best_path: str
    ) -> None:
        super().__init__()
        self.eval_model = eval_model
        self.valid = valid
        self.best_path = best_path
        self.best = math.inf

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Resets the training model's hidden state."""
        reset_rnn_states(self.model)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Measures the validation perplexity; saves a new best's weights."""
        weights = [
            keras.ops.convert_to_numpy(v.value)
            for v in self.model.trainable_variables
        ]
        perplexity = evaluate_perplexity(self.eval_model, weights, self.valid)
        loss = math.log(perplexity)
        if logs is not None:
            logs["val_loss"] = loss
            logs["val_perplexity"] = perplexity
        if loss < self.best:
            self.best = loss
            save_weights(self.best_path, weights)

    def get_state(self) -> dict[str, Any]:
        """The callback's state (the best ``val_loss``), for checkpoints."""
        return {"best": self.best}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state` result."""
        self.best = float(state["best"])


def evaluate_perplexity(
    model: keras.Model, weights: list[np.ndarray], data: BPTTDataset
) -> float:
    """Exact perplexity of `data` with `model`'s trainable variables `weights`.

    One pass, from a fresh hidden state.
    """
    for variable, value in zip(model.trainable_variables, weights):
        variable.assign(value)
    reset_rnn_states(model)
    result = model.evaluate(data, verbose=0, return_dict=True)
    return float(result["perplexity"])


def save_weights(path: str, weights: list[np.ndarray]) -> None:
    """Writes `weights` to `path` (a ``.npz`` file), atomically."""
    write_npz(path, *weights)


def load_weights(path: str) -> list[np.ndarray]:
    """The weights that `save_weights` wrote to `path`."""
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def _build(
    args: argparse.Namespace,
    vocab_size: int,
    batch_size: int,
    seed: int,
) -> keras.Model:
    return rnn_language_model(
        vocab_size,
        cell=args.cell,
        embed_dim=args.embed_dim,
        units=args.units,
        layers=2,
        dropout=args.dropout,
        use_cudnn=False,
        stateful=True,
        batch_size=batch_size,
        rnn_init="torch",
        seed=seed,
    )


def check_single_process() -> None:
    """Refuses a data-parallel run (`keras_seht.distributed`).

    The recipe is not written for several workers: its stateful RNN
    carries each of the :math:`b` parallel token streams from window to
    window, which a worker holding :math:`b / K` of every batch would
    split across workers (each worker's model would need its own
    per-worker batch size, and so would the evaluation model), and the
    best-weights file is written by the chief alone and read back by
    every worker. Run it as one process (it fits one GPU).

    Raises:
        RuntimeError: There are several workers.
    """
    count = distributed.world_size()
    if count > 1:
        raise RuntimeError(
            "The WikiText-2 recipe (examples/wikitext2_rnn.py) runs as one "
            f"process, not {count} data-parallel workers: its stateful RNN "
            "carries every token stream across windows, and its best "
            "weights are read back by every worker. Start it as one "
            "process (without torchrun, TF_CONFIG or a JAX coordinator)."
        )


def train_one(
    method: str, seed: int, args: argparse.Namespace, corpus: Any
) -> dict[str, Any]:
    """One resumable run; returns its results (one process only)."""
    check_single_process()
    parts = recipes.parse_method(method, METHODS)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    vocab = len(corpus.vocab)
    model = _build(args, vocab, args.batch_size, seed)
    eval_model = _build(args, vocab, EVAL_BATCH, seed)
    smoothing = 0.1 if "label-smoothing" in parts else 0.0
    loss = SparseCategoricalCrossentropy(
        from_logits=True, label_smoothing=smoothing
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=args.learning_rate, global_clipnorm=args.clipnorm
        ),
        loss=loss,
        seht=recipes.penalties(parts, args.strength, args.p, args.max_iter)
        or None,
    )
    eval_model.compile(loss=loss, weighted_metrics=[Perplexity()])

    def windows(ids: np.ndarray, batch: int) -> BPTTDataset:
        return BPTTDataset(ids, batch, args.seq_len, pad_remainder=True)

    output_dir = cli.run_dir(args.output_dir, method, seed)
    best_path = os.path.join(output_dir, "best.weights.npz")
    evaluation = StatefulEvaluation(
        eval_model, windows(corpus.valid, EVAL_BATCH), best_path
    )

    def evaluate(model: keras.Model, history: dict[str, list]) -> dict:
        best = load_weights(best_path)
        return {
            "valid_perplexity": evaluate_perplexity(
                eval_model, best, windows(corpus.valid, EVAL_BATCH)
            ),
            "test_perplexity": evaluate_perplexity(
                eval_model, best, windows(corpus.test, EVAL_BATCH)
            ),
        }

    return run_training(
        model,
        BPTTDataset(
            corpus.train, args.batch_size, args.seq_len, drop_remainder=True
        ),
        epochs=args.epochs,
        output_dir=output_dir,
        experiment=f"wikitext2_{args.cell}",
        method=method,
        seed=seed,
        config=cli.run_config(args, method=method, seed=seed),
        evaluate=evaluate,
        learning_rate=recipes.plateau_decay(args.learning_rate, 0.25),
        callbacks=[evaluation],
        verbose=cli.fit_verbosity(args),
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parses `argv`, runs every (method, seed), prints the table."""
    args = make_parser().parse_args(argv)
    check_single_process()  # before the data are loaded
    if args.dropout is None:
        args.dropout = DROPOUT[args.cell]
    if args.smoke:
        cli.apply_smoke(args, SMOKE)
    corpus = load_wikitext2(args.data_dir)
    results = [
        train_one(method, seed, args, corpus)
        for method in args.methods
        for seed in args.seeds
    ]
    report.main([args.output_dir])
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
