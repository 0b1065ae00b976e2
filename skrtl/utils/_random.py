"""One way to derive seeds: every random draw of members, folds and trials goes through here."""

from __future__ import annotations

from numbers import Integral

import numpy as np

__all__ = ["derive_seed", "root_seed"]

_MAX_SEED = 2**31 - 1


def root_seed(random_state) -> int:
    """One integer seed from a ``random_state`` parameter (int, RandomState, Generator, None).

    An int is used as it is (reduced to ``[0, 2**31 - 1)``); a ``RandomState`` or
    ``Generator`` draws one integer (advancing it, as scikit-learn estimators do); ``None``
    draws from fresh OS entropy.
    """
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0] % _MAX_SEED)
    if isinstance(random_state, Integral) and not isinstance(random_state, bool):
        return int(random_state) % _MAX_SEED
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(_MAX_SEED))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(_MAX_SEED))
    raise ValueError(
        f"random_state must be None, an int, a numpy RandomState or Generator, got "
        f"{random_state!r}."
    )


def derive_seed(seed: int, *path: int | str) -> int:
    """Independent child seed of ``seed`` for the draw named by ``path``.

    ``derive_seed(seed, "member", 3)`` seeds ensemble member 3, ``derive_seed(seed, "fold")``
    the fold split, and so on: children with different paths are statistically independent
    streams (numpy's ``SeedSequence`` spawning), and the same path always gives the same
    seed.

    Parameters
    ----------
    seed : int
        Root seed, e.g. from :func:`root_seed`.
    *path : int or str
        Names and indices of the draw.

    Returns
    -------
    int
        A seed in ``[0, 2**31 - 1)``, usable by numpy, torch and scikit-learn.
    """
    key = []
    for part in path:
        if isinstance(part, str):
            key.extend(part.encode())
        else:
            key.append(int(part))
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(key))
    return int(ss.generate_state(1, dtype=np.uint64)[0] % _MAX_SEED)
