"""Median pruning that compares the trials of a cross-validated search fold by fold."""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

__all__ = ["CVMedianPruner"]


class CVMedianPruner(BasePruner):
    """Median pruning that compares trials fold by fold.

    :class:`TransferSearchCV` reports the validation metric of epoch ``e`` (0-based) of fold
    ``f`` at step ``f * epochs_per_fold + e``. Optuna's ``MedianPruner`` compares a trial's
    *best value over all its steps so far* with the median of other trials at the current
    step; after the first fold that "best so far" mixes folds (the peak of fold 0 is compared
    with other trials' first epochs of fold 1), which makes it lenient in a way that depends
    on the fold. This pruner applies the same median rule *within the current fold*: the
    trial's best value over epochs ``0..e`` of fold ``f`` against the median, over completed
    trials, of their best value over epochs ``0..e`` of the same fold. Every comparison is
    thus between models trained on the same data for the same number of epochs.

    Parameters
    ----------
    n_startup_trials : int, default=5
        No pruning until this many trials have completed.
    n_warmup_epochs : int, default=1
        No pruning during the first epochs of every fold (a freshly initialised classifier
        head is noisy).
    n_min_trials : int, default=1
        Minimum number of completed trials with a report in the current fold.
    epochs_per_fold : int or None, default=None
        Step stride between folds. :class:`TransferSearchCV` sets it in ``fit`` (from the
        estimator's ``max_epochs``); set it yourself only when using the pruner elsewhere.
        ``None`` treats all steps as one fold (plain within-trial median pruning).
    """

    def __init__(
        self,
        n_startup_trials: int = 5,
        n_warmup_epochs: int = 1,
        n_min_trials: int = 1,
        epochs_per_fold: int | None = None,
    ) -> None:
        for name, value, low in (
            ("n_startup_trials", n_startup_trials, 0),
            ("n_warmup_epochs", n_warmup_epochs, 0),
            ("n_min_trials", n_min_trials, 1),
        ):
            if not isinstance(value, Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if epochs_per_fold is not None and (
            not isinstance(epochs_per_fold, Integral) or epochs_per_fold < 1
        ):
            raise ValueError(
                f"epochs_per_fold must be None or a positive integer, got {epochs_per_fold!r}."
            )
        self.n_startup_trials = int(n_startup_trials)
        self.n_warmup_epochs = int(n_warmup_epochs)
        self.n_min_trials = int(n_min_trials)
        self.epochs_per_fold = epochs_per_fold

    def __repr__(self) -> str:
        return (
            f"CVMedianPruner(n_startup_trials={self.n_startup_trials}, "
            f"n_warmup_epochs={self.n_warmup_epochs}, n_min_trials={self.n_min_trials}, "
            f"epochs_per_fold={self.epochs_per_fold})"
        )

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        stride = self.epochs_per_fold
        fold_start = 0 if stride is None else (step // stride) * stride
        warmup = self.n_warmup_epochs if stride is None else min(self.n_warmup_epochs, stride - 1)
        if step - fold_start < warmup:
            return False
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < max(self.n_startup_trials, 1):
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

        def best(t: FrozenTrial) -> float:
            values = [
                v
                for s, v in t.intermediate_values.items()
                if fold_start <= s <= step and not math.isnan(v)
            ]
            if not values:
                return math.nan
            return max(values) if maximize else min(values)

        mine = best(trial)
        if math.isnan(mine):
            return True
        others = [b for b in (best(t) for t in completed) if not math.isnan(b)]
        if len(others) < self.n_min_trials:
            return False
        median = float(np.median(others))
        return mine < median if maximize else mine > median
