"""Loss scaling and mixed precision, on every backend.

Keras differentiates the *scaled* loss s * L when the optimizer scales it
(``loss_scale_factor``, or a ``LossScaleOptimizer`` under
``mixed_float16``) and unscales the gradients in ``apply``. The SEHT step
must do the same to g, t and dt/dw, log the unscaled t, and turn an
overflowing t into a skipped step with a lower scale, never NaN weights.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import (
    FixedProbes,
    compile_plain,
    make_data,
    rademacher_probe,
    tanh_mlp,
)

import keras_seht


def _probe(model, seed=0, fill=None):
    shapes = [v.shape for v in model.trainable_variables]
    return rademacher_probe(shapes, np.random.default_rng(seed), fill)


def _one_step(optimizer, probe=None, fill=None):
    keras.utils.set_random_seed(5)
    x, y = make_data(n=16)
    model = tanh_mlp()
    probe = _probe(model, fill=fill) if probe is None else probe
    compile_plain(model, optimizer=optimizer, seht=FixedProbes([probe], 0.3))
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    after = model.get_weights()
    return before, after, history.history, model


def test_loss_scale_factor_gives_the_same_update():
    b0, a0, logs0, _ = _one_step(keras.optimizers.SGD(0.5))
    b1, a1, logs1, _ = _one_step(
        keras.optimizers.SGD(0.5, loss_scale_factor=64.0)
    )
    for w0, w1 in zip(b0, b1):
        np.testing.assert_array_equal(w0, w1)
    for w0, w1, v0, v1 in zip(a0, a1, b0, b1):
        np.testing.assert_allclose(w1 - v1, w0 - v0, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(logs1["seht_trace"], logs0["seht_trace"], 1e-5)
    np.testing.assert_allclose(logs1["loss"], logs0["loss"], 1e-5)


def test_overflowing_trace_under_loss_scaling_skips_the_step():
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.5), initial_scale=2.0**10
    )
    with pytest.warns(RuntimeWarning, match="was NaN/Inf"):
        before, after, logs, model = _one_step(optimizer, fill=np.inf)
    for w0, w1 in zip(before, after):
        np.testing.assert_array_equal(w0, w1)
    assert logs["seht_skipped"] == [1.0]
    scale = float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
    assert scale < 2.0**10


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains(policy):
    keras.mixed_precision.set_global_policy(policy)
    x, y = make_data(n=64)
    model = tanh_mlp(hidden=8)
    compile_plain(
        model,
        optimizer=keras.optimizers.SGD(0.05),
        seht=keras_seht.SEHTH(max_iter=2, strength=1e-2),
    )
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    before = model.get_weights()
    with warnings.catch_warnings():
        # mixed_float16 starts at a loss scale (2**15) where the scaled HVP
        # may overflow: such steps are skipped (and warned about) while the
        # LossScaleOptimizer lowers its scale.
        warnings.filterwarnings("ignore", "A `seht` penalty", RuntimeWarning)
        history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    logs = history.history
    assert np.all(np.isfinite(logs["loss"]))
    assert np.isfinite(logs["seht_trace"][-1])
    # Overflowing steps are skipped and lower the scale; they stay rare
    # (how many depends on where float16 first overflows: 0-2 here).
    assert sum(logs["seht_skipped"]) <= 3, logs["seht_skipped"]
    after = model.get_weights()
    assert all(np.all(np.isfinite(w)) for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))
    # The diagnostics work on the mixed-precision model and agree with a
    # float32 copy of it to float16/bfloat16 accuracy.
    exact = keras_seht.exact_hessian_trace(model, x, y)
    keras.mixed_precision.set_global_policy("float32")
    copy = compile_plain(tanh_mlp(hidden=8))
    copy.set_weights(after)
    reference = keras_seht.exact_hessian_trace(copy, x, y)
    assert np.isfinite(exact)
    tolerance = 2e-2 if policy == "mixed_float16" else 1e-1
    np.testing.assert_allclose(exact, reference, rtol=tolerance)
