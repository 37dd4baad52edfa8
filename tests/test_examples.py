"""The example scripts, end to end in --smoke mode.

MNIST and CIFAR come from `tfds.testing.mock_data` (random images of the
right shapes), WikiText-2 from a small corpus the test writes.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from keras_seht.experiments import runner

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _example(name):
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mock(num_examples):
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples)


def _results(output_dir, method, seed=0):
    path = os.path.join(output_dir, method, f"seed_{seed}", "results.json")
    with open(path) as f:
        return json.load(f)


def test_mnist_hessian_reinit_smoke(tmp_path, capsys):
    example = _example("mnist_hessian_reinit")
    out = str(tmp_path)
    argv = [
        "--smoke",
        "--methods",
        "baseline,reinit-k10",
        "--hidden",
        "32,16",
        "--output-dir",
        out,
        "--verbose",
        "0",
    ]
    with _mock(300):
        results = example.main(argv)
    assert [r["method"] for r in results] == ["baseline", "reinit-k10"]
    for r in results:
        assert r["complete"] and r["epochs_completed"] == 2
        assert r["format"] == runner.RESULTS_FORMAT
        assert set(r["final"]) == {
            "test_accuracy",
            "best_test_accuracy",
            "top_eigenvalue",
            "hessian_trace",
        }
        assert r == _results(out, r["method"])
    history = results[1]["history"]
    # 10% of each of the last two layers' 16*32+16 and 16*10+10 weights
    # (53 + 17) after updates 2, 4 and 6 (3 batches of 128 per epoch).
    assert history["hessian_reinit_weights"] == [70, 140]
    printed = capsys.readouterr().out
    assert "| reinit-k10 | 1 |" in printed
    for name in ("report.md", "curvature.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # Run again: both runs are complete, nothing is trained.
    with _mock(300):
        again = example.main(argv)
    assert again == [json.loads(json.dumps(r)) for r in results]
    assert "already complete" in capsys.readouterr().out


def test_mnist_missing_data_is_a_clear_error(tmp_path):
    from keras_seht.data import DatasetNotFoundError

    example = _example("mnist_hessian_reinit")
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        example.main(["--smoke", "--data-dir", str(tmp_path), "--no-download"])
