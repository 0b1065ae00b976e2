"""Selecting the rows of sample-aligned fit parameters."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.utils import _safe_indexing
from sklearn.utils.validation import _num_samples

__all__ = ["index_params"]


def index_params(params: Mapping, indices: np.ndarray, n_samples: int) -> dict:
    """``params`` with every value that has one entry per sample restricted to ``indices``.

    Values of another length (scalars, settings, unlabelled target data) are kept as they are.
    """
    out = {}
    for key, value in params.items():
        if value is not None and hasattr(value, "__len__") and not isinstance(value, str):
            try:
                if _num_samples(value) == n_samples:
                    out[key] = _safe_indexing(value, indices)
                    continue
            except TypeError:
                pass
        out[key] = value
    return out
