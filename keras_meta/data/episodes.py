"""Episode vocabulary shared by every episode source."""

import numpy as np

EPISODE_KEYS = ("support_x", "support_y", "query_x", "query_y")


def check_positive_int(name, value, allow_none=False):
    """Validates a positive integer argument; raises a ValueError naming it."""
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


def resolve_seed(seed):
    """An int seed: `seed` itself, or a fresh random one for `None`."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"`seed` must be a non-negative integer or None. Received: seed={seed!r}"
        )
    return int(seed)
