"""Probabilities: the floor that keeps logarithms finite, prior-ratio reweighting and decision
thresholds chosen on validation data."""

from __future__ import annotations

import numpy as np

__all__ = ["PROBA_FLOOR", "THRESHOLD_METRICS", "choose_threshold", "reweight_posteriors"]

#: Smallest probability used before taking logarithms (calibration and label shift).
PROBA_FLOOR = 1e-15

#: Metrics a decision threshold can be chosen for (:func:`choose_threshold`).
THRESHOLD_METRICS = ("balanced_accuracy", "accuracy")


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


def choose_threshold(
    y_true, proba, *, metric: str = "balanced_accuracy", sample_weight=None
) -> float:
    """Threshold ``t`` on the positive-class probability that maximises ``metric``.

    The rule predicts the positive class when ``proba > t``. Every gap between two distinct
    probabilities is a candidate; among the best candidates the middle one is taken and ``t``
    lies halfway between the probabilities on either side of it, so that it does not sit on a
    validation sample. ``"balanced_accuracy"`` (the mean of sensitivity and specificity) does
    not depend on the class prevalence of ``y_true``, so the threshold it gives keeps its
    meaning when the prevalence of new data differs.

    Parameters
    ----------
    y_true : array-like of {0, 1}
    proba : array-like of float
        Predicted probability of class 1.
    metric : {"balanced_accuracy", "accuracy"}, default="balanced_accuracy"
    sample_weight : array-like or None, default=None
        Weight of every sample in the metric.

    Returns
    -------
    float in (0, 1)
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"metric must be one of {THRESHOLD_METRICS!r}, got {metric!r}.")
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(proba, dtype=np.float64).ravel()
    w = np.ones_like(p) if sample_weight is None else np.asarray(sample_weight, float).ravel()
    if y.size == 0 or y.size != p.size or w.size != p.size:
        raise ValueError(
            f"choose_threshold needs as many labels, probabilities and weights (at least 1), "
            f"got {y.size}, {p.size} and {w.size}."
        )
    if np.any(~np.isin(y, (0, 1))):
        raise ValueError(f"y_true must hold 0 and 1 only, got {np.unique(y)[:5].tolist()!r}.")
    values, inverse = np.unique(p, return_inverse=True)
    # weight of each class at every distinct probability, ascending
    w_pos = np.bincount(inverse, weights=w * (y == 1), minlength=values.size)
    w_neg = np.bincount(inverse, weights=w * (y == 0), minlength=values.size)
    # cut j (0..n_values): values[:j] negative, values[j:] positive
    tn = np.concatenate([[0.0], np.cumsum(w_neg)])
    fn = np.concatenate([[0.0], np.cumsum(w_pos)])
    tp, fp = fn[-1] - fn, tn[-1] - tn
    pos, neg = tp + fn, tn + fp
    if metric == "accuracy":
        score = (tp + tn) / max(float(pos[0] + neg[0]), 1e-300)
    else:
        tpr = tp / pos if pos[0] > 0 else np.zeros_like(tp)
        tnr = tn / neg if neg[0] > 0 else np.zeros_like(tn)
        if pos[0] > 0 and neg[0] > 0:
            score = 0.5 * (tpr + tnr)
        else:  # one class only: accuracy
            score = tpr + tnr
    best = np.flatnonzero(score >= score.max() - 1e-12)
    j = int(best[len(best) // 2])
    lower = values[j - 1] if j > 0 else 0.0
    upper = values[j] if j < values.size else 1.0
    return float(np.clip(0.5 * (lower + upper), 1e-6, 1 - 1e-6))
