"""The model zoo `keras_seht.applications`: architectures, parameter counts,
argument checks, and a few SEHT training steps on tiny instances.

Backend-agnostic: runs under KERAS_BACKEND=torch, jax and tensorflow.
Full-size models are built with their variables left uninitialized
(`shapes_only`), never run; the training tests use reduced widths and tiny
inputs. Outside torch, building the third-order SEHT step is slow on one
CPU core (JAX/XLA: 12-120 s per model, and each new weight shape costs a
compilation; TensorFlow: 7-20 s), so the default run there trains one
LSTM, one stateful GRU and (TensorFlow only) the WRN; the other training
tests are marked slow on those backends (`make test-all` runs them).
torch runs them all."""

from __future__ import annotations

import doctest
import importlib

import keras
import numpy as np
import pytest

import keras_seht
import keras_seht.applications
from keras_seht.applications import (
    SEHTGRU,
    SEHTLSTM,
    reset_rnn_states,
    resnet18_cifar,
    rnn_language_model,
    wide_resnet,
)

RNN_TYPES = {"lstm": SEHTLSTM, "gru": SEHTGRU}


#: Marks for tests that XLA makes slow (see the module docstring): on JAX
#: and TensorFlow, and on JAX only (where even a forward pass compiles).
XLA_SLOW = [] if keras.config.backend() == "torch" else [pytest.mark.slow]
JAX_SLOW = [pytest.mark.slow] if keras.config.backend() == "jax" else []


def slow_on(marks):
    """A decorator adding `marks` (`XLA_SLOW` or `JAX_SLOW`) to a test."""

    def decorate(test):
        for mark in marks:
            test = mark(test)
        return test

    return decorate


def shapes_only(builder, **kwargs):
    """Builds a model without initializing its variables (cheap on JAX,
    where each new weight shape costs an XLA compilation); enough for
    counting parameters, not for running it."""
    with keras.StatelessScope(initialize_variables=False):
        return builder(**kwargs)


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def layers_of(model, layer_type):
    return [layer for layer in model.layers if isinstance(layer, layer_type)]


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def bn(channels):
    """(trainable, moving) parameters of a BatchNormalization layer."""
    return 2 * channels, 2 * channels


def resnet18_counts(width, num_classes, channels=3):
    """(trainable, non-trainable) parameters of the CIFAR ResNet-18, counted
    from the architecture: bias-free convs, BN after each, Dense logits."""
    trainable = 9 * channels * width  # 3x3 stem
    moving = 0
    t, m = bn(width)
    trainable, moving = trainable + t, moving + m
    c_in = width
    for multiplier in (1, 2, 4, 8):
        c = width * multiplier
        for _ in range(2):
            trainable += 9 * c_in * c + 9 * c * c  # two 3x3 convs
            t, m = bn(c)
            trainable, moving = trainable + 2 * t, moving + 2 * m
            if c_in != c:  # 1x1 projection + BN
                trainable += c_in * c
                trainable, moving = trainable + t, moving + m
            c_in = c
    trainable += c_in * num_classes + num_classes
    return trainable, moving


def wide_resnet_counts(depth, width, num_classes, channels=3):
    """(trainable, non-trainable) parameters of WRN-depth-width."""
    n = (depth - 4) // 6
    trainable = 9 * channels * 16  # 3x3 stem, no BN
    moving = 0
    c_in = 16
    for multiplier in (16, 32, 64):
        c = width * multiplier
        for _ in range(n):
            t1, m1 = bn(c_in)
            t2, m2 = bn(c)
            trainable += t1 + 9 * c_in * c + t2 + 9 * c * c
            moving += m1 + m2
            if c_in != c:
                trainable += c_in * c  # 1x1 shortcut
            c_in = c
    t, m = bn(c_in)
    trainable, moving = trainable + t, moving + m
    trainable += c_in * num_classes + num_classes
    return trainable, moving


def language_model_count(vocab, cell, embed_dim, units, layers):
    total = vocab * embed_dim + (units + 1) * vocab
    size_in = embed_dim
    for _ in range(layers):
        if cell == "lstm":
            total += 4 * (size_in * units + units * units + units)
        else:  # GRU with reset_after=True: two bias vectors
            total += 3 * (size_in * units + units * units + 2 * units)
        size_in = units
    return total


def fit_with_seht(model, x, y, learning_rate=0.01, **fit_kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        seht=keras_seht.SEHTH(max_iter=1, strength=1e-3),
    )
    history = model.fit(x, y, epochs=1, verbose=0, **fit_kwargs)
    return history.history


def assert_finite_history(history):
    for key in ("loss", "seht_trace"):
        assert np.isfinite(history[key]).all(), (key, history[key])
    assert history["seht_skipped"] == [0]


def images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, 5, size=(n,)).astype("int32")
    return x, y


def token_windows(n, steps, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, steps + 1)).astype("int32")
    return ids[:, :-1], ids[:, 1:]


class TestResNet18Cifar:
    def test_full_size_parameter_count(self):
        model = shapes_only(resnet18_cifar)
        trainable, moving = resnet18_counts(64, 10)
        assert trainable == 11_173_962  # the PyTorch model's count
        assert trainable_count(model) == trainable
        assert model.count_params() == trainable + moving == 11_183_562
        assert 11_100_000 <= model.count_params() <= 11_300_000
        assert isinstance(model, keras_seht.Model)

    def test_reduced_width_parameter_count(self):
        for width, classes in [(16, 10), (8, 100)]:
            model = shapes_only(
                resnet18_cifar, num_classes=classes, width=width
            )
            trainable, moving = resnet18_counts(width, classes)
            assert trainable_count(model) == trainable
            assert model.count_params() == trainable + moving

    def test_architecture(self):
        model = shapes_only(resnet18_cifar, width=4)
        convs = layers_of(model, keras.layers.Conv2D)
        # stem + 8 blocks x 2 convs + 3 projections
        assert len(convs) == 1 + 16 + 3
        assert not any(conv.use_bias for conv in convs)
        stem = model.get_layer("stem_conv")
        assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
        assert not layers_of(model, keras.layers.MaxPooling2D)
        assert [c.filters for c in convs if c.kernel_size == (1, 1)] == [
            8,
            16,
            32,
        ]
        assert len(layers_of(model, keras.layers.BatchNormalization)) == 20
        logits = model.get_layer("logits")
        assert logits.activation is keras.activations.linear

    @slow_on(JAX_SLOW)
    def test_output_shape_and_projection(self):
        # One small configuration for every ResNet that runs: on JAX each
        # new weight shape costs an XLA compilation.
        model = resnet18_cifar(num_classes=5, width=4, input_shape=(8, 8, 3))
        assert model.output_shape == (None, 5)
        default = shapes_only(resnet18_cifar, width=2)
        assert default.input_shape == (None, 32, 32, 3)
        # The subsample + 1x1 projection is a strided 1x1 convolution.
        projection = model.get_layer("stage2_block1_proj")
        block_input = model.get_layer("stage1_block2_out").output
        sub = keras_seht.Model(
            model.input, [model.output, block_input, projection.output]
        )
        x, _ = images(2, 8)
        logits, h, projected = sub.predict(x, verbose=0)
        assert logits.shape == (2, 5) and np.isfinite(logits).all()
        assert projected.shape == (2, 4, 4, 8)
        strided = keras.layers.Conv2D(8, 1, strides=2, use_bias=False)
        strided.build(h.shape)
        strided.kernel.assign(projection.kernel)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(strided(h)),
            projected,
            rtol=1e-5,
            atol=1e-5,
        )

    @slow_on(XLA_SLOW)
    def test_trains_with_seht(self):
        model = resnet18_cifar(
            num_classes=5, width=4, input_shape=(16, 16, 3), seed=0
        )
        x, y = images(8, 16)
        history = fit_with_seht(model, x, y, batch_size=4)
        assert_finite_history(history)


class TestWideResNet:
    def test_wrn_28_10_parameter_count(self):
        model = shapes_only(wide_resnet, depth=28, width=10, num_classes=100)
        trainable, moving = wide_resnet_counts(28, 10, 100)
        assert trainable == 36_536_884
        assert trainable_count(model) == trainable
        assert model.count_params() == trainable + moving == 36_554_836
        assert 36_400_000 <= trainable <= 36_600_000
        assert model.name == "wrn_28_10"
        assert isinstance(model, keras_seht.Model)

    def test_small_parameter_count(self):
        for depth, width in [(10, 1), (16, 2), (22, 3)]:
            model = shapes_only(
                wide_resnet, depth=depth, width=width, num_classes=7
            )
            trainable, moving = wide_resnet_counts(depth, width, 7)
            assert trainable_count(model) == trainable
            assert model.count_params() == trainable + moving

    def test_architecture(self):
        model = shapes_only(wide_resnet, depth=16, width=2, dropout=0.3)
        n = 2
        convs = layers_of(model, keras.layers.Conv2D)
        # stem + 3 groups x n blocks x 2 convs + 3 shortcuts (16 -> 32 too)
        assert len(convs) == 1 + 6 * n + 3
        assert not any(conv.use_bias for conv in convs)
        dropouts = layers_of(model, keras.layers.Dropout)
        assert len(dropouts) == 3 * n
        assert all(d.rate == pytest.approx(0.3) for d in dropouts)
        widths = {c.filters for c in convs if c.name.endswith("conv2")}
        assert widths == {32, 64, 128}
        no_dropout = shapes_only(wide_resnet, depth=10, width=1)
        assert not layers_of(no_dropout, keras.layers.Dropout)

    @slow_on(JAX_SLOW)  # as for the ResNet: a forward pass compiles
    def test_output_shape(self):
        model = wide_resnet(
            depth=10, width=1, dropout=0.2, num_classes=5, input_shape=(8, 8, 3)
        )
        x, _ = images(3, 8)
        assert model.output_shape == (None, 5)
        assert tuple(model.predict(x, verbose=0).shape) == (3, 5)

    def test_seed_makes_weights_reproducible(self):
        kwargs = dict(depth=10, width=1, dropout=0.2, num_classes=5)
        a = wide_resnet(**kwargs, seed=3)
        b = wide_resnet(**kwargs, seed=3)
        c = wide_resnet(**kwargs, seed=4)
        for wa, wb in zip(weights(a), weights(b)):
            np.testing.assert_array_equal(wa, wb)
        assert a.get_layer("group1_block1_dropout").seed == 3 + 2
        stem_a = a.get_layer("stem_conv").kernel
        assert not np.array_equal(
            keras.ops.convert_to_numpy(stem_a),
            keras.ops.convert_to_numpy(c.get_layer("stem_conv").kernel),
        )
        # Each layer has its own seed: equal shapes, different values.
        first = a.get_layer("group1_block1_conv1").kernel  # 16 -> 16
        second = a.get_layer("group1_block1_conv2").kernel
        assert not np.array_equal(
            keras.ops.convert_to_numpy(first),
            keras.ops.convert_to_numpy(second),
        )

    @slow_on(JAX_SLOW)
    def test_trains_with_seht(self):
        model = wide_resnet(
            depth=10,
            width=1,
            dropout=0.2,
            num_classes=5,
            input_shape=(8, 8, 3),
        )
        x, y = images(4, 8)
        history = fit_with_seht(model, x, y, batch_size=2)
        assert_finite_history(history)


class TestRNNLanguageModel:
    def test_parameter_count(self):
        for cell in ("lstm", "gru"):
            model = shapes_only(
                rnn_language_model,
                vocab_size=1000,
                cell=cell,
                embed_dim=64,
                units=48,
                layers=3,
            )
            expected = language_model_count(1000, cell, 64, 48, 3)
            assert model.count_params() == trainable_count(model) == expected
        # The docstring's numbers for the paper's 2-layer 512/512 models.
        for cell, count in [("lstm", 38_308_350), ("gru", 37_261_822)]:
            assert language_model_count(33278, cell, 512, 512, 2) == count
            model = shapes_only(rnn_language_model, vocab_size=33278, cell=cell)
            assert model.count_params() == count

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_architecture_and_output_shape(self, cell):
        model = rnn_language_model(
            20, cell=cell, embed_dim=8, units=8, layers=2, dropout=0.5
        )
        recurrent = layers_of(model, RNN_TYPES[cell])
        assert len(recurrent) == 2
        assert all(r.return_sequences and not r.stateful for r in recurrent)
        assert all(r.use_cudnn is False for r in recurrent)
        # TensorFlow: XLA cannot compile the SEHT step of a recurrent loop.
        on_tensorflow = keras.config.backend() == "tensorflow"
        assert all(r.supports_jit is not on_tensorflow for r in recurrent)
        assert len(layers_of(model, keras.layers.Dropout)) == 3
        assert model.name == f"{cell}_language_model"
        x, _ = token_windows(3, 7, 20)
        assert model.output_shape == (None, None, 20)
        assert tuple(model.predict(x, verbose=0).shape) == (3, 7, 20)

    def test_initialization(self):
        model = rnn_language_model(20, embed_dim=8, units=8, seed=7)
        embedding = keras.ops.convert_to_numpy(
            model.get_layer("embedding").embeddings
        )
        decoder = model.get_layer("logits")
        kernel = keras.ops.convert_to_numpy(decoder.kernel)
        for w in (embedding, kernel):
            assert np.abs(w).max() <= 0.1
            assert np.abs(w).max() > 0.09  # uniform on the whole range
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(decoder.bias), 0.0
        )
        assert not np.array_equal(
            np.sort(embedding.ravel()), np.sort(kernel.ravel())
        )
        again = rnn_language_model(20, embed_dim=8, units=8, seed=7)
        for a, b in zip(weights(model), weights(again)):
            np.testing.assert_array_equal(a, b)

    def test_torch_initialization(self):
        units = 8
        limit = units**-0.5
        for cell in ("lstm", "gru"):
            model = rnn_language_model(
                20, cell=cell, embed_dim=8, units=units, rnn_init="torch"
            )
            for w in model.get_layer(f"{cell}_1").weights:
                values = keras.ops.convert_to_numpy(w)
                assert np.abs(values).max() <= limit + 1e-7
                assert np.abs(values).max() > 0.8 * limit

    def test_use_cudnn_is_passed_on(self):
        for use_cudnn in (True, "auto"):
            model = shapes_only(
                rnn_language_model,
                vocab_size=20,
                embed_dim=8,
                units=8,
                use_cudnn=use_cudnn,
            )
            for layer in layers_of(model, SEHTLSTM):
                assert layer.use_cudnn == use_cudnn

    @pytest.mark.parametrize(
        "cell", ["lstm", pytest.param("gru", marks=XLA_SLOW)]
    )
    def test_trains_with_seht(self, cell):
        model = rnn_language_model(
            20, cell=cell, embed_dim=8, units=8, layers=2, dropout=0.2
        )
        x, y = token_windows(4, 5, 20)
        before = weights(model)
        history = fit_with_seht(model, x, y, batch_size=2)
        assert_finite_history(history)
        assert any(
            not np.allclose(a, b) for a, b in zip(before, weights(model))
        )

    @pytest.mark.parametrize(
        "cell", [pytest.param("lstm", marks=XLA_SLOW), "gru"]
    )
    def test_stateful_trains_with_seht(self, cell):
        # Learning rate 0 and no dropout: the state after fitting on two
        # consecutive windows must be the state of two plain forward passes.
        model = rnn_language_model(
            20,
            cell=cell,
            embed_dim=8,
            units=8,
            layers=2,
            dropout=0.0,
            stateful=True,
            batch_size=2,
        )
        assert model.input_shape == (2, None)
        recurrent = layers_of(model, RNN_TYPES[cell])
        assert len(recurrent) == 2 and all(r.stateful for r in recurrent)
        state_paths = {v.path for r in recurrent for v in r.states}
        assert state_paths <= {v.path for v in model.non_trainable_variables}
        x, y = token_windows(4, 5, 20)
        history = fit_with_seht(
            model, x, y, learning_rate=0.0, batch_size=2, shuffle=False
        )
        assert_finite_history(history)
        fitted = [
            keras.ops.convert_to_numpy(s) for r in recurrent for s in r.states
        ]
        assert all(np.abs(s).max() > 0 for s in fitted)  # carried over
        reset_rnn_states(model)
        for r in recurrent:
            for s in r.states:
                assert not np.any(keras.ops.convert_to_numpy(s))
        model(x[:2])
        model(x[2:])
        expected = [
            keras.ops.convert_to_numpy(s) for r in recurrent for s in r.states
        ]
        for got, want in zip(fitted, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def test_stateful_model_saves_and_loads(self, tmp_path):
        model = rnn_language_model(
            20,
            cell="gru",
            embed_dim=8,
            units=8,
            layers=1,
            stateful=True,
            batch_size=2,
        )
        x, _ = token_windows(2, 3, 20)
        expected = keras.ops.convert_to_numpy(model(x))
        path = str(tmp_path / "lm.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        assert isinstance(loaded, keras_seht.Model)
        assert isinstance(loaded.get_layer("gru_1"), SEHTGRU)
        reset_rnn_states(loaded)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(loaded(x)), expected, atol=1e-6
        )

    def test_stateful_carries_state_between_batches(self):
        model = rnn_language_model(
            20, embed_dim=8, units=8, layers=1, stateful=True, batch_size=2
        )
        x, _ = token_windows(2, 4, 20)
        first = keras.ops.convert_to_numpy(model(x))
        second = keras.ops.convert_to_numpy(model(x))
        assert not np.allclose(first, second)
        reset_rnn_states(model)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(model(x)), first, rtol=1e-5, atol=1e-6
        )


ERRORS = [
    (resnet18_cifar, {"num_classes": 0}, "num_classes"),
    (resnet18_cifar, {"width": 0}, "width"),
    (resnet18_cifar, {"width": 2.5}, "width"),
    (resnet18_cifar, {"input_shape": (32, 32)}, "input_shape"),
    (resnet18_cifar, {"input_shape": (32, -1, 3)}, "input_shape"),
    (resnet18_cifar, {"seed": -1}, "seed"),
    (wide_resnet, {"depth": 27}, "depth"),
    (wide_resnet, {"depth": 4}, "depth"),
    (wide_resnet, {"depth": "28"}, "depth"),
    (wide_resnet, {"width": 0}, "width"),
    (wide_resnet, {"dropout": 1.0}, "dropout"),
    (wide_resnet, {"dropout": -0.1}, "dropout"),
    (wide_resnet, {"num_classes": 0}, "num_classes"),
    (wide_resnet, {"input_shape": (3, 32, 32, 1)}, "input_shape"),
    (rnn_language_model, {"vocab_size": 0}, "vocab_size"),
    (rnn_language_model, {"vocab_size": 10, "cell": "rnn"}, "cell"),
    (rnn_language_model, {"vocab_size": 10, "embed_dim": 0}, "embed_dim"),
    (rnn_language_model, {"vocab_size": 10, "units": -1}, "units"),
    (rnn_language_model, {"vocab_size": 10, "layers": 0}, "layers"),
    (rnn_language_model, {"vocab_size": 10, "layers": 1.0}, "layers"),
    (rnn_language_model, {"vocab_size": 10, "dropout": 1.0}, "dropout"),
    (rnn_language_model, {"vocab_size": 10, "use_cudnn": "yes"}, "use_cudnn"),
    (rnn_language_model, {"vocab_size": 10, "stateful": True}, "batch_size"),
    (rnn_language_model, {"vocab_size": 10, "stateful": 1}, "stateful"),
    (rnn_language_model, {"vocab_size": 10, "batch_size": 0}, "batch_size"),
    (rnn_language_model, {"vocab_size": 10, "rnn_init": "he"}, "rnn_init"),
]


@pytest.mark.parametrize(
    "builder",
    [resnet18_cifar, wide_resnet, rnn_language_model],
    ids=lambda b: b.__name__,
)
def test_bad_arguments_raise_value_errors_naming_them(builder):
    cases = [(kw, arg) for b, kw, arg in ERRORS if b is builder]
    assert cases
    for kwargs, argument in cases:
        with pytest.raises(ValueError, match=f"`{argument}`"):
            builder(**kwargs)


def test_cell_error_lists_allowed_values():
    with pytest.raises(ValueError, match="'lstm', 'gru'"):
        rnn_language_model(10, cell="LSTMs")


def test_reset_rnn_states_rejects_non_models():
    with pytest.raises(ValueError, match="`model`"):
        reset_rnn_states("model")


def test_public_names():
    assert set(keras_seht.applications.__all__) == {
        "resnet18_cifar",
        "wide_resnet",
        "rnn_language_model",
        "reset_rnn_states",
        "SEHTLSTM",
        "SEHTGRU",
    }
    for name in ("resnet18_cifar", "wide_resnet", "rnn_language_model"):
        function = getattr(keras_seht.applications, name)
        assert function.__doc__ and "Example" in function.__doc__


@slow_on(JAX_SLOW)
def test_docstring_examples():
    for name in ("", ".resnet", ".wide_resnet", ".rnn"):
        module = importlib.import_module(f"keras_seht.applications{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__


def _dropblocks(model):
    from keras_seht.layers import DropBlock2D

    return [
        (layer.name, layer.block_size, layer.keep_prob)
        for layer in model.layers
        if isinstance(layer, DropBlock2D)
    ]


def test_dropblock_after_the_middle_stages():
    resnet = shapes_only(resnet18_cifar, width=4, dropblock=0.9, seed=0)
    assert _dropblocks(resnet) == [
        ("stage2_dropblock", 7, 0.9),
        ("stage3_dropblock", 7, 0.9),
    ]
    wrn = shapes_only(
        wide_resnet, depth=10, width=1, dropblock=0.8, dropblock_size=3
    )
    assert _dropblocks(wrn) == [
        ("group2_dropblock", 3, 0.8),
        ("group3_dropblock", 3, 0.8),
    ]
    assert _dropblocks(shapes_only(resnet18_cifar, width=4)) == []


@slow_on(JAX_SLOW)  # two ResNet forward passes: 15-30 s of XLA on JAX
def test_dropblock_inference_is_the_identity():
    # Same logits as the model without them.
    resnet = resnet18_cifar(width=4, dropblock=0.9, seed=0)
    assert _dropblocks(resnet)
    plain = resnet18_cifar(width=4, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(resnet(x)),
        keras.ops.convert_to_numpy(plain(x)),
        rtol=1e-5,
        atol=1e-6,
    )
