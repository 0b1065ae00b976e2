"""What a cell of an image frame holds: nothing, a file path, or something else."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

__all__ = ["is_missing_cell", "is_path_cell"]


def is_missing_cell(cell) -> bool:
    """An empty table cell: None, NaN, pd.NA or a blank string (never an array or a tuple)."""
    if cell is None or cell is pd.NA:
        return True
    if isinstance(cell, float):
        return bool(np.isnan(cell))
    if isinstance(cell, str):
        return not cell.strip()
    return False


def is_path_cell(cell) -> bool:
    """A file path (str or ``os.PathLike``)."""
    return isinstance(cell, str | os.PathLike)
