"""``cv_results_`` of :class:`~skrtl.TransferSearchCV`, built from the trials of a study."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy.stats import rankdata

__all__ = ["SearchResults", "build_cv_results"]


@dataclass
class SearchResults:
    """What a search's trials add up to.

    Attributes
    ----------
    cv_results : dict of numpy arrays
        One entry per trial, in scikit-learn's ``cv_results_`` layout.
    epochs_run, epochs_unpruned : int
    n_trials : dict
        Number of ``complete``, ``pruned`` and ``fail`` trials.
    best_trial : optuna.trial.FrozenTrial or None
    best_index : int or None
        Row of the best trial in ``cv_results``.
    """

    cv_results: dict
    epochs_run: int
    epochs_unpruned: int
    n_trials: dict
    best_trial: Any
    best_index: int | None

    @property
    def pruned_epoch_fraction(self) -> float:
        """``1 - epochs_run / epochs_unpruned``: the fraction of training saved by pruning."""
        return 1.0 - self.epochs_run / self.epochs_unpruned if self.epochs_unpruned else 0.0


def build_cv_results(study: optuna.Study, n_splits: int) -> SearchResults:
    """Tabulate every trial of ``study`` (``number``, ``state``, ``param_<name>``, scores...).

    Scores are ranked as in scikit-learn (1 = best, ties share the lowest rank); trials
    without a score rank last.
    """
    trials = study.get_trials(deepcopy=False)
    results: dict[str, Any] = {
        "number": np.array([t.number for t in trials], dtype=int),
        "state": np.array([t.state.name for t in trials], dtype=object),
    }
    names: list[str] = []
    for t in trials:
        for name in t.params:
            if name not in names:
                names.append(name)
    for name in names:
        col = np.ma.MaskedArray(np.empty(len(trials), dtype=object), mask=True)
        for i, t in enumerate(trials):
            if name in t.params:
                col[i] = t.params[name]
        results[f"param_{name}"] = col
    split = np.full((len(trials), n_splits), np.nan)
    for i, t in enumerate(trials):
        s = t.user_attrs.get("split_scores", [])[:n_splits]
        split[i, : len(s)] = s
    for j in range(n_splits):
        results[f"split{j}_test_score"] = split[:, j]
    complete = np.array([t.state == TrialState.COMPLETE for t in trials], dtype=bool)
    mean = np.array(
        [t.value if t.state == TrialState.COMPLETE else np.nan for t in trials], dtype=float
    )
    results["mean_test_score"] = mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(split, axis=1)
    results["std_test_score"] = np.where(complete, std, np.nan)
    order = np.where(np.isnan(mean), -np.inf, mean)
    results["rank_test_score"] = rankdata(-order, method="min").astype(np.int32)
    results["mean_fit_time"] = np.array(
        [np.mean(t.user_attrs.get("fit_times") or [np.nan]) for t in trials], dtype=float
    )
    run = np.array([t.user_attrs.get("epochs_run", 0) for t in trials], dtype=int)
    full = np.array([t.user_attrs.get("epochs_unpruned", 0) for t in trials], dtype=int)
    results["epochs_run"] = run
    results["epochs_unpruned"] = full
    results["params"] = [dict(t.params) for t in trials]
    n_trials = {
        state.name.lower(): int(sum(t.state == state for t in trials))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    best_trial = best_index = None
    if complete.any():
        best_trial = study.best_trial
        best_index = int(np.flatnonzero(results["number"] == best_trial.number)[0])
    return SearchResults(
        cv_results=results,
        epochs_run=int(run.sum()),
        epochs_unpruned=int(full.sum()),
        n_trials=n_trials,
        best_trial=best_trial,
        best_index=best_index,
    )
