"""keras_seht.experiments.recipes: optimizer, schedules, method names."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import keras_seht
from keras_seht.experiments import recipes


def test_coupled_sgd_is_pytorch_sgd_with_weight_decay():
    lr, momentum, decay = 0.1, 0.9, 5e-2
    w0 = np.array([1.0, -2.0, 0.5], "float32")
    grads = [np.array([0.3, 0.1, -0.2], "float32") * (i + 1) for i in range(4)]
    variable = keras.Variable(w0)
    optimizer = recipes.CoupledSGD(lr, momentum=momentum, l2_decay=decay)
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
    # torch.optim.SGD(lr, momentum, weight_decay): d = g + λw;
    # buf = momentum * buf + d; w -= lr * buf.
    w, buf = w0.astype("float64"), np.zeros(3)
    for g in grads:
        buf = momentum * buf + (g + decay * w)
        w = w - lr * buf
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variable), w, rtol=1e-5
    )


def test_coupled_sgd_config_and_bad_decay():
    optimizer = recipes.CoupledSGD(0.1, momentum=0.9, l2_decay=5e-4)
    config = keras.optimizers.serialize(optimizer)
    again = keras.optimizers.deserialize(config)
    assert isinstance(again, recipes.CoupledSGD)
    assert again.l2_decay == 5e-4 and again.momentum == 0.9
    with pytest.raises(ValueError, match="l2_decay"):
        recipes.CoupledSGD(l2_decay=-1.0)


def test_schedules():
    cosine = recipes.cosine(0.01, 200)
    assert cosine(0, {}) == 0.01
    assert cosine(100, {}) == pytest.approx(0.005)
    assert cosine(199, {}) == pytest.approx(
        0.005 * (1 + math.cos(math.pi * 199 / 200))
    )
    step = recipes.step_decay(0.1, (60, 120, 160), 0.2)
    assert [step(e, {}) for e in (0, 59, 60, 120, 199)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.004, 0.0008]
    )
    plateau = recipes.plateau_decay(20.0, 0.25)
    history = {"val_loss": [5.0, 4.0, 4.5, 3.9, 3.95, 4.0]}
    # New bests at epochs 0, 1, 3; no new best at 2, 4 and 5.
    assert [plateau(e, history) for e in range(7)] == [
        20.0,
        20.0,
        20.0,
        5.0,
        5.0,
        1.25,
        0.3125,
    ]


def test_parse_method_and_penalties():
    assert recipes.parse_method("baseline") == set()
    parts = recipes.parse_method("seht-d+dropout")
    assert parts == {"seht-d", "dropout"}
    for bad in ("seht", "seht-d+seht-h", "cutout+cutout"):
        with pytest.raises(ValueError):
            recipes.parse_method(bad)
    with pytest.raises(ValueError, match="Unknown method"):
        recipes.parse_method("dropout", allowed=("seht-d",))
    found = recipes.penalties(
        {"seht-h", "jacobian", "confidence-penalty"}, 1e-3, 0.01, None
    )
    assert isinstance(found[0], keras_seht.SEHTH)
    assert found[0].max_iter == 5 and found[0].strength == 1e-3
    (sehtd,) = recipes.penalties({"seht-d", "cutout"}, 1e-2, 0.05, None)
    assert sehtd.p == 0.05 and sehtd.max_iter == 1
    assert recipes.penalties(set(), 1e-3, 0.01, None) == []


def test_sharpness_methods_parse_and_build():
    from keras_seht.regularizers import GradientNorm

    assert recipes.parse_method("sam+cutout") == {"sam", "cutout"}
    assert recipes.parse_method("seht-d+asam") == {"seht-d", "asam"}
    for bad in ("sam+asam", "gnp+sam", "seht-d+asam+gnp"):
        with pytest.raises(ValueError, match="choose one of sam, asam, gnp"):
            recipes.parse_method(bad)
    (sam,) = recipes.penalties({"sam", "cutout"}, 1e-3, 0.01, None)
    assert type(sam) is keras_seht.SAM
    assert sam.rho == recipes.SAM_RHO == 0.05 and not sam.adaptive
    (asam,) = recipes.penalties({"asam"}, 1e-3, 0.01, None, asam_rho=1.0)
    assert isinstance(asam, keras_seht.ASAM)
    assert asam.rho == 1.0 and asam.adaptive and asam.eta == 0.01
    sehtd, gnp = recipes.penalties({"seht-d", "gnp"}, 1e-3, 0.01, None)
    assert isinstance(sehtd, keras_seht.SEHTD)
    assert isinstance(gnp, GradientNorm)
    assert gnp.method == "finite_difference" and gnp.epsilon == 0.01
    # GNP's alpha = 2 * strength * ||g|| / r is the paper's 0.8 at ||g|| = 1.
    assert 2 * gnp.strength / gnp.epsilon == pytest.approx(0.8)
    (gnp,) = recipes.penalties({"gnp"}, 1e-3, 0.01, None, gnp_strength=0.1)
    assert gnp.strength == 0.1
    # A list with SAM and a SEHT estimator is a valid `seht` setting.
    found = recipes.penalties({"seht-h", "sam"}, 1e-3, 0.01, None)
    assert len(keras_seht.regularizers.get(found)) == 2
