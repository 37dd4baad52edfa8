"""SEHT-D on JAX: compiled step variants chosen per step on the host.

`keras_seht.backend.jax.SparseTrainStep` runs each step in the variant
compiled for the layers its probes can touch. Checked here:

* every variant's update is the exact gradient of L + strength * t
  (plain nested autodiff, `reference.objective_gradient`) on tanh and
  ReLU models, for probes on the output layer only, one hidden layer,
  several, and none (t = 0 exactly);
* training with the variants gives the one-program step's weights and
  logs (the same probes, drawn from the same seed) to float32 round-off,
  with a bounded number of compiled variants;
* which models use it, and that `precompile` compiles every variant
  and changes nothing.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import reference
from conftest import STRENGTH, FixedProbes, make_data

import keras_seht
from keras_seht import SEHTD, SEHTH, variants
from keras_seht.layout import weight_layout

if keras.config.backend() != "jax":
    pytest.skip("JAX's compiled step variants", allow_module_level=True)

from keras_seht.backend import jax as seht_jax  # noqa: E402

LOSS = "sparse_categorical_crossentropy"
#: Weight-bearing layers of the test models; the tests lower the size from
#: which models use variants (`variants.MIN_VARIANT_LAYERS`) to it, so
#: that small programs compile fast.
DEPTH = 6


@pytest.fixture(autouse=True)
def _small_models_use_variants(monkeypatch):
    monkeypatch.setattr(variants, "MIN_VARIANT_LAYERS", DEPTH)


def deep_mlp(activation: str, depth: int = DEPTH, width: int = 4):
    """`depth` Dense layers, the last a softmax over 3 classes."""
    layers = [keras.Input((6,))]
    layers += [
        keras.layers.Dense(width, activation=activation)
        for _ in range(depth - 1)
    ]
    layers.append(keras.layers.Dense(3, activation="softmax"))
    return keras_seht.Sequential(layers)


def weights(model):
    return [
        np.asarray(keras.ops.convert_to_numpy(v.value), "float64")
        for v in model.trainable_variables
    ]


def masked_probe(model, layers, seed=1):
    """Rademacher entries on the variables of `layers`, zero elsewhere."""
    layout = weight_layout(model)
    owner = layout.layer_of()
    rng = np.random.default_rng(seed)
    probe = []
    for i, shape in enumerate(layout.shapes):
        values = rng.choice([-1.0, 1.0], size=shape).astype("float32")
        probe.append(values if owner[i] in layers else np.zeros(shape, "f4"))
    return probe


def with_variants(model):
    """Makes the model's compiled train function a `SparseTrainStep`."""
    dispatch = seht_jax.SparseTrainStep(model)
    model.make_train_function()
    model.train_function = model._make_function(dispatch)
    return dispatch


def test_variant_tangents_cover_the_probed_layers():
    layout = weight_layout(deep_mlp("tanh"))
    owner = layout.layer_of()
    buckets = variants.buckets(layout)
    assert buckets[0] == 0 and len(buckets) <= variants.MAX_HIDDEN_VARIANTS
    assert buckets == sorted(set(buckets))
    rng = np.random.default_rng(0)
    for _ in range(200):
        drawn = rng.random(layout.num_layers) < 0.3
        support = [bool(drawn[o]) for o in owner]
        name, tangents = variants.variant_of(layout, support)
        probed = {i for i, s in enumerate(support) if s}
        assert probed <= tangents
        hidden = [j for j in np.flatnonzero(drawn) if j != layout.output_layer]
        if hidden:
            start = max(b for b in buckets if b <= min(hidden))
            assert tangents == {i for i, o in enumerate(owner) if o >= start}, (
                name
            )
        elif drawn[layout.output_layer]:
            assert name == "output layer"
            assert tangents == set(layout.groups[layout.output_layer])
        else:
            assert name == "no probe" and not tangents


CASES = [
    ("tanh", (DEPTH - 1,)),
    ("tanh", (3,)),
    ("tanh", (1, 4, DEPTH - 1)),
    ("tanh", (0, DEPTH - 1)),
    ("tanh", ()),
    ("relu", (DEPTH - 1,)),
    ("relu", (2, DEPTH - 1)),
]


@pytest.mark.parametrize("activation, layers", CASES, ids=str)
def test_variant_update_is_exact(activation, layers):
    keras.utils.set_random_seed(0)
    model = deep_mlp(activation)
    x, y = make_data(n=16)
    probe = masked_probe(model, set(layers))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=LOSS,
        seht=FixedProbes([probe]),
    )
    loss, t, expected = reference.objective_gradient(
        model, x, y, probe, STRENGTH
    )
    dispatch = with_variants(model)
    before = weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    applied = [b - a for b, a in zip(before, weights(model))]
    for got, want in zip(applied, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
    assert logs["seht_trace"] == pytest.approx(t, rel=1e-4, abs=1e-6)
    (name,) = dispatch.counts
    if not layers:
        assert name == "no probe" and logs["seht_trace"] == 0.0
    elif layers == (DEPTH - 1,):
        assert name == "output layer"
    else:
        assert name.startswith("layers ")


def train(model, x, y, steps):
    logs = [model.train_on_batch(x, y, return_dict=True) for _ in range(steps)]
    return weights(model), logs


def test_variants_train_like_one_program(monkeypatch):
    """Same probes, same weights and logs; `precompile` changes nothing."""
    monkeypatch.setattr(variants, "MAX_HIDDEN_VARIANTS", 2)
    x, y = make_data(n=16)
    estimator = SEHTD(p=0.2, layer_p=0.15, strength=0.05)

    def build():
        keras.utils.set_random_seed(3)
        model = deep_mlp("tanh")
        model.compile(optimizer="sgd", loss=LOSS, seht=estimator)
        return model

    sparse = build()
    first = sparse.train_on_batch(x, y, return_dict=True)
    dispatch = sparse.seht_sparse_step
    assert isinstance(dispatch, seht_jax.SparseTrainStep)
    counts = dict(dispatch.counts)
    dispatch.precompile((x, y, None))  # every variant, nothing changed
    assert len(dispatch._variants) == len(dispatch.variants()) == 3
    assert dispatch.counts == counts
    sparse_weights, sparse_logs = train(sparse, x, y, steps=11)
    sparse_logs.insert(0, first)
    assert sum(dispatch.counts.values()) == 12
    assert len(dispatch.counts) >= 2  # several variants were used
    assert len(dispatch._variants) == 3  # no compile after precompile

    monkeypatch.setattr(variants, "MIN_VARIANT_LAYERS", DEPTH + 1)
    dense = build()
    dense_weights, dense_logs = train(dense, x, y, steps=12)
    assert dense.seht_sparse_step is None
    for got, want in zip(sparse_weights, dense_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(sparse_logs, dense_logs):
        assert got["seht_trace"] == pytest.approx(
            want["seht_trace"], rel=1e-4, abs=1e-6
        )
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_which_models_use_variants():
    def uses(model, seht, **kwargs):
        model.compile(optimizer="sgd", loss=LOSS, seht=seht, **kwargs)
        model.make_train_function()
        return model.seht_sparse_step is not None

    assert uses(deep_mlp("tanh"), SEHTD(p=0.1))
    assert uses(deep_mlp("tanh"), SEHTD(p=0.1, curvature="gauss_newton"))
    assert not uses(deep_mlp("tanh"), SEHTH())  # every layer, every step
    assert not uses(deep_mlp("tanh", depth=DEPTH - 1), SEHTD(p=0.1))
    assert not uses(deep_mlp("tanh"), SEHTD(p=0.1), run_eagerly=True)
    assert not uses(deep_mlp("tanh"), SEHTD(p=0.1, method="finite_difference"))
