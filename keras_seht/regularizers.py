"""The registry of training penalties accepted by ``compile(seht=...)``.

Modelled on ``keras.regularizers``: every class is reachable by its class
name and its snake_case name, plus short aliases (``"seht_h"``,
``"seht_d"``); `get` accepts None, a name, a config dict, a class or an
instance.

Example:

>>> from keras_seht import regularizers
>>> regularizers.get("seht_d")
SEHTD(max_iter=1, strength=0.001, p=0.01, layer_p=None, \
include_output_layer=True, unbiased=False)
>>> regularizers.get({"class_name": "seht_h", "config": {"max_iter": 5}})
SEHTH(max_iter=5, strength=0.001)
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import keras

from keras_seht.estimators import SEHTD, SEHTH, CurvatureEstimator

ALL_OBJECTS = {SEHTH, SEHTD}
ALIASES = {"seht_h": SEHTH, "seht_d": SEHTD}


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", name).lower()


ALL_OBJECTS_DICT: dict[str, type] = {cls.__name__: cls for cls in ALL_OBJECTS}
ALL_OBJECTS_DICT.update({_snake_case(cls.__name__): cls for cls in ALL_OBJECTS})
ALL_OBJECTS_DICT.update(ALIASES)


def _known_names() -> str:
    return ", ".join(sorted(repr(k) for k in ALIASES))


def serialize(penalty: CurvatureEstimator) -> dict[str, Any]:
    """Returns the Keras config dict of a penalty."""
    return keras.saving.serialize_keras_object(penalty)


def deserialize(
    config: dict[str, Any] | str,
    custom_objects: dict[str, Any] | None = None,
) -> CurvatureEstimator:
    """Re-creates a penalty from `serialize`'s output (or a short dict).

    Accepts the Keras form ``{"class_name": ..., "config": {...}}`` (any
    registered name or alias as ``class_name``) and the flat form
    ``{"class_name": "seht_d", "p": 0.05}``.
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
        if (
            isinstance(name, str)
            and name not in ALL_OBJECTS_DICT
            and "registered_name" not in config
            and not (custom_objects and name in custom_objects)
        ):
            raise ValueError(_unknown(name))
    try:
        return keras.saving.deserialize_keras_object(
            config,
            module_objects=ALL_OBJECTS_DICT,
            custom_objects=custom_objects,
        )
    except TypeError as e:
        raise ValueError(
            f"Could not build a `seht` estimator from {config!r}: {e}"
        ) from e


def _class_names() -> str:
    return ", ".join(sorted(c.__name__ for c in ALL_OBJECTS))


def _unknown(name: str) -> str:
    return (
        f"Unknown `seht` name: {name!r}. Allowed names: {_known_names()} "
        f"(or a class name: {_class_names()})."
    )


def get(identifier: Any) -> CurvatureEstimator | None:
    """Resolves ``compile(seht=...)``'s argument to an estimator or None.

    Args:
        identifier: None, an estimator instance, a registered name or alias
            (``"seht_h"``, ``"seht_d"``), a config dict, or a class.

    Returns:
        The estimator, or None.

    Raises:
        ValueError: naming `seht` and the allowed values when the identifier
            is not understood.
    """
    if identifier is None:
        return None
    if isinstance(identifier, CurvatureEstimator):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        cls = ALL_OBJECTS_DICT.get(identifier)
        if cls is None:
            raise ValueError(_unknown(identifier))
        return cls()
    if inspect.isclass(identifier) and issubclass(
        identifier, CurvatureEstimator
    ):
        return identifier()
    raise ValueError(
        "Could not interpret the `seht` argument: expected None, an "
        f"estimator, one of {_known_names()}, or a config dict. Received: "
        f"seht={identifier!r}"
    )
