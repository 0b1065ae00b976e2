"""Probabilities: the floor that keeps logarithms finite, and prior-ratio reweighting."""

from __future__ import annotations

import numpy as np

__all__ = ["PROBA_FLOOR", "reweight_posteriors"]

#: Smallest probability used before taking logarithms (calibration and label shift).
PROBA_FLOOR = 1e-15


def reweight_posteriors(proba: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Posteriors ``p(y|x) * ratio[y]``, renormalised per row (the Bayes prior-shift rule).

    A row whose mass sits only on classes with a zero ratio keeps its input posteriors.
    """
    unnorm = proba * ratio
    total = unnorm.sum(axis=1, keepdims=True)
    bad = total[:, 0] <= 0
    if np.any(bad):
        unnorm[bad] = proba[bad]
        total[bad] = 1.0
    return unnorm / total
