"""Class labels: a clear error for missing labels before scikit-learn's generic checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

__all__ = ["check_class_labels", "missing_rows"]


def missing_rows(values) -> np.ndarray:
    """Indices of the missing (None / NaN / NaT) entries of a 1-D sequence."""
    return np.flatnonzero(pd.isna(pd.Series(np.asarray(values, dtype=object), dtype=object)))


def check_class_labels(y, *, name: str = "y", estimator_name: str = "estimator") -> np.ndarray:
    """``y`` as a 1-D array of class labels, with a clear error for missing ones.

    scikit-learn reports ``None`` labels as "Unknown label type: unknown"; this names the rows
    instead and says what to do.
    """
    arr = np.asarray(y, dtype=object) if not isinstance(y, np.ndarray) else y
    flat = arr.ravel() if arr.ndim > 1 and 1 in arr.shape else arr
    if flat.ndim == 1:
        rows = missing_rows(flat)
        if rows.size:
            raise ValueError(
                f"{estimator_name}: {name} has {rows.size} missing labels (None / NaN) at rows "
                f"{rows[:5].tolist()!r}; every training sample needs a class label. Drop the "
                "unlabelled samples (or, for unlabelled target images, pass them as X_target "
                "where the estimator takes them)."
            )
    y = column_or_1d(y, warn=True)
    check_classification_targets(y)
    return y
