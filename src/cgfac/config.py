"""Hyperparameters that are a number or a schedule ``step -> number``, checked on every use, and the
validators of plain arguments (:func:`check_range`, :func:`positive_int`, :func:`choice`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal, Union, overload

Hyper = Union[float, Callable[[int], float]]


def check_range(name: str, value: object, *, low: float | None, low_open: bool, high: float | None) -> float:
    """``value`` as a finite float in ``(low, high]`` (``[low, high]`` unless ``low_open``; None: no
    bound), else ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a callable step -> number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


class HyperParam:
    """A named hyperparameter with bounds; a callable is evaluated (and checked) at each step."""

    def __init__(self, name: str, value: Hyper, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None) -> None:
        self.name, self.low, self.low_open, self.high = name, low, low_open, high
        self.value = value
        if not callable(value):
            check_range(name, value, low=low, low_open=low_open, high=high)

    def __call__(self, step: int) -> float:
        value = self.value(step) if callable(self.value) else self.value
        label = f"{self.name} (returned by the callable at step {step})" if callable(self.value) else self.name
        return check_range(label, value, low=self.low, low_open=self.low_open, high=self.high)


@overload
def positive_int(name: str, value: object, *, allow_none: Literal[False] = False) -> int: ...


@overload
def positive_int(name: str, value: object, *, allow_none: bool) -> int | None: ...


def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """An integer argument ``>= 1`` (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    """A string argument from a fixed set."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {options}, got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
