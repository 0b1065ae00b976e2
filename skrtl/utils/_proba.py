"""Probabilities: the floor that keeps logarithms finite, prior-ratio reweighting and decision
thresholds chosen on validation data."""

from __future__ import annotations

import numpy as np

__all__ = ["PROBA_FLOOR", "THRESHOLD_METRICS", "choose_threshold", "reweight_posteriors"]

#: Smallest probability used before taking logarithms (calibration and label shift).
PROBA_FLOOR = 1e-15
#: Metrics a decision threshold can be chosen for (:func:`choose_threshold`).
THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "f1")


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


def choose_threshold(y_true, proba, *, metric: str = "accuracy") -> float:
    """The threshold ``t`` on ``proba`` (positive class when ``proba >= t``) that maximises
    ``metric`` on ``(y_true, proba)``.

    Every distinct probability is a candidate (and "no positive"); among the candidates with
    the best score the middle one is taken, and ``t`` is placed halfway between it and the
    next lower probability, so that the rule does not sit on a validation sample.

    Parameters
    ----------
    y_true : array-like of {0, 1}
    proba : array-like of float
        Predicted probability of class 1.
    metric : {"accuracy", "balanced_accuracy", "f1"}

    Returns
    -------
    float in (0, 1)
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"metric must be one of {THRESHOLD_METRICS!r}, got {metric!r}.")
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(proba, dtype=np.float64).ravel()
    if y.size == 0 or y.size != p.size:
        raise ValueError("choose_threshold needs as many labels as probabilities (at least 1).")
    cand = np.append(np.unique(p), np.inf)  # predict positive iff p >= cand
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    tp = pos.size - np.searchsorted(pos, cand, side="left")
    fp = neg.size - np.searchsorted(neg, cand, side="left")
    fn, tn = pos.size - tp, neg.size - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            score = (tp + tn) / y.size
        elif metric == "balanced_accuracy":
            tpr = np.where(pos.size, tp / max(pos.size, 1), 0.0)
            tnr = np.where(neg.size, tn / max(neg.size, 1), 0.0)
            score = 0.5 * (tpr + tnr)
        else:
            score = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    i = int(best[len(best) // 2])
    upper = 1.0 if not np.isfinite(cand[i]) else cand[i]
    lower = cand[i - 1] if i > 0 else 0.0
    return float(np.clip(0.5 * (lower + upper), 1e-6, 1 - 1e-6))
