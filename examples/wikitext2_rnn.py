"""WikiText-2, 2-layer LSTM or GRU language model: the SEHT paper's Table 3.

Test perplexity: LSTM 95.65 -> 94.86, GRU 111.64 -> 109.03.

    python examples/wikitext2_rnn.py --cell lstm --data-dir DIR
    python examples/wikitext2_rnn.py --cell gru --methods baseline,seht-h
    python examples/wikitext2_rnn.py --smoke --data-dir DIR   # seconds

DIR holds wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens
(from the wikitext-2-v1 zip); without --data-dir the Hugging Face
`datasets` library's copy is used when it is installed and online. The
recipe (the classic PyTorch word_language_model one: SGD lr 20, clip
0.25, lr / 4 on plateau, BPTT 35, batch 20, 40 epochs, dropout 0.5 LSTM
/ 0.3 GRU) is described in `keras_seht.experiments.language_model`.
Runs resume after a kill; the script ends with the perplexity table.
"""

from keras_seht.experiments.language_model import main, make_parser

__all__ = ["main", "make_parser"]

if __name__ == "__main__":
    import sys

    from keras_seht import distributed

    distributed.setup_from_environment()  # torchrun's workers, if any
    main(sys.argv[1:])
