"""Argument checks shared by the package.

Each raises a ValueError that names the argument, its allowed values and
what was received.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def check_int(name: str, value: Any, low: int = 1) -> int:
    """`value` as an int >= `low` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )
    if value < low:
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value}"
        )
    return int(value)


def check_choice(name: str, value: Any, allowed: Sequence[T]) -> T:
    """`value`, if it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {tuple(allowed)}. Received: "
            f"{name}={value!r}"
        )
    return value


def check_strength(strength: Any) -> float:
    """`strength` as a finite float >= 0 (bools and strings refused)."""
    return check_nonnegative("strength", strength)


def seed_generator(seed: Any) -> Any:
    """A `keras.random.SeedGenerator` for a user's int seed (or None).

    The int is first scrambled (SplitMix64's finalizer, to 31 bits): on
    the torch backend ``SeedGenerator(s + 1)`` otherwise yields the stream
    of ``SeedGenerator(s)`` shifted by one draw, so two calls with nearby
    seeds would share all but a few probes. A generator or None is passed
    through unchanged (None: the global Keras seed).
    """
    import keras

    if isinstance(seed, keras.random.SeedGenerator):
        return seed
    if seed is None:
        return keras.random.SeedGenerator(None)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            "`seed` must be an integer, a keras.random.SeedGenerator or "
            f"None. Received: seed={seed!r}"
        )
    mask = (1 << 64) - 1
    z = (int(seed) + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return keras.random.SeedGenerator((z ^ (z >> 31)) >> 33)


def check_bool(name: str, value: Any, allow_none: bool = False) -> Any:
    """`value` as a bool (a NumPy bool too; None if `allow_none`)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if allow_none else "a bool"
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )
    return bool(value)


def check_probability(name: str, value: Any, high: float = 1.0) -> float:
    """`value` as a float in the interval (0, `high`] (bools refused)."""
    prob = _number(value)
    if not (0.0 < prob <= high):
        raise ValueError(
            f"`{name}` must be in the interval (0, {high:g}]. Received: "
            f"{name}={value!r}"
        )
    return prob


def _number(value: Any) -> float:
    """`value` as a float; NaN for bools, strings and non-numbers."""
    if isinstance(value, (bool, str, bytes)):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def check_positive(name: str, value: Any) -> float:
    """`value` as a finite float > 0 (bools and strings refused)."""
    number = _number(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(
            f"`{name}` must be a finite float > 0. Received: {name}={value!r}"
        )
    return number


def check_nonnegative(name: str, value: Any) -> float:
    """`value` as a finite float >= 0 (bools and strings refused)."""
    number = _number(value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value!r}"
        )
    return number


def check_samples(name: str, data: Any) -> int:
    """The number of samples in `data`, an array or a structure of arrays.

    Every array must have a leading sample axis with at least one sample,
    and all the same number.

    Raises:
        ValueError: `data` is None, holds no array, a scalar, an empty
            array, or arrays of different lengths (naming `name`).
    """
    import keras

    if data is None:
        raise ValueError(
            f"`{name}` must be an array (or a structure of arrays) of "
            f"samples, not None. Received: {name}=None"
        )
    leaves = keras.tree.flatten(data)
    if not leaves:
        raise ValueError(
            f"`{name}` must hold at least one array of samples. Received: "
            f"{name}={data!r}"
        )
    counts = []
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            shape = np.shape(leaf)
        if leaf is None or len(shape) == 0:
            raise ValueError(
                f"`{name}` must be an array with a leading sample axis (or a "
                f"structure of such arrays). Received an entry {leaf!r}"
            )
        counts.append(shape[0])
    if any(c != counts[0] for c in counts):
        raise ValueError(
            f"The arrays in `{name}` must hold the same number of samples. "
            f"Received: {counts}"
        )
    if not counts[0]:
        raise ValueError(
            f"`{name}` must hold at least one sample. Received an empty "
            f"array (shape {tuple(np.shape(leaves[0]))})."
        )
    return int(counts[0])
