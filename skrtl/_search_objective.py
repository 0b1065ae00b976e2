"""The cross-validated objective of :class:`~skrtl.TransferSearchCV`: one trial, every fold."""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from numbers import Integral

import numpy as np
import optuna
from sklearn.base import clone
from sklearn.utils import _safe_indexing
from sklearn.utils.validation import _num_samples

from ._callbacks import FoldReporter, OptunaPruning
from .utils import index_params

__all__ = ["PRUNING_CALLBACK", "CVObjective"]

#: Name of the pruning callback appended to the estimator's ``callbacks``.
PRUNING_CALLBACK = "skrtl_pruning"


def _json_safe(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return repr(value)


class CVObjective:
    """Optuna objective: fit a clone with the trial's parameters on every training fold.

    The trial's value is the mean test score over the folds (greater is better). Per-epoch
    validation metrics are reported for pruning through :class:`~skrtl._callbacks.
    OptunaPruning` when the estimator has a ``callbacks`` parameter; otherwise each fold's test
    score is reported at the last step of the fold. Fold fits that raise get ``error_score``
    (with a warning) unless it is ``"raise"``; their exceptions are collected in ``errors``.

    Parameters
    ----------
    estimator : estimator
    X, y : data
    space : callable
        ``space(trial) -> dict`` of estimator parameters.
    splits : list of (train, test) index arrays
    fit_params, score_params : dict
        Passed to ``fit`` / the scorer (sample-aligned values are split with the folds).
    scorer : callable
    has_callbacks : bool
        Whether the estimator takes skorch ``callbacks`` (per-epoch reports).
    stride : int
        Steps per fold in the trial's reports.
    monitor : str or None
        History key reported for pruning.
    error_score : "raise" or float
    """

    def __init__(
        self,
        estimator,
        X,
        y,
        *,
        space: Callable,
        splits: list,
        fit_params: Mapping,
        score_params: Mapping,
        scorer: Callable,
        has_callbacks: bool,
        stride: int,
        monitor: str | None,
        error_score,
    ):
        self.estimator = estimator
        self.X = X
        self.y = y
        self.space = space
        self.splits = splits
        self.fit_params = dict(fit_params)
        self.score_params = dict(score_params)
        self.scorer = scorer
        self.has_callbacks = has_callbacks
        self.stride = stride
        self.monitor = monitor
        self.error_score = error_score
        self.n_samples = _num_samples(X)
        self.errors: list[BaseException] = []

    def _fold(self, base, trial, fold: int, train, test, reporter: FoldReporter) -> float:
        est = clone(base)
        if self.has_callbacks:
            callbacks = list(est.get_params(deep=False).get("callbacks") or [])
            callbacks.append((PRUNING_CALLBACK, OptunaPruning(reporter)))
            est.set_params(callbacks=callbacks)
        X, y = self.X, self.y
        X_train = _safe_indexing(X, train)
        y_train = None if y is None else _safe_indexing(y, train)
        est.fit(X_train, y_train, **index_params(self.fit_params, train, self.n_samples))
        X_test = _safe_indexing(X, test)
        y_test = None if y is None else _safe_indexing(y, test)
        return float(
            self.scorer(
                est, X_test, y_test, **index_params(self.score_params, test, self.n_samples)
            )
        )

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.space(trial)
        if not isinstance(params, Mapping):
            raise TypeError(
                f"param_distributions(trial) must return a dict of estimator parameters, "
                f"got {type(params).__name__}."
            )
        base = clone(self.estimator).set_params(**params)
        max_epochs = base.get_params(deep=False).get("max_epochs")
        per_fold_full = int(max_epochs) if isinstance(max_epochs, Integral) else None
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        stride, splits = self.stride, self.splits
        scores: list[float] = []
        fit_times: list[float] = []
        epochs_run = 0
        epochs_full = 0
        pruned = False
        try:
            for fold, (train, test) in enumerate(splits):
                reporter = FoldReporter(trial, fold, stride, self.monitor)
                t0 = time.perf_counter()
                try:
                    score = self._fold(base, trial, fold, train, test, reporter)
                    fit_times.append(time.perf_counter() - t0)
                except optuna.TrialPruned:
                    pruned = True
                    raise
                except Exception as exc:
                    if reporter.pruned:  # the estimator wrapped our TrialPruned
                        pruned = True
                        raise optuna.TrialPruned(str(exc)) from exc
                    if isinstance(self.error_score, str):
                        raise
                    self.errors.append(exc)
                    warnings.warn(
                        f"Trial {trial.number}, fold {fold}: fitting or scoring failed "
                        f"({type(exc).__name__}: {exc}); its score is set to "
                        f"error_score={self.error_score!r}.",
                        UserWarning,
                        stacklevel=2,
                    )
                    score = float(self.error_score)
                finally:
                    epochs_run += reporter.n_epochs
                    if pruned:
                        if per_fold_full is not None:
                            epochs_full += (len(splits) - fold) * per_fold_full
                    else:
                        epochs_full += reporter.n_epochs
                scores.append(score)
                if reporter.n_reports == 0 and not math.isnan(score):
                    # no per-epoch metric: prune between folds on the fold's test score
                    trial.report(score, fold * stride + stride - 1)
                    if trial.should_prune():
                        pruned = True
                        if per_fold_full is not None:
                            epochs_full += (len(splits) - fold - 1) * per_fold_full
                        raise optuna.TrialPruned(f"pruned after fold {fold}")
        finally:
            trial.set_user_attr("split_scores", [float(s) for s in scores])
            trial.set_user_attr("fit_times", fit_times)
            trial.set_user_attr("epochs_run", int(epochs_run))
            trial.set_user_attr("epochs_unpruned", int(max(epochs_full, epochs_run)))
            trial.set_user_attr("estimator_params", {k: _json_safe(v) for k, v in params.items()})
        return float(np.mean(scores))
