"""Optuna search over transfer hyper-parameters inside scikit-learn cross-validation.

:class:`TransferSearchCV` tunes the freeze depth ``k``, the layer-wise learning-rate decay
``gamma``, the peak learning rate and the transfer strategy of a torch image estimator (by
default :class:`skrtl._finetune.FineTuneClassifier`) with Optuna:

* a cross-validated objective with any scikit-learn scorer, folds computed once per ``fit`` so
  that every trial sees exactly the same splits;
* a **fresh study per fit** when no storage is given (nested cross-validation does not leak
  trials from one outer fold into the next);
* pruning from per-epoch validation reports of the skorch training loop, with a step scheme
  that stays comparable across folds (see :class:`CVMedianPruner` and
  :class:`TransferSearchCV`);
* an optional RDB storage (SQLite file or any SQLAlchemy URL) so that several processes or
  machines add trials to one resumable study;
* ``best_params_``, ``best_estimator_`` (refit on all data), ``study_``, ``cv_results_`` and
  PNG plots (optimisation history, parameter importances, ``freeze_depth``-vs-``gamma``
  contour).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from sklearn.base import BaseEstimator, MetaEstimatorMixin, _fit_context, clone
from sklearn.metrics import check_scoring, get_scorer_names
from sklearn.model_selection import check_cv
from sklearn.utils import _safe_indexing, check_random_state, get_tags
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import _num_samples, check_is_fitted, indexable

__all__ = [
    "CVMedianPruner",
    "TransferSearchCV",
    "transfer_search_space",
]

# history keys tried (in this order) for pruning reports, with the sign that makes them
# "greater is better" like scikit-learn scorers (the study always maximises)
_MONITORS: tuple[tuple[str, float], ...] = (
    ("valid_auc", 1.0),
    ("valid_acc", 1.0),
    ("valid_loss", -1.0),
)
_CALLBACK_NAME = "skrtl_pruning"
_DEFAULT_STRATEGIES = ("finetune", "linear_probe")


# --------------------------------------------------------------------------------------------
# search space
# --------------------------------------------------------------------------------------------
def transfer_search_space(
    n_layers: int,
    *,
    strategies: tuple[str, ...] | list[str] = _DEFAULT_STRATEGIES,
    gamma: tuple[float, float] = (0.1, 1.0),
    lr: tuple[float, float] = (1e-4, 1e-2),
) -> Callable[[optuna.trial.BaseTrial], dict]:
    """Default search space of :class:`TransferSearchCV` for a network with ``n_layers`` layers.

    The space is *conditional*: the freeze depth and ``gamma`` only mean something when the
    backbone is fine-tuned, so they are sampled only for ``strategy="finetune"`` (a linear
    probe freezes everything but the classifier, a network trained from scratch freezes
    nothing), which keeps the sampler from spending trials on equivalent configurations.

    Parameters
    ----------
    n_layers : int
        Number ``L`` of transfer layers (:func:`skrtl.get_transfer_layers` of the network
        *with* its classifier). ``freeze_depth`` is drawn from ``0 .. L-1`` (``0`` = nothing
        frozen, ``L-1`` = everything but the classifier frozen).
    strategies : sequence of str, default=("finetune", "linear_probe")
        Values of the categorical ``strategy`` parameter (add ``"scratch"`` to compare with
        training from random weights). A single value fixes the strategy without sampling.
    gamma : (float, float), default=(0.1, 1.0)
        Bounds of the log-uniform layer-wise learning-rate decay.
    lr : (float, float), default=(1e-4, 1e-2)
        Bounds of the log-uniform peak learning rate ``alpha_max``.

    Returns
    -------
    callable
        ``space(trial) -> dict`` of estimator parameters, usable as ``param_distributions``.

    Examples
    --------
    >>> import optuna
    >>> space = transfer_search_space(10)
    >>> space(optuna.trial.FixedTrial({"strategy": "finetune", "freeze_depth": 3,
    ...                                "gamma": 0.5, "lr": 1e-3}))
    {'strategy': 'finetune', 'lr': 0.001, 'freeze_depth': 3, 'gamma': 0.5}
    """
    if not isinstance(n_layers, Integral) or n_layers < 1:
        raise ValueError(
            f"n_layers must be a positive integer (the number of transfer layers of the "
            f"backbone), got {n_layers!r}."
        )
    strategies = tuple(strategies)
    if not strategies:
        raise ValueError("strategies must name at least one strategy, got an empty sequence.")
    for name, bounds in (("gamma", gamma), ("lr", lr)):
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
            raise ValueError(
                f"{name} must be a pair (low, high) with 0 < low <= high, got {bounds!r}."
            )
    if not 0 < gamma[1] <= 1:
        raise ValueError(f"gamma bounds must lie in (0, 1], got {gamma!r}.")
    n_layers = int(n_layers)

    def space(trial: optuna.trial.BaseTrial) -> dict:
        if len(strategies) == 1:
            strategy = strategies[0]
        else:
            strategy = trial.suggest_categorical("strategy", list(strategies))
        params: dict[str, Any] = {"strategy": strategy}
        params["lr"] = trial.suggest_float("lr", lr[0], lr[1], log=True)
        if strategy == "finetune":
            params["freeze_depth"] = trial.suggest_int("freeze_depth", 0, max(n_layers - 1, 0))
            params["gamma"] = trial.suggest_float("gamma", gamma[0], gamma[1], log=True)
        return params

    space.n_layers = n_layers  # type: ignore[attr-defined]
    return space


def _n_layers_of(estimator) -> int:
    """Number of transfer layers of an (unfitted or fitted) torch image estimator."""
    n_layers = getattr(estimator, "n_layers_", None)
    if isinstance(n_layers, Integral) and n_layers > 0:
        return int(n_layers)
    params = estimator.get_params(deep=False)
    if "backbone" not in params:
        raise ValueError(
            f"param_distributions=None builds the default transfer space from the estimator's "
            f"backbone, but {type(estimator).__name__} has no 'backbone' parameter. Pass "
            "param_distributions explicitly: a dict of optuna distributions, e.g. "
            "{'freeze_depth': optuna.distributions.IntDistribution(0, 5)}, or a callable "
            "trial -> dict."
        )
    from ._backbone import get_transfer_layers, load_backbone

    backbone = params["backbone"]
    if isinstance(backbone, str):
        model = load_backbone(backbone, pretrained=False, num_classes=2)
    else:  # an nn.Module passed directly
        model = backbone
    return len(get_transfer_layers(model))


def _suggest_from_distributions(
    trial: optuna.trial.BaseTrial, distributions: Mapping[str, Any]
) -> dict:
    params = {}
    for name, dist in distributions.items():
        if isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, FloatDistribution):
            params[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, list | tuple):
            params[name] = trial.suggest_categorical(name, list(dist))
        else:  # pragma: no cover - validated in fit
            raise TypeError(name, dist)
    return params


def _check_distributions(distributions: Mapping[str, Any], estimator) -> None:
    valid = estimator.get_params(deep=True)
    for name, dist in distributions.items():
        if not isinstance(name, str):
            raise TypeError(
                f"param_distributions keys must be parameter names (str), got {name!r}."
            )
        if name not in valid:
            raise ValueError(
                f"param_distributions has the key {name!r}, which is not a parameter of "
                f"{type(estimator).__name__}. Valid parameters: {sorted(valid)}."
            )
        if isinstance(dist, BaseDistribution):
            if not isinstance(dist, IntDistribution | FloatDistribution | CategoricalDistribution):
                raise TypeError(
                    f"param_distributions[{name!r}]={dist!r} is not supported: use "
                    "optuna.distributions.IntDistribution, FloatDistribution or "
                    "CategoricalDistribution."
                )
        elif isinstance(dist, list | tuple):
            if len(dist) == 0:
                raise ValueError(f"param_distributions[{name!r}] is an empty list of choices.")
        else:
            raise TypeError(
                f"param_distributions[{name!r}]={dist!r} must be an optuna distribution "
                "(IntDistribution, FloatDistribution, CategoricalDistribution) or a list of "
                "choices."
            )


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------
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


def _make_callback(reporter: _FoldReporter):
    from skorch.callbacks import Callback

    class _OptunaPruning(Callback):
        """Reports completed epochs to the trial; raises ``optuna.TrialPruned``.

        A history row is complete (all scoring callbacks have written to it) only at the
        next ``on_epoch_begin`` or at ``on_train_end``, whatever the order of the estimator's
        own callbacks, so the report happens there; no training happens in between.
        """

        def __init__(self, reporter=None):
            self.reporter = reporter

        def __deepcopy__(self, memo):  # a per-fit hook: clones share the live reporter
            return self

        def on_epoch_begin(self, net, **kwargs):
            if len(net.history) >= 2:
                self.reporter.report(net.history[-2])

        def on_epoch_end(self, net, **kwargs):
            self.reporter.n_epochs += 1

        def on_train_end(self, net, **kwargs):
            if len(net.history) >= 1:
                self.reporter.report(net.history[-1])

    return _OptunaPruning(reporter)


class _FoldReporter:
    """Per-fold state shared between the objective and the skorch callback."""

    def __init__(self, trial, fold: int, stride: int, monitor: str | None):
        self.trial = trial
        self.fold = fold
        self.stride = stride
        self.monitor = monitor
        self.n_epochs = 0
        self.n_reports = 0
        self.reported: set[int] = set()
        self.pruned = False

    def _value(self, row: Mapping) -> tuple[str, float] | None:
        if self.monitor is not None:
            key = self.monitor.lstrip("-")
            sign = -1.0 if self.monitor.startswith("-") or key.endswith("loss") else 1.0
            if key in row and row[key] is not None:
                return self.monitor, sign * float(row[key])
            return None
        for key, sign in _MONITORS:
            if key in row and row[key] is not None:
                return key, sign * float(row[key])
        return None

    def report(self, row: Mapping) -> None:
        epoch = int(row.get("epoch", len(self.reported) + 1)) - 1  # skorch counts from 1
        if epoch in self.reported or epoch >= self.stride or self.pruned:
            return
        found = self._value(row)
        if found is None:
            return
        self.monitor = found[0] if self.monitor is None else self.monitor
        self.reported.add(epoch)
        self.n_reports += 1
        self.trial.report(found[1], self.fold * self.stride + epoch)
        if self.trial.should_prune():
            self.pruned = True
            raise optuna.TrialPruned(
                f"pruned at fold {self.fold}, epoch {epoch + 1} ({self.monitor}={found[1]:.4g})"
            )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@contextmanager
def _optuna_verbosity(verbose: int):
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose >= 2 else optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


def _index_params(params: Mapping, indices: np.ndarray, n_samples: int) -> dict:
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


def _estimator_has(attr: str):
    def check(self):
        if hasattr(self, "best_estimator_"):
            getattr(self.best_estimator_, attr)
            return True
        getattr(self.estimator, attr)
        return True

    return check


def _json_safe(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return repr(value)


# --------------------------------------------------------------------------------------------
# the search estimator
# --------------------------------------------------------------------------------------------
class TransferSearchCV(MetaEstimatorMixin, BaseEstimator):
    """Optuna search of transfer hyper-parameters with cross-validation and pruning.

    Every trial clones ``estimator``, sets the sampled parameters and fits it on each
    training fold in turn, scoring the matching test fold with ``scoring``; the trial's value
    is the mean test score (greater is better, like scikit-learn). The best parameters are
    then refit on all the data.

    **Pruning under cross-validation.** When the estimator has a ``callbacks`` parameter
    (skorch-based estimators, :class:`~skrtl._finetune.FineTuneClassifier`) a skorch
    callback is appended for every fold. After each epoch it reports the epoch's validation
    metric (the first of ``valid_auc``, ``valid_acc``, ``-valid_loss`` present in the skorch
    history, or ``pruning_metric``) to the trial at step

        ``step = fold_index * epochs_per_fold + epoch``  (epoch 0-based),

    where ``epochs_per_fold`` is the estimator's ``max_epochs`` (the upper bound of a
    searched ``max_epochs`` distribution). Why this scheme: Optuna pruners compare the
    values of different trials *at the same step*, and an Optuna step can be reported only
    once, so the folds cannot share steps. Since the folds are computed once per ``fit`` and
    run in the same order in every trial, a step denotes the same training data and the
    same number of epochs in every trial, so each comparison is like for like (reporting a
    running mean over folds instead would compare fold 0 of one trial with a mix of folds of
    another when training stops early). ``"hyperband"`` compares values at the rung step,
    which fits this scheme directly; ``"median"`` uses :class:`CVMedianPruner`, which
    restricts Optuna's median rule to the current fold (Optuna's ``MedianPruner`` compares a
    trial's best value over *all* earlier steps, which would mix folds). The pruned trial's
    remaining epochs and folds are skipped. Estimators without ``callbacks`` (or whose
    history has none of the metrics) report each fold's test score instead, at the last step
    of the fold, so pruning then works between folds.

    **Studies.** With ``storage=None`` each call to ``fit`` creates a new in-memory study
    (``study_``), never reusing one from an earlier fit: nested cross-validation (for
    example ``cross_val_score(TransferSearchCV(...), X, y)``) is leak-free. With a storage
    URL (``"sqlite:///search.db"`` or any SQLAlchemy RDB URL such as
    ``"postgresql://user:pw@host/db"``) the study lives in the database: with a
    ``study_name`` and ``load_if_exists=True`` a later ``fit`` (or another process or
    machine running the same code on the same data) continues the same study, every
    process runs ``n_trials`` *new* trials, and ``best_params_`` / ``cv_results_`` cover all
    trials of the study, whoever ran them. Use a fixed ``study_name`` only for one
    data set: never inside nested cross-validation.

    Parameters
    ----------
    estimator : estimator object
        Estimator to tune, typically :class:`~skrtl._finetune.FineTuneClassifier`.
    param_distributions : dict, callable or None, default=None
        Search space. A dict maps parameter names to
        :class:`optuna.distributions.IntDistribution`, ``FloatDistribution``,
        ``CategoricalDistribution`` or a list of choices. A callable ``space(trial) -> dict``
        may use ``trial.suggest_*`` freely (conditional spaces). ``None`` uses
        :func:`transfer_search_space` for the estimator's backbone: ``strategy`` in
        ``("finetune", "linear_probe")``, log-uniform ``lr`` in [1e-4, 1e-2] and, when fine
        tuning, ``freeze_depth`` in ``0..L-1`` and log-uniform ``gamma`` in [0.1, 1].
    n_trials : int or None, default=20
        Trials run by this ``fit`` (per process; with a shared storage the study grows by
        ``n_trials`` per worker). ``None`` runs until ``timeout``.
    timeout : float or None, default=None
        Stop starting new trials after this many seconds.
    cv : int, cross-validation generator or iterable, default=None
        As in scikit-learn (``None`` = 5-fold, stratified for classifiers). The splits are
        materialised once per fit and shared by all trials.
    scoring : str, callable or None, default=None
        Scorer of the objective (``None`` = the estimator's ``score``).
    refit : bool, default=True
        Refit the best parameters on all data as ``best_estimator_``.
    pruner : {"median", "hyperband"}, optuna pruner or None, default="median"
        ``"median"``: :class:`CVMedianPruner` (5 startup trials, 1 warm-up epoch per fold);
        ``"hyperband"``: ``optuna.pruners.HyperbandPruner(min_resource=1,
        max_resource=n_folds * epochs_per_fold)``; ``None``: no pruning. A pruner instance is
        copied at every fit (a :class:`CVMedianPruner` without ``epochs_per_fold`` gets it).
    sampler : optuna sampler or None, default=None
        ``None`` uses ``optuna.samplers.TPESampler(seed=random_state)``. An instance is
        deep-copied at every fit, so repeated fits start from the same sampler state.
    random_state : int, RandomState instance or None, default=None
        Seed of the default sampler (a RandomState draws one integer seed). It does not seed
        the estimator: set the estimator's own ``random_state`` for reproducible training.
    storage : str, optuna storage or None, default=None
        ``None``: in-memory study, new at every fit. A URL such as ``"sqlite:///path.db"`` or
        an RDB URL: persistent, shareable between processes and machines. SQLite URLs get a
        60 s lock timeout. Prefer URLs to storage objects: the estimator stays clonable.
    study_name : str or None, default=None
        Name of the study in ``storage`` (``None``: a new unique name per fit).
    load_if_exists : bool, default=False
        With ``storage``, continue the study ``study_name`` if it exists (resume /
        multi-process work) instead of raising an error.
    n_jobs : int or None, default=None
        Trials run in parallel threads of this process (Optuna's ``n_jobs``; ``-1`` = CPU
        count). With ``n_jobs > 1`` the sampled sequence is no longer deterministic. For
        several processes or machines use a shared ``storage``.
    plots_dir : str, path or None, default=None
        When given, :meth:`save_plots` writes the PNG plots there after fitting.
    pruning_metric : str or None, default=None
        History key reported for pruning (prefix ``-`` or a name ending in ``loss`` means
        lower is better). ``None`` tries ``valid_auc``, ``valid_acc``, ``valid_loss``.
    error_score : "raise" or float, default=np.nan
        Value of a fold whose fit or scoring raised (with a warning). A NaN trial value is
        recorded by Optuna as a failed trial and the search goes on; ``"raise"`` stops it.
    verbose : int, default=0
        0: silent; 1: progress bar; 2: also Optuna's per-trial log lines.

    Attributes
    ----------
    study_ : optuna.Study
        The study of this fit (all its trials when a shared storage is used).
    best_params_ : dict
        Estimator parameters of the best completed trial.
    best_score_ : float
        Its mean cross-validated score.
    best_index_ : int
        Its row in ``cv_results_``.
    best_trial_ : optuna.trial.FrozenTrial
        The best trial.
    best_estimator_ : estimator
        Clone of ``estimator`` with ``best_params_`` fitted on all data (``refit=True``).
    cv_results_ : dict of numpy arrays
        One entry per trial of the study (``number``, ``state``, ``param_<name>``,
        ``split<i>_test_score``, ``mean_test_score``, ``std_test_score``,
        ``rank_test_score``, ``mean_fit_time``, ``epochs_run``, ``epochs_unpruned``,
        ``params``), loadable with ``pandas.DataFrame(cv_results_)``.
    epochs_run_ : int
        Epochs trained by the trials of this study (NaN-free counts; trials of other
        processes included).
    epochs_unpruned_ : int
        Epochs the same trials would have trained without pruning (pruned folds and the
        skipped folds counted at ``max_epochs``; an upper bound if the estimator stops
        early by itself).
    pruned_epoch_fraction_ : float
        ``1 - epochs_run_ / epochs_unpruned_``: the fraction of training saved by pruning.
    n_trials_ : dict
        Number of ``complete``, ``pruned`` and ``fail`` trials in the study.
    n_splits_ : int
        Number of folds.
    epochs_per_fold_ : int
        Step stride of the pruning reports.
    scorer_ : callable
        The scorer used.
    refit_time_ : float
        Seconds spent refitting the best estimator.
    plot_paths_ : dict
        Written PNG files (when ``plots_dir`` is given).

    See Also
    --------
    sklearn.model_selection.RandomizedSearchCV : exhaustive-free search without pruning.

    Examples
    --------
    >>> import optuna
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> search = TransferSearchCV(
    ...     LogisticRegression(max_iter=2000),
    ...     param_distributions={"C": optuna.distributions.FloatDistribution(1e-3, 1e2, log=True)},
    ...     n_trials=5, cv=3, scoring="roc_auc", random_state=0,
    ... ).fit(X, y)
    >>> sorted(search.best_params_)
    ['C']
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit"])],
        "param_distributions": [dict, callable, None],
        "n_trials": [Interval(Integral, 1, None, closed="left"), None],
        "timeout": [Interval(Real, 0, None, closed="neither"), None],
        "cv": ["cv_object"],
        "scoring": [StrOptions(set(get_scorer_names())), callable, None],
        "refit": ["boolean"],
        "pruner": [StrOptions({"median", "hyperband"}), BasePruner, None],
        "sampler": [BaseSampler, None],
        "random_state": ["random_state"],
        "storage": [str, BaseStorage, None],
        "study_name": [str, None],
        "load_if_exists": ["boolean"],
        "n_jobs": [Integral, None],
        "plots_dir": [str, os.PathLike, None],
        "pruning_metric": [str, None],
        "error_score": [StrOptions({"raise"}), Real],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimator,
        *,
        param_distributions=None,
        n_trials=20,
        timeout=None,
        cv=None,
        scoring=None,
        refit=True,
        pruner="median",
        sampler=None,
        random_state=None,
        storage=None,
        study_name=None,
        load_if_exists=False,
        n_jobs=None,
        plots_dir=None,
        pruning_metric=None,
        error_score=np.nan,
        verbose=0,
    ):
        self.estimator = estimator
        self.param_distributions = param_distributions
        self.n_trials = n_trials
        self.timeout = timeout
        self.cv = cv
        self.scoring = scoring
        self.refit = refit
        self.pruner = pruner
        self.sampler = sampler
        self.random_state = random_state
        self.storage = storage
        self.study_name = study_name
        self.load_if_exists = load_if_exists
        self.n_jobs = n_jobs
        self.plots_dir = plots_dir
        self.pruning_metric = pruning_metric
        self.error_score = error_score
        self.verbose = verbose

    # ---------------------------------------------------------------- sklearn plumbing
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        sub = get_tags(self.estimator)
        tags.estimator_type = sub.estimator_type
        tags.classifier_tags = copy.deepcopy(sub.classifier_tags)
        tags.regressor_tags = copy.deepcopy(sub.regressor_tags)
        tags.input_tags.pairwise = sub.input_tags.pairwise
        tags.input_tags.sparse = sub.input_tags.sparse
        tags.input_tags.allow_nan = sub.input_tags.allow_nan
        tags.non_deterministic = sub.non_deterministic
        return tags

    @property
    def classes_(self):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.classes_

    @property
    def n_features_in_(self):
        if not hasattr(self, "best_estimator_"):
            raise AttributeError(
                f"{type(self).__name__} has no attribute 'n_features_in_' before fit with "
                "refit=True."
            )
        return self.best_estimator_.n_features_in_

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "study_")

    # ---------------------------------------------------------------- fit
    def _space(self):
        space = self.param_distributions
        if space is None:
            return transfer_search_space(_n_layers_of(self.estimator))
        if callable(space):
            return space
        _check_distributions(space, self.estimator)
        return lambda trial: _suggest_from_distributions(trial, space)

    def _epochs_per_fold(self) -> int | None:
        params = self.estimator.get_params(deep=False)
        max_epochs = params.get("max_epochs")
        if isinstance(self.param_distributions, Mapping):
            dist = self.param_distributions.get("max_epochs")
            if isinstance(dist, IntDistribution):
                max_epochs = dist.high
            elif isinstance(dist, CategoricalDistribution | list | tuple):
                choices = dist.choices if isinstance(dist, CategoricalDistribution) else dist
                max_epochs = max(choices)
        if isinstance(max_epochs, Integral) and max_epochs > 0:
            return int(max_epochs)
        return None

    def _make_pruner(self, n_splits: int, stride: int) -> BasePruner:
        if self.pruner is None:
            return optuna.pruners.NopPruner()
        if self.pruner == "median":
            return CVMedianPruner(epochs_per_fold=stride)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=max(n_splits * stride, 1), reduction_factor=3
            )
        pruner = copy.deepcopy(self.pruner)
        if isinstance(pruner, CVMedianPruner) and pruner.epochs_per_fold is None:
            pruner.epochs_per_fold = stride
        return pruner

    def _make_sampler(self) -> BaseSampler:
        if self.sampler is not None:
            return copy.deepcopy(self.sampler)
        seed = self.random_state
        if seed is not None and not isinstance(seed, Integral):
            seed = int(check_random_state(seed).randint(np.iinfo(np.int32).max))
        return optuna.samplers.TPESampler(seed=seed)

    def _make_storage(self):
        storage = self.storage
        if isinstance(storage, str) and storage.startswith("sqlite"):
            return optuna.storages.RDBStorage(
                storage, engine_kwargs={"connect_args": {"timeout": 60}}
            )
        return storage

    def _create_study(self, pruner, sampler) -> optuna.Study:
        if self.storage is None and (self.study_name is not None or self.load_if_exists):
            warnings.warn(
                "study_name / load_if_exists have no effect with storage=None: every fit "
                "creates a new in-memory study. Pass storage='sqlite:///search.db' (or an RDB "
                "URL) to resume or share a study.",
                UserWarning,
                stacklevel=3,
            )
        storage = None
        for attempt in range(5):
            try:
                # workers starting together may race to create the tables: retry
                storage = self._make_storage()
                study = optuna.create_study(
                    storage=storage,
                    sampler=sampler,
                    pruner=pruner,
                    study_name=self.study_name if storage is not None else None,
                    direction="maximize",
                    load_if_exists=bool(self.load_if_exists) and storage is not None,
                )
                break
            except optuna.exceptions.DuplicatedStudyError as exc:
                raise ValueError(
                    f"storage already holds a study named study_name={self.study_name!r}. "
                    "Pass load_if_exists=True to continue it (resume / several workers), or "
                    "choose another study_name."
                ) from exc
            except Exception as exc:
                if attempt == 4 or "sqlalchemy" not in type(exc).__module__:
                    raise
                time.sleep(0.2 + 0.5 * attempt + 0.3 * np.random.default_rng().random())
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ValueError(
                f"The existing study {study.study_name!r} minimises; TransferSearchCV needs a "
                "maximised study (scikit-learn scores are greater-is-better)."
            )
        return study

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, *, groups=None, **fit_params):
        """Run the search, then refit the best parameters on all data.

        Parameters
        ----------
        X : array-like or image frame
            Training data (``(n, H, W)`` / ``(n, H, W, C)`` arrays, an image frame from
            :func:`skrtl.make_image_frame`, or any data ``estimator`` accepts).
        y : array-like of shape (n_samples,), default=None
            Targets.
        groups : array-like of shape (n_samples,), default=None
            Group labels for group-aware ``cv`` splitters.
        **fit_params : dict
            Passed to ``estimator.fit`` (sample-aligned values are split with the folds).

        Returns
        -------
        self : TransferSearchCV
            Fitted search.
        """
        if self.n_trials is None and self.timeout is None:
            raise ValueError(
                "n_trials=None and timeout=None would search forever. Set n_trials (e.g. 20) "
                "or timeout (seconds)."
            )
        for attr in ("best_estimator_", "plot_paths_"):
            if hasattr(self, attr):
                delattr(self, attr)
        X, y, groups = indexable(X, y, groups)
        n_samples = _num_samples(X)
        space = self._space()
        self.scorer_ = check_scoring(self.estimator, scoring=self.scoring)
        is_clf = get_tags(self.estimator).estimator_type == "classifier"
        cv = check_cv(self.cv, y, classifier=is_clf)
        splits = [(np.asarray(tr), np.asarray(te)) for tr, te in cv.split(X, y, groups)]
        self.n_splits_ = len(splits)
        has_callbacks = "callbacks" in self.estimator.get_params(deep=False)
        stride = self._epochs_per_fold() if has_callbacks else None
        self.epochs_per_fold_ = stride if stride is not None else 1
        stride = self.epochs_per_fold_
        pruner = self._make_pruner(self.n_splits_, stride)
        self._fold_errors: list[BaseException] = []
        objective = self._make_objective(
            X, y, space, splits, fit_params, n_samples, has_callbacks, stride
        )
        from tqdm.auto import tqdm

        with _optuna_verbosity(int(self.verbose)):
            study = self._create_study(pruner, self._make_sampler())
        study.set_user_attr("n_splits", self.n_splits_)
        self.study_ = study
        with (
            _optuna_verbosity(int(self.verbose)),
            tqdm(total=self.n_trials, desc="TransferSearchCV", disable=not self.verbose) as bar,
        ):

            def progress(study_, frozen):
                bar.update(1)
                try:
                    bar.set_postfix(best=f"{study_.best_value:.4f}", refresh=False)
                except ValueError:
                    pass

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    objective,
                    n_trials=self.n_trials,
                    timeout=self.timeout,
                    n_jobs=1 if self.n_jobs is None else int(self.n_jobs),
                    callbacks=[progress],
                    catch=(),
                )

        errors = self.__dict__.pop("_fold_errors")
        self._collect_results(study, space, errors)
        if self.refit:
            params = self.best_params_
            est = clone(self.estimator).set_params(**params)
            t0 = time.perf_counter()
            est.fit(X, y, **fit_params)
            self.refit_time_ = time.perf_counter() - t0
            self.best_estimator_ = est
        if self.plots_dir is not None:
            self.plot_paths_ = self.save_plots(self.plots_dir)
        return self

    def _make_objective(self, X, y, space, splits, fit_params, n_samples, has_callbacks, stride):
        scorer = self.scorer_
        error_score = self.error_score
        monitor = self.pruning_metric
        errors = self._fold_errors

        def objective(trial: optuna.Trial) -> float:
            params = space(trial)
            if not isinstance(params, Mapping):
                raise TypeError(
                    f"param_distributions(trial) must return a dict of estimator parameters, "
                    f"got {type(params).__name__}."
                )
            base = clone(self.estimator).set_params(**params)
            max_epochs = base.get_params(deep=False).get("max_epochs")
            per_fold_full = int(max_epochs) if isinstance(max_epochs, Integral) else None
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            scores: list[float] = []
            fit_times: list[float] = []
            epochs_run = 0
            epochs_full = 0
            pruned = False
            try:
                for fold, (train, test) in enumerate(splits):
                    est = clone(base)
                    reporter = _FoldReporter(trial, fold, stride, monitor)
                    if has_callbacks:
                        callbacks = list(est.get_params(deep=False).get("callbacks") or [])
                        callbacks.append((_CALLBACK_NAME, _make_callback(reporter)))
                        est.set_params(callbacks=callbacks)
                    X_train, y_train = _safe_indexing(X, train), _safe_indexing(y, train)
                    t0 = time.perf_counter()
                    try:
                        est.fit(X_train, y_train, **_index_params(fit_params, train, n_samples))
                        fit_times.append(time.perf_counter() - t0)
                        score = float(
                            scorer(est, _safe_indexing(X, test), _safe_indexing(y, test))
                        )
                    except optuna.TrialPruned:
                        pruned = True
                        raise
                    except Exception as exc:
                        if reporter.pruned:  # the estimator wrapped our TrialPruned
                            pruned = True
                            raise optuna.TrialPruned(str(exc)) from exc
                        if isinstance(error_score, str):
                            raise
                        errors.append(exc)
                        warnings.warn(
                            f"Trial {trial.number}, fold {fold}: fitting or scoring failed "
                            f"({type(exc).__name__}: {exc}); its score is set to "
                            f"error_score={error_score!r}.",
                            UserWarning,
                            stacklevel=2,
                        )
                        score = float(error_score)
                    finally:
                        epochs_run += reporter.n_epochs
                        if pruned:
                            remaining = len(splits) - fold
                            if per_fold_full is not None:
                                epochs_full += remaining * per_fold_full
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
                trial.set_user_attr(
                    "estimator_params", {k: _json_safe(v) for k, v in params.items()}
                )
            return float(np.mean(scores))

        return objective

    def _collect_results(self, study: optuna.Study, space, errors: list) -> None:
        trials = study.get_trials(deepcopy=False)
        n_splits = self.n_splits_
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
        # ranks as in scikit-learn (1 = best, ties share the lowest rank), unscored trials last
        from scipy.stats import rankdata

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
        self.cv_results_ = results
        self.epochs_run_ = int(run.sum())
        self.epochs_unpruned_ = int(full.sum())
        self.pruned_epoch_fraction_ = (
            1.0 - self.epochs_run_ / self.epochs_unpruned_ if self.epochs_unpruned_ else 0.0
        )
        self.n_trials_ = {
            state.name.lower(): int(sum(t.state == state for t in trials))
            for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        if not complete.any() and errors:
            # every trial failed: re-raise the first underlying error (type and message kept)
            first = errors[0]
            if hasattr(first, "add_note"):
                first.add_note(
                    f"TransferSearchCV: all {len(trials)} trials failed ({len(errors)} fold "
                    "fits or scores raised); this is the first error."
                )
            raise first
        if not complete.any():
            raise ValueError(
                f"No trial of study {study.study_name!r} completed ({self.n_trials_}). Check "
                "the warnings of failed folds, relax the pruner (pruner=None) or raise "
                "n_trials / timeout."
            )
        best = study.best_trial
        self.best_trial_ = best
        self.best_index_ = int(np.flatnonzero(results["number"] == best.number)[0])
        self.best_score_ = float(best.value)
        self.best_params_ = dict(space(optuna.trial.FixedTrial(best.params)))

    # ---------------------------------------------------------------- results
    def trials_dataframe(self, **kwargs):
        """All trials of ``study_`` as a pandas DataFrame (``Study.trials_dataframe``).

        Parameters
        ----------
        **kwargs : dict
            Passed to :meth:`optuna.study.Study.trials_dataframe` (``attrs``, ``multi_index``).

        Returns
        -------
        pandas.DataFrame
        """
        check_is_fitted(self, "study_")
        return self.study_.trials_dataframe(**kwargs)

    def save_plots(self, plots_dir, *, dpi: int = 100) -> dict[str, Path]:
        """Write the optimisation plots of ``study_`` as PNG files.

        Writes ``optimization_history.png``, ``param_importances.png`` (skipped, with a
        warning, with fewer than two completed trials or nothing to rank) and
        ``contour_freeze_depth_gamma.png`` (skipped when these two parameters were not both
        searched).

        Parameters
        ----------
        plots_dir : str or path
            Folder, created if needed.
        dpi : int, default=100
            Resolution of the PNG files.

        Returns
        -------
        dict of str to pathlib.Path
            Plot name -> written file.
        """
        check_is_fitted(self, "study_")
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        out = Path(plots_dir)
        out.mkdir(parents=True, exist_ok=True)
        study = self.study_
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        names = set().union(*(t.params for t in completed)) if completed else set()
        jobs: list[tuple[str, Callable]] = [
            ("optimization_history", lambda: ovm.plot_optimization_history(study))
        ]
        if len(completed) >= 2:
            jobs.append(("param_importances", lambda: ovm.plot_param_importances(study)))
        else:
            warnings.warn(
                f"Skipping the parameter-importance plot: {len(completed)} completed trial(s), "
                "at least 2 are needed.",
                UserWarning,
                stacklevel=2,
            )
        if {"freeze_depth", "gamma"} <= names:
            jobs.append(
                (
                    "contour_freeze_depth_gamma",
                    lambda: ovm.plot_contour(study, params=["freeze_depth", "gamma"]),
                )
            )
        paths: dict[str, Path] = {}
        for name, make in jobs:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                try:
                    ax = make()
                except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                    warnings.warn(
                        f"Skipping the {name} plot ({type(exc).__name__}: {exc}).",
                        UserWarning,
                        stacklevel=2,
                    )
                    continue
            fig = np.ravel(ax)[0].figure if isinstance(ax, np.ndarray) else ax.figure
            path = out / f"{name}.png"
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
            plt.close(fig)
            paths[name] = path
        return paths

    # ---------------------------------------------------------------- delegation
    def _check_refit(self, method: str):
        check_is_fitted(self, "study_")
        if not hasattr(self, "best_estimator_"):
            raise AttributeError(
                f"{method} needs the refitted best estimator, but refit=False. Fit with "
                "refit=True, or build the model yourself from best_params_."
            )

    @available_if(_estimator_has("predict"))
    def predict(self, X):
        """Predict with ``best_estimator_``."""
        self._check_refit("predict")
        return self.best_estimator_.predict(X)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities from ``best_estimator_``."""
        self._check_refit("predict_proba")
        return self.best_estimator_.predict_proba(X)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """Log class probabilities from ``best_estimator_``."""
        self._check_refit("predict_log_proba")
        return self.best_estimator_.predict_log_proba(X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        """Decision function of ``best_estimator_``."""
        self._check_refit("decision_function")
        return self.best_estimator_.decision_function(X)

    @available_if(_estimator_has("transform"))
    def transform(self, X):
        """Transform with ``best_estimator_``."""
        self._check_refit("transform")
        return self.best_estimator_.transform(X)

    @available_if(_estimator_has("score"))
    def score(self, X, y=None):
        """Score ``best_estimator_`` on ``X, y`` with the search's scorer.

        Parameters
        ----------
        X : array-like or image frame
        y : array-like, default=None

        Returns
        -------
        float
        """
        self._check_refit("score")
        return float(self.scorer_(self.best_estimator_, X, y))
