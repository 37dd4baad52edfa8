"""The registry of training penalties accepted by ``compile(seht=...)``.

Modelled on ``keras.regularizers``: every class is reachable by its class
name and its snake_case name, plus short aliases (``"seht_h"``,
``"seht_d"``, ``"jacobian"``, ``"confidence_penalty"``,
``"gradient_norm"``); `get` accepts None, a name, a config dict, a class
or an instance, and a list of those to combine several penalties:

    model.compile(..., seht=[SEHTD(p=0.01), Jacobian(strength=0.01)])

minimizes L + 0.001 * t + 0.01 * ||J||_F^2 (each at its own strength).

Example:
>>> from keras_seht import regularizers
>>> est = regularizers.get("seht_d")
>>> type(est).__name__, est.p, est.strength
('SEHTD', 0.01, 0.001)
>>> est = regularizers.get({"class_name": "seht_h", "config": {"max_iter": 5}})
>>> type(est).__name__, est.max_iter
('SEHTH', 5)
>>> [type(p).__name__ for p in regularizers.get(["seht_d", "jacobian"])]
['SEHTD', 'Jacobian']
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Sequence, cast

import keras

from keras_seht.estimators import SEHTD, SEHTH, CurvatureEstimator
from keras_seht.penalties import (
    ConfidencePenalty,
    GradientNorm,
    Jacobian,
    Penalty,
)
from keras_seht.sharpness import ASAM, SAM

__all__ = [
    "ASAM",
    "CurvatureEstimator",
    "ConfidencePenalty",
    "GradientNorm",
    "Jacobian",
    "Penalty",
    "SAM",
    "SEHTD",
    "SEHTH",
    "deserialize",
    "get",
    "serialize",
]

ALL_OBJECTS = {
    SEHTH,
    SEHTD,
    Jacobian,
    ConfidencePenalty,
    GradientNorm,
    SAM,
    ASAM,
}
ALIASES = {
    "sam": SAM,
    "asam": ASAM,
    "seht_h": SEHTH,
    "seht_d": SEHTD,
    "jacobian": Jacobian,
    "confidence_penalty": ConfidencePenalty,
    "gradient_norm": GradientNorm,
}


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", name).lower()


ALL_OBJECTS_DICT: dict[str, type] = {cls.__name__: cls for cls in ALL_OBJECTS}
ALL_OBJECTS_DICT.update({_snake_case(cls.__name__): cls for cls in ALL_OBJECTS})
ALL_OBJECTS_DICT.update(ALIASES)


def _known_names() -> str:
    return ", ".join(sorted(repr(k) for k in ALIASES))


def serialize(
    penalty: Penalty | Sequence[Penalty],
) -> dict[str, Any] | list[dict[str, Any]]:
    """Returns the Keras config dict of a penalty (a list for a list).

    Example:
    >>> from keras_seht import regularizers
    >>> config = regularizers.serialize(regularizers.SEHTD(p=0.05))
    >>> config["class_name"], config["config"]["p"]
    ('SEHTD', 0.05)
    """
    if isinstance(penalty, (list, tuple)):
        return [keras.saving.serialize_keras_object(p) for p in penalty]
    return keras.saving.serialize_keras_object(penalty)


def deserialize(
    config: dict[str, Any] | str,
    custom_objects: dict[str, Any] | None = None,
) -> Penalty:
    """Re-creates a penalty from `serialize`'s output (or a short dict).

    Accepts the Keras form ``{"class_name": ..., "config": {...}}`` (any
    registered name or alias as ``class_name``) and the flat form
    ``{"class_name": "seht_d", "p": 0.05}``.

    Raises:
        ValueError: naming `seht`, when `config` does not describe a
            penalty (an unknown or tampered name, a registered object of
            another kind, arguments the class does not take).

    Example:
    >>> from keras_seht import regularizers
    >>> est = regularizers.SEHTH(max_iter=5)
    >>> regularizers.deserialize(regularizers.serialize(est)) == est
    True
    >>> regularizers.deserialize({"class_name": "seht_d", "p": 0.05}).p
    0.05
    """
    if isinstance(config, dict) and "config" not in config:
        config = dict(config)
        if "class_name" not in config:
            raise ValueError(
                "A `seht` config dict needs a 'class_name' key (one of "
                f"{_known_names()}). Received: seht={config!r}"
            )
        config = {"class_name": config.pop("class_name"), "config": config}
    if isinstance(config, dict):
        name = config.get("class_name")
        if not isinstance(name, str):
            raise ValueError(
                "The 'class_name' of a `seht` config dict must be a string "
                f"(one of {_known_names()}). Received: seht={config!r}"
            )
        if (
            name not in ALL_OBJECTS_DICT
            and "registered_name" not in config
            and not (custom_objects and name in custom_objects)
        ):
            raise ValueError(_unknown(name))
    try:
        penalty = keras.saving.deserialize_keras_object(
            config,
            module_objects=ALL_OBJECTS_DICT,
            custom_objects=custom_objects,
        )
    except (TypeError, ImportError, AttributeError, KeyError) as e:
        raise ValueError(
            f"Could not build a `seht` penalty from {config!r}: {e}"
        ) from e
    # Keras hands back what it cannot resolve (an unregistered name comes
    # back as the string itself) or any other registered object.
    if not isinstance(penalty, Penalty):
        raise ValueError(
            f"Could not build a `seht` penalty from {config!r}: it gave "
            f"{penalty!r}, not a penalty. Allowed names: {_known_names()} "
            f"(or a class name: {_class_names()}, or a `Penalty` subclass "
            "registered with `keras.saving.register_keras_serializable`)."
        )
    return penalty


def _class_names() -> str:
    return ", ".join(sorted(c.__name__ for c in ALL_OBJECTS))


def _unknown(name: str) -> str:
    return (
        f"Unknown `seht` name: {name!r}. Allowed names: {_known_names()} "
        f"(or a class name: {_class_names()})."
    )


def get(identifier: Any) -> Penalty | list[Penalty] | None:
    """Resolves ``compile(seht=...)``'s argument to penalties or None.

    Args:
        identifier: None, a penalty instance (an estimator such as
            ``SEHTD(p=0.01)``, or `Jacobian`, `ConfidencePenalty`,
            `GradientNorm`), a registered name or alias (``"seht_h"``,
            ``"seht_d"``, ``"jacobian"``, ...), a config dict, a class, or
            a non-empty list or tuple of those.

    Returns:
        The penalty, a list of penalties (for a list), or None.

    Raises:
        ValueError: naming `seht` and the allowed values when the identifier
            is not understood, or when a list is empty or holds two
            penalties that log under the same name (e.g. two estimators).
    """
    if isinstance(identifier, (list, tuple)):
        return _get_list(identifier)
    if identifier is None:
        return None
    if isinstance(identifier, Penalty):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        cls = ALL_OBJECTS_DICT.get(identifier)
        if cls is None:
            raise ValueError(_unknown(identifier))
        return cls()
    if inspect.isclass(identifier) and issubclass(identifier, Penalty):
        return identifier()
    raise ValueError(
        "Could not interpret the `seht` argument: expected None, a penalty "
        f"(e.g. SEHTD(p=0.01)), one of {_known_names()}, a config dict, or a "
        f"list of those. Received: seht={identifier!r}"
    )


def _get_list(identifiers: Sequence[Any]) -> list[Penalty]:
    if not identifiers:
        raise ValueError(
            "`seht` was given an empty list. Pass seht=None for no penalty."
        )
    penalties: list[Penalty] = []
    for item in identifiers:
        if item is None or isinstance(item, (list, tuple)):
            raise ValueError(
                "Each entry of a `seht` list must be a penalty, a name or a "
                f"config dict. Received: {item!r} in seht={identifiers!r}"
            )
        # Not a list nor None: `get` resolves it to a single penalty.
        penalties.append(cast(Penalty, get(item)))
    names = [p.log_name for p in penalties]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            "A `seht` list may hold one penalty of each kind (at most one "
            f"curvature estimator); these would share the log entries "
            f"{repeated}. Received: seht={identifiers!r}"
        )
    replacing = [p for p in penalties if p.replaces_loss_gradient]
    if len(replacing) > 1:
        raise ValueError(
            "A `seht` list may hold at most one penalty that replaces the "
            "loss's own gradient (SAM/ASAM, an antithetic estimator): their "
            "updates would each count the loss. Received: "
            f"seht={identifiers!r}"
        )
    return penalties


def as_list(penalties: Penalty | Sequence[Penalty] | None) -> list[Penalty]:
    """`get`'s result as a (possibly empty) list."""
    if penalties is None:
        return []
    if isinstance(penalties, Penalty):
        return [penalties]
    return list(penalties)
