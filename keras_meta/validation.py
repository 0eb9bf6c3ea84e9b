"""Argument checks whose errors name the argument, the expectation and the value."""

import numpy as np


def check_positive_int(name, value, allow_none=False):
    """Returns `value` as an int; raises ValueError unless it is >= 1."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def check_positive_float(name, value):
    """Returns `value` as a float; raises ValueError unless finite and > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return float(value)


def check_choice(name, value, choices):
    """Returns `value`; raises ValueError unless it is one of `choices`."""
    if not (value is None or isinstance(value, str)) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}"
        )
    return value


def resolve_seed(seed):
    """An int seed: `seed` itself, or a fresh random one for `None`."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"`seed` must be a non-negative integer or None. Received: seed={seed!r}"
        )
    return int(seed)


def check_non_negative_float(name, value):
    """Returns `value` as a float; raises ValueError unless finite and >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"`{name}` must be a non-negative number. Received: {name}={value!r}"
        )
    return float(value)


def check_bool(name, value):
    """Returns `value` as a bool; raises ValueError unless it is a boolean.

    Strings are refused: `bool("False")` is True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r} of "
            f"type {type(value).__name__}"
        )
    return bool(value)
