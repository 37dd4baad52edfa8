"""Argument checks shared by the package: each raises a ValueError that
names the argument, its allowed values and what was received."""

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
    """`strength` as a finite float >= 0."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(strength, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(
            "`strength` must be a finite number >= 0. Received: strength="
            f"{strength!r}"
        )
    return value
